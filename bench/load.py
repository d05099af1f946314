"""The load client: many SSE subscribers in one gevent process, driven over stdin.

bench/run.py starts one or more of these and sends one JSON command per line
on stdin; each command is answered by one JSON line on stdout. Kept cheap on
purpose, so the client is not what limits the figures: raw sockets, an
HTTP/1.1 GET, a minimal chunked-encoding decoder, and of each SSE frame only
the `id:` line is parsed (`<epoch>-<n>` -> n, or a bare `n`; first in the frame
or not, as the peers of bench/peers.py send it), stamped with the monotonic
clock at the recv() that completed it. CLOCK_MONOTONIC is system-wide, so
these stamps compare directly with the publisher's send times in run.py.

Commands:
  {"cmd": "open", "host", "port", "path", "count", "concurrency", "timeout"}
      open `count` streams; answer once each got its `retry:` frame (or failed)
  {"cmd": "mark"}                   forget what was received so far (a phase starts)
  {"cmd": "wait", "last_id", "timeout"}   answer once every open stream got id >= last_id
  {"cmd": "dump", "path"}           pickle per stream (ids, receive times, counters) to path
  {"cmd": "close"}                  close every stream
  {"cmd": "exit"}
Every answer carries "cpu": this process's user+system CPU seconds so far.
"""
from __future__ import annotations

import json
import os
import pickle
import resource
import sys
import time
from array import array

import gevent
from gevent import socket
from gevent.fileobject import FileObjectPosix
from gevent.lock import BoundedSemaphore

monotonic = time.monotonic


class Subscriber:
    __slots__ = ("ids", "times", "heartbeats", "others", "ready", "closed", "error", "last_id", "sock")

    def __init__(self) -> None:
        self.ids = array("q")
        self.times = array("d")
        self.heartbeats = 0
        self.others = 0  # frames that are neither a message, retry: nor a comment (e.g. reset)
        self.ready = False
        self.closed = False
        self.error: str | None = None
        self.last_id = 0
        self.sock = None

    def mark(self) -> None:
        self.ids = array("q")
        self.times = array("d")
        self.heartbeats = self.others = 0

    def run(self, host: str, port: int, path: str, gate: BoundedSemaphore) -> None:
        gate.acquire()
        released = False
        try:
            sock = self.sock = socket.create_connection((host, port), timeout=30)
            sock.settimeout(None)
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode()
            )
            raw = b""
            while b"\r\n\r\n" not in raw:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed before the response headers")
                raw += data
            head, _, raw = raw.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            if b"chunked" not in head.lower():
                raise ConnectionError("expected Transfer-Encoding: chunked")
            text = b""
            recv = sock.recv
            while True:
                now = monotonic()
                # Chunked transfer coding: "<hex size>\r\n<bytes>\r\n", ended by size 0.
                pos = 0
                while True:
                    nl = raw.find(b"\r\n", pos)
                    if nl < 0:
                        break
                    size = int(raw[pos:nl].split(b";", 1)[0], 16)
                    if size == 0:
                        self.closed = True
                        return
                    end = nl + 2 + size
                    if len(raw) < end + 2:
                        break
                    text += raw[nl + 2:end]
                    pos = end + 2
                raw = raw[pos:]
                # SSE frames end with a blank line; the server only sends LF.
                while True:
                    end = text.find(b"\n\n")
                    if end < 0:
                        break
                    frame = text[:end]
                    text = text[end + 2:]
                    # The `id` field: first, as this project and sse-starlette send it,
                    # or on a later line (flask-sse: "data:...\nid:7"), space optional.
                    if frame.startswith(b"id:"):
                        at = 3
                    else:
                        at = frame.find(b"\nid:")
                        at = at + 4 if at >= 0 else 0
                    if at:
                        stop = frame.find(b"\n", at)
                        cursor = frame[at:stop] if stop >= 0 else frame[at:]
                        message_id = int(cursor.rpartition(b"-")[2])
                        if frame.find(b"\nevent: reset") >= 0:
                            self.others += 1
                            continue
                        self.ids.append(message_id)
                        self.times.append(now)
                        self.last_id = message_id
                    elif frame.startswith(b":"):
                        self.heartbeats += 1
                    elif frame.startswith(b"retry:"):
                        self.ready = True
                        if not released:
                            released = True
                            gate.release()
                    else:
                        self.others += 1
                data = recv(65536)
                if not data:
                    self.closed = True
                    return
                raw += data
        except Exception as exc:  # noqa: BLE001 - reported, never raised
            self.error = f"{type(exc).__name__}: {exc}"
            self.closed = True
        finally:
            if not released:
                gate.release()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class LoadClient:
    def __init__(self) -> None:
        self.subscribers: list[Subscriber] = []
        self.greenlets: list[gevent.Greenlet] = []

    def open(self, host: str, port: int, path: str, count: int, concurrency: int, timeout: float) -> dict:
        gate = BoundedSemaphore(concurrency)
        new = [Subscriber() for _ in range(count)]
        self.subscribers.extend(new)
        self.greenlets.extend(gevent.spawn(s.run, host, port, path, gate) for s in new)
        deadline = monotonic() + timeout
        while monotonic() < deadline and not all(s.ready or s.closed for s in new):
            gevent.sleep(0.05)
        errors = sorted({s.error for s in new if s.error})
        return {
            "ready": sum(s.ready and not s.closed for s in new),
            "failed": sum(s.closed for s in new),
            "pending": sum(not s.ready and not s.closed for s in new),
            "errors": errors[:5],
        }

    def mark(self) -> dict:
        for s in self.subscribers:
            s.mark()
        return {}

    def wait(self, last_id: int, timeout: float) -> dict:
        deadline = monotonic() + timeout
        while monotonic() < deadline:
            if all(s.closed or s.last_id >= last_id for s in self.subscribers):
                break
            gevent.sleep(0.05)
        return {
            "caught_up": sum(s.last_id >= last_id for s in self.subscribers),
            "closed": sum(s.closed for s in self.subscribers),
        }

    def dump(self, path: str) -> dict:
        records = [
            (s.ids.tobytes(), s.times.tobytes(), s.heartbeats, s.others, s.closed, s.error)
            for s in self.subscribers
        ]
        with open(path, "wb") as f:
            pickle.dump(records, f, protocol=pickle.HIGHEST_PROTOCOL)
        return {"streams": len(records)}

    def close(self) -> dict:
        for s in self.subscribers:
            s.close()
        gevent.killall(self.greenlets, timeout=5)
        self.subscribers, self.greenlets = [], []
        return {}


def main() -> None:
    client = LoadClient()
    commands = FileObjectPosix(sys.stdin.fileno(), "rb")
    while True:
        line = commands.readline()
        if not line:
            break
        command = json.loads(line)
        name = command.pop("cmd")
        if name == "exit":
            break
        reply = getattr(client, name)(**command)
        reply["cpu"] = cpu()
        os.write(sys.stdout.fileno(), (json.dumps(reply) + "\n").encode())
    client.close()


if __name__ == "__main__":
    main()
