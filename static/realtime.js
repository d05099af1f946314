/**
 * realtime.js: a dependency-free browser client for this app's event stream (docs/protocol.md §5-6).
 *
 *     import { subscribe } from "/static/realtime.js";
 *
 *     const sub = subscribe({
 *       channel: "run.42",
 *       topics: ["status", "log", "run"],
 *       // A string, or an async function that returns a fresh token (or the whole
 *       // grant `{token, expires_at}`, which lets the client refresh before expiry).
 *       token: () => fetch("/api/realtime/token", {
 *         method: "POST",
 *         headers: { "Content-Type": "application/json" },  // anything else is refused (415)
 *         body: JSON.stringify({ channel: "run.42", topics: ["status", "log", "run"] }),
 *       }).then((response) => response.json()),
 *       closeOnRunEnd: true,
 *     });
 *
 *     sub.onChange((change, sub) => {
 *       if (change.type === "message") console.log(change.message.topic, change.message.data);
 *       render(sub.state, sub.latestByTopic.status?.data, sub.runStatus);
 *     });
 *     // later: sub.close();
 *
 * What it keeps, replaced (never mutated) on every change, so `sub.snapshot`
 * works with React's useSyncExternalStore(sub.onChange, () => sub.snapshot):
 *
 *   state          "connecting" | "open" | "paused" (tab hidden) | "closed" | "error" (gave up)
 *                  | "idle" (several channels, none left to watch: no connection)
 *   error          null, or {status, code, message} of the last failure
 *   lastEventId    the cursor: the last `id:` received; every reconnect sends it back
 *   latest         the newest envelope {id, channel, topic, data, run_id, created_at}
 *   latestByTopic  {topic: newest envelope of that topic}
 *   messages       the last `historyLimit` envelopes, oldest first (text-stream messages excepted)
 *   runStatus      data.status of the newest message on topic "run", e.g. "running"
 *   lastReset      null, or the server's reset {reason, cursor} (history was cut; data restarted)
 *   retryAt        when the next reconnect attempt is due (ms since epoch), or null
 *   texts          {sid: {text, seq, status, topic, error?}}: the text streams (see "Text streams" below)
 *   channels       {channel: {channel, topics, latest, latestByTopic, messages, runStatus, texts, ended}}
 *
 * How it resumes, with its cursor, on any disconnect (the server replays what was missed):
 *   - the browser's own EventSource reconnect sends `Last-Event-ID` by itself;
 *   - when the EventSource gives up (readyState CLOSED), it cannot tell why: the client then
 *     GETs the same URL with fetch to read the status: 401 means the token was refused (asks
 *     the token function for a new one, reopens at once), other 4xx are fatal (state "error"),
 *     anything else is a network or server failure: retry with jittered exponential backoff;
 *   - while the tab is hidden the connection is closed ("paused"); it reopens when visible;
 *   - with the "fetch" transport (which also hands the raw bytes to `onRaw`, for workshops)
 *     the status is read directly and a stream the server ends is resumed after its `retry:`.
 * Each reopen passes `last_event_id=<cursor>`. Messages are also de-duplicated by envelope id.
 *
 * Text streams (docs/protocol.md, "text streams"): a text a job writes piece by piece (an LLM's
 * answer) comes as messages whose data is {text_stream: sid, seq, delta} (appended) or
 * {text_stream: sid, seq, text} (the whole text so far: a replay, or a new attempt at seq 0);
 * the end is one more delta carrying `status`. They move the cursor and reach `onMessage` like
 * any message, but are kept only in `texts`, never in `messages`, `latest`, `latestByTopic` or
 * `runStatus`: a 20,000-delta answer would push every other message out of `messages`, and one
 * delta means nothing alone. Listeners get {type: "text", sid, delta: "<appended piece>",
 * replaced: false}, or {type: "text", sid, delta: null, replaced: true} when the text was
 * replaced, so a page appends only the new piece: `renderText(element, sub, sid)` does that.
 *
 * Several channels on one stream (docs/protocol.md §12): one connection for a whole page, one
 * cursor for all its channels, instead of one EventSource each (a browser keeps six HTTP/1.1
 * connections per host: the seventh card would wait).
 *
 *     const hub = subscribe({ channels: { "run.1": ["status", "run"] }, token: fetchGrant, closeOnRunEnd: true });
 *     // fetchGrant({channels}) asks POST /api/realtime/token with {channels} for the whole set.
 *     const card = hub.add("run.2", ["status", "run"]);  // from its start; adds of one tick reopen once
 *     card.onChange((change, card) => render(card.runStatus, card.latestByTopic.status?.data));
 *     hub.channels["run.1"].runStatus;                    // each channel's data; none at the top level
 *     card.close();                                        // = hub.remove("run.2")
 *
 * Adding reopens the stream from the cursor with a token for the new set, saying where the new
 * channel starts (its start, or a cursor of it): its earlier messages arrive, the others go on
 * exactly. Removing only filters: the channel's messages are ignored at once and the next
 * connection leaves it out; no reconnect for it. With closeOnRunEnd, a channel whose run ended
 * stops (`ended`), not the stream; with no channel left the connection closes ("idle").
 *
 * This file is an ES module. From a plain script, expose it once:
 *     <script type="module">import * as Realtime from "/static/realtime.js"; window.Realtime = Realtime;</script>
 */

export const TERMINAL_RUN_STATUSES = Object.freeze(["completed", "failed", "cancelled"]);

const DEFAULTS = {
  url: "/api/realtime/subscribe",
  lastEventId: null,
  historyLimit: 100,
  closeOnRunEnd: false,
  pauseWhenHidden: true,
  transport: "eventsource",
  backoff: { initialMs: 1000, maxMs: 30000 },
  // Refresh a token this long before its known expiry instead of letting a reconnect fail.
  tokenMarginMs: 1000,
  // After this many 401s in a row, even with fresh tokens, stop: the server refuses us.
  maxAuthFailures: 3,
};

const EVENTSOURCE_OPEN = 1;
const EVENTSOURCE_CLOSED = 2;

/** Open a subscription; see the comment at the top of this file. */
export function subscribe(options) {
  return new Subscription(options);
}

export class Subscription {
  constructor(options) {
    const o = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...options?.backoff } };
    const several = o.channels !== undefined;
    if (several) {
      if (o.channel !== undefined || o.topics !== undefined) {
        throw new TypeError("subscribe: give 'channel' and 'topics', or 'channels', not both");
      }
      if (!o.channels || typeof o.channels !== "object" || Array.isArray(o.channels)) {
        throw new TypeError("subscribe: 'channels' must be an object {channel: [topics]}");
      }
      for (const [channel, topics] of Object.entries(o.channels)) checkChannel(channel, topics);
    } else {
      checkChannel(o.channel, o.topics);
    }
    if (typeof o.token !== "string" && typeof o.token !== "function") {
      throw new TypeError("subscribe: 'token' must be a string or a function returning one");
    }
    if (o.transport !== "eventsource" && o.transport !== "fetch") {
      throw new TypeError("subscribe: 'transport' must be \"eventsource\" or \"fetch\"");
    }
    // One channel: `channel` and `topics`, and the channel's data at the top level as well.
    this.channel = several ? null : o.channel;
    this.topics = several ? null : Object.freeze([...o.topics]);
    this.transport = o.transport;
    this._several = several;
    this._options = o;
    this._env = hostEnvironment(o.env);
    this._listeners = new Set();
    if (o.onChange) this._listeners.add(o.onChange);

    this.state = "connecting";
    this.error = null;
    this.lastEventId = o.lastEventId || null;
    this.retryAt = null;
    this.lastReset = null;
    // channel -> {topics, highestId, ended, handle}: what the stream carries and what was seen of it.
    this._channels = new Map();
    this.channels = Object.freeze({});
    for (const [channel, topics] of Object.entries(several ? o.channels : { [o.channel]: o.topics })) {
      this._channels.set(channel, { topics: Object.freeze([...topics]), highestId: 0, ended: false, handle: null });
    }
    // Channels added with a start before the cursor: channel -> {from, sent}, until the stream
    // passes the cursor (see _advance). `from` moves along as the channel's earlier messages arrive.
    this._starts = new Map();
    this._cursorId = null; // the envelope id at lastEventId: what "before the cursor" means
    this._reconnectQueued = false;
    this._clearData();

    this._conn = null; // the current connection attempt: {close()}; identity marks stale callbacks
    this._timer = null;
    this._attempt = 0;
    this._authFailures = 0;
    this._serverRetryMs = null;
    this._grant = null; // from the token function: {token, expiresAt, channels}
    this._needFreshToken = false;

    this.onChange = this.onChange.bind(this);
    this._onVisibilityChange = this._onVisibilityChange.bind(this);
    this._onOnline = this._onOnline.bind(this);
    const { document, window } = this._env;
    if (o.pauseWhenHidden && document) document.addEventListener("visibilitychange", this._onVisibilityChange);
    if (window) window.addEventListener("online", this._onOnline);

    this._snapshot();
    if (o.pauseWhenHidden && document?.hidden) this.state = "paused";
    else this._open();
  }

  /** Call `listener(change, subscription)` after every change; returns a function that stops it. */
  onChange(listener) {
    this._listeners.add(listener);
    return () => this._listeners.delete(listener);
  }

  /** Stop for good: close the connection and forget the listeners' interest. */
  close() {
    if (this.state === "closed") return;
    this._disconnect();
    this._removeHostListeners();
    this._set({ state: "closed", retryAt: null }, { type: "state" });
  }

  /**
   * Forget the messages received so far. With `{replay: true}` also forget the cursor and
   * reconnect, so the server replays every retained message from the oldest.
   */
  reset({ replay = false } = {}) {
    this._clearData();
    if (replay) {
      this.lastEventId = null;
      this._cursorId = null;
      this._starts.clear();
    }
    this._notify({ type: "cleared" });
    if (replay && this._isActive()) this.reconnect();
  }

  /** Close the current connection and open a new one now, from the cursor (optionally switching transport). */
  reconnect({ transport } = {}) {
    if (transport) this.transport = transport;
    if (!this._isActive()) return;
    this._disconnect();
    this._open();
  }

  /** Drop the connection as a network failure would: the usual resume path follows. For workshops and tests. */
  drop() {
    if (!this._isActive()) return;
    this._disconnect();
    this._retryLater({ status: 0, code: "dropped", message: "the connection was dropped on purpose" });
  }

  // -- several channels ----------------------------------------------------------------

  /**
   * Watch one more channel on this subscription's stream (several-channel subscriptions only).
   * `from` says where the channel starts: "start" (every retained message of it, the default)
   * or a cursor of that channel (e.g. one saved earlier). The stream reopens from its cursor
   * with a token for the new set of channels; the channels it already carried go on exactly,
   * and the new one's earlier messages arrive first. Adds made in the same tick reopen once.
   * Returns the channel's handle (see channel()).
   */
  add(channel, topics, { from = "start" } = {}) {
    if (!this._several) throw new TypeError("add: this subscription watches one channel; subscribe({channels}) for several");
    if (typeof this._options.token !== "function") throw new TypeError("add: needs a token function, to get a token for the new channels");
    checkChannel(channel, topics);
    if (from !== "start" && (typeof from !== "string" || !from)) throw new TypeError("add: 'from' must be \"start\" or a cursor");
    const known = this._channels.get(channel);
    if (known && !known.ended && sameTopics(known.topics, topics)) return this.forChannel(channel);
    if (known) this.remove(channel);
    this._channels.set(channel, { topics: Object.freeze([...topics]), highestId: 0, ended: false, handle: null });
    this._setView(channel, emptyView(channel, this._channels.get(channel).topics));
    // Without a cursor the stream replays every channel from its start anyway.
    if (this.lastEventId) this._starts.set(channel, { from, sent: false });
    this._notify({ type: "channel", channel, status: "added" });
    this._reopenSoon();
    return this.forChannel(channel);
  }

  /**
   * Stop watching a channel: its data goes, its messages are ignored from now on, and the next
   * connection (the next add, a token refresh, any reconnect) leaves it out. No reconnect just
   * for this: a channel removed is most often a run that ended, which publishes nothing more.
   */
  remove(channel) {
    const known = this._channels.get(channel);
    if (!known || !this._several) return;
    this._channels.delete(channel);
    this._starts.delete(channel);
    if (known.handle) known.handle._last = this.channels[channel];
    const { [channel]: _gone, ...rest } = this.channels;
    this.channels = Object.freeze(rest);
    this._notify({ type: "channel", channel, status: "removed" });
    this._idleIfEmpty();
  }

  /** A channel's handle: reads and listens like a one-channel subscription; close() removes the channel. */
  forChannel(channel) {
    const known = this._channels.get(channel);
    if (!known) return null;
    known.handle ??= new ChannelSubscription(this, channel);
    return known.handle;
  }

  /** Reopen once after the adds of this tick (a microtask: they are all made by then). */
  _reopenSoon() {
    if (this._reconnectQueued) return;
    this._reconnectQueued = true;
    Promise.resolve().then(() => {
      this._reconnectQueued = false;
      if (this.state === "paused" || !this._isActive()) return; // opened with the new set when visible
      this._disconnect();
      this._open();
    });
  }

  /** The channels the stream should carry now: {channel: topics}. */
  _wanted() {
    const wanted = {};
    for (const [channel, { topics, ended }] of this._channels) if (!ended) wanted[channel] = topics;
    return wanted;
  }

  /** A several-channel subscription with nothing left to watch closes its connection until add(). */
  _idleIfEmpty() {
    if (!this._several || !this._isActive() || Object.keys(this._wanted()).length > 0) return;
    this._disconnect();
    this._set({ state: "idle", retryAt: null, error: null }, { type: "state" });
  }

  // -- connecting -----------------------------------------------------------------------

  _open() {
    if (!this._isActive()) return; // closed or failed while a timer was pending
    if (this._several && Object.keys(this._wanted()).length === 0) {
      this._set({ state: "idle", retryAt: null }, { type: "state" });
      return;
    }
    const conn = { close() {} };
    this._conn = conn;
    this._set({ state: "connecting", retryAt: null }, { type: "state" });
    const token = this._currentToken();
    if (token !== null) {
      this._connect(token);
      return;
    }
    this._fetchToken().then(
      (fresh) => this._conn === conn && this._connect(fresh), // unless closed, paused or reconnected meanwhile
      (err) => {
        if (this._conn !== conn) return;
        this._conn = null;
        const message = `could not get a subscription token: ${err?.message ?? err}`;
        this._retryLater({ status: 0, code: "token_unavailable", message });
      },
    );
  }

  _connect(token) {
    const url = this._url(token);
    if (this.transport === "fetch") this._openFetch(url);
    else this._openEventSource(url);
  }

  /** The token to use now, or null when one must be fetched first. */
  _currentToken() {
    const source = this._options.token;
    if (typeof source === "string") return source;
    const fresh = this._grant && !this._needFreshToken && this._msUntilTokenRefresh() > 0;
    // A grant for other channels than those wanted now (one was added or removed) is not reused.
    if (fresh && this._grant.channels === JSON.stringify(this._wanted())) return this._grant.token;
    return null;
  }

  async _fetchToken() {
    const wanted = this._wanted();
    const request = this._several ? { channels: wanted } : { channel: this.channel, topics: this.topics };
    const got = await this._options.token(request);
    this._grant = { ...normalizeGrant(got), channels: JSON.stringify(wanted) };
    this._needFreshToken = false;
    return this._grant.token;
  }

  /** How long the current token may still open a stream (Infinity: unknown, or a fixed token). */
  _msUntilTokenRefresh() {
    const expiresAt = this._grant?.expiresAt;
    if (expiresAt == null || typeof this._options.token !== "function") return Infinity;
    return expiresAt - this._options.tokenMarginMs - this._env.now();
  }

  _url(token) {
    const params = new URLSearchParams({ token });
    if (this.lastEventId) params.set("last_event_id", this.lastEventId);
    // `since=run.3:0,run.4:<cursor>`: where each added channel starts, 0 for its oldest message (docs/protocol.md §12).
    const since = [...this._starts].map(([channel, start]) => `${channel}:${start.from === "start" ? "0" : start.from}`);
    if (since.length > 0) params.set("since", since.join(","));
    for (const start of this._starts.values()) start.sent = true;
    const base = this._options.url;
    return base + (base.includes("?") ? "&" : "?") + params;
  }

  _openEventSource(url) {
    const es = new this._env.EventSource(url);
    const conn = { close: () => es.close() };
    this._conn = conn;
    const live = () => this._conn === conn;
    es.onopen = () => {
      if (!live()) return;
      this._env.clearTimeout(this._timer); // a pending takeover (below) is no longer needed
      this._timer = null;
      this._opened();
    };
    // Only events with data are frames; a topic may even be called "error" or "open".
    const onFrame = (event) => {
      if (live() && typeof event.data === "string") this._receive(event.type, event.data, event.lastEventId);
    };
    const topics = Object.values(this._wanted()).flat();
    for (const name of new Set([...topics, "reset"])) es.addEventListener(name, onFrame);
    es.addEventListener("error", (event) => {
      if (!live() || typeof event.data === "string") return;
      if (es.readyState !== EVENTSOURCE_CLOSED) {
        // The browser reconnects by itself and sends Last-Event-ID. But an attempt made
        // after our token expires would be refused (a 401 in the console, then the probe):
        // if the browser has not reconnected by then, take over with a fresh token.
        const takeOver = () => {
          if (!live() || es.readyState === EVENTSOURCE_OPEN || es.readyState === EVENTSOURCE_CLOSED) return;
          es.close();
          this._open();
        };
        const untilRefresh = this._msUntilTokenRefresh();
        if (untilRefresh <= 0) {
          takeOver();
          return;
        }
        const error = { status: 0, code: "disconnected", message: "the stream was interrupted; the browser is reconnecting" };
        this._set({ state: "connecting", error }, { type: "state" });
        if (untilRefresh !== Infinity) {
          this._env.clearTimeout(this._timer);
          this._timer = this._env.setTimeout(() => {
            this._timer = null;
            takeOver();
          }, untilRefresh);
        }
        return;
      }
      // The browser gave up. EventSource hides the status code, so ask for it.
      es.close();
      this._diagnose(url);
    });
  }

  /** Why did the EventSource fail? GET the same URL, read only the status and the JSON error. */
  async _diagnose(url) {
    const controller = new AbortController();
    const conn = { close: () => controller.abort() };
    this._conn = conn;
    this._set({ state: "connecting" }, { type: "state" });
    let status = 0;
    let body = null;
    try {
      const response = await this._env.fetch(url, { signal: controller.signal, cache: "no-store" });
      status = response.status;
      if (response.ok) controller.abort(); // a working stream: do not read it
      else body = await response.json().catch(() => null);
    } catch {
      status = 0; // the network, not the server
    }
    if (this._conn !== conn) return;
    this._conn = null;
    this._failed(status, body?.error);
  }

  async _openFetch(url) {
    const controller = new AbortController();
    const conn = { close: () => controller.abort() };
    this._conn = conn;
    let response;
    try {
      response = await this._env.fetch(url, {
        signal: controller.signal,
        cache: "no-store",
        headers: { Accept: "text/event-stream" },
      });
    } catch {
      if (this._conn !== conn) return;
      this._conn = null;
      this._failed(0, null);
      return;
    }
    if (this._conn !== conn) return;
    if (!response.ok || !response.body) {
      const body = await response.json().catch(() => null);
      if (this._conn !== conn) return;
      this._conn = null;
      this._failed(response.status, body?.error);
      return;
    }
    this._opened();
    const parser = createParser();
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done || this._conn !== conn) break;
        const text = decoder.decode(value, { stream: true });
        this._options.onRaw?.(text, this);
        for (const item of parser.push(text)) {
          if (item.kind === "retry") this._serverRetryMs = item.ms;
          else if (item.kind === "event") this._receive(item.event, item.data, item.lastEventId);
          if (this._conn !== conn) break; // e.g. closed by the run's terminal status
        }
      }
    } catch {
      // The network dropped the stream: resumed below like a stream the server ended.
    }
    if (this._conn !== conn) return;
    this._conn = null;
    this._retryLater({ status: 0, code: "disconnected", message: "the stream ended; resuming from the cursor" });
  }

  _opened() {
    this._attempt = 0;
    this._authFailures = 0;
    this._set({ state: "open", error: null, retryAt: null }, { type: "state" });
  }

  /** A connection failed before streaming: decide between refresh, retry and giving up. */
  _failed(status, serverError) {
    const error = {
      status,
      code: serverError?.code ?? (status ? `http_${status}` : "network_error"),
      message: serverError?.message ?? (status ? `the server answered ${status}` : "the server could not be reached"),
    };
    const canRefresh = typeof this._options.token === "function";
    if (status === 401 && canRefresh && this._authFailures < this._options.maxAuthFailures) {
      // token_expired is routine (a token is only checked when a stream opens; docs/protocol.md §5),
      // and invalid_token follows a server restart with a new key: both mean "ask again".
      this._authFailures += 1;
      this._needFreshToken = true;
      this._retryLater(error, this._authFailures === 1 ? 0 : undefined);
    } else if (status >= 400 && status < 500 && status !== 408 && status !== 429) {
      this._disconnect();
      this._removeHostListeners();
      this._set({ state: "error", error, retryAt: null }, { type: "state" });
    } else {
      this._retryLater(error);
    }
  }

  _retryLater(error, delayMs) {
    if (delayMs === undefined) {
      // After a stream that was open, the server's `retry:` (as EventSource does); then backoff.
      delayMs = this._attempt === 0 && this._serverRetryMs != null ? this._serverRetryMs : this._backoffMs();
      this._attempt += 1;
    }
    this._set({ state: "connecting", error, retryAt: this._env.now() + delayMs }, { type: "state" });
    // One pending timer at most: an earlier one (a takeover) would otherwise
    // survive unseen, and reopen a subscription that was closed meanwhile.
    if (this._timer !== null) this._env.clearTimeout(this._timer);
    this._timer = this._env.setTimeout(() => {
      this._timer = null;
      this._open();
    }, delayMs);
  }

  /** Exponential backoff with "equal jitter": half fixed, half random, so clients spread out. */
  _backoffMs() {
    const { initialMs, maxMs } = this._options.backoff;
    const ceiling = Math.min(maxMs, initialMs * 2 ** this._attempt);
    return Math.round(ceiling / 2 + (this._env.random() * ceiling) / 2);
  }

  _disconnect() {
    const conn = this._conn;
    this._conn = null;
    conn?.close();
    if (this._timer !== null) this._env.clearTimeout(this._timer);
    this._timer = null;
  }

  _isActive() {
    return this.state !== "closed" && this.state !== "error";
  }

  _onVisibilityChange() {
    if (!this._isActive()) return;
    if (this._env.document.hidden) {
      this._disconnect();
      this._set({ state: "paused", retryAt: null }, { type: "state" });
    } else if (this.state === "paused") {
      this._open();
    }
  }

  _onOnline() {
    // Back online: do not sit out the rest of a long backoff.
    if (this._timer === null || !this._isActive()) return;
    this._disconnect();
    this._open();
  }

  _removeHostListeners() {
    this._env.document?.removeEventListener("visibilitychange", this._onVisibilityChange);
    this._env.window?.removeEventListener("online", this._onOnline);
  }

  // -- receiving ------------------------------------------------------------------------

  _receive(topic, data, id) {
    if (topic === "reset") {
      if (id) this.lastEventId = id;
      this._cursorId = null;
      this._starts.clear(); // every channel starts again from the oldest retained message
      const reset = parseJSON(data) ?? { reason: "unknown", cursor: id };
      // The server could not resume exactly (history pruned, or another database): it
      // starts again from the oldest message it has, so drop what we had (docs/protocol.md §6).
      this._clearData();
      this.lastReset = reset;
      this._notify({ type: "reset", reset });
      return;
    }
    const envelope = parseJSON(data);
    this._advance(id, envelope);
    const known = envelope && typeof envelope === "object" ? this._channels.get(envelope.channel) : undefined;
    if (!known || known.ended) return; // a channel removed, ended, or never asked for
    if (!known.topics.includes(envelope.topic)) return; // the token may cover more topics
    // Defensive: the server promises each message once, in id order. Per channel, because a
    // channel just added replays its earlier messages, with smaller ids than the others' latest.
    if (typeof envelope.id === "number") {
      if (envelope.id <= known.highestId) return;
      known.highestId = envelope.id;
    }
    if (isTextStreamData(envelope.data)) {
      this._receiveText(envelope);
      return;
    }
    const view = this.channels[envelope.channel];
    const limit = this._options.historyLimit;
    const messages = view.messages.length >= limit ? view.messages.slice(view.messages.length - limit + 1) : view.messages.slice();
    if (limit > 0) messages.push(envelope);
    const runStatus = envelope.topic === "run" && typeof envelope.data?.status === "string" ? envelope.data.status : view.runStatus;
    this._setView(envelope.channel, {
      ...view,
      messages,
      latest: envelope,
      latestByTopic: { ...view.latestByTopic, [envelope.topic]: envelope },
      runStatus,
    });
    this._options.onMessage?.(envelope, this);
    this._notify({ type: "message", message: envelope });
    if (this._options.closeOnRunEnd && TERMINAL_RUN_STATUSES.includes(runStatus)) this._runEnded(envelope.channel);
  }

  /**
   * Move the cursor to a frame's id, unless the frame is an added channel's earlier message
   * (its envelope id below the cursor's): then the cursor stays, for the other channels, and
   * that channel's own start moves to the frame, so a reconnect now resumes both exactly. The
   * first frame past the cursor means the stream passed every start it was opened with. (The
   * browser's own reconnect keeps the URL, with its `since`, and sends the last id it saw as
   * Last-Event-ID: the server moves each channel on to that id when later, as exact.)
   */
  _advance(id, envelope) {
    if (!id) return;
    const messageId = typeof envelope?.id === "number" ? envelope.id : null;
    if (messageId !== null && this._cursorId !== null && messageId < this._cursorId) {
      const start = this._starts.get(envelope.channel);
      if (start?.sent) start.from = id;
      return;
    }
    this.lastEventId = id;
    if (messageId === null) return;
    this._cursorId = messageId;
    for (const [channel, start] of this._starts) if (start.sent) this._starts.delete(channel);
  }

  /** A text-stream message: fold it into its channel's `texts` (see nextTextState) and say what changed. */
  _receiveText(envelope) {
    const { channel } = envelope;
    const sid = envelope.data.text_stream;
    const view = this.channels[channel];
    const next = nextTextState(view.texts[sid], envelope.data, envelope.topic);
    if (next !== null) this._setView(channel, { ...view, texts: { ...view.texts, [sid]: next.state } });
    this._options.onMessage?.(envelope, this);
    // null: a duplicate, or a gap (see nextTextState); nothing changed to show.
    if (next !== null) this._notify({ type: "text", channel, sid, delta: next.delta, replaced: next.delta === null });
  }

  /** closeOnRunEnd: one channel's run ended. Alone, the subscription closes; among several, that channel ends. */
  _runEnded(channel) {
    if (!this._several) {
      this.close();
      return;
    }
    this._channels.get(channel).ended = true;
    this._starts.delete(channel);
    this._setView(channel, { ...this.channels[channel], ended: true });
    this._notify({ type: "channel", channel, status: "ended" });
    this._idleIfEmpty();
  }

  /** Replace one channel's view; a one-channel subscription shows its data at the top level too. */
  _setView(channel, view) {
    const frozen = Object.freeze(view);
    this.channels = Object.freeze({ ...this.channels, [channel]: frozen });
    if (this._several) return;
    const { latest, latestByTopic, messages, runStatus, texts } = frozen;
    Object.assign(this, { latest, latestByTopic, messages, runStatus, texts });
  }

  _clearData() {
    // Among several channels the data is per channel only: a run status, a text id or "the
    // latest message" of a whole page means nothing (read `channels[name]`, or channel(name)).
    Object.assign(this, { messages: [], texts: {}, latest: null, latestByTopic: {}, runStatus: null });
    for (const [channel, known] of this._channels) {
      known.highestId = 0;
      this._setView(channel, { ...emptyView(channel, known.topics), ended: known.ended });
    }
  }

  // -- notifying ------------------------------------------------------------------------

  _set(fields, change) {
    Object.assign(this, fields);
    this._notify(change);
  }

  _snapshot() {
    this.snapshot = Object.freeze({
      state: this.state,
      error: this.error,
      lastEventId: this.lastEventId,
      latest: this.latest,
      latestByTopic: this.latestByTopic,
      messages: this.messages,
      runStatus: this.runStatus,
      lastReset: this.lastReset,
      retryAt: this.retryAt,
      texts: this.texts,
      channels: this.channels,
    });
  }

  _notify(change) {
    this._snapshot();
    for (const listener of [...this._listeners]) {
      try {
        listener(change, this);
      } catch (err) {
        // A listener's bug must not break the stream; still show it in the console.
        this._env.setTimeout(() => {
          throw err;
        }, 0);
      }
    }
  }
}

/**
 * One channel of a subscription, read like a one-channel subscription: `latest`,
 * `latestByTopic`, `messages`, `runStatus` and `texts` are the channel's; `state`, `error` and
 * `lastEventId` the stream's ("closed" once the channel ended or was removed); `onChange`
 * hears the changes about this channel and the stream's; `close()` removes the channel. So a
 * card of a page takes its handle where it took a subscription, and renderText works on it.
 */
export class ChannelSubscription {
  constructor(subscription, channel) {
    this.subscription = subscription;
    this.channel = channel;
    this._last = null; // the channel's data when it was removed
  }

  get _view() {
    return this.subscription.channels[this.channel] ?? this._last;
  }

  get topics() {
    return this._view.topics;
  }

  get state() {
    return this._view.ended || this._last ? "closed" : this.subscription.state;
  }

  get error() {
    return this.subscription.error;
  }

  get lastEventId() {
    return this.subscription.lastEventId;
  }

  get latest() {
    return this._view.latest;
  }

  get latestByTopic() {
    return this._view.latestByTopic;
  }

  get messages() {
    return this._view.messages;
  }

  get runStatus() {
    return this._view.runStatus;
  }

  get texts() {
    return this._view.texts;
  }

  /** Call `listener(change, handle)` after each change of this channel or of the stream. */
  onChange(listener) {
    return this.subscription.onChange((change) => {
      const about = change.message?.channel ?? change.channel;
      if (about === undefined || about === this.channel) listener(change, this);
    });
  }

  close() {
    this.subscription.remove(this.channel);
  }
}

function checkChannel(channel, topics) {
  if (!channel || typeof channel !== "string") throw new TypeError("subscribe: 'channel' is required");
  if (!Array.isArray(topics) || topics.length === 0) {
    // EventSource only delivers named events to listeners registered by name.
    throw new TypeError(`subscribe: the topics of '${channel}' must be a non-empty array`);
  }
}

const sameTopics = (a, b) => a.length === b.length && a.every((topic, i) => topic === b[i]);

const emptyView = (channel, topics) => ({
  channel,
  topics,
  latest: null,
  latestByTopic: {},
  messages: [],
  runStatus: null,
  texts: {},
  ended: false,
});

// -- text streams ------------------------------------------------------------------------

const isTextStreamData = (data) => typeof data?.text_stream === "string";

/**
 * The next state of one text stream after a message's `data`, with the appended piece, or
 * `delta: null` when the text was replaced; null when the message changes nothing. The rule:
 *   - `text`: replaces the text and its seq (a replay folds the stream into one message, and a
 *     retried attempt starts again with {seq: 0, text: ""}, so only the running attempt shows);
 *     the status is the message's, or "streaming";
 *   - `delta` with seq = current + 1: appended; its `status`, if any, ends the stream;
 *   - seq <= current: a duplicate, ignored;
 *   - seq > current + 1: a gap. An exactly-once stream never has one (every message is
 *     replayed after its cursor), so it means the pieces between were never seen here, e.g.
 *     the client started from a `lastEventId` in the middle of the stream. Appending would
 *     show a text with a silent hole; the stream keeps its state until a `text` message
 *     (a reload's replay, or the next attempt) replaces it.
 */
function nextTextState(current = { text: "", seq: 0, status: "streaming" }, data, topic) {
  if (!Number.isInteger(data.seq) || data.seq < 0) return null;
  const ending = typeof data.status === "string" ? { status: data.status, ...errorOf(data) } : null;
  if (typeof data.text === "string") {
    const state = { text: data.text, seq: data.seq, topic, ...(ending ?? { status: "streaming" }) };
    return { state: Object.freeze(state), delta: null };
  }
  if (typeof data.delta !== "string" || data.seq !== current.seq + 1) return null;
  // Engines concatenate strings into ropes: no copy of the whole text per delta.
  const state = { ...current, text: current.text + data.delta, seq: data.seq, topic, ...ending };
  return { state: Object.freeze(state), delta: data.delta };
}

const errorOf = (data) => (typeof data.error === "string" ? { error: data.error } : {});

/**
 * Show text stream `sid` of `subscription` in `element`, appending a text node per delta
 * instead of re-rendering the whole text (a 100,000-character answer at 50 deltas a second
 * stays smooth); the text is rewritten only when it is replaced (a replay, a new attempt)
 * or cleared (a reset). Returns a function that stops following.
 */
export function renderText(element, subscription, sid) {
  const show = () => {
    element.textContent = subscription.texts[sid]?.text ?? "";
  };
  show();
  return subscription.onChange((change) => {
    if (change.type === "text" && change.sid === sid) {
      if (change.replaced) show();
      else if (change.delta) element.appendChild(element.ownerDocument.createTextNode(change.delta));
    } else if (change.type === "reset" || change.type === "cleared") {
      show();
    }
  });
}

// -- helpers, exported for tests ---------------------------------------------------------

function hostEnvironment(overrides = {}) {
  const g = globalThis;
  return {
    EventSource: g.EventSource,
    fetch: g.fetch?.bind(g),
    document: g.document,
    window: g.window,
    setTimeout: g.setTimeout.bind(g),
    clearTimeout: g.clearTimeout.bind(g),
    now: Date.now,
    random: Math.random,
    ...overrides,
  };
}

/** A token function may return the token, or a grant `{token, expires_at}` (ISO string or Unix seconds). */
export function normalizeGrant(got) {
  if (typeof got === "string" && got) return { token: got, expiresAt: null };
  if (got && typeof got.token === "string" && got.token) {
    const raw = got.expires_at ?? got.expiresAt;
    let expiresAt = null;
    if (typeof raw === "number") expiresAt = raw * 1000;
    else if (typeof raw === "string" && !Number.isNaN(Date.parse(raw))) expiresAt = Date.parse(raw);
    return { token: got.token, expiresAt };
  }
  throw new TypeError("the token function must return a token string or {token, expires_at}");
}

function parseJSON(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

/**
 * An incremental text/event-stream parser (WHATWG HTML §9.2.6): `push(text)` returns what
 * the text completed, in order: {kind: "event", event, data, lastEventId},
 * {kind: "comment", text} and {kind: "retry", ms}. Chunks may split lines anywhere.
 */
export function createParser() {
  let buffer = "";
  let first = true;
  let skipLF = false; // a chunk ended on CR: a following LF belongs to the same line ending
  let data = "";
  let hasData = false;
  let eventType = "";
  let lastEventId = "";

  function line(text, out) {
    if (text === "") {
      // Blank line: dispatch. The id sticks even for an event without data.
      if (hasData) out.push({ kind: "event", event: eventType || "message", data: data.slice(0, -1), lastEventId });
      data = "";
      hasData = false;
      eventType = "";
      return;
    }
    if (text.startsWith(":")) {
      out.push({ kind: "comment", text: text.slice(1).replace(/^ /, "") });
      return;
    }
    const colon = text.indexOf(":");
    const field = colon === -1 ? text : text.slice(0, colon);
    const value = colon === -1 ? "" : text.slice(colon + 1).replace(/^ /, "");
    if (field === "data") {
      data += value + "\n";
      hasData = true;
    } else if (field === "event") {
      eventType = value;
    } else if (field === "id") {
      if (!value.includes("\0")) lastEventId = value;
    } else if (field === "retry") {
      if (/^[0-9]+$/.test(value)) out.push({ kind: "retry", ms: Number(value) });
    }
  }

  return {
    push(text) {
      const out = [];
      if (skipLF && text.startsWith("\n")) text = text.slice(1);
      skipLF = false;
      buffer += text;
      if (first && buffer.length > 0) {
        if (buffer.charCodeAt(0) === 0xfeff) buffer = buffer.slice(1);
        first = false;
      }
      const ending = /\r\n|\r|\n/g;
      let start = 0;
      let match;
      while ((match = ending.exec(buffer)) !== null) {
        // A CR at the very end may be half of a CRLF split across chunks.
        if (match[0] === "\r" && match.index === buffer.length - 1) skipLF = true;
        line(buffer.slice(start, match.index), out);
        start = ending.lastIndex;
      }
      buffer = buffer.slice(start);
      return out;
    },
  };
}
