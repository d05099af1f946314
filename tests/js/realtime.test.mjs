// Unit tests of static/realtime.js with node's built-in runner: `node --test tests/js/`.
// The browser tests (tests/test_browser.py) cover the same client against a real server.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { createParser, normalizeGrant, subscribe } from "../../static/realtime.js";
import {
  FakeEventSource,
  cursorOf,
  envelope,
  fakeFetch,
  jsonResponse,
  settle,
  streamResponse,
  testEnv,
} from "./fakes.mjs";

const TOPICS = ["status", "log", "run"];

function open(options = {}, envOverrides = {}) {
  const { env, timers } = testEnv(envOverrides);
  const sub = subscribe({ channel: "run.42", topics: TOPICS, token: "t0", env, ...options });
  return { sub, env, timers };
}

function deliver(es, message) {
  es.emit(message.topic, message, cursorOf(message));
}

function params(url) {
  return Object.fromEntries(new URL(url, "http://localhost").searchParams);
}

// -- the wire format ------------------------------------------------------------------------

describe("createParser", () => {
  const cases = [
    ["one event", ["id: 1\nevent: log\ndata: {}\n\n"], [{ kind: "event", event: "log", data: "{}", lastEventId: "1" }]],
    ["default event type", ["data: x\n\n"], [{ kind: "event", event: "message", data: "x", lastEventId: "" }]],
    ["multi-line data", ["data: a\ndata: b\n\n"], [{ kind: "event", event: "message", data: "a\nb", lastEventId: "" }]],
    ["CRLF and CR line endings", ["data: a\r\ndata: b\r\r"], [{ kind: "event", event: "message", data: "a\nb", lastEventId: "" }]],
    ["CRLF split across chunks", ["data: a\r", "\n\r", "\n"], [{ kind: "event", event: "message", data: "a", lastEventId: "" }]],
    ["a line split anywhere", ["da", "ta: he", "llo\n", "\n"], [{ kind: "event", event: "message", data: "hello", lastEventId: "" }]],
    ["comments and retry", [": keep-alive\nretry: 200\n\n"], [{ kind: "comment", text: "keep-alive" }, { kind: "retry", ms: 200 }]],
    ["a retry that is not a number is ignored", ["retry: soon\n\n"], []],
    ["no space after the colon", ["data:x\nevent:log\n\n"], [{ kind: "event", event: "log", data: "x", lastEventId: "" }]],
    ["a field without a colon", ["data\n\n"], [{ kind: "event", event: "message", data: "", lastEventId: "" }]],
    ["an id without data sticks to the next event", ["id: 7\n\ndata: x\n\n"], [{ kind: "event", event: "message", data: "x", lastEventId: "7" }]],
    ["an id with NULL is ignored", ["id: 1\n\nid: a\0b\ndata: x\n\n"], [{ kind: "event", event: "message", data: "x", lastEventId: "1" }]],
    ["a leading BOM is skipped", ["\uFEFFdata: x\n\n"], [{ kind: "event", event: "message", data: "x", lastEventId: "" }]],
    ["an unfinished frame waits", ["data: x\n"], []],
  ];
  for (const [name, chunks, expected] of cases) {
    test(name, () => {
      const parser = createParser();
      assert.deepEqual(chunks.flatMap((chunk) => parser.push(chunk)), expected);
    });
  }
});

describe("normalizeGrant", () => {
  test("accepts a token, or a grant with an ISO or numeric expiry", () => {
    assert.deepEqual(normalizeGrant("abc"), { token: "abc", expiresAt: null });
    assert.deepEqual(normalizeGrant({ token: "abc", expires_at: "2026-11-28T06:00:00+00:00" }), {
      token: "abc",
      expiresAt: Date.parse("2026-11-28T06:00:00Z"),
    });
    assert.deepEqual(normalizeGrant({ token: "abc", expires_at: 1000.5 }), { token: "abc", expiresAt: 1_000_500 });
  });

  test("refuses anything else", () => {
    assert.throws(() => normalizeGrant(""), TypeError);
    assert.throws(() => normalizeGrant({ expires_at: 1 }), TypeError);
  });
});

// -- options --------------------------------------------------------------------------------

test("subscribe refuses incomplete options", () => {
  const { env } = testEnv();
  assert.throws(() => subscribe({ topics: TOPICS, token: "t", env }), /channel/);
  assert.throws(() => subscribe({ channel: "c", topics: [], token: "t", env }), /topics/);
  assert.throws(() => subscribe({ channel: "c", topics: TOPICS, env }), /token/);
  assert.throws(() => subscribe({ channel: "c", topics: TOPICS, token: "t", transport: "ws", env }), /transport/);
});

// -- messages -------------------------------------------------------------------------------

describe("messages", () => {
  test("open, then latest, per topic, bounded history and the run status", () => {
    const seen = [];
    const { sub } = open({ historyLimit: 2, onMessage: (m) => seen.push(m.id) });
    const es = FakeEventSource.last;
    assert.equal(params(es.url).token, "t0");
    assert.equal(params(es.url).last_event_id, undefined);
    assert.equal(sub.state, "connecting");
    es.open();
    assert.equal(sub.state, "open");

    const status = envelope("status", { stage: "fetching", percent: 10 });
    const run = envelope("run", { status: "running" });
    const log = envelope("log", { level: "info", message: "hi" });
    for (const message of [status, run, log]) deliver(es, message);

    assert.deepEqual(seen, [status.id, run.id, log.id]);
    assert.deepEqual(sub.latest, log);
    assert.deepEqual(sub.latestByTopic, { status, run, log });
    assert.deepEqual(sub.messages, [run, log]);
    assert.equal(sub.runStatus, "running");
    assert.equal(sub.lastEventId, cursorOf(log));
  });

  test("a message seen before, or for another channel or topic, is dropped", () => {
    const { sub } = open();
    const es = FakeEventSource.last;
    const first = envelope("log", { message: "one" });
    deliver(es, first);
    deliver(es, first);
    deliver(es, envelope("log", { message: "x" }, { channel: "run.other" }));
    deliver(es, { ...envelope("secret", {}), topic: "secret" });
    es.emit("log", "not json", "abcdef12-99");
    assert.deepEqual(sub.messages, [first]);
  });

  test("a topic called 'error' is a message, not a failure", () => {
    const { sub } = open({ topics: ["error"] });
    const es = FakeEventSource.last;
    es.open();
    deliver(es, envelope("error", { message: "boom" }));
    assert.equal(sub.state, "open");
    assert.equal(sub.latestByTopic.error.data.message, "boom");
  });

  test("closeOnRunEnd closes on a terminal run status", () => {
    const { sub } = open({ closeOnRunEnd: true });
    const es = FakeEventSource.last;
    es.open();
    deliver(es, envelope("run", { status: "running" }));
    assert.equal(sub.state, "open");
    deliver(es, envelope("run", { status: "completed", output: {} }));
    assert.equal(sub.state, "closed");
    assert.equal(es.readyState, FakeEventSource.CLOSED);
  });

  test("a reset frame clears what the client had and is reported", () => {
    const changes = [];
    const { sub } = open({ onChange: (change) => changes.push(change.type) });
    const es = FakeEventSource.last;
    es.open();
    deliver(es, envelope("log", { message: "old" }, { id: 500 }));
    es.emit("reset", { reason: "unknown_cursor", cursor: "0badc0de-3" }, "0badc0de-3");
    assert.deepEqual(sub.messages, []);
    assert.equal(sub.latest, null);
    assert.deepEqual(sub.lastReset, { reason: "unknown_cursor", cursor: "0badc0de-3" });
    assert.equal(sub.lastEventId, "0badc0de-3");
    assert.ok(changes.includes("reset"));
    // Ids start again in the other database: not mistaken for duplicates.
    deliver(es, envelope("log", { message: "new" }, { id: 4 }));
    assert.equal(sub.messages.length, 1);
  });

  test("reset() forgets the data; reset({replay: true}) also the cursor, and reconnects", () => {
    const { sub } = open();
    const es = FakeEventSource.last;
    es.open();
    deliver(es, envelope("log", { message: "a" }));
    sub.reset();
    assert.deepEqual(sub.messages, []);
    assert.ok(sub.lastEventId);
    assert.equal(FakeEventSource.instances.length, 1);
    sub.reset({ replay: true });
    assert.equal(sub.lastEventId, null);
    assert.equal(es.readyState, FakeEventSource.CLOSED);
    assert.equal(params(FakeEventSource.last.url).last_event_id, undefined);
  });

  test("the snapshot is replaced on every change, and a failing listener does not stop the others", () => {
    const { sub, timers } = open();
    const before = sub.snapshot;
    let calls = 0;
    sub.onChange(() => {
      throw new Error("listener bug");
    });
    const stop = sub.onChange(() => (calls += 1));
    FakeEventSource.last.open();
    assert.notEqual(sub.snapshot, before);
    assert.equal(sub.snapshot.state, "open");
    assert.equal(calls, 1);
    assert.throws(() => timers.runNext(), /listener bug/); // rethrown asynchronously, for the console
    stop();
    deliver(FakeEventSource.last, envelope("log", {}));
    assert.equal(calls, 1);
  });
});

// -- resuming -------------------------------------------------------------------------------

describe("resuming", () => {
  test("the browser's own reconnect needs nothing from the client", () => {
    const { sub, timers } = open();
    const es = FakeEventSource.last;
    es.open();
    deliver(es, envelope("log", {}));
    es.fail(FakeEventSource.CONNECTING);
    assert.equal(sub.state, "connecting");
    assert.equal(sub.error.code, "disconnected");
    es.open();
    assert.equal(sub.state, "open");
    assert.equal(sub.error, null);
    assert.equal(FakeEventSource.instances.length, 1);
    assert.deepEqual(timers.pending, []);
  });

  test("an EventSource that gave up is probed; a network failure backs off, then resumes from the cursor", async () => {
    const { sub, env, timers } = open({}, { fetch: fakeFetch(new TypeError("Failed to fetch")) });
    const es = FakeEventSource.last;
    es.open();
    const last = envelope("log", {});
    deliver(es, last);
    es.fail(FakeEventSource.CLOSED);
    await settle();
    assert.equal(env.fetch.calls.length, 1);
    assert.equal(env.fetch.calls[0].url, es.url); // the same URL, to read its status
    assert.equal(sub.state, "connecting");
    assert.equal(sub.error.code, "network_error");
    assert.deepEqual(timers.delays, [500]); // random() = 0: half of the first 1000 ms
    assert.equal(sub.retryAt, 1_000_000 + 500);

    timers.runNext();
    await settle();
    const second = FakeEventSource.last;
    assert.notEqual(second, es);
    assert.deepEqual(params(second.url), { token: "t0", last_event_id: cursorOf(last) });
    second.fail(FakeEventSource.CLOSED);
    await settle();
    assert.deepEqual(timers.delays, [1000]); // doubled
    timers.runNext();
    await settle();
    FakeEventSource.last.open();
    assert.equal(sub.state, "open");
  });

  test("a 5xx is retried like a network failure", async () => {
    const { sub, timers } = open({}, { fetch: fakeFetch(jsonResponse(503, { error: { code: "unavailable", message: "busy" } })) });
    FakeEventSource.last.fail(FakeEventSource.CLOSED);
    await settle();
    assert.equal(sub.error.code, "unavailable");
    assert.equal(sub.error.status, 503);
    assert.equal(timers.pending.length, 1);
  });

  test("a 401 with a token function: a fresh token, reopened at once with the cursor", async () => {
    const expired = jsonResponse(401, { error: { code: "token_expired", message: "expired" } });
    const tokens = ["t1", "t2"];
    const { env, timers } = testEnv({ fetch: fakeFetch(expired) });
    const sub = subscribe({ channel: "run.42", topics: TOPICS, token: async () => tokens.shift(), env });
    await settle();
    const es = FakeEventSource.last;
    assert.equal(params(es.url).token, "t1");
    es.open();
    const last = envelope("log", {});
    deliver(es, last);
    es.fail(FakeEventSource.CLOSED);
    await settle();
    assert.equal(sub.error.code, "token_expired");
    assert.deepEqual(timers.delays, [0]);
    timers.runNext();
    await settle();
    assert.deepEqual(params(FakeEventSource.last.url), { token: "t2", last_event_id: cursorOf(last) });
  });

  test("a 401 with a fixed token is final", async () => {
    const refused = jsonResponse(401, { error: { code: "invalid_token", message: "bad token" } });
    const { sub, timers } = open({}, { fetch: fakeFetch(refused) });
    FakeEventSource.last.fail(FakeEventSource.CLOSED);
    await settle();
    assert.equal(sub.state, "error");
    assert.deepEqual(sub.error, { status: 401, code: "invalid_token", message: "bad token" });
    assert.deepEqual(timers.pending, []);
  });

  test("repeated 401s even with fresh tokens end in the error state", async () => {
    const refused = () => jsonResponse(401, { error: { code: "invalid_token", message: "no" } });
    const { env, timers } = testEnv({ fetch: fakeFetch(refused) });
    let calls = 0;
    const sub = subscribe({ channel: "run.42", topics: TOPICS, token: async () => `t${++calls}`, env, maxAuthFailures: 2 });
    for (let i = 0; i < 3; i += 1) {
      await settle();
      FakeEventSource.last.fail(FakeEventSource.CLOSED);
      await settle();
      if (sub.state === "error") break;
      timers.runNext();
    }
    assert.equal(sub.state, "error");
    assert.equal(calls, 3);
  });

  test("other 4xx answers are final", async () => {
    const { sub } = open({}, { fetch: fakeFetch(jsonResponse(400, { error: { code: "invalid_last_event_id", message: "?" } })) });
    FakeEventSource.last.fail(FakeEventSource.CLOSED);
    await settle();
    assert.equal(sub.state, "error");
    assert.equal(sub.error.code, "invalid_last_event_id");
  });

  test("a known expiry is refreshed before reconnecting, instead of meeting a 401", async () => {
    let now = 1_000_000;
    const grants = [
      { token: "t1", expires_at: 1060 }, // Unix seconds: 60 s from now
      { token: "t2", expires_at: 1120 },
    ];
    const { env } = testEnv({ now: () => now });
    subscribe({ channel: "run.42", topics: TOPICS, token: async () => grants.shift(), env });
    await settle();
    const es = FakeEventSource.last;
    es.open();
    deliver(es, envelope("log", {}));
    now += 59_500; // inside the refresh margin
    es.fail(FakeEventSource.CONNECTING);
    await settle();
    assert.equal(es.readyState, FakeEventSource.CLOSED); // not left to the browser's doomed retry
    assert.equal(params(FakeEventSource.last.url).token, "t2");
    assert.equal(env.fetch.calls.length, 0); // no probe needed
  });

  test("a browser reconnect still pending when the token is due is taken over", async () => {
    let now = 1_000_000;
    const grants = [
      { token: "t1", expires_at: 1060 },
      { token: "t2", expires_at: 1120 },
    ];
    const { env, timers } = testEnv({ now: () => now });
    subscribe({ channel: "run.42", topics: TOPICS, token: async () => grants.shift(), env });
    await settle();
    const es = FakeEventSource.last;
    es.open();
    now += 10_000;
    es.fail(FakeEventSource.CONNECTING); // the browser's reconnect hangs...
    assert.deepEqual(timers.delays, [49_000]); // ...until the token is due (60 s minus the 1 s margin)
    now += 49_000;
    timers.runNext();
    await settle();
    assert.equal(es.readyState, FakeEventSource.CLOSED);
    assert.equal(params(FakeEventSource.last.url).token, "t2");
  });

  test("a browser reconnect that succeeds cancels the takeover", async () => {
    const { env, timers } = testEnv();
    subscribe({ channel: "run.42", topics: TOPICS, token: async () => ({ token: "t1", expires_at: 1060 }), env });
    await settle();
    const es = FakeEventSource.last;
    es.open();
    es.fail(FakeEventSource.CONNECTING);
    assert.equal(timers.pending.length, 1);
    es.open();
    assert.deepEqual(timers.pending, []);
  });

  test("a takeover pending when the browser gives up is replaced, so close() leaves nothing behind", async () => {
    const { env, timers } = testEnv({ fetch: fakeFetch(new TypeError("Failed to fetch")) });
    const sub = subscribe({ channel: "run.42", topics: TOPICS, token: async () => ({ token: "t1", expires_at: 1060 }), env });
    await settle();
    const es = FakeEventSource.last;
    es.open();
    es.fail(FakeEventSource.CONNECTING); // a takeover timer is armed...
    es.fail(FakeEventSource.CLOSED); // ...then the browser gives up: probe, then a retry timer
    await settle();
    assert.equal(timers.pending.length, 1); // the retry replaced the takeover
    sub.close();
    assert.deepEqual(timers.pending, []); // nothing left that could reopen it
    assert.equal(sub.state, "closed");
  });

  test("a failing token function is retried with backoff", async () => {
    const { env, timers } = testEnv();
    let calls = 0;
    const sub = subscribe({
      channel: "run.42",
      topics: TOPICS,
      token: async () => {
        calls += 1;
        if (calls === 1) throw new Error("offline");
        return "t";
      },
      env,
    });
    await settle();
    assert.equal(sub.error.code, "token_unavailable");
    timers.runNext();
    await settle();
    assert.equal(params(FakeEventSource.last.url).token, "t");
  });

  test("drop() resumes from the cursor after a backoff; 'online' cuts the wait short", async () => {
    const { sub, env, timers } = open();
    const es = FakeEventSource.last;
    es.open();
    const last = envelope("log", {});
    deliver(es, last);
    sub.drop();
    assert.equal(es.readyState, FakeEventSource.CLOSED);
    assert.equal(sub.state, "connecting");
    assert.equal(timers.pending.length, 1);
    env.window.dispatchEvent(new Event("online"));
    await settle();
    assert.deepEqual(timers.pending, []);
    assert.equal(params(FakeEventSource.last.url).last_event_id, cursorOf(last));
  });

  test("close() stops everything, for good", async () => {
    const { sub, env, timers } = open();
    const es = FakeEventSource.last;
    es.fail(FakeEventSource.CLOSED);
    sub.close();
    await settle();
    assert.equal(sub.state, "closed");
    assert.deepEqual(timers.pending, []);
    env.document.setHidden(true);
    env.document.setHidden(false);
    assert.equal(FakeEventSource.instances.length, 1);
  });
});

// -- visibility -----------------------------------------------------------------------------

describe("a hidden tab", () => {
  test("pauses, then resumes from the cursor", async () => {
    const { sub, env } = open();
    const es = FakeEventSource.last;
    es.open();
    const last = envelope("log", {});
    deliver(es, last);
    env.document.setHidden(true);
    assert.equal(sub.state, "paused");
    assert.equal(es.readyState, FakeEventSource.CLOSED);
    env.document.setHidden(false);
    await settle();
    assert.equal(params(FakeEventSource.last.url).last_event_id, cursorOf(last));
    FakeEventSource.last.open();
    assert.equal(sub.state, "open");
  });

  test("starts paused when the page opens hidden", async () => {
    const { env } = testEnv();
    env.document.hidden = true;
    const sub = subscribe({ channel: "run.42", topics: TOPICS, token: "t", env });
    await settle();
    assert.equal(sub.state, "paused");
    assert.equal(FakeEventSource.instances.length, 0);
  });

  test("is ignored with pauseWhenHidden: false", () => {
    const { sub, env } = open({ pauseWhenHidden: false });
    FakeEventSource.last.open();
    env.document.setHidden(true);
    assert.equal(sub.state, "open");
  });
});

// -- the fetch transport --------------------------------------------------------------------

describe("the fetch transport", () => {
  test("hands over the raw bytes, parses frames split anywhere, and resumes after the server's retry", async () => {
    const stream = streamResponse();
    const raw = [];
    const { sub, env, timers } = open(
      { transport: "fetch", onRaw: (text) => raw.push(text) },
      { fetch: fakeFetch(stream) },
    );
    await settle();
    assert.equal(sub.state, "open");
    assert.equal(env.fetch.calls[0].init.headers.Accept, "text/event-stream");
    const message = envelope("log", { message: "hi" });
    const frame = `id: ${cursorOf(message)}\nevent: log\ndata: ${JSON.stringify(message)}\n\n`;
    stream.write("retry: 300\n\n" + frame.slice(0, 20));
    await settle();
    assert.equal(sub.messages.length, 0);
    stream.write(frame.slice(20) + ": keep-alive\n\n");
    await settle();
    assert.deepEqual(sub.messages, [message]);
    assert.equal(raw.join(""), "retry: 300\n\n" + frame + ": keep-alive\n\n");

    env.fetch.answer(streamResponse());
    stream.end(); // the server shut down
    await settle();
    assert.equal(sub.state, "connecting");
    assert.deepEqual(timers.delays, [300]);
    timers.runNext();
    await settle();
    assert.equal(params(env.fetch.calls[1].url).last_event_id, cursorOf(message));
    assert.equal(sub.state, "open");
  });

  test("reads the status directly: a refused token is refreshed without a probe", async () => {
    const expired = jsonResponse(401, { error: { code: "token_expired", message: "expired" } });
    const stream = streamResponse();
    const { env, timers } = testEnv({ fetch: fakeFetch(expired, stream) });
    const tokens = ["t1", "t2"];
    const sub = subscribe({ channel: "run.42", topics: TOPICS, token: async () => tokens.shift(), transport: "fetch", env });
    await settle();
    assert.equal(sub.error.code, "token_expired");
    timers.runNext();
    await settle();
    assert.equal(params(env.fetch.calls[1].url).token, "t2");
    assert.equal(sub.state, "open");
  });

  test("reconnect() switches transport and keeps the cursor", async () => {
    const stream = streamResponse();
    const { sub, env } = open({}, { fetch: fakeFetch(stream) });
    const es = FakeEventSource.last;
    es.open();
    const last = envelope("log", {});
    deliver(es, last);
    sub.reconnect({ transport: "fetch" });
    await settle();
    assert.equal(es.readyState, FakeEventSource.CLOSED);
    assert.equal(params(env.fetch.calls[0].url).last_event_id, cursorOf(last));
    assert.equal(sub.state, "open");
  });
});
