// Compiled (never run) by tests/test_react.py with tsc in strict mode: how a TypeScript user
// calls realtime.js and react.js, and misuses the declarations must refuse (@ts-expect-error
// fails the check if the line compiles after all).
import { subscribe, TERMINAL_RUN_STATUSES, createParser, renderText } from "../../static/realtime.js";
import type {
  ChannelSubscription,
  ChannelView,
  RealtimeSnapshot,
  RunData,
  Subscription,
  TextStreamData,
  TextStreamState,
} from "../../static/realtime.js";
import { useRealtime } from "../../static/react.js";

interface Topics {
  status: { percent: number };
  log: { message: string };
  run: RunData;
}

const sub: Subscription<Topics> = subscribe<Topics>({
  channel: "run.42",
  topics: ["status", "log", "run"],
  token: async ({ channel, topics }) => ({ token: `${channel}:${topics.join(",")}`, expires_at: "2026-11-28T06:00:00Z" }),
  closeOnRunEnd: true,
  historyLimit: 50,
  transport: "fetch",
  onRaw: (text) => text.length,
  onMessage: (message) => {
    if (message.topic === "log") message.data.message.toUpperCase(); // narrowed by topic
  },
});

const stop: () => void = sub.onChange((change, current) => {
  if (change.type === "message" && change.message.topic === "status") change.message.data.percent.toFixed();
  if (change.type === "reset") change.reset.cursor.length;
  const percent: number | undefined = current.latestByTopic.status?.data.percent;
  const done: boolean = TERMINAL_RUN_STATUSES.includes(current.runStatus as "completed");
  return [percent, done, current.state === "paused", current.error?.code];
});
stop();

// Text streams: the state by id, and changes that say whether to append or to re-render.
const answer: TextStreamState<"status" | "log" | "run"> | undefined = sub.texts["answer-1"];
const finished: boolean = answer?.status === "completed" || answer?.error !== undefined;
const stopText: () => void = sub.onChange((change) => {
  if (change.type !== "text") return;
  if (change.replaced) {
    const nothing: null = change.delta;
    return [nothing, sub.texts[change.sid]?.text.length];
  }
  return change.delta.length; // a string when not replaced
});
stopText();
renderText(document.createElement("pre"), sub, "answer-1")();
const piece: TextStreamData = { text_stream: "answer-1", seq: 3, delta: "Hel" };

sub.reset({ replay: true });
sub.reconnect({ transport: "eventsource" });
sub.close();
const snapshot: RealtimeSnapshot<Topics> = sub.snapshot;
for (const item of createParser().push("data: x\n\n")) if (item.kind === "retry") item.ms.toFixed();

// Untyped topics: data is JSON (any), as in plain JavaScript.
const plain = subscribe({ channel: "c", topics: ["a"], token: "t" });
plain.latest?.data.anything;

export function RunProgress({ runId }: { runId: string }) {
  const { state, latest, latestByTopic, messages, runStatus, error, texts } = useRealtime<Topics>({
    channel: `run.${runId}`,
    topics: ["status", "log", "run"],
    token: () => fetch("/api/realtime/token").then((response) => response.json() as Promise<{ token: string }>),
    closeOnRunEnd: true,
  });
  const lines: string[] = messages.flatMap((m) => (m.topic === "log" ? [m.data.message] : []));
  const answerText: string = texts[`answer-${runId}`]?.text ?? "";
  return { state, latest, percent: latestByTopic.status?.data.percent ?? 0, lines, runStatus, error, snapshot, answerText, finished, piece };
}

// Several channels on one stream: per-channel data, handles, add() and remove().
const hub = subscribe<Topics>({
  channels: { "run.1": ["status", "run"], "run.2": ["log"] },
  token: async ({ channels }) => ({ token: Object.keys(channels).join(","), expires_at: 1_800_000_000 }),
  closeOnRunEnd: true,
});
const first: ChannelView<Topics> | undefined = hub.channels["run.1"];
const firstDone: boolean = first?.ended === true || first?.runStatus === "completed";
const card: ChannelSubscription<Topics> = hub.add("run.3", ["status", "log", "run"], { from: "start" });
const cardPercent: number | undefined = card.latestByTopic.status?.data.percent;
card.onChange((change, handle) => {
  if (change.type === "channel") return [change.status === "ended", handle.state === "idle"];
  if (change.type === "text") return change.channel;
});
renderText(document.createElement("pre"), card, "answer-1");
hub.forChannel("run.2")?.close();
hub.remove("run.1");
const hubState: boolean = hub.state === "idle";

export function RunsProgress({ runIds }: { runIds: string[] }) {
  const { channels, state } = useRealtime<Topics>({
    channels: Object.fromEntries(runIds.map((id) => [`run.${id}`, ["status", "run"] as const])),
    token: "t",
  });
  return runIds.map((id) => [state, channels[`run.${id}`]?.latestByTopic.status?.data.percent, firstDone, cardPercent, hubState]);
}

// @ts-expect-error: one channel, or several, not both
subscribe({ channel: "c", topics: ["a"], channels: { d: ["a"] }, token: "t" });
// @ts-expect-error: a channel's topics come from the map
hub.add("run.4", ["metrics"]);
// @ts-expect-error: a channel's view is read-only
hub.channels["run.1"]!.ended = true;
// @ts-expect-error: topics must be listed
subscribe({ channel: "c", token: "t" });
// @ts-expect-error: no such transport
subscribe({ channel: "c", topics: ["a"], token: "t", transport: "websocket" });
// @ts-expect-error: a topic outside the map
subscribe<Topics>({ channel: "c", topics: ["metrics"], token: "t" });
// @ts-expect-error: not a state
sub.state === "reconnecting";
// @ts-expect-error: status data has no message
sub.latestByTopic.status?.data.message;
// @ts-expect-error: the snapshot is read-only
snapshot.messages.push(snapshot.messages[0]!);
// @ts-expect-error: not a text stream status
answer?.status === "thinking";
// @ts-expect-error: a text stream's state is read-only
sub.texts["answer-1"]!.text = "changed";
// @ts-expect-error: which text stream to render
renderText(document.createElement("pre"), sub);
// @ts-expect-error: a delta change's piece is a string, a replacement's null
sub.onChange((change) => change.type === "text" && change.delta.length);
