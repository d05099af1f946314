"""The text-stream load client: many SSE subscribers in one epoll loop that rebuild each stream's text.

bench/texts.py starts a few of these and drives them over stdin as bench/run.py drives load.py
(one JSON command per line, one JSON answer per line; clients.py's `TextClientPool`). The loop, the
connecting and the commands are load.py's; what differs is the parsing. load.py reads only the
`id:` line of each frame. Here each message's `data:` line is decoded and applied by the client
rule of docs/protocol.md §11:

- a text stream message with `text` (a folded replay) replaces the text and sets the seq;
- a `delta` with seq = current + 1 is appended, seq <= current is ignored; anything else is a
  gap, counted (it must stay 0);
- `status` ends the stream (`completed`, `failed`, `cancelled`);
- the naive way (one message per token, `{"k": n, "t": "<token>"}`) appends the token when n is
  the next one, and counts a gap otherwise.

For each message applied it records the receive time (CLOCK_MONOTONIC, system-wide, so it compares
with the writers' write times) and the text's length in code points after it: the token that ends
at offset o reached the client with the first message whose length is >= o.

Commands, beside load.py's (`open`, `close`, `exit`):
  {"cmd": "wait_ended", "timeout"}   answer once every stream got its `status` (or ended)
  {"cmd": "dump_texts", "path"}      pickle per stream (texts, lengths, times, counters) to path
"""
from __future__ import annotations

import json
import pickle
from array import array
from pathlib import Path

from load import LoadClient, Opening, Stream, dechunk, monotonic, opened, stream_request

HERE = Path(__file__).resolve().parent
_loads = json.loads


class TextStream(Stream):
    """One subscriber that rebuilds the text of the text stream (or the naive tokens) of its channel."""

    __slots__ = ("pieces", "length", "seq", "status", "lengths", "stamps", "gaps", "frames", "bytes", "counted")

    def __init__(self, opening: Opening | None = None) -> None:
        super().__init__(opening)
        self.pieces: list[str] = []
        self.length = 0  # code points of the text so far
        self.seq = -1  # the text stream's seq, or the naive way's last token index
        self.status: str | None = None
        self.lengths = array("q")  # the text's length after each message applied
        self.stamps = array("d")  # when that message was received
        self.gaps = 0  # a seq or token index that skipped one: must stay 0
        self.frames = 0  # message frames received
        self.bytes = 0  # bytes received, headers and chunk framing included
        self.counted = False  # `headers` counted the bytes it hands to `feed`

    def headers(self, data: bytes, now: float) -> bool:
        self.bytes += len(data)
        self.counted = True
        try:
            return super().headers(data, now)
        finally:
            self.counted = False

    def feed(self, data: bytes, now: float) -> bool:
        """Body bytes received at `now`: decode the chunks, apply each whole frame; True if it ended."""
        if not self.counted:
            self.bytes += len(data)
        text, self.raw, ended = dechunk(self.text, self.raw + data if self.raw else data)
        start, decoded = 0, len(text)
        while start < decoded:
            end = text.find(b"\n\n", start)
            if end < 0:
                break
            if text.startswith(b"id:", start):
                at = text.find(b"\ndata: ", start, end)
                if at >= 0 and text.find(b"\nevent: reset", start, end) < 0:
                    self.frames += 1
                    self.apply(_loads(text[at + 7:end])["data"], now)
                else:
                    self.others += 1
            elif text.startswith(b":", start):
                self.heartbeats += 1
            elif text.startswith(b"retry:", start):
                self.ready = True
                self.settle()
            else:
                self.others += 1
            start = end + 2
        self.text = text[start:]
        return ended

    def apply(self, data: dict, now: float) -> None:
        """The client rule (docs/protocol.md §11), or the naive way's tokens in order."""
        seq = data.get("seq")
        if seq is None:  # the naive way: {"k": n, "t": token}
            if data["k"] != self.seq + 1:
                self.gaps += 1
                return
            self.seq = data["k"]
            self.pieces.append(data["t"])
            self.length += len(data["t"])
        elif "text" in data:
            self.seq = seq
            self.pieces = [data["text"]]
            self.length = len(data["text"])
        elif seq <= self.seq:
            return
        elif seq == self.seq + 1:
            self.seq = seq
            delta = data["delta"]
            if delta:
                self.pieces.append(delta)
                self.length += len(delta)
        else:
            self.gaps += 1
            return
        if "status" in data:
            self.status = data["status"]
        self.lengths.append(self.length)
        self.stamps.append(now)

    def whole_text(self) -> str:
        return "".join(self.pieces)


class TextOpening(Opening):
    def add(self, count: int) -> list[Stream]:
        streams = [TextStream(self) for _ in range(count)]
        self.queue.extend(streams)
        self.unsettled += count
        return streams


class TextLoadClient(LoadClient):
    def open(self, host: str, port: int, paths: list[str], concurrency: int, timeout: float) -> None:
        """Open one stream per path (each its own channel's token), `concurrency` connecting at once."""
        import socket

        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        new: list[Stream] = []
        for path in paths:
            opening = TextOpening(family, address, stream_request(host, port, path), concurrency)
            new.extend(opening.add(1))
            self.openings.append(opening)
        self.concurrency = concurrency  # load.py caps it per Opening; here one per path: over all of them
        self.streams.extend(new)
        self.pending = (lambda: all(s.ready or s.closed for s in new), lambda: opened(new), monotonic() + timeout)

    def start_streams(self) -> None:
        """Connect queued streams while fewer than the concurrency are connecting, over all openings."""
        connecting = sum(1 for s in self.streams if s.opening is not None and s.sock is not None)
        limit = getattr(self, "concurrency", 100)
        for opening in self.openings:
            while opening.queue and connecting < limit:
                self.connect(opening.queue.popleft(), opening)
                connecting += 1
        self.openings = [o for o in self.openings if o.queue]

    def wait_ended(self, timeout: float) -> None:
        streams = self.streams

        def answer() -> dict:
            return {"ended": sum(s.status is not None for s in streams), "closed": sum(s.closed for s in streams)}

        self.pending = (lambda: all(s.closed or s.status is not None for s in streams), answer,
                        monotonic() + timeout)

    def dump_texts(self, path: str) -> dict:
        records = [
            {"text": s.whole_text(), "status": s.status, "lengths": s.lengths.tobytes(), "stamps": s.stamps.tobytes(),
             "gaps": s.gaps, "frames": s.frames, "bytes": s.bytes, "closed": s.closed, "error": s.error}
            for s in self.streams
        ]
        with open(path, "wb") as f:
            pickle.dump(records, f, protocol=pickle.HIGHEST_PROTOCOL)
        return {"streams": len(records)}


def main() -> None:
    TextLoadClient().run()


if __name__ == "__main__":
    main()
