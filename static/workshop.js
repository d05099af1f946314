// The spec lab (/workshop): run one case of demo/spec_cases.py in this browser. The raw
// bytes come from fetch(), one request per scripted answer; the events from a real
// EventSource on the same URL. Nothing here parses the stream: that is the browser's job.

const READY_STATES = ["0 CONNECTING", "1 OPEN", "2 CLOSED"];
const CASES = JSON.parse(document.getElementById("spec-cases").textContent);
const byName = new Map(CASES.map((c) => [c.name, c]));
const $ = (selector) => document.querySelector(selector);

let current = null; // the case shown
let running = null; // {source, done} of the run in progress

/** The last finished run, for the curious (devtools) and for tests/test_workshop.py. */
window.specLab = { last: null };

// -- showing a case ------------------------------------------------------------------------

function show(name) {
  if (current && !byName.has(name)) return; // an in-page link such as #cases-heading
  const found = byName.get(name) ?? CASES[0];
  stop();
  current = found;
  document.title = `${found.title} · SSE spec lab`;
  $("#case-title").textContent = found.title;
  $("#case-rule").textContent = found.rule;
  const section = $("#case-section");
  section.textContent = `§${found.section}`;
  $("#case-url").textContent = `GET /workshop/cases/${found.name}`;
  $("#case-notice").textContent = found.notice;
  $("#case-notice").hidden = !found.notice;
  $("#expected-list").textContent = describe(found.dispatches);
  $("#expected").open = false;
  $("#prediction").value = "";
  resetResult();
  for (const link of document.querySelectorAll(".lab-nav-link")) {
    if (link.dataset.case === found.name) link.setAttribute("aria-current", "true");
    else link.removeAttribute("aria-current");
  }
}

function resetResult() {
  const result = $("#result");
  result.dataset.state = "idle";
  delete result.dataset.match;
  $("#verdict").hidden = true;
  $("#raw").replaceChildren(placeholder("p", "Run the case to see the bytes."));
  $("#dispatched").replaceChildren(placeholderRow(5, "Nothing yet."));
  $("#requests").replaceChildren(placeholderRow(4, "Nothing yet."));
}

/** The same text as demo/spec_cases.py's describe(), which docs/workshop.md quotes. */
function describe(dispatches) {
  return dispatches
    .map((d) => {
      const state = READY_STATES[d.readyState];
      if ("data" in d) return `${d.type.padEnd(8)} data=${JSON.stringify(d.data)} lastEventId=${JSON.stringify(d.lastEventId)}`;
      if (d.type === "close") return `${"close()".padEnd(8)} readyState=${state}  (the lab closed it)`;
      return `${d.type.padEnd(8)} readyState=${state}`;
    })
    .join("\n");
}

// -- running it ------------------------------------------------------------------------------

async function run() {
  stop();
  const spec = current;
  const lab = crypto.getRandomValues(new Uint32Array(2)).reduce((s, n) => s + n.toString(16), "lab");
  const result = $("#result");
  result.dataset.state = "running";
  delete result.dataset.match;
  $("#verdict").hidden = true;
  $("#dispatched").replaceChildren();
  $("#requests").replaceChildren(placeholderRow(4, "Waiting for the run to end…"));
  const rawDone = showRawBytes(spec);
  const dispatched = await watch(spec, lab);
  const requests = await fetchJSON(`/workshop/cases/${spec.name}/requests?lab=${lab}`).then((body) => body.requests);
  await rawDone;
  if (current !== spec) return;
  showRequests(requests);
  const match = describe(dispatched) === describe(spec.dispatches)
    && JSON.stringify(requests.map((r) => r.last_event_id)) === JSON.stringify(spec.requests);
  const verdict = $("#verdict");
  verdict.textContent = match
    ? "✓ Your browser did exactly what the spec says. Was your prediction right?"
    : "✗ Your browser did something else than the case states: compare with “What the spec says happens”.";
  verdict.hidden = false;
  $("#expected").open = true;
  window.specLab.last = { name: spec.name, lab, dispatched, requests, match };
  result.dataset.match = String(match);
  result.dataset.state = "done";
}

/** Open a real EventSource on the case; resolve with what it dispatched once it is closed. */
function watch(spec, lab) {
  return new Promise((resolve) => {
    const source = new EventSource(`/workshop/cases/${spec.name}?lab=${lab}`);
    const started = performance.now();
    const dispatched = [];
    const finish = () => {
      source.close();
      running = null;
      resolve(dispatched);
    };
    running = { source, finish };
    const note = (entry) => {
      const at = Math.round(performance.now() - started);
      dispatched.push(entry);
      addDispatchRow(entry, at);
    };
    const onMessage = (event) => note({ type: event.type, readyState: source.readyState, data: event.data, lastEventId: event.lastEventId });
    source.onopen = () => note({ type: "open", readyState: source.readyState });
    source.onmessage = onMessage;
    for (const type of spec.listen) source.addEventListener(type, onMessage);
    source.onerror = () => {
      note({ type: "error", readyState: source.readyState });
      if (source.readyState === EventSource.CLOSED) {
        finish();
      } else if (!spec.reconnects) {
        // The stream ended; the browser would reconnect after its reconnection time.
        source.close();
        note({ type: "close", readyState: source.readyState });
        finish();
      }
    };
  });
}

function stop() {
  running?.finish();
}

// -- the raw bytes ---------------------------------------------------------------------------

async function showRawBytes(spec) {
  const raw = $("#raw");
  raw.replaceChildren();
  // A case the lab closes after its first stream makes one request; the others, one per answer.
  const attempts = spec.reconnects ? spec.answers.length : 1;
  for (let attempt = 1; attempt <= attempts; attempt += 1) {
    // The same Last-Event-ID the EventSource sends on this attempt, so an echo shows the same.
    const sent = spec.requests[attempt - 1];
    const headers = sent ? { "Last-Event-ID": sent } : {};
    const response = await fetch(`/workshop/cases/${spec.name}?attempt=${attempt}`, { headers, cache: "no-store" });
    const bytes = new Uint8Array(await response.arrayBuffer());
    const block = document.createElement("div");
    block.className = "raw-response";
    const head = document.createElement("p");
    head.className = "raw-head";
    const type = response.headers.get("Content-Type");
    head.textContent = `request ${attempt}${sent ? ` (Last-Event-ID: ${sent})` : ""} → ${response.status}${type ? ` ${type}` : ""} · ${bytes.length} bytes`;
    block.append(head, renderBytes(bytes));
    raw.append(block);
  }
}

/** The bytes as text, with every CR, LF, BOM and NUL made visible (as \r, \n, BOM, \0). */
function renderBytes(bytes) {
  const pre = document.createElement("pre");
  pre.className = "bytes";
  if (bytes.length === 0) {
    pre.append(placeholder("span", "(no body)"));
    return pre;
  }
  // ignoreBOM keeps a leading BOM in the text instead of silently eating it.
  const text = new TextDecoder("utf-8", { ignoreBOM: true }).decode(bytes);
  let plain = "";
  const flush = () => {
    if (plain) pre.append(plain);
    plain = "";
  };
  const mark = (label, title, lineBreak = false) => {
    flush();
    const span = document.createElement("span");
    span.className = "ctl";
    span.title = title;
    span.textContent = label;
    pre.append(span);
    if (lineBreak) pre.append("\n");
  };
  for (let i = 0; i < text.length; i += 1) {
    const ch = text[i];
    if (ch === "\r" && text[i + 1] === "\n") {
      mark("\\r\\n", "CR LF", true);
      i += 1;
    } else if (ch === "\r") mark("\\r", "CR", true);
    else if (ch === "\n") mark("\\n", "LF", true);
    else if (ch === "\ufeff") mark("BOM", "U+FEFF byte order mark (EF BB BF)");
    else if (ch === "\0") mark("\\0", "U+0000 NULL");
    else plain += ch;
  }
  flush();
  return pre;
}

// -- tables ------------------------------------------------------------------------------------

function addDispatchRow(entry, at) {
  const row = document.createElement("tr");
  row.className = `kind-${entry.type === "open" || entry.type === "error" || entry.type === "close" ? entry.type : "message"}`;
  const hasData = "data" in entry;
  row.append(
    cell(`+${at} ms`, "num"),
    cell(entry.type === "close" ? "close()" : entry.type, "type"),
    cell(hasData ? JSON.stringify(entry.data) : "", "mono", hasData ? "data" : null),
    cell(hasData ? JSON.stringify(entry.lastEventId) : "", "mono", hasData ? "lastEventId" : null),
    cell(READY_STATES[entry.readyState], "state"),
  );
  $("#dispatched").append(row);
}

function showRequests(requests) {
  const rows = requests.map((r) => {
    const row = document.createElement("tr");
    row.append(
      cell(String(r.attempt), "num"),
      cell(`+${r.ms} ms`, "num"),
      cell(r.last_event_id === null ? "(none)" : r.last_event_id, "mono"),
      cell(String(r.status), "num"),
    );
    return row;
  });
  $("#requests").replaceChildren(...(rows.length ? rows : [placeholderRow(4, "No request reached this process.")]));
}

function cell(text, className, label = null) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  if (label) td.dataset.label = label; // shown before the value where rows stack (phones)
  return td;
}

function placeholder(tag, text) {
  const element = document.createElement(tag);
  element.className = "placeholder";
  element.textContent = text;
  return element;
}

function placeholderRow(columns, text) {
  const row = document.createElement("tr");
  row.className = "placeholder-row";
  const td = cell(text);
  td.colSpan = columns;
  row.append(td);
  return row;
}

async function fetchJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(`${url} answered ${response.status}`);
  return response.json();
}

// -- wiring ------------------------------------------------------------------------------------

$("#run").addEventListener("click", () => {
  run().catch((err) => {
    $("#result").dataset.state = "failed";
    const verdict = $("#verdict");
    verdict.textContent = `The run failed: ${err.message}`;
    verdict.hidden = false;
  });
});
window.addEventListener("hashchange", () => show(location.hash.slice(1)));
show(location.hash.slice(1));
