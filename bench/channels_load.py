"""The load client of bench/channels.py: load.py's epoll loop, each stream on a path of its own.

load.py opens `count` streams on one path (one token for all of them). Here every stream has its
own token, one client's: a token of ten channels (one connection per client) or of one (ten per
client). What is parsed and recorded is load.py's: the `id:` of each frame and when it arrived.

Commands, beside load.py's (`mark`, `dump`, `close`, `exit`):
  {"cmd": "open_paths", "host", "port", "paths", "concurrency", "timeout"}
      one stream per path, at most `concurrency` connecting at once; answered as load.py's `open`
  {"cmd": "wait_targets", "targets", "timeout"}
      answer once stream i (in opening order) got an id >= targets[i], or ended
"""
from __future__ import annotations

import socket

from load import LoadClient, Opening, Stream, monotonic, opened, stream_request


class PathStream(Stream):
    __slots__ = ("own_request",)


class ChannelsLoadClient(LoadClient):
    def open_paths(self, host: str, port: int, paths: list[str], concurrency: int, timeout: float) -> None:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        opening = Opening(family, address, b"", concurrency)
        new = []
        for path in paths:
            s = PathStream(opening)
            s.own_request = stream_request(host, port, path)
            new.append(s)
        opening.queue.extend(new)
        opening.unsettled += len(new)
        self.openings.append(opening)
        self.streams.extend(new)
        self.start_streams()
        self.pending = (lambda: opening.unsettled == 0, lambda: opened(new), monotonic() + timeout)

    def connect(self, s: PathStream, opening: Opening) -> None:
        super().connect(s, opening)
        if s.sock is not None:  # connecting: the GET to send once connected is the stream's own
            s.request = s.own_request

    def wait_targets(self, targets: list[int], timeout: float) -> None:
        pairs = list(zip(self.streams, targets))

        def answer() -> dict:
            return {"caught_up": sum(s.last_id >= t for s, t in pairs), "closed": sum(s.closed for s, _ in pairs)}

        self.pending = (lambda: all(s.closed or s.last_id >= t for s, t in pairs), answer, monotonic() + timeout)


if __name__ == "__main__":
    ChannelsLoadClient().run()
