"""The text/event-stream wire format: every frame this server sends is built here.

WHATWG HTML §9.2.6 "Interpreting an event stream": lines end with CRLF, LF or
CR; a line starting with ":" is a comment; `data:` lines are joined with LF;
a blank line dispatches the event. So a value is safe in a field only when it
holds no CR or LF: `data` is split on every line ending (the client joins the
pieces back with LF), while `id` and `event` must be single lines, and a
violation is a bug in the caller, never something to repair silently.

Pure functions of their inputs, no Flask, no I/O, tested as tables of exact
bytes (tests/test_sse.py), as in sse-starlette's `event.py`.
"""
from __future__ import annotations

import json
import re
from typing import Any, Sequence

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _single_line(name: str, value: str) -> str:
    if _LINE_BREAK.search(value):
        raise ValueError(f"SSE field {name!r} must not contain CR or LF: {value!r}")
    return value


def format_event(
    *,
    data: str | None = None,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
    comment: str | None = None,
) -> str:
    """One frame: its field lines in a fixed order, then the blank line.

    >>> format_event(id="7", event="status", data='{"percent": 10}')
    'id: 7\\nevent: status\\ndata: {"percent": 10}\\n\\n'
    """
    lines: list[str] = []
    if comment is not None:
        lines.extend(": " + part if part else ":" for part in _LINE_BREAK.split(comment))
    if retry is not None:
        if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
            raise ValueError(f"SSE retry must be a non-negative integer, not {retry!r}")
        lines.append(f"retry: {retry}")
    if id is not None:
        # The spec ignores an id that contains NULL, which would silently
        # break resume: refuse it here instead.
        if "\0" in id:
            raise ValueError("SSE field 'id' must not contain NULL")
        lines.append("id: " + _single_line("id", id))
    if event is not None:
        lines.append("event: " + _single_line("event", event))
    if data is not None:
        lines.extend("data: " + part for part in _LINE_BREAK.split(data))
    if not lines:
        raise ValueError("an SSE frame needs at least one field")
    return "\n".join(lines) + "\n\n"


# -- the frames of docs/protocol.md §6, as the bytes written to the socket ----------


def retry_frame(retry_ms: int) -> bytes:
    """The first frame of every stream: how long EventSource waits before reconnecting."""
    return format_event(retry=retry_ms).encode()


def message_frame(cursor: str, topic: str, envelope_json: str) -> bytes:
    """One stored message: `id:` its cursor, `event:` its topic, `data:` its envelope."""
    if "\n" in envelope_json or "\r" in envelope_json or "\0" in cursor:  # never from json.dumps
        return format_event(id=cursor, event=topic, data=envelope_json).encode()
    # The same bytes as format_event's, without splitting a half-megabyte line.
    return f"id: {_single_line('id', cursor)}\nevent: {_single_line('event', topic)}\ndata: {envelope_json}\n\n".encode()


def reset_frame(reason: str, cursor: str, channels: Sequence[str] | None = None) -> bytes:
    """The cursor could not be honoured exactly; the stream goes on from `cursor`.

    The reset carries that position as its own id, so a client that drops
    right after it resumes from there, not from the cursor that failed. On a
    stream of several channels, `channels` names those it concerns (§12).
    """
    fields: dict[str, Any] = {"reason": reason, "cursor": cursor}
    if channels is not None:
        fields["channels"] = list(channels)
    return format_event(id=cursor, event="reset", data=json.dumps(fields)).encode()


#: Sent on a quiet stream, so proxies and clients can tell idle from dead.
KEEP_ALIVE = format_event(comment="keep-alive").encode()

#: The last frame of a stream this process ends because it shuts down.
SHUTDOWN = format_event(comment="server shutting down; reconnect with Last-Event-ID").encode()
