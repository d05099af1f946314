// Test doubles for static/realtime.js: an EventSource, fetch, timers and a document the
// tests drive by hand, passed in through subscribe({env}). No network, no clock.

export class FakeEventSource {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSED = 2;
  static instances = [];

  constructor(url) {
    this.url = url;
    this.readyState = FakeEventSource.CONNECTING;
    this.listeners = new Map();
    this.onopen = null;
    FakeEventSource.instances.push(this);
  }

  static get last() {
    return FakeEventSource.instances.at(-1);
  }

  addEventListener(type, listener) {
    if (!this.listeners.has(type)) this.listeners.set(type, []);
    this.listeners.get(type).push(listener);
  }

  close() {
    this.readyState = FakeEventSource.CLOSED;
  }

  // -- what the browser would do --

  open() {
    this.readyState = FakeEventSource.OPEN;
    this.onopen?.({ type: "open" });
  }

  /** Deliver a frame: `event: type`, `data: data` and `id: lastEventId`. */
  emit(type, data, lastEventId = "") {
    this.#dispatch(type, { type, data: typeof data === "string" ? data : JSON.stringify(data), lastEventId });
  }

  /** The connection broke: CONNECTING means the browser retries by itself, CLOSED that it gave up. */
  fail(readyState) {
    this.readyState = readyState;
    this.#dispatch("error", { type: "error" });
  }

  #dispatch(type, event) {
    for (const listener of this.listeners.get(type) ?? []) listener(event);
  }
}

let nextEnvelopeId = 1;

/** A frame as the server sends it: the envelope, and the cursor `epoch-id` as `id:`. */
export function envelope(topic, data, { id = nextEnvelopeId++, channel = "run.42" } = {}) {
  return { id, channel, topic, data, run_id: "42", created_at: "2026-11-28T06:00:00.000000+00:00" };
}

export function cursorOf(message) {
  return `abcdef12-${message.id}`;
}

/** Manual timers: `pending` lists what is scheduled; `runNext()` fires the earliest. */
export class FakeTimers {
  constructor() {
    this.pending = [];
    this.nextHandle = 1;
    this.setTimeout = (fn, delay) => {
      const handle = this.nextHandle++;
      this.pending.push({ handle, fn, delay });
      return handle;
    };
    this.clearTimeout = (handle) => {
      this.pending = this.pending.filter((t) => t.handle !== handle);
    };
  }

  get delays() {
    return this.pending.map((t) => t.delay);
  }

  runNext() {
    this.pending.sort((a, b) => a.delay - b.delay);
    const timer = this.pending.shift();
    if (!timer) throw new Error("no timer is pending");
    timer.fn();
    return timer.delay;
  }
}

export class FakeDocument extends EventTarget {
  hidden = false;

  setHidden(hidden) {
    this.hidden = hidden;
    this.dispatchEvent(new Event("visibilitychange"));
  }
}

/** A fetch that answers from a queue: a Response, an Error to throw, or a function of the URL. */
export function fakeFetch(...answers) {
  const calls = [];
  const fetch = async (url, init = {}) => {
    calls.push({ url, init });
    let answer = answers.length > 1 ? answers.shift() : answers[0];
    if (typeof answer === "function") answer = answer(url, init);
    if (answer instanceof Error) throw answer;
    return answer;
  };
  fetch.calls = calls;
  fetch.answer = (...more) => answers.splice(0, answers.length, ...more);
  return fetch;
}

export function jsonResponse(status, body) {
  return new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json" } });
}

/** A 200 event stream whose body the test writes chunk by chunk. */
export function streamResponse() {
  let controller;
  const body = new ReadableStream({
    start(c) {
      controller = c;
    },
  });
  const encoder = new TextEncoder();
  const response = new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } });
  response.write = (text) => controller.enqueue(encoder.encode(text));
  response.end = () => controller.close();
  response.break = () => controller.error(new TypeError("network error"));
  return response;
}

/** Let pending promise callbacks (fetch, token functions, stream reads) run. */
export async function settle(rounds = 10) {
  for (let i = 0; i < rounds; i += 1) await new Promise((resolve) => setImmediate(resolve));
}

export function testEnv(overrides = {}) {
  FakeEventSource.instances = [];
  const timers = new FakeTimers();
  const env = {
    EventSource: FakeEventSource,
    fetch: fakeFetch(jsonResponse(500, {})),
    document: new FakeDocument(),
    window: new EventTarget(),
    setTimeout: timers.setTimeout,
    clearTimeout: timers.clearTimeout,
    now: () => 1_000_000,
    random: () => 0,
    ...overrides,
  };
  return { env, timers };
}

/** Just enough of a DOM element for renderText, counting whole-text writes and appended nodes. */
export class FakeElement {
  pieces = [];
  writes = 0;
  appends = 0;
  ownerDocument = { createTextNode: (data) => ({ data }) };

  set textContent(text) {
    this.writes += 1;
    this.pieces = text ? [text] : [];
  }

  get textContent() {
    return this.pieces.join("");
  }

  appendChild(node) {
    this.appends += 1;
    this.pieces.push(node.data);
    return node;
  }
}
