/**
 * TypeScript declarations for realtime.js (and, through react.d.ts, react.js's useRealtime).
 * They describe the code; static/README.md explains it. Checked against a usage file in strict
 * mode by tests/test_react.py.
 *
 * `M`, the topic map, names each topic's data type: `subscribe<{status: {percent: number},
 * log: {message: string}, run: RunData}>({...})` types `latestByTopic.status.data.percent`, and
 * narrows `message.data` once `message.topic` is checked. Without it, data is `any` (JSON).
 */
/// <reference lib="dom" />

/** `{topic: type of its data}`: an interface or a type literal. */
export type TopicMap = object;
// Helpers, not exported (see `export {}` at the end).
type AnyTopics = Record<string, any>;
type TopicOf<M> = keyof M & string;

/** One message as the server sends it (the envelope, docs/protocol.md §5). */
export interface RealtimeMessage<Topic extends string = string, Data = any> {
  readonly id: number;
  readonly channel: string;
  readonly topic: Topic;
  readonly data: Data;
  readonly run_id: string | null;
  /** ISO 8601, UTC. */
  readonly created_at: string;
}

/** Any message of the map, as a union discriminated by `topic`. */
export type MessageOf<M extends TopicMap> = { [T in TopicOf<M>]: RealtimeMessage<T, M[T]> }[TopicOf<M>];

/** What the lifecycle topic `run` carries. */
export interface RunData {
  status: string;
  output?: unknown;
  error?: string;
}

/** "idle": a several-channel subscription with no channel to watch, so no connection (until add()). */
export type RealtimeState = "connecting" | "open" | "paused" | "closed" | "error" | "idle";

export interface RealtimeError {
  /** The HTTP status, or 0 when the server could not be reached. */
  status: number;
  /** The server's error code, or e.g. "network_error", "http_503", "disconnected", "token_unavailable". */
  code: string;
  message: string;
}

/** The server's `event: reset`: history was cut, data restarts from the oldest retained message. */
export interface RealtimeReset {
  reason: string;
  cursor: string;
}

/** What POST /api/realtime/token answers; `expires_at` lets the client refresh before expiry. */
export interface TokenGrant {
  token: string;
  /** ISO 8601 string or Unix seconds. */
  expires_at?: string | number | null;
  expiresAt?: string | number | null;
}

/** What the token function is asked for: one channel's topics ... */
export type TokenRequest<M extends TopicMap = AnyTopics> = { channel: string; topics: readonly TopicOf<M>[] };
/** ... or, for subscribe({channels}), every channel's: the set the stream should carry now. */
export type ChannelsTokenRequest<M extends TopicMap = AnyTopics> = { channels: { readonly [channel: string]: readonly TopicOf<M>[] } };

export type TokenSource<M extends TopicMap = AnyTopics, Request = TokenRequest<M>> =
  | string
  | ((request: Request) => string | TokenGrant | Promise<string | TokenGrant>);

export type TextStreamStatus = "streaming" | "completed" | "failed" | "cancelled";

/** The `data` of a text-stream message (docs/protocol.md, "text streams"). */
export type TextStreamData = { text_stream: string; seq: number; status?: Exclude<TextStreamStatus, "streaming">; error?: string } & (
  | { delta: string }
  | { text: string }
);

/** One text stream as the client keeps it, in `texts[sid]`. */
export interface TextStreamState<Topic extends string = string> {
  /** The running attempt's text so far. */
  readonly text: string;
  /** The seq of the last message folded in: 0 before the first delta. */
  readonly seq: number;
  /** "streaming" until the stream's last message says how it ended. */
  readonly status: TextStreamStatus;
  readonly topic: Topic;
  /** The error's type, when the stream failed. */
  readonly error?: string;
}

export type RealtimeChange<M extends TopicMap = AnyTopics> =
  | { type: "state" }
  | { type: "message"; message: MessageOf<M> }
  | { type: "reset"; reset: RealtimeReset }
  | { type: "cleared" }
  /** Text stream `sid` of `channel` changed: `delta` was appended, or (`replaced`) its text was replaced: read `texts[sid]`. */
  | { type: "text"; channel: string; sid: string; delta: string; replaced: false }
  | { type: "text"; channel: string; sid: string; delta: null; replaced: true }
  /** Several channels: one was added, ended (closeOnRunEnd) or removed. */
  | { type: "channel"; channel: string; status: "added" | "ended" | "removed" };

export type ChangeListener<M extends TopicMap = AnyTopics, S = Subscription<M>> = (change: RealtimeChange<M>, subscription: S) => void;

/** The host objects realtime.js uses; tests pass fakes. */
export interface HostEnvironment {
  EventSource: { new (url: string): EventSource };
  fetch: typeof fetch;
  document: Document | undefined;
  window: Window | undefined;
  setTimeout: (callback: () => void, ms: number) => unknown;
  clearTimeout: (handle: any) => void;
  now: () => number;
  random: () => number;
}

/** What subscribe() takes: one channel and its topics, or several channels (`ChannelsOptions`). */
export type SubscribeOptions<M extends TopicMap = AnyTopics> = ChannelOptions<M> | ChannelsOptions<M>;

export interface ChannelOptions<M extends TopicMap = AnyTopics> extends CommonOptions<M> {
  channel: string;
  /** EventSource delivers named events only to listeners registered by name: list them. */
  topics: readonly TopicOf<M>[];
  channels?: undefined;
  token: TokenSource<M>;
}

export interface ChannelsOptions<M extends TopicMap = AnyTopics> extends CommonOptions<M> {
  /** `{channel: topics}`, each channel with its own topics (may be empty: add() later). */
  channels: { readonly [channel: string]: readonly TopicOf<M>[] };
  channel?: undefined;
  topics?: undefined;
  /** A string (add() needs a function), or a function asked for the whole set of channels. */
  token: TokenSource<M, ChannelsTokenRequest<M>>;
}

export interface CommonOptions<M extends TopicMap = AnyTopics> {
  /** Default "/api/realtime/subscribe". */
  url?: string;
  /** Start after this cursor instead of replaying all retained history. */
  lastEventId?: string | null;
  /** How many messages `messages` keeps; default 100. */
  historyLimit?: number;
  /** Close once topic "run" reports completed, failed or cancelled; default false. Among several channels, end that channel only. */
  closeOnRunEnd?: boolean;
  /** Close while the tab is hidden, resume when visible; default true. */
  pauseWhenHidden?: boolean;
  /** "fetch" reads the stream with fetch() and hands each raw chunk to `onRaw`. */
  transport?: "eventsource" | "fetch";
  backoff?: { initialMs?: number; maxMs?: number };
  /** Refresh a token this long before its known expiry; default 1000. */
  tokenMarginMs?: number;
  /** Give up after this many 401s in a row; default 3. */
  maxAuthFailures?: number;
  onMessage?: (message: MessageOf<M>, subscription: Subscription<M>) => void;
  onChange?: ChangeListener<M>;
  onRaw?: (text: string, subscription: Subscription<M>) => void;
  env?: Partial<HostEnvironment>;
}

/** One channel's data: what a one-channel subscription also shows at its top level. */
export interface ChannelData<M extends TopicMap = AnyTopics> {
  readonly latest: MessageOf<M> | null;
  readonly latestByTopic: { readonly [T in TopicOf<M>]?: RealtimeMessage<T, M[T]> };
  /** The last `historyLimit` messages, oldest first; text-stream messages are kept in `texts` only. */
  readonly messages: readonly MessageOf<M>[];
  /** data.status of the newest message on topic "run". */
  readonly runStatus: string | null;
  /** The text streams, by id. */
  readonly texts: { readonly [sid: string]: TextStreamState<TopicOf<M>> };
}

/** A channel in `channels`: its data, frozen, replaced only when that channel changes. */
export interface ChannelView<M extends TopicMap = AnyTopics> extends ChannelData<M> {
  readonly channel: string;
  readonly topics: readonly TopicOf<M>[];
  /** closeOnRunEnd among several channels: its run ended; it gets nothing more, its data stays. */
  readonly ended: boolean;
}

/**
 * Everything a UI shows, in one frozen object replaced (never mutated) on every change. The
 * channel data at the top level is the channel's for one channel; among several channels it
 * stays empty: read `channels[name]`.
 */
export interface RealtimeSnapshot<M extends TopicMap = AnyTopics> extends ChannelData<M> {
  readonly state: RealtimeState;
  readonly error: RealtimeError | null;
  /** The cursor: the last `id:` received; one for every channel of the stream. */
  readonly lastEventId: string | null;
  readonly lastReset: RealtimeReset | null;
  /** When the next reconnect attempt is due (ms since epoch). */
  readonly retryAt: number | null;
  /** Every channel watched, by name. */
  readonly channels: { readonly [channel: string]: ChannelView<M> };
}

/** A subscription has every field of its snapshot, live (declaration merging: not written twice). */
export interface Subscription<M extends TopicMap = AnyTopics> extends RealtimeSnapshot<M> {}

export declare class Subscription<M extends TopicMap = AnyTopics> {
  constructor(options: SubscribeOptions<M>);
  /** The channel and topics of a one-channel subscription; null for several. */
  readonly channel: string | null;
  readonly topics: readonly TopicOf<M>[] | null;
  readonly transport: "eventsource" | "fetch";
  readonly snapshot: RealtimeSnapshot<M>;
  /** Call `listener` after every change; returns a function that stops it. */
  onChange(listener: ChangeListener<M>): () => void;
  close(): void;
  /** Forget the messages; `{replay: true}` also forgets the cursor and replays from the oldest. */
  reset(options?: { replay?: boolean }): void;
  reconnect(options?: { transport?: "eventsource" | "fetch" }): void;
  /** Drop the connection as a network failure would (workshops, tests). */
  drop(): void;
  /**
   * Several channels: watch one more, from its start (default) or from a cursor of it. Adds
   * of one tick reopen the stream once, from the cursor, with a token for the new set.
   */
  add(channel: string, topics: readonly TopicOf<M>[], options?: { from?: "start" | string }): ChannelSubscription<M>;
  /** Several channels: stop watching one; its messages are ignored, the next connection leaves it out. */
  remove(channel: string): void;
  /** A channel's handle, or null when it is not watched. */
  forChannel(channel: string): ChannelSubscription<M> | null;
}

/** One channel of a subscription, read like a one-channel subscription; close() removes the channel. */
export interface ChannelSubscription<M extends TopicMap = AnyTopics> extends ChannelData<M> {}

export declare class ChannelSubscription<M extends TopicMap = AnyTopics> {
  readonly subscription: Subscription<M>;
  readonly channel: string;
  readonly topics: readonly TopicOf<M>[];
  /** The stream's state, or "closed" once the channel ended or was removed. */
  readonly state: RealtimeState;
  readonly error: RealtimeError | null;
  readonly lastEventId: string | null;
  /** Hear the changes of this channel and of the stream; returns a function that stops it. */
  onChange(listener: ChangeListener<M, ChannelSubscription<M>>): () => void;
  close(): void;
}

export declare function subscribe<M extends TopicMap = AnyTopics>(options: SubscribeOptions<M>): Subscription<M>;

export declare const TERMINAL_RUN_STATUSES: readonly ["completed", "failed", "cancelled"];

export declare function normalizeGrant(got: string | TokenGrant): { token: string; expiresAt: number | null };

/**
 * Show text stream `sid` in `element`: a text node appended per delta, the whole text written
 * only when it is replaced or cleared. Returns a function that stops following.
 */
export declare function renderText<M extends TopicMap>(
  element: Element,
  subscription: Subscription<M> | ChannelSubscription<M>,
  sid: string,
): () => void;

export type ParsedItem =
  | { kind: "event"; event: string; data: string; lastEventId: string }
  | { kind: "comment"; text: string }
  | { kind: "retry"; ms: number };

/** An incremental text/event-stream parser: `push(text)` returns what the text completed. */
export declare function createParser(): { push(text: string): ParsedItem[] };

/** react.js's hook takes subscribe()'s options and returns the snapshot (declared in react.d.ts). */
export type UseRealtimeOptions<M extends TopicMap = AnyTopics> = SubscribeOptions<M>;
export type UseRealtimeResult<M extends TopicMap = AnyTopics> = RealtimeSnapshot<M>;

// Only what is marked `export` above is exported (a .d.ts would otherwise export every declaration).
export {};
