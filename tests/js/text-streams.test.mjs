// Unit tests of text streams in static/realtime.js (`texts`, the "text" changes, renderText),
// with node's built-in runner: `node --test tests/js/`.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { renderText, subscribe } from "../../static/realtime.js";
import { FakeElement, FakeEventSource, cursorOf, envelope, testEnv } from "./fakes.mjs";

const TOPICS = ["status", "log", "run", "answer"];

/** A subscription on an open fake stream; `send(data, topic)` delivers one message. */
function open(options = {}) {
  const { env } = testEnv();
  const changes = [];
  const sub = subscribe({ channel: "run.42", topics: TOPICS, token: "t0", env, ...options });
  sub.onChange((change) => change.type === "text" && changes.push(change));
  const es = FakeEventSource.last;
  es.open();
  const send = (data, topic = "answer") => {
    const message = envelope(topic, data);
    es.emit(topic, message, cursorOf(message));
    return message;
  };
  return { sub, es, send, changes };
}

/** The data of text stream `sid`'s messages. */
const text = (seq, whole, more = {}) => ({ text_stream: "a1", seq, text: whole, ...more });
const delta = (seq, piece, more = {}) => ({ text_stream: "a1", seq, delta: piece, ...more });

describe("text streams", () => {
  test("deltas are appended in order, after the attempt's empty start", () => {
    const { sub, send } = open();
    send(text(0, ""));
    assert.deepEqual(sub.texts.a1, { text: "", seq: 0, status: "streaming", topic: "answer" });
    for (const [seq, piece] of ["Hel", "lo, ", "world"].entries()) send(delta(seq + 1, piece));
    assert.deepEqual(sub.texts.a1, { text: "Hello, world", seq: 3, status: "streaming", topic: "answer" });
    assert.equal(sub.snapshot.texts, sub.texts);
  });

  test("a seq already seen is a duplicate, ignored without a change", () => {
    const { sub, send, changes } = open();
    send(text(0, ""));
    send(delta(1, "one"));
    send(delta(2, " two"));
    const before = sub.texts;
    send(delta(2, " two")); // the same piece under another envelope id
    send(delta(1, "one"));
    assert.equal(sub.texts, before);
    assert.equal(sub.texts.a1.text, "one two");
    assert.equal(changes.length, 3);
  });

  test("a seq that skips ahead is a gap: ignored, the stream keeps its state", () => {
    const { sub, send } = open();
    send(text(0, ""));
    send(delta(1, "one"));
    send(delta(3, " three"));
    assert.deepEqual(sub.texts.a1, { text: "one", seq: 1, status: "streaming", topic: "answer" });
    send(text(3, "one two three")); // a replay's folded text repairs it
    send(delta(4, " four"));
    assert.equal(sub.texts.a1.text, "one two three four");
  });

  test("a delta of a stream never seen continues from seq 0: its start was before the cursor", () => {
    const { sub, send } = open();
    send(delta(1, "Hi"));
    assert.deepEqual(sub.texts.a1, { text: "Hi", seq: 1, status: "streaming", topic: "answer" });
    send({ text_stream: "a2", seq: 4, delta: "lost" });
    assert.equal(sub.texts.a2, undefined);
  });

  test("a `text` replaces the text and the seq; deltas continue from it", () => {
    const { sub, send } = open();
    send(text(0, ""));
    send(delta(1, "old"));
    send(text(5, "The whole text so far"));
    assert.deepEqual(sub.texts.a1, { text: "The whole text so far", seq: 5, status: "streaming", topic: "answer" });
    send(delta(5, "dup"));
    send(delta(6, "."));
    assert.equal(sub.texts.a1.text, "The whole text so far.");
  });

  test("a retry's {seq: 0, text: ''} clears the failed attempt's text, status and error", () => {
    const { sub, send } = open();
    send(text(0, ""));
    send(delta(1, "I think the ans"));
    send(delta(2, "", { status: "failed", error: "TimeoutError" }));
    assert.deepEqual(sub.texts.a1, { text: "I think the ans", seq: 2, status: "failed", topic: "answer", error: "TimeoutError" });
    send(text(0, ""));
    assert.deepEqual(sub.texts.a1, { text: "", seq: 0, status: "streaming", topic: "answer" });
    send(delta(1, "The answer"));
    assert.equal(sub.texts.a1.text, "The answer"); // never the failed attempt's text, then the new one
  });

  for (const [status, error] of [["completed"], ["failed", "RateLimitError"], ["cancelled"]]) {
    test(`the end delta ends the stream ${status}, keeping the text`, () => {
      const { sub, send } = open();
      send(text(0, ""));
      send(delta(1, "Done"));
      send(delta(2, "", error ? { status, error } : { status }));
      assert.deepEqual(sub.texts.a1, { text: "Done", seq: 2, status, topic: "answer", ...(error ? { error } : {}) });
    });
  }

  test("a folded replay message carries the whole text and how it ended", () => {
    const { sub, send, changes } = open();
    send(text(42, "A long answer, whole", { status: "failed", error: "ValueError" }));
    assert.deepEqual(sub.texts.a1, { text: "A long answer, whole", seq: 42, status: "failed", topic: "answer", error: "ValueError" });
    send({ text_stream: "a2", seq: 7, text: "Another", status: "completed" });
    assert.deepEqual(sub.texts.a2, { text: "Another", seq: 7, status: "completed", topic: "answer" });
    assert.deepEqual(changes, [
      { type: "text", channel: "run.42", sid: "a1", delta: null, replaced: true },
      { type: "text", channel: "run.42", sid: "a2", delta: null, replaced: true },
    ]);
  });

  test("several streams on one topic are kept apart", () => {
    const { sub, send } = open();
    const a = (seq, piece) => ({ text_stream: "a", seq, delta: piece });
    const b = (seq, piece) => ({ text_stream: "b", seq, delta: piece });
    send({ text_stream: "a", seq: 0, text: "" });
    send({ text_stream: "b", seq: 0, text: "" });
    for (const data of [a(1, "A1"), b(1, "B1"), b(2, "B2"), a(2, "A2")]) send(data);
    send({ text_stream: "b", seq: 3, delta: "", status: "completed" });
    assert.deepEqual(Object.keys(sub.texts), ["a", "b"]);
    assert.deepEqual(sub.texts.a, { text: "A1A2", seq: 2, status: "streaming", topic: "answer" });
    assert.deepEqual(sub.texts.b, { text: "B1B2", seq: 3, status: "completed", topic: "answer" });
  });

  test("listeners are told what was appended, or that the text was replaced", () => {
    const { send, changes } = open();
    send(text(0, ""));
    send(delta(1, "Hel"));
    send(delta(2, "lo"));
    send(text(2, "Hello")); // e.g. replayed after a reset
    send(delta(3, "", { status: "completed" }));
    assert.deepEqual(changes, [
      { type: "text", channel: "run.42", sid: "a1", delta: null, replaced: true },
      { type: "text", channel: "run.42", sid: "a1", delta: "Hel", replaced: false },
      { type: "text", channel: "run.42", sid: "a1", delta: "lo", replaced: false },
      { type: "text", channel: "run.42", sid: "a1", delta: null, replaced: true },
      { type: "text", channel: "run.42", sid: "a1", delta: "", replaced: false },
    ]);
  });

  test("text-stream messages move the cursor and reach onMessage, like every message", () => {
    const seen = [];
    const { sub, send } = open({ onMessage: (message) => seen.push(message.id) });
    const first = send(text(0, ""));
    const last = send(delta(1, "x"));
    assert.deepEqual(seen, [first.id, last.id]);
    assert.equal(sub.lastEventId, cursorOf(last));
    assert.equal(sub.snapshot.lastEventId, cursorOf(last));
  });

  test("a 20,000-delta answer stays out of messages, latest and runStatus", () => {
    const { sub, send } = open({ historyLimit: 3, closeOnRunEnd: true });
    const logs = [send({ message: "started" }, "log"), send({ message: "asked" }, "log")];
    send(text(0, ""));
    for (let seq = 1; seq <= 20_000; seq += 1) send(delta(seq, "w "));
    // On topic "run" too: its end status is the text's, not the run's.
    send({ text_stream: "r1", seq: 1, delta: "", status: "completed" }, "run");
    assert.deepEqual(sub.messages, logs); // nothing evicted by the deltas
    assert.deepEqual(sub.latest, logs[1]);
    assert.deepEqual(Object.keys(sub.latestByTopic), ["log"]);
    assert.equal(sub.runStatus, null);
    assert.equal(sub.state, "open");
    assert.equal(sub.texts.a1.text.length, 40_000);
    const after = send({ message: "answered" }, "log");
    assert.deepEqual(sub.messages, [...logs, after]);
  });

  test("a reset forgets the texts, as it does the messages", () => {
    const { sub, es, send } = open();
    send(text(0, "old"));
    es.emit("reset", { reason: "history_truncated", cursor: "0badc0de-3" }, "0badc0de-3");
    assert.deepEqual(sub.texts, {});
    send(text(3, "replayed"));
    sub.reset();
    assert.deepEqual(sub.snapshot.texts, {});
  });
});

describe("renderText", () => {
  test("appends a text node per delta and rewrites the text only when it is replaced", () => {
    const { sub, send } = open();
    send(text(0, "Already "));
    const element = new FakeElement();
    const other = new FakeElement();
    renderText(element, sub, "a1");
    const stop = renderText(other, sub, "b1");
    assert.equal(element.textContent, "Already ");
    send(delta(1, "here"));
    send({ text_stream: "b1", seq: 0, text: "" });
    send(delta(2, "", { status: "completed" })); // the end appends nothing
    assert.equal(element.textContent, "Already here");
    assert.deepEqual([element.writes, element.appends], [1, 1]);
    assert.equal(other.textContent, "");

    send(text(0, "")); // a new attempt
    assert.equal(element.textContent, "");
    assert.deepEqual([element.writes, element.appends], [2, 1]);

    stop();
    send({ text_stream: "b1", seq: 1, delta: "unseen" });
    assert.equal(other.textContent, "");
  });

  test("a reset clears the element", () => {
    const { sub, es, send } = open();
    const element = new FakeElement();
    renderText(element, sub, "a1");
    send(text(0, "old"));
    es.emit("reset", { reason: "history_truncated", cursor: "0badc0de-3" }, "0badc0de-3");
    assert.equal(element.textContent, "");
  });

  test("a 100,000-character answer from 25,000 deltas: each delta appends its piece, the text is never rewritten", () => {
    const { sub, send, changes } = open();
    const element = new FakeElement();
    renderText(element, sub, "a1");
    send(text(0, ""));
    const pieces = Array.from({ length: 25_000 }, (_, i) => String(i % 10_000).padStart(4, "0"));
    pieces.forEach((piece, i) => send(delta(i + 1, piece)));
    send(delta(25_001, "", { status: "completed" }));

    const expected = pieces.join("");
    assert.equal(expected.length, 100_000);
    assert.equal(sub.texts.a1.text, expected);
    assert.equal(sub.texts.a1.status, "completed");
    assert.equal(element.textContent, expected);
    // O(1) DOM work per delta: one node of its 4 characters each; the whole text written
    // only twice (before the stream existed, and its empty start).
    assert.equal(element.appends, 25_000);
    assert.equal(element.writes, 2);
    const appended = changes.filter((change) => !change.replaced);
    assert.equal(appended.length, 25_001);
    assert.ok(appended.every((change) => change.delta.length <= 4));
  });
});
