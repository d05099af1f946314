"""Reading an event stream, within bounds (WHATWG HTML §9.2.5-9.2.6): the other side of sse.py.

A pure parser of bytes into frames for the Python client (client.py). It keeps
no more than `max_bytes` of an unfinished line or frame: a `data:` line that
never ends must not grow its reader without bound. Lines end at CR, LF or CRLF
only, so no character inside a `data:` line can cut a frame.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

_LINE_END = re.compile(rb"\r\n|\r|\n")
_DIGITS = re.compile(r"[0-9]+")  # `retry:` (§9.2.6): ASCII digits only


class FrameTooLarge(Exception):
    """A line or frame passed the reader's `max_bytes` before it ended."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"a frame of more than {max_bytes} bytes")
        self.max_bytes = max_bytes


@dataclass(frozen=True)
class Frame:
    """The fields of one frame, the lines up to a blank line."""

    event: str = ""
    data: str = ""  # its data lines, joined with LF
    id: str | None = None  # this frame's own `id:`: unlike EventSource's, the cursor is not kept from frame to frame
    retry_ms: float | None = None
    comment: bool = False  # a keep-alive


def read_frames(chunks: Iterable[bytes], max_bytes: int) -> Iterator[Frame]:
    """The frames of an event stream; `FrameTooLarge` once a frame passes `max_bytes`."""
    fields: dict[str, Any] = {}
    data: list[str] = []
    size = 0
    for number, line in enumerate(read_lines(chunks, max_bytes)):
        if not line:
            if fields or data:
                yield Frame(data="\n".join(data), **fields)
            fields, data, size = {}, [], 0
            continue
        size += len(line) + 1
        if size > max_bytes:
            raise FrameTooLarge(max_bytes)
        text = line.decode(errors="replace")
        if number == 0 and text.startswith("\ufeff"):
            text = text[1:]
        name, _, value = text.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if not name:
            fields["comment"] = True
        elif name == "data":
            data.append(value)
        elif name in ("event", "id"):
            fields[name] = value
        elif name == "retry" and _DIGITS.fullmatch(value):
            fields["retry_ms"] = float(value)  # a float: int() refuses 5,000 digits


def read_lines(chunks: Iterable[bytes], max_bytes: int) -> Iterator[bytes]:
    """Lines ended by CRLF, LF or CR; `FrameTooLarge` as soon as one passes `max_bytes`, not when it ends."""
    pending = bytearray()
    after_cr = False  # the last chunk ended with CR: an LF opening this one is the same line end
    for chunk in chunks:
        if after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        start = 0
        for end in _LINE_END.finditer(chunk):
            if len(pending) + end.start() - start > max_bytes:
                raise FrameTooLarge(max_bytes)
            yield bytes(pending) + chunk[start:end.start()]
            pending.clear()
            start = end.end()
        if len(pending) + len(chunk) - start > max_bytes:
            raise FrameTooLarge(max_bytes)
        pending += chunk[start:]
        after_cr = chunk.endswith(b"\r")
