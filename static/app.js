// The demo page: start reports, ask a question and watch the answer stream in, each run's
// channel on ONE stream for the whole page (realtime.js's several-channel subscription: a
// browser keeps six HTTP/1.1 connections per host, so a stream per card made the seventh card
// wait), and (in the Workshop panel) show the raw bytes of that stream, each frame's channel
// beside it. The URL keeps `?run=<id>` for every run on the page, so a reload picks them all up
// again, over one connection, with their whole history (an answer comes back as its text so
// far, then grows).
import { renderText, subscribe, TERMINAL_RUN_STATUSES } from "./realtime.js";

const STAGES = {
  fetching: "Fetching data",
  processing: "Processing",
  generating: "Generating the PDF",
  done: "Done",
};
const RUN_STATUSES = {
  queued: "Queued",
  running: "Running",
  completed: "Completed",
  failed: "Failed",
  cancelled: "Cancelled",
};
// The Ask card's status line, by the state of its answer (data-answer on the card).
const ANSWER_STATES = {
  idle: "",
  asking: "Asking…",
  thinking: "Thinking…",
  streaming: "Streaming…",
  stopping: "Stopping…",
  retrying: "That attempt failed; trying again…",
  completed: "Completed",
  stopped: "Stopped",
  failed: "Failed",
};
const MAX_FRAME_BLOCKS = 400;
// How long a run may stay queued before the page asks whether any job worker polls, and how
// often it asks again while the run waits.
const WORKER_CHECK_MS = 3000;

const $ = (selector, root = document) => root.querySelector(selector);
const reports = new Map(); // run_id -> {sub, card}: sub is the run's channel on the hub
let answer = null; // the Ask card's run: {runId, sub, cancelToken, sid, stopRender, stopping}
const params = new URLSearchParams(location.search);
let workshopOn = params.get("workshop") === "1";

// The page's one stream. Each card adds its run's channel (from the channel's start) and
// removes it when dismissed; a run that ends stops its channel (closeOnRunEnd), not the stream.
const hub = subscribe({
  channels: {},
  // Asked for the whole set each time it changes: the demo's policy lets anyone watch any run.
  token: ({ channels }) => postJSON("/api/realtime/token", { channels }),
  historyLimit: 1000,
  closeOnRunEnd: true,
  transport: workshopOn ? "fetch" : "eventsource",
  onRaw: (text) => showRaw(text),
});
hub.onChange((change) => {
  if (change.type === "state" && workshopOn) noteConnection(hub);
  if (workshopOn || change.type === "state" || change.type === "channel") renderStreams();
});

// -- talking to the server -----------------------------------------------------------------

async function postJSON(url, body) {
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const json = await response.json().catch(() => null);
  if (!response.ok) {
    throw new Error(json?.error?.message ?? `the server answered ${response.status}`);
  }
  return json;
}

async function startReport() {
  const button = $("#generate");
  button.disabled = true;
  say("Starting a report…");
  try {
    const grant = await postJSON("/demo/reports", {});
    watch(grant);
    say("Report started.");
  } catch (err) {
    say(`Could not start a report: ${err.message}`, true);
  } finally {
    button.disabled = false;
  }
}

/**
 * A reload: what each run is (report or answer, its cancel token) from /demo/token, all at
 * once; then every card is added in the same tick, so the hub opens one stream for them all.
 */
async function resume(runIds) {
  const grants = await Promise.allSettled(runIds.map((runId) => postJSON("/demo/token", { run_id: runId })));
  // Oldest first, so the newest ends up on top as when they were started.
  for (const [i, got] of grants.entries()) {
    if (got.status === "rejected") say(`Could not resume run ${runIds[i]}: ${got.reason.message}`, true);
    else if (got.value.kind === "ask") followAnswer(got.value);
    else watch(got.value);
  }
}

// -- one report ---------------------------------------------------------------------------------

function watch(grant) {
  const runId = grant.run_id;
  if (reports.has(runId)) return;
  const card = createCard(runId);
  const sub = hub.add(grant.channel, grant.topics);
  sub.onChange((change, sub) => render(card, change, sub));
  renderConnection(card, sub);
  reports.set(runId, { card, sub });
  syncURL();
  renderStreams();
  setTimeout(() => checkWorkers(card), WORKER_CHECK_MS);
}

/**
 * While the run stays queued, show whether a job worker is there to run it: /readyz
 * warns `jobs_workers` when runs wait and no worker has polled lately (common/health.py).
 * With JOBS_EMBEDDED off and no `flask jobs worker`, the card said "Queued" forever.
 */
async function checkWorkers(card) {
  if (!card.isConnected || card.dataset.runStatus !== "queued") return;
  const warning = await workersWarning();
  if (card.dataset.runStatus === "queued") $(".no-worker", card).hidden = !warning;
  setTimeout(() => checkWorkers(card), WORKER_CHECK_MS);
}

async function workersWarning() {
  try {
    const body = await (await fetch("/readyz", { cache: "no-store" })).json();
    return body.warnings?.jobs_workers ?? null;
  } catch {
    return null; // the server is away: the card's connection state says so
  }
}

function createCard(runId) {
  const item = $("#report-template").content.firstElementChild.cloneNode(true);
  const short = runId.length > 12 ? runId.slice(0, 8) : runId;
  item.dataset.runId = runId;
  const title = $(".report-title", item);
  title.id = `report-${cssSafe(runId)}`;
  $(".report-card", item).setAttribute("aria-labelledby", title.id);
  $(".run-id", item).textContent = short;
  $(".run-id", item).title = runId;
  const progress = $(".progress", item);
  progress.setAttribute("aria-label", `Progress of report ${short}`);
  $(".log", item).setAttribute("aria-label", `Log of report ${short}`);
  const dismiss = $(".dismiss", item);
  dismiss.setAttribute("aria-label", `Remove report ${short} from this page`);
  dismiss.addEventListener("click", () => forget(runId));
  $("#reports").prepend(item);
  $("#empty").hidden = true;
  return item;
}

function forget(runId) {
  const report = reports.get(runId);
  if (!report) return;
  report.sub.close();
  report.card.remove();
  reports.delete(runId);
  $("#empty").hidden = reports.size > 0;
  syncURL();
  renderStreams();
  $("#generate").focus();
}

function render(card, change, sub) {
  if (change.type === "message") renderMessage(card, change.message);
  if (change.type === "reset" || change.type === "cleared") clearCard(card, change.reset);
  if (change.type === "state" || change.type === "channel") renderConnection(card, sub);
  $(".cursor-value", card).textContent = sub.lastEventId ?? "none yet";
}

function renderMessage(card, { id, topic, data, created_at: createdAt }) {
  if (topic === "status") {
    const percent = Math.max(0, Math.min(100, Number(data.percent) || 0));
    $(".progress", card).value = percent;
    $(".percent", card).textContent = `${percent}%`;
    $(".stage", card).textContent = `${STAGES[data.stage] ?? data.stage} · ${percent}%`;
    if (data.url) {
      const link = $(".download", card);
      link.href = data.url;
      link.hidden = false;
    }
  } else if (topic === "log") {
    const item = document.createElement("li");
    item.dataset.id = id;
    item.className = `log-line level-${cssSafe(data.level ?? "info")}`;
    const time = document.createElement("time");
    time.dateTime = createdAt;
    time.textContent = new Date(createdAt).toLocaleTimeString([], { hour12: false });
    const text = document.createElement("span");
    text.className = "log-message";
    text.textContent = data.message ?? JSON.stringify(data);
    item.append(time, text);
    const log = $(".log", card);
    log.append(item);
    log.scrollTop = log.scrollHeight;
    $(".log-count", card).textContent = log.children.length;
  } else if (topic === "run" && RUN_STATUSES[data.status]) {
    card.dataset.runStatus = data.status;
    if (data.status !== "queued") $(".no-worker", card).hidden = true;
    const badge = $(".run-status", card);
    badge.textContent = RUN_STATUSES[data.status];
    if (data.status === "failed" || data.status === "cancelled") {
      const reason = typeof data.error === "string" ? data.error : data.error?.message;
      note(card, `The report ${data.status === "failed" ? "failed" : "was cancelled"}${reason ? `: ${reason}` : "."}`);
      $(".stage", card).textContent = RUN_STATUSES[data.status];
    }
  }
}

function clearCard(card, reset) {
  $(".log", card).replaceChildren();
  $(".log-count", card).textContent = "0";
  $(".progress", card).value = 0;
  $(".percent", card).textContent = "0%";
  $(".download", card).hidden = true;
  if (reset) {
    const why = reset.reason === "history_truncated" ? "older messages were pruned" : "the cursor was not recognised";
    note(card, `The server could not resume exactly (${why}); showing what it still has.`);
  }
}

function note(card, text) {
  const el = $(".report-note", card);
  el.textContent = text;
  el.hidden = false;
}

function renderConnection(card, sub) {
  card.dataset.connection = sub.state;
  $(".connection-label", card).textContent = connectionLabel(sub);
  $(".connection", card).title = sub.error?.message ?? "";
}

function connectionLabel(sub) {
  switch (sub.state) {
    case "open":
      return "Live";
    case "connecting":
      return sub.lastEventId ? "Reconnecting…" : "Connecting…";
    case "paused":
      return "Paused";
    case "closed":
      return TERMINAL_RUN_STATUSES.includes(sub.runStatus) ? "Finished" : "Closed";
    case "idle":
      return "Idle";
    default:
      return `Error: ${sub.error?.message ?? "disconnected"}`;
  }
}

// -- the Ask card ---------------------------------------------------------------------------------
//
// One answer at a time: asking again follows the new run (the old one goes on on the server).
// The answer is a text stream on topic "answer" (sub.texts); renderText appends each piece as a
// text node, so a long answer never re-renders whole, and a reload gets the text so far in one
// message, shown at once.

async function ask(event) {
  event.preventDefault();
  const button = $("#ask-button");
  button.disabled = true;
  showAnswerState("asking");
  try {
    followAnswer(await postJSON("/demo/ask", { prompt: $("#ask-prompt").value }));
  } catch (err) {
    showAnswerState(answer ? answerState(answer) : "idle");
    showAnswerError(`Could not ask: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

function followAnswer(grant) {
  forgetAnswer();
  const runId = grant.run_id;
  const card = $("#ask-card");
  const state = { runId, cancelToken: grant.cancel_token ?? null, sid: null, stopRender: null, stopping: false };
  answer = state;
  $("#answer").replaceChildren();
  $("#answer-question").textContent = grant.prompt ?? "";
  $(".answer-question", card).hidden = !grant.prompt;
  $("#ask-run-id").textContent = shortId(runId);
  $("#ask-run-id").title = runId;
  $("#answer-block").hidden = false;
  $(".connection", card).hidden = false;
  card.dataset.runStatus = "queued";
  state.sub = hub.add(grant.channel, grant.topics);
  state.sub.onChange((change, sub) => renderAnswer(state, change, sub));
  renderConnection(card, state.sub);
  showAnswerState(answerState(state));
  syncURL();
  renderStreams();
  setTimeout(() => checkWorkers(card), WORKER_CHECK_MS);
}

function forgetAnswer() {
  if (!answer) return;
  answer.stopRender?.();
  answer.sub.close();
  answer = null;
}

function renderAnswer(state, change, sub) {
  if (state !== answer) return;
  const card = $("#ask-card");
  if (change.type === "text" && change.sid !== state.sid && sub.texts[change.sid]?.topic === "answer") {
    // The answer's stream, first seen: show its text so far, then follow it piece by piece.
    state.stopRender?.();
    state.sid = change.sid;
    state.stopRender = renderText($("#answer"), sub, change.sid);
  }
  if (change.type === "text") keepAnswerInView();
  if (change.type === "message" && change.message.topic === "run" && RUN_STATUSES[change.message.data.status]) {
    card.dataset.runStatus = change.message.data.status;
    if (change.message.data.status !== "queued") $(".no-worker", card).hidden = true;
  }
  if (change.type === "state" || change.type === "channel") renderConnection(card, sub);
  $(".cursor-value", card).textContent = sub.lastEventId ?? "none yet";
  showAnswerState(answerState(state));
}

/** What the status line says, from the answer's text stream and the run's status. */
function answerState({ sub, sid, stopping }) {
  const text = sid ? sub.texts[sid] : null;
  const run = sub.runStatus;
  const ended = TERMINAL_RUN_STATUSES.includes(run);
  if (text?.status === "completed") return "completed";
  if (text?.status === "cancelled" || run === "cancelled") return "stopped";
  if (text?.status === "failed" || run === "failed") return ended || run === null ? "failed" : "retrying";
  if (stopping) return "stopping";
  if (run === "completed") return "completed";
  return text?.text ? "streaming" : "thinking";
}

function showAnswerState(name) {
  const card = $("#ask-card");
  card.dataset.answer = name;
  let label = ANSWER_STATES[name];
  if (name === "failed" && answer) {
    const data = answer.sub.latestByTopic.run?.data;
    const reason = typeof data?.error === "string" ? data.error : answer.sid && answer.sub.texts[answer.sid]?.error;
    if (reason) label = `Failed: ${reason}`;
  }
  $("#ask-status").textContent = label;
  $("#ask-status").classList.remove("ask-status-error");
  $("#answer").setAttribute("aria-busy", String(["thinking", "streaming", "stopping", "retrying"].includes(name)));
  $("#stop").disabled = !answer || !["thinking", "streaming", "retrying"].includes(name);
}

/** A request of the card failed: say so on its status line until the answer's state changes. */
function showAnswerError(text) {
  $("#ask-status").textContent = text;
  $("#ask-status").classList.add("ask-status-error");
}

/** Follow the answer's end as it grows, unless the reader scrolled up to read. */
function keepAnswerInView() {
  const box = $("#answer");
  if (box.scrollHeight - box.scrollTop - box.clientHeight > 48) return;
  requestAnimationFrame(() => {
    box.scrollTop = box.scrollHeight;
  });
}

/**
 * Stop: cancel the run with its cancel token (a capability for this run only, which came with
 * the grant). The job's next write then ends the answer `cancelled`, keeping its text. A token
 * that expired (401) is replaced by a fresh grant's, once.
 */
async function stopAnswer() {
  const state = answer;
  if (!state) return;
  state.stopping = true;
  showAnswerState(answerState(state));
  try {
    let response = await cancelRun(state);
    if (response.status === 401) {
      state.cancelToken = (await postJSON("/demo/token", { run_id: state.runId })).cancel_token ?? null;
      response = await cancelRun(state);
    }
    // 409: it ended meanwhile; its end is on its way.
    if (!response.ok && response.status !== 409) {
      const json = await response.json().catch(() => null);
      throw new Error(json?.error?.message ?? `the server answered ${response.status}`);
    }
  } catch (err) {
    state.stopping = false;
    showAnswerState(answerState(state));
    showAnswerError(`Could not stop: ${err.message}`);
  }
}

function cancelRun({ runId, cancelToken }) {
  return fetch(`/api/runs/${encodeURIComponent(runId)}/cancel`, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...(cancelToken ? { Authorization: `Bearer ${cancelToken}` } : {}) },
    body: "{}",
  });
}

// -- workshop ---------------------------------------------------------------------------------

function setWorkshop(on) {
  workshopOn = on;
  $("#workshop").hidden = !on;
  $("#workshop-toggle").setAttribute("aria-pressed", String(on));
  document.body.classList.toggle("workshop-on", on);
  // Switch the stream to the transport that can show raw bytes (or back), from its cursor.
  hub.reconnect({ transport: on ? "fetch" : "eventsource" });
  syncURL();
  renderStreams();
}

function showRaw(text) {
  if (!workshopOn) return;
  const block = document.createElement("div");
  block.className = "chunk";
  const label = document.createElement("span");
  label.className = "chunk-label";
  label.textContent = `${clock()} · ${new TextEncoder().encode(text).length} bytes`;
  block.append(label);
  const lines = text.split(/\r\n|\r|\n/);
  if (lines.at(-1) === "") lines.pop(); // the end of the last line, not a line of its own
  for (const line of lines) {
    const el = document.createElement("span");
    el.className = `line ${lineKind(line)}`;
    el.textContent = line;
    // Which card's channel a frame is for, beside its data line (CSS shows it; the text stays the bytes).
    const channel = lineKind(line) === "line-data" ? channelOf(line) : null;
    if (channel) el.dataset.channel = shortId(channel.replace(/^run\./, ""));
    block.append(el);
  }
  appendFrames(block);
}

/** The envelope's channel in a `data:` line, if the chunk holds the whole line. */
function channelOf(line) {
  try {
    return JSON.parse(line.slice(line.indexOf(":") + 1)).channel ?? null;
  } catch {
    return null;
  }
}

function lineKind(line) {
  if (line === "") return "line-blank";
  if (line.startsWith(":")) return "line-comment";
  const field = line.split(":", 1)[0];
  return ["id", "event", "data", "retry"].includes(field) ? `line-${field}` : "line-other";
}

function noteConnection(sub) {
  let text;
  if (sub.state === "open") {
    text = sub.lastEventId ? `connected, resuming after ${sub.lastEventId}` : "connected, replaying from the start";
  } else if (sub.state === "connecting" && sub.retryAt) {
    const seconds = Math.max(0, (sub.retryAt - Date.now()) / 1000).toFixed(1);
    text = `${sub.error?.message ?? "disconnected"}; reconnecting in ${seconds} s with last_event_id=${sub.lastEventId ?? "(none)"}`;
  } else if (sub.state === "closed" || sub.state === "paused" || sub.state === "error") {
    text = `stream ${sub.state}${sub.error ? `: ${sub.error.message}` : ""}`;
  } else {
    return;
  }
  const block = document.createElement("div");
  block.className = "chunk chunk-note";
  block.textContent = `${clock()} · ${text}`;
  appendFrames(block);
}

function appendFrames(block) {
  const frames = $("#frames");
  const atBottom = frames.scrollHeight - frames.scrollTop - frames.clientHeight < 40;
  frames.append(block);
  while (frames.childElementCount > MAX_FRAME_BLOCKS) frames.firstElementChild.remove();
  if (atBottom) frames.scrollTop = frames.scrollHeight;
}

/** The one stream: the channels it carries (the runs still live), its state and its cursor. */
function renderStreams() {
  const live = Object.values(hub.channels).filter((view) => !view.ended);
  const row = document.createElement("tr");
  if (live.length === 0 && hub.state === "idle") {
    row.className = "streams-empty";
    row.innerHTML = '<td colspan="3">No streams open.</td>';
  } else {
    const names = live.map((view) => shortId(view.channel.replace(/^run\./, "")));
    for (const value of [names.join(", ") || "none", connectionLabel(hub), hub.lastEventId ?? "none yet"]) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.append(cell);
    }
    row.firstElementChild.className = "stream-channels";
    row.lastElementChild.className = "last-event-id";
  }
  $("#streams").replaceChildren(row);
  $("#drop").disabled = !(hub.state === "open" || hub.state === "connecting");
}

function dropConnections() {
  hub.drop();
}

// -- page ---------------------------------------------------------------------------------

function say(text, isError = false) {
  const notice = $("#notice");
  notice.textContent = text;
  notice.classList.toggle("notice-error", isError);
}

function syncURL() {
  const query = new URLSearchParams();
  for (const runId of reports.keys()) query.append("run", runId); // oldest first
  if (answer) query.append("run", answer.runId);
  if (workshopOn) query.set("workshop", "1");
  const search = query.toString();
  history.replaceState(null, "", search ? `?${search}` : location.pathname);
}

function shortId(runId) {
  return runId.length > 12 ? runId.slice(0, 8) : runId;
}

function cssSafe(text) {
  return String(text).replace(/[^A-Za-z0-9_-]/g, "_");
}

function clock() {
  return new Date().toLocaleTimeString([], { hour12: false }) + "." + String(Date.now() % 1000).padStart(3, "0");
}

$("#generate").addEventListener("click", startReport);
$("#ask-form").addEventListener("submit", ask);
$("#stop").addEventListener("click", stopAnswer);
$("#workshop-toggle").addEventListener("click", () => setWorkshop(!workshopOn));
$("#drop").addEventListener("click", dropConnections);
$("#clear-frames").addEventListener("click", () => $("#frames").replaceChildren());
if (workshopOn) setWorkshop(true);
renderStreams();
await resume([...new Set(params.getAll("run"))]);
