"""The spec lab's cases: hand-made event streams, each with what EventSource dispatches.

One case per line rule and reconnection rule of WHATWG HTML §9.2 "Server-sent
events", in the order of its sections. Each case is data: the answers the
server gives to the first, second ... request of one EventSource (fixed bytes,
a status, a Content-Type), and the events a conforming EventSource dispatches
for them, in order. demo/workshop.py serves them, templates/workshop.html shows
them next to what the browser really did, tests/test_workshop.py checks them in
Chromium, and docs/workshop.md quotes them (`describe()` is the text the guide
shows).

Nothing here formats frames with realtime/sse.py on purpose: these bytes break
the rules that module keeps (CR line ends, a BOM, an id with NUL ...).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

#: Sections of the WHATWG HTML Standard, §9.2 "Server-sent events".
PROCESSING = "9.2.3 Processing model"
LAST_EVENT_ID = "9.2.4 The Last-Event-ID header"
PARSING = "9.2.5 Parsing an event stream"
INTERPRETING = "9.2.6 Interpreting an event stream"
SPEC_URL = "https://html.spec.whatwg.org/multipage/server-sent-events.html"

#: EventSource.readyState values.
CONNECTING, OPEN, CLOSED = 0, 1, 2

EVENT_STREAM = "text/event-stream; charset=utf-8"

#: Where an answer repeats the request's Last-Event-ID header (or "(none)").
ECHO = b"{Last-Event-ID}"


@dataclass(frozen=True)
class Answer:
    """What the server sends to one request of the case."""

    body: bytes = b""
    status: int = 200
    content_type: str | None = EVENT_STREAM

    def render(self, last_event_id: str | None) -> bytes:
        """The body as sent: ECHO replaced by the request's Last-Event-ID header."""
        return self.body.replace(ECHO, (last_event_id or "(none)").encode())


#: Answered once a case's script is over: a 204 stops an EventSource for good.
NO_CONTENT = Answer(status=204, content_type=None)


@dataclass(frozen=True)
class Dispatch:
    """One thing the page sees: an event a listener got, or the lab closing the source."""

    type: str  # "open", "error", "close" (the lab called es.close()), or the event's type
    ready_state: int
    data: str | None = None  # message events only
    last_event_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"type": self.type, "readyState": self.ready_state}
        if self.data is not None:
            found.update(data=self.data, lastEventId=self.last_event_id)
        return found


def message(data: str, last_event_id: str = "", type: str = "message") -> Dispatch:
    return Dispatch(type, OPEN, data, last_event_id)


OPENED = Dispatch("open", OPEN)
#: The stream ended: EventSource will reconnect after its reconnection time.
RECONNECTING = Dispatch("error", CONNECTING)
#: The connection failed (a status other than 200, a wrong Content-Type): no reconnect, ever.
FAILED = Dispatch("error", CLOSED)
#: The lab closed the source once the stream ended, instead of letting it reconnect.
LAB_CLOSED = Dispatch("close", CLOSED)


@dataclass(frozen=True)
class SpecCase:
    name: str
    title: str
    section: str
    #: The spec rule, and what this stream sends, in one or two sentences; shown above
    #: "Your prediction", so never what happens: that is for `notice`.
    rule: str
    answers: tuple[Answer, ...]
    dispatches: tuple[Dispatch, ...]
    #: The Last-Event-ID header of each request EventSource makes (None: no header).
    requests: tuple[str | None, ...] = (None,)
    #: Event types the page listens for with addEventListener, besides onmessage.
    listen: tuple[str, ...] = ()
    #: True: let the browser reconnect as the answers say; False: the lab closes the
    #: source when the first stream ends (the browser would otherwise reconnect in 3 s).
    reconnects: bool = False
    notice: str = ""  # what to look at, shown with what happens once the case ran

    def answer(self, attempt: int) -> Answer:
        """The answer to the `attempt`-th request (from 1); after the script, 204."""
        return self.answers[attempt - 1] if attempt <= len(self.answers) else NO_CONTENT

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "section": self.section,
            "rule": self.rule,
            "notice": self.notice,
            "listen": list(self.listen),
            "reconnects": self.reconnects,
            "requests": list(self.requests),
            "answers": [{"status": a.status, "content_type": a.content_type} for a in self.answers],
            "dispatches": [d.to_json() for d in self.dispatches],
        }


def _stream(*messages: Dispatch) -> tuple[Dispatch, ...]:
    """One stream the lab closes when it ends: open, the messages, the end, close()."""
    return (OPENED, *messages, RECONNECTING, LAB_CLOSED)


_CASES = [
    # -- 9.2.3 Processing model: reconnecting, failing ---------------------------------
    SpecCase(
        "retry", "retry: sets the reconnection time", PROCESSING,
        "When the stream ends, EventSource waits the reconnection time, then reconnects. "
        "retry: (ASCII digits only) sets it, in milliseconds, for every later reconnect.",
        (
            Answer(b"retry: 1500\ndata: see you in 1.5 s\n\n"),
            Answer(b"retry: 2.5\nretry: 200\ndata: see you in 0.2 s\n\n"),
            NO_CONTENT,
        ),
        (OPENED, message("see you in 1.5 s"), RECONNECTING,
         OPENED, message("see you in 0.2 s"), RECONNECTING, FAILED),
        requests=(None, None, None),
        reconnects=True,
        notice="Look at the times: the gaps before each reconnect. retry: 2.5 is not digits: ignored.",
    ),
    SpecCase(
        "http-error", "An HTTP error status", PROCESSING,
        "Any status other than 200 fails the connection: readyState CLOSED, one error event, "
        "no reconnect, even for a 503 with Retry-After. EventSource does not say which status.",
        (Answer(
            b'{"error": {"code": "workshop_unavailable", "message": "a scripted 503 of the spec lab"}}\n',
            status=503, content_type="application/json",
        ),),
        (FAILED,),
        reconnects=True,
        notice="Why static/realtime.js probes the URL with fetch when its EventSource gives up.",
    ),
    SpecCase(
        "no-content", "204 No Content", PROCESSING,
        "A 204 fails the connection like any status but 200: the way for a server to say "
        "\"stop, do not come back\".",
        (NO_CONTENT,),
        (FAILED,),
        reconnects=True,
    ),
    SpecCase(
        "wrong-type", "A wrong Content-Type", PROCESSING,
        "A 200 whose Content-Type is not text/event-stream fails the connection: the body is "
        "never parsed.",
        (Answer(b"data: never dispatched\n\n", content_type="text/plain; charset=utf-8"),),
        (FAILED,),
        reconnects=True,
    ),
    # -- 9.2.4 The Last-Event-ID header: resuming --------------------------------------
    SpecCase(
        "dropped", "A dropped connection resumes with Last-Event-ID", LAST_EVENT_ID,
        "On reconnect, EventSource sends the last event ID it saw as the Last-Event-ID header. "
        "This server ends its first stream after two events with ids, echoes the header in its "
        "second, and answers the third request 204 No Content.",
        (
            Answer(b"retry: 200\nid: 41\ndata: first\n\nid: 42\ndata: second\n\n"),
            Answer(b"data: you sent Last-Event-ID: " + ECHO + b"\n\n"),
            NO_CONTENT,
        ),
        (OPENED, message("first", "41"), message("second", "42"), RECONNECTING,
         OPENED, message("you sent Last-Event-ID: 42", "42"), RECONNECTING, FAILED),
        requests=(None, "42", "42"),
        reconnects=True,
        notice="The event after the reconnect still has lastEventId 42, and the 204 stopped the "
        "EventSource for good. This project's cursor is exactly this id: the server replays what came after it.",
    ),
    SpecCase(
        "id-reset", "An empty id forgets the last event ID", LAST_EVENT_ID,
        "An id field with an empty value resets the last event ID; the next reconnect then "
        "sends no Last-Event-ID header at all.",
        (
            Answer(b"retry: 200\nid: 7\ndata: a\n\nid\ndata: b\n\n"),
            NO_CONTENT,
        ),
        (OPENED, message("a", "7"), message("b"), RECONNECTING, FAILED),
        requests=(None, None),
        reconnects=True,
    ),
    # -- 9.2.5 Parsing: line ends and the BOM ------------------------------------------
    SpecCase(
        "lf", "Lines end with LF", PARSING,
        "A line ends with LF, CR or CRLF. A blank line dispatches the event.",
        (Answer(b"data: first\n\ndata: second\n\n"),),
        _stream(message("first"), message("second")),
        notice="The usual line end. Compare the next two cases: the same two events.",
    ),
    SpecCase(
        "crlf", "Lines end with CRLF", PARSING,
        "CRLF is one line end, not two: CR LF CR LF is one line and a blank line.",
        (Answer(b"data: first\r\n\r\ndata: second\r\n\r\n"),),
        _stream(message("first"), message("second")),
    ),
    SpecCase(
        "cr", "Lines end with CR alone", PARSING,
        "A CR on its own ends a line too (old Mac style): CR CR is a line and a blank line.",
        (Answer(b"data: first\r\rdata: second\r\r"),),
        _stream(message("first"), message("second")),
    ),
    SpecCase(
        "mixed-line-ends", "Mixed line ends in one event", PARSING,
        "Each line may end differently; data lines are joined with LF whatever ended them.",
        (Answer(b"data: a\r\ndata: b\rdata: c\n\n"),),
        _stream(message("a\nb\nc")),
    ),
    SpecCase(
        "bom", "A leading byte order mark", PARSING,
        "A stream may start with a UTF-8 byte order mark (U+FEFF), which is skipped. This one "
        "sends a BOM before each of its two events.",
        (Answer(b"\xef\xbb\xbfdata: first\n\n\xef\xbb\xbfdata: second\n\n"),),
        _stream(message("first")),
        notice="Two events were sent, one is dispatched. Only the BOM at the very start is skipped; "
        "anywhere else it is part of its line: the second field name is U+FEFF followed by \"data\", "
        "a field the spec does not know, so the line is ignored.",
    ),
    # -- 9.2.6 Interpreting: fields ----------------------------------------------------
    SpecCase(
        "data-space", "data: with and without a space", INTERPRETING,
        "After the colon, one space is removed if there is one; anything else is the value.",
        (Answer(b"data:no space\n\ndata: one space\n\ndata:  two spaces\n\n"),),
        _stream(message("no space"), message("one space"), message(" two spaces")),
    ),
    SpecCase(
        "multi-line", "Multi-line data", INTERPRETING,
        "Each data line appends its value and an LF to the data buffer; on dispatch the last "
        "LF is removed. An empty data line adds an empty line.",
        (Answer(b"data: line 1\ndata: line 2\ndata:\ndata: line 4\n\n"),),
        _stream(message("line 1\nline 2\n\nline 4")),
        notice="This is how realtime/sse.py sends multi-line data: one data: line per line.",
    ),
    SpecCase(
        "no-colon", "A field with no colon", INTERPRETING,
        "A line without a colon is a field name with an empty value: \"data\" alone adds an "
        "empty line to the data.",
        (Answer(b"data\n\ndata\ndata\n\n"),),
        _stream(message(""), message("\n")),
        notice="An event whose data is the empty string is still dispatched.",
    ),
    SpecCase(
        "unknown-fields", "Unknown fields and case", INTERPRETING,
        "Field names are case-sensitive; a field the spec does not name is ignored.",
        (Answer(b"foo: bar\nDATA: shouted\nData: capitalised\ndata: kept\n\n"),),
        _stream(message("kept")),
    ),
    SpecCase(
        "id-nul", "An id containing NUL", INTERPRETING,
        "An id field whose value contains U+0000 NULL is ignored: the last event ID stays what it was.",
        (Answer(b"id: 1\ndata: first\n\nid: 2\x00x\ndata: second\n\n"),),
        _stream(message("first", "1"), message("second", "1")),
        notice="realtime/sse.py refuses such an id: it would silently break resuming.",
    ),
    SpecCase(
        "no-data", "Events without data", INTERPRETING,
        "A blank line with an empty data buffer dispatches nothing, but an id set before it "
        "sticks: the next event carries it.",
        (Answer(b"event: status\n\nid: 9\n\ndata: after\n\n"),),
        _stream(message("after", "9")),
    ),
    SpecCase(
        "named-events", "event: named vs message", INTERPRETING,
        "The event field sets the type. Without one the type is \"message\", which onmessage "
        "hears; any other type reaches only addEventListener(type). The page listens for "
        "\"message\" and \"status\", not \"log\".",
        (Answer(
            b"event: status\ndata: 40%\n\n"
            b"event: log\ndata: nobody listens for log\n\n"
            b"event: message\ndata: explicit message\n\n"
            b"data: no event field\n\n"
        ),),
        _stream(message("40%", type="status"), message("explicit message"), message("no event field")),
        listen=("status",),
        notice="The log event was dispatched, but no listener heard it: subscribe to every topic by name.",
    ),
    SpecCase(
        "comments", "Comments and keep-alives", INTERPRETING,
        "A line starting with a colon is a comment: ignored by EventSource, but bytes on the "
        "wire that keep proxies and idle timeouts from closing the connection.",
        (Answer(b": hello\n\n: keep-alive\n\ndata: after the comments\n\n:\n\n"),),
        _stream(message("after the comments")),
    ),
    SpecCase(
        "no-final-blank-line", "A stream that ends mid-event", INTERPRETING,
        "An event is dispatched only by a blank line: at the end of the stream, a half-built "
        "event is discarded.",
        (Answer(b"data: complete\n\ndata: incomplete\n"),),
        _stream(message("complete")),
        notice="Why a proxy that buffers or cuts a stream loses the event in flight.",
    ),
]

CASES: dict[str, SpecCase] = {case.name: case for case in _CASES}
assert len(CASES) == len(_CASES), "case names are unique"


def describe(dispatches: tuple[Dispatch, ...] | list[dict[str, Any]]) -> str:
    """The dispatches as docs/workshop.md shows them, one line each."""
    lines = []
    for d in dispatches:
        d = d.to_json() if isinstance(d, Dispatch) else d
        state = {CONNECTING: "0 CONNECTING", OPEN: "1 OPEN", CLOSED: "2 CLOSED"}[d["readyState"]]
        if "data" in d:
            lines.append(f"{d['type']:<8} data={_js(d['data'])} lastEventId={_js(d['lastEventId'])}")
        elif d["type"] == "close":
            lines.append(f"{'close()':<8} readyState={state}  (the lab closed it)")
        else:
            lines.append(f"{d['type']:<8} readyState={state}")
    return "\n".join(lines)


def _js(text: str) -> str:
    return json.dumps(text)

