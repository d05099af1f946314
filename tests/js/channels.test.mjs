// Unit tests of several channels on one stream in static/realtime.js: subscribe({channels}),
// add() and remove(), per-channel data, closeOnRunEnd per channel, channel handles.
// `node --test tests/js/`.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { renderText, subscribe } from "../../static/realtime.js";
import { FakeElement, FakeEventSource, cursorOf, envelope, jsonResponse, settle, testEnv } from "./fakes.mjs";

const REPORT = ["status", "log", "run"];

/** A several-channel subscription whose token function records what it is asked for. */
function hub(channels = {}, options = {}, envOverrides = {}) {
  const { env, timers } = testEnv(envOverrides);
  const asked = [];
  const sub = subscribe({
    channels,
    token: async (request) => {
      asked.push(request);
      return { token: `t${asked.length}`, channels: request.channels, expires_at: null };
    },
    env,
    ...options,
  });
  return { sub, asked, env, timers };
}

const on = (channel, topic, data, id) => envelope(topic, data, { channel, ...(id ? { id } : {}) });

function deliver(es, message) {
  es.emit(message.topic, message, cursorOf(message));
}

function params(url) {
  const search = new URL(url, "http://localhost").searchParams;
  return { token: search.get("token"), last_event_id: search.get("last_event_id"), since: search.get("since") };
}

describe("subscribe({channels})", () => {
  test("one stream for every channel; each channel's data apart; nothing mixed at the top level", async () => {
    const { sub, asked } = hub({ "run.1": REPORT, "run.2": REPORT });
    await settle();
    assert.deepEqual(asked, [{ channels: { "run.1": REPORT, "run.2": REPORT } }]);
    assert.equal(FakeEventSource.instances.length, 1);
    const es = FakeEventSource.last;
    assert.deepEqual(params(es.url), { token: "t1", last_event_id: null, since: null });
    es.open();

    const a = on("run.1", "status", { percent: 10 });
    const b = on("run.2", "run", { status: "running" });
    const c = on("run.1", "log", { message: "hi" });
    for (const message of [a, b, c]) deliver(es, message);

    assert.deepEqual(sub.channels["run.1"].messages, [a, c]);
    assert.deepEqual(sub.channels["run.1"].latestByTopic, { status: a, log: c });
    assert.equal(sub.channels["run.1"].runStatus, null);
    assert.deepEqual(sub.channels["run.2"].latest, b);
    assert.equal(sub.channels["run.2"].runStatus, "running");
    assert.equal(sub.lastEventId, cursorOf(c), "one cursor for all");
    assert.deepEqual([sub.latest, sub.messages, sub.runStatus, sub.channel, sub.topics], [null, [], null, null, null]);
    assert.equal(sub.snapshot.channels, sub.channels);
  });

  test("a channel's view is replaced only when that channel changes", () => {
    const { sub } = hub({ "run.1": REPORT, "run.2": REPORT }, { token: "fixed" });
    const es = FakeEventSource.last;
    const before = sub.channels["run.2"];
    deliver(es, on("run.1", "log", { message: "x" }));
    assert.equal(sub.channels["run.2"], before);
    assert.ok(Object.isFrozen(sub.channels) && Object.isFrozen(sub.channels["run.1"]));
  });

  test("refuses both forms at once, and channels without topics", () => {
    const { env } = testEnv();
    assert.throws(() => subscribe({ channels: {}, channel: "c", topics: ["a"], token: "t", env }), /not both/);
    assert.throws(() => subscribe({ channels: ["run.1"], token: "t", env }), /channels/);
    assert.throws(() => subscribe({ channels: { "run.1": [] }, token: "t", env }), /run\.1/);
  });

  test("with no channel there is no connection: idle until one is added", async () => {
    const { sub, asked } = hub();
    await settle();
    assert.equal(sub.state, "idle");
    assert.equal(FakeEventSource.instances.length, 0);
    assert.deepEqual(asked, []);
    sub.add("run.1", REPORT);
    await settle();
    assert.equal(FakeEventSource.instances.length, 1);
    assert.deepEqual(asked, [{ channels: { "run.1": REPORT } }]);
  });
});

describe("add()", () => {
  test("adds of one tick reopen once, from the cursor, with a token for the new set and where the new channels start", async () => {
    const { sub, asked } = hub({ "run.1": REPORT });
    await settle();
    const first = FakeEventSource.last;
    first.open();
    const early2 = on("run.2", "log", { message: "before the add" }, 100); // published before the page added run.2
    const seen = on("run.1", "log", { message: "one" }, 101);
    deliver(first, seen);

    sub.add("run.2", REPORT);
    sub.add("run.3", ["run"], { from: "abcdef12-90" });
    assert.deepEqual(Object.keys(sub.channels), ["run.1", "run.2", "run.3"], "the views exist at once");
    await settle();
    assert.equal(first.readyState, FakeEventSource.CLOSED);
    assert.equal(FakeEventSource.instances.length, 2, "one reconnect for both adds");
    assert.deepEqual(asked.at(-1), { channels: { "run.1": REPORT, "run.2": REPORT, "run.3": ["run"] } });
    const second = FakeEventSource.last;
    assert.deepEqual(params(second.url), {
      token: "t2",
      last_event_id: cursorOf(seen),
      since: "run.2:0,run.3:abcdef12-90",
    });

    second.open();
    deliver(second, early2); // the new channel's earlier message, below the cursor: kept
    const next1 = on("run.1", "log", { message: "two" }, 102);
    deliver(second, next1);
    deliver(second, seen); // run.1's message seen before: a duplicate
    assert.deepEqual(sub.channels["run.2"].messages, [early2]);
    assert.deepEqual(sub.channels["run.1"].messages, [seen, next1]);

    // Once open, the one cursor covers the new channels too: a later reconnect sends no start.
    second.fail(FakeEventSource.CLOSED);
    await settle();
    sub.reconnect();
    await settle();
    assert.equal(params(FakeEventSource.last.url).since, null);
  });

  test("a drop while the new channel's earlier messages arrive: the cursor stayed, the channel goes on from its own", async () => {
    const { sub, timers } = hub({ "run.1": REPORT });
    await settle();
    FakeEventSource.last.open();
    const cursor = on("run.1", "log", {}, 50);
    deliver(FakeEventSource.last, cursor);
    sub.add("run.2", REPORT);
    await settle();
    const catching = FakeEventSource.last;
    catching.open();
    const early = on("run.2", "log", { message: "earlier" }, 20);
    deliver(catching, early);
    assert.equal(sub.lastEventId, cursorOf(cursor), "an earlier message of the new channel does not move the cursor back");

    catching.fail(FakeEventSource.CLOSED); // gave up: probed (a 500 here), then reopened by the client
    await settle();
    timers.runNext();
    await settle();
    const resumed = FakeEventSource.last;
    assert.notEqual(resumed, catching);
    assert.deepEqual(params(resumed.url), { token: "t2", last_event_id: cursorOf(cursor), since: `run.2:${cursorOf(early)}` });

    resumed.open();
    deliver(resumed, on("run.2", "log", { message: "earlier too" }, 30));
    deliver(resumed, on("run.1", "log", {}, 51)); // past the cursor: every start is passed
    assert.deepEqual(sub.channels["run.2"].messages.map((m) => m.id), [20, 30]);
    sub.reconnect();
    await settle();
    assert.deepEqual(params(FakeEventSource.last.url), { token: "t2", last_event_id: "abcdef12-51", since: null });
  });

  test("a reconnect before the new set's stream opened still says where the new channel starts", async () => {
    const { sub, timers } = hub({ "run.1": REPORT }, {}, { fetch: async () => jsonResponse(503, {}) });
    await settle();
    FakeEventSource.last.open();
    deliver(FakeEventSource.last, on("run.1", "log", {}, 5));
    sub.add("run.2", REPORT);
    await settle();
    FakeEventSource.last.fail(FakeEventSource.CLOSED); // refused before it opened: probed, 503, retried
    await settle();
    timers.runNext();
    await settle();
    assert.equal(params(FakeEventSource.last.url).since, "run.2:0");
  });

  test("before any cursor a new channel needs no start: the stream replays everything anyway", async () => {
    const { sub } = hub({ "run.1": REPORT });
    sub.add("run.2", REPORT);
    await settle();
    assert.equal(params(FakeEventSource.last.url).since, null);
  });

  test("adding a channel already watched changes nothing; needs a token function and several channels", async () => {
    const { sub } = hub({ "run.1": REPORT });
    await settle();
    const count = FakeEventSource.instances.length;
    assert.equal(sub.add("run.1", REPORT), sub.forChannel("run.1"));
    await settle();
    assert.equal(FakeEventSource.instances.length, count);

    const { env } = testEnv();
    const fixed = subscribe({ channels: {}, token: "t", env });
    assert.throws(() => fixed.add("run.1", REPORT), /token function/);
    const single = subscribe({ channel: "run.1", topics: REPORT, token: () => "t", env });
    assert.throws(() => single.add("run.2", REPORT), /one channel/);
  });

  test("an add while the tab is hidden waits: the stream opens with the new set when visible", async () => {
    const { sub, env, asked } = hub({ "run.1": REPORT });
    await settle();
    env.document.setHidden(true);
    sub.add("run.2", REPORT);
    await settle();
    assert.equal(sub.state, "paused");
    assert.equal(FakeEventSource.instances.length, 1);
    env.document.setHidden(false);
    await settle();
    assert.deepEqual(asked.at(-1), { channels: { "run.1": REPORT, "run.2": REPORT } });
    assert.equal(FakeEventSource.instances.length, 2);
  });
});

describe("remove()", () => {
  test("drops the channel's data and messages at once, reconnects only when needed, leaves it out next time", async () => {
    const { sub, asked } = hub({ "run.1": REPORT, "run.2": REPORT });
    await settle();
    const es = FakeEventSource.last;
    es.open();
    const changes = [];
    sub.onChange((change) => changes.push(change));
    sub.remove("run.2");
    assert.deepEqual(Object.keys(sub.channels), ["run.1"]);
    assert.deepEqual(changes, [{ type: "channel", channel: "run.2", status: "removed" }]);
    deliver(es, on("run.2", "log", {}));
    assert.equal(sub.channels["run.2"], undefined);
    await settle();
    assert.equal(FakeEventSource.instances.length, 1, "no reconnect just to remove");

    sub.reconnect();
    await settle();
    assert.deepEqual(asked.at(-1), { channels: { "run.1": REPORT } }, "a new token, without it");
  });

  test("removing the last channel closes the connection: idle; an add opens it again", async () => {
    const { sub } = hub({ "run.1": REPORT });
    await settle();
    const es = FakeEventSource.last;
    es.open();
    sub.remove("run.1");
    assert.equal(es.readyState, FakeEventSource.CLOSED);
    assert.equal(sub.state, "idle");
    sub.add("run.2", REPORT);
    await settle();
    assert.equal(FakeEventSource.instances.length, 2);
  });
});

describe("several channels, per channel", () => {
  test("closeOnRunEnd ends the channel whose run ended, not the stream; the last one leaves it idle", async () => {
    const { sub } = hub({ "run.1": REPORT, "run.2": REPORT }, { closeOnRunEnd: true });
    await settle();
    const es = FakeEventSource.last;
    es.open();
    const handle = sub.forChannel("run.1");
    deliver(es, on("run.1", "run", { status: "completed" }));
    assert.equal(sub.channels["run.1"].ended, true);
    assert.equal(sub.channels["run.1"].runStatus, "completed", "its data stays");
    assert.equal(handle.state, "closed");
    assert.equal(sub.state, "open");
    deliver(es, on("run.1", "log", { message: "after the end" }));
    assert.equal(sub.channels["run.1"].messages.length, 1);
    deliver(es, on("run.2", "log", { message: "still here" }));
    assert.equal(sub.channels["run.2"].messages.length, 1);

    deliver(es, on("run.2", "run", { status: "failed" }));
    assert.equal(sub.state, "idle");
    assert.equal(es.readyState, FakeEventSource.CLOSED);
  });

  test("a channel's handle reads and listens like a one-channel subscription; close() removes the channel", async () => {
    const { sub } = hub({ "run.1": REPORT, "run.2": REPORT });
    await settle();
    const es = FakeEventSource.last;
    es.open();
    const handle = sub.forChannel("run.2");
    const heard = [];
    handle.onChange((change, h) => heard.push([change.type, h.runStatus]));
    deliver(es, on("run.1", "run", { status: "running" }));
    const mine = on("run.2", "run", { status: "queued" });
    deliver(es, mine);
    assert.deepEqual(heard, [["message", "queued"]]);
    assert.deepEqual([handle.channel, handle.topics, handle.latest, handle.state], ["run.2", REPORT, mine, "open"]);
    assert.equal(handle.lastEventId, sub.lastEventId);
    handle.close();
    assert.equal(sub.channels["run.2"], undefined);
    assert.deepEqual([handle.state, handle.runStatus], ["closed", "queued"], "it keeps what it had");
    assert.equal(sub.forChannel("run.2"), null);
  });

  test("text streams are kept per channel, and renderText follows one channel's", async () => {
    const { sub } = hub({ "run.1": ["answer"], "run.2": ["answer"] });
    await settle();
    const es = FakeEventSource.last;
    es.open();
    const element = new FakeElement();
    renderText(element, sub.forChannel("run.2"), "s");
    deliver(es, on("run.1", "answer", { text_stream: "s", seq: 0, text: "one: " }));
    deliver(es, on("run.2", "answer", { text_stream: "s", seq: 0, text: "" }));
    deliver(es, on("run.2", "answer", { text_stream: "s", seq: 1, delta: "two" }));
    deliver(es, on("run.1", "answer", { text_stream: "s", seq: 1, delta: "uno" }));
    assert.equal(sub.channels["run.1"].texts.s.text, "one: uno");
    assert.equal(sub.channels["run.2"].texts.s.text, "two");
    assert.equal(element.textContent, "two");
    assert.deepEqual(sub.texts, {});
  });

  test("a reset clears every channel", async () => {
    const { sub } = hub({ "run.1": REPORT, "run.2": REPORT });
    await settle();
    const es = FakeEventSource.last;
    deliver(es, on("run.1", "log", {}, 7));
    deliver(es, on("run.2", "log", {}, 8));
    es.emit("reset", { reason: "history_truncated", cursor: "abcdef12-3" }, "abcdef12-3");
    assert.deepEqual([sub.channels["run.1"].messages, sub.channels["run.2"].messages], [[], []]);
    deliver(es, on("run.1", "log", {}, 7)); // replayed from the oldest retained: shown again
    assert.equal(sub.channels["run.1"].messages.length, 1);
  });
});
