"""The load client: many SSE subscribers in one single-threaded epoll loop, driven over stdin.

bench/run.py starts one or more of these (clients.py, ClientPool) and sends one JSON command per
line on stdin; each command is answered by one JSON line on stdout. Kept cheap on purpose, so the
client is not what limits the figures: raw non-blocking sockets, an HTTP/1.1 GET, a minimal
chunked-encoding decoder, and of each SSE frame only the `id:` line is parsed (`<epoch>-<n>` -> n,
or a bare `n`; first in the frame or not, as the peers of bench/peers.py send it), stamped with
the monotonic clock at the recv() that completed it. CLOCK_MONOTONIC is system-wide, so these
stamps compare directly with the publisher's send times in run.py.

Why epoll rather than a greenlet per stream (the gevent client this replaces): there, a delivery
cost a hub wake-up, two greenlet switches and gevent's socket layer, about 35 % of a core per
client process at 20,000 streams, on the machine the measured server shares. Here a delivery is
one event of a level-triggered epoll_wait() and one recv(), never an extra EAGAIN round trip.
stdin is read in the same loop; a command that waits (open, wait) is answered by the loop once
its condition holds, so every stream keeps being read meanwhile. Commands run one at a time.

Commands:
  {"cmd": "open", "host", "port", "path", "count", "concurrency", "timeout"}
      open `count` streams, at most `concurrency` connecting at once (until one got its `retry:`
      frame or failed); answer once each got `retry:` or failed, or after `timeout` s
  {"cmd": "mark"}                   forget what was received so far (a phase starts)
  {"cmd": "wait", "last_id", "timeout"}   answer once every open stream got id >= last_id
  {"cmd": "dump", "path"}           pickle per stream (ids, receive times, counters) to path
  {"cmd": "close"}                  close every stream
  {"cmd": "exit"}                   (or EOF on stdin) close every stream and exit
Every answer carries "cpu": this process's user+system CPU seconds so far.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import resource
import select
import socket
import sys
import time
from array import array
from collections import deque
from typing import Callable

monotonic = time.monotonic

STDIN = 0
RECV_SIZE = 65536
CONNECT_TIMEOUT = 30.0  # to connect and send the request, as the gevent client's create_connection
TICK = 0.05  # how often a waiting command checks its condition, and connects their timeout


class Opening:
    """One `open` command: its streams not started yet, and how many hold one of its `concurrency` slots."""

    __slots__ = ("family", "address", "request", "concurrency", "queue", "connecting", "unsettled")

    def __init__(self, family: int, address: tuple, request: bytes, concurrency: int) -> None:
        self.family, self.address, self.request = family, address, request
        self.concurrency = concurrency
        self.queue: deque[Stream] = deque()
        self.connecting = 0  # started, neither ready nor ended: holding a slot
        self.unsettled = 0  # neither ready nor ended: the `open` answers at 0

    def add(self, count: int) -> list[Stream]:
        streams = [Stream(self) for _ in range(count)]
        self.queue.extend(streams)
        self.unsettled += count
        return streams


def stream_request(host: str, port: int, path: str) -> bytes:
    """The GET that opens an event stream."""
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode()


def opened(new: list) -> dict:
    """The answer to an `open`: its streams ready, failed and still pending, the first errors."""
    return {
        "ready": sum(s.ready and not s.closed for s in new),
        "failed": sum(s.closed for s in new),
        "pending": sum(not s.ready and not s.closed for s in new),
        "errors": sorted({s.error for s in new if s.error})[:5],
    }


def dechunk(text: bytes, raw: bytes) -> tuple[bytes, bytes, bool]:
    """Chunked transfer coding ("<hex size>\\r\\n<bytes>\\r\\n", ended by size 0): `text` with the
    whole chunks of `raw` appended, what is left of `raw`, and whether the body ended."""
    pos, received = 0, len(raw)
    while pos < received:
        nl = raw.find(b"\r\n", pos)
        if nl < 0:
            break
        try:
            size = int(raw[pos:nl], 16)
        except ValueError:  # a chunk extension: "<hex size>;name=value"
            size = int(raw[pos:nl].split(b";", 1)[0], 16)
        if size == 0:
            return text, raw[pos:], True
        end = nl + 2 + size
        if received < end + 2:
            break
        text += raw[nl + 2:end]
        pos = end + 2
    return text, raw[pos:], False


class Stream:
    """One subscriber: what it received since the last `mark`, and its socket and parser state."""

    __slots__ = ("ids", "times", "heartbeats", "others", "ready", "closed", "error", "last_id",
                 "sock", "opening", "request", "deadline", "head", "raw", "text")

    def __init__(self, opening: Opening | None = None) -> None:
        self.ids = array("q")
        self.times = array("d")
        self.heartbeats = 0
        self.others = 0  # frames that are neither a message, retry: nor a comment (e.g. reset)
        self.ready = False
        self.closed = False
        self.error: str | None = None
        self.last_id = 0
        self.sock: socket.socket | None = None
        self.opening: Opening | None = opening  # until ready or ended
        self.request = b""  # what is left to send of the GET
        self.deadline = 0.0  # to be connected and have sent the GET by
        self.head = True  # connecting, sending the GET or reading the response headers
        self.raw = b""  # received bytes not decoded yet: headers, then chunked coding
        self.text = b""  # decoded body bytes, not yet a whole frame

    def mark(self) -> None:
        self.ids = array("q")
        self.times = array("d")
        self.heartbeats = self.others = 0

    def settle(self) -> None:
        """Ready or ended: free its connecting slot, count it as settled for its `open`."""
        opening = self.opening
        if opening is not None:
            opening.connecting -= 1
            opening.unsettled -= 1
            self.opening = None

    def headers(self, data: bytes, now: float) -> bool:
        """Bytes received before the body; True if the stream ended."""
        raw = self.raw + data
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            self.raw = raw
            return False
        head = raw[:end]
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        if b"chunked" not in head.lower():
            raise ConnectionError("expected Transfer-Encoding: chunked")
        self.head = False
        self.raw = b""
        return self.feed(raw[end + 4:], now)

    def feed(self, data: bytes, now: float) -> bool:
        """Body bytes received at `now`: decode the chunks, count the whole frames; True if it ended."""
        text, self.raw, ended = dechunk(self.text, self.raw + data if self.raw else data)
        # SSE frames end with a blank line; the servers only send LF.
        start, decoded = 0, len(text)
        while start < decoded:
            end = text.find(b"\n\n", start)
            if end < 0:
                break
            # The `id` field: first, as this project and sse-starlette send it,
            # or on a later line (flask-sse: "data:...\nid:7"), space optional.
            if text.startswith(b"id:", start):
                at = start + 3
            else:
                at = text.find(b"\nid:", start, end)
                if at >= 0:
                    at += 4
            if at >= 0:
                stop = text.find(b"\n", at, end)
                message_id = int(text[at:stop if stop >= 0 else end].rpartition(b"-")[2])
                if text.find(b"\nevent: reset", start, end) >= 0:
                    self.others += 1
                else:
                    self.ids.append(message_id)
                    self.times.append(now)
                    self.last_id = message_id
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


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class LoadClient:
    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.epoll.register(STDIN, select.EPOLLIN)
        self.streams: list[Stream] = []  # in opening order, for `dump`
        self.by_fd: dict[int, Stream] = {}  # every stream with a socket
        self.connecting: dict[int, Stream] = {}  # connecting or sending the GET: they time out
        self.openings: list[Opening] = []  # with streams still to start
        self.input = b""  # stdin, not yet a whole line
        self.commands_due = False  # lines may be waiting in self.input
        self.eof = False
        self.exiting = False
        # The command being waited on: (condition, answer, deadline).
        self.pending: tuple[Callable[[], bool], Callable[[], dict], float] | None = None
        self.next_tick = 0.0

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        poll = self.epoll.poll
        by_fd = self.by_fd
        while True:
            # Not while handling a batch of events: a command may close sockets, whose fds
            # new ones would reuse, with events of the old ones still in the batch.
            if self.openings:
                self.start_streams()
            if self.commands_due:
                self.next_commands()
            if self.exiting:
                break
            timeout = -1.0
            if self.pending or self.connecting:
                now = monotonic()
                if now >= self.next_tick:
                    self.tick(now)
                    continue
                timeout = self.next_tick - now
            for fd, _ in poll(timeout):
                s = by_fd.get(fd)
                if s is None:
                    if fd == STDIN:
                        self.read_stdin()
                    continue
                try:
                    if s.head:
                        ended = self.setup(s, fd)
                    else:
                        data = s.sock.recv(RECV_SIZE)
                        ended = s.feed(data, monotonic()) if data else True
                except BlockingIOError:
                    continue
                except Exception as exc:  # noqa: BLE001 - reported, never raised
                    s.error = describe(exc)
                    ended = True
                if ended:
                    self.end(s)
        self.close()

    def tick(self, now: float) -> None:
        """Every TICK while something waits: connect timeouts, and the pending command's condition."""
        self.next_tick = now + TICK
        for s in [s for s in self.connecting.values() if s.deadline <= now]:
            s.error = "TimeoutError: timed out"
            self.end(s)
        if self.pending is not None:
            condition, answer, deadline = self.pending
            if condition() or now >= deadline:
                self.pending = None
                self.reply(answer())
                self.commands_due = True

    # -- streams -------------------------------------------------------------------------------

    def start_streams(self) -> None:
        """Connect the queued streams of each `open` its concurrency allows."""
        for opening in self.openings:
            while opening.queue and opening.connecting < opening.concurrency:
                self.connect(opening.queue.popleft(), opening)
        self.openings = [o for o in self.openings if o.queue]

    def connect(self, s: Stream, opening: Opening) -> None:
        """Start a non-blocking connect; `setup` goes on once the socket is writable."""
        opening.connecting += 1
        try:
            sock = socket.socket(opening.family, socket.SOCK_STREAM)
        except OSError as exc:  # e.g. out of file descriptors
            s.error = describe(exc)
            self.end(s)
            return
        sock.setblocking(False)
        s.sock = sock
        s.request = opening.request
        s.deadline = monotonic() + CONNECT_TIMEOUT
        fd = sock.fileno()
        self.by_fd[fd] = self.connecting[fd] = s
        err = sock.connect_ex(opening.address)
        if err in (0, errno.EINPROGRESS):
            self.epoll.register(fd, select.EPOLLOUT)
        else:
            s.error = describe(OSError(err, os.strerror(err)))
            self.end(s)

    def setup(self, s: Stream, fd: int) -> bool:
        """Until the body: the connect's outcome, the GET, the response headers. True if it ended."""
        sock = s.sock
        if s.request:  # writable: connected, or failed to
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            s.request = s.request[sock.send(s.request):]
            if not s.request:
                del self.connecting[fd]
                self.epoll.modify(fd, select.EPOLLIN)
            return False
        data = sock.recv(RECV_SIZE)
        if not data:
            raise ConnectionError("closed before the response headers")
        return s.headers(data, monotonic())

    def end(self, s: Stream) -> None:
        """The stream ended (EOF, the last chunk, an error): close its socket, free its slot."""
        s.closed = True
        s.settle()
        if s.sock is not None:
            fd = s.sock.fileno()
            del self.by_fd[fd]
            self.connecting.pop(fd, None)
            s.sock.close()  # which also takes it out of the epoll set (no duplicates of the fd)
            s.sock = None

    # -- commands ------------------------------------------------------------------------------

    def read_stdin(self) -> None:
        data = os.read(STDIN, 65536)
        if data:
            self.input += data
        else:
            self.epoll.unregister(STDIN)
            self.eof = True
        self.commands_due = True

    def next_commands(self) -> None:
        """Run the buffered command lines, one at a time, until one has to wait."""
        self.commands_due = False
        while self.pending is None and not self.exiting:
            line, newline, rest = self.input.partition(b"\n")
            if not newline and not (self.eof and line):
                if self.eof:
                    self.exiting = True
                return
            self.input = rest
            if line.strip():
                self.execute(line)

    def execute(self, line: bytes) -> None:
        command = json.loads(line)
        name = command.pop("cmd")
        if name == "exit":
            self.exiting = True
            return
        answer = getattr(self, name)(**command)
        if answer is not None:
            self.reply(answer)
        else:
            self.tick(monotonic())  # `pending` is set: answer at once if it holds already

    def reply(self, answer: dict) -> None:
        answer["cpu"] = cpu()
        os.write(sys.stdout.fileno(), (json.dumps(answer) + "\n").encode())

    def open(self, host: str, port: int, path: str, count: int, concurrency: int, timeout: float) -> None:
        request = stream_request(host, port, path)
        try:
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        except OSError as exc:  # every stream fails, as it would have when connecting
            opening = None
            new = [Stream() for _ in range(count)]
            for s in new:
                s.error, s.closed = describe(exc), True
        else:
            opening = Opening(family, address, request, concurrency)
            new = opening.add(count)
            self.openings.append(opening)
            self.start_streams()
        self.streams.extend(new)

        self.pending = (lambda: opening is None or opening.unsettled == 0, lambda: opened(new), monotonic() + timeout)

    def mark(self) -> dict:
        for s in self.streams:
            s.mark()
        return {}

    def wait(self, last_id: int, timeout: float) -> None:
        streams = self.streams

        def answer() -> dict:
            return {
                "caught_up": sum(s.last_id >= last_id for s in streams),
                "closed": sum(s.closed for s in streams),
            }

        self.pending = (lambda: all(s.closed or s.last_id >= last_id for s in streams), answer,
                        monotonic() + timeout)

    def dump(self, path: str) -> dict:
        records = [
            (s.ids.tobytes(), s.times.tobytes(), s.heartbeats, s.others, s.closed, s.error)
            for s in self.streams
        ]
        with open(path, "wb") as f:
            pickle.dump(records, f, protocol=pickle.HIGHEST_PROTOCOL)
        return {"streams": len(records)}

    def close(self) -> dict:
        for s in self.streams:
            if s.sock is not None:
                s.sock.close()
                s.sock = None
        self.streams, self.openings = [], []
        self.by_fd.clear()
        self.connecting.clear()
        return {}


def main() -> None:
    LoadClient().run()


if __name__ == "__main__":
    main()
