"""A small WHATWG-conformant SSE client for the live tests (tests/test_stream_*.py).

It parses an event stream as the HTML standard's "interpreting an event
stream" says (lines split on CRLF, LF and CR only; `data:` lines joined;
comments kept so tests can see keep-alives and the shutdown comment), and
adds what those tests drive against a real gunicorn: publishers that spread
their requests over both workers, subscribers that reconnect with their
cursor like EventSource, and the exactly-once check on what they received.
Not a test module: it holds no tests and no fixtures.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import re
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import httpx

from conftest import PUBLISH_KEY, LiveServer, wait_until

SUBSCRIBE = "/api/realtime/subscribe"
_LINE_END = re.compile(r"\r\n|\r(?!$)|\n")  # a CR at the end may be half of a CRLF


# -- a small SSE client: WHATWG "interpreting an event stream" ------------------------------


@dataclass(frozen=True)
class Frame:
    """One dispatched block of fields. `id` is None when the frame had no `id:` line."""

    id: str | None
    event: str
    data: str
    retry: int | None

    @property
    def envelope(self) -> dict:
        return json.loads(self.data)


@dataclass(frozen=True)
class Comment:
    text: str


def parse_sse(lines: Iterable[str]) -> Iterator[Frame | Comment]:
    """Frames and comments from lines already split on CRLF, LF and CR (`sse_lines`).

    Unlike a browser this also yields a frame holding only `retry:`, so tests can see it.
    """
    fields: dict[str, str] = {}
    for line in lines:
        if line == "":
            if fields:
                retry = fields.get("retry")
                yield Frame(fields.get("id"), fields.get("event", "message"), fields.get("data", ""),
                            int(retry) if retry is not None and retry.isdigit() else None)
            fields = {}
        elif line.startswith(":"):
            yield Comment(line[1:].removeprefix(" "))
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data" and "data" in fields:
                fields["data"] += "\n" + value
            elif name in ("id", "event", "data", "retry"):
                fields[name] = value


@contextmanager
def open_stream(server: LiveServer, token: str, *, header_cursor: str | None = None,
                query_cursor: str | None = None, bearer: bool = False, read_timeout: float = 5.0):
    """GET /subscribe; yields the response once its status and headers arrived."""
    params = {} if bearer else {"token": token}
    headers = {"Authorization": f"Bearer {token}"} if bearer else {}
    if header_cursor is not None:
        headers["Last-Event-ID"] = header_cursor
    if query_cursor is not None:
        params["last_event_id"] = query_cursor
    timeout = httpx.Timeout(10.0, read=read_timeout)
    with httpx.stream("GET", server.url + SUBSCRIBE, params=params, headers=headers, timeout=timeout) as response:
        yield response


def read_frames(items: Iterator[Frame | Comment], count: int, within: float = 15.0) -> list[Frame]:
    """The next `count` frames that carry an event (not `retry:` alone); comments skipped."""
    frames: list[Frame] = []
    deadline = time.monotonic() + within
    for item in items:
        if isinstance(item, Frame) and item.data:
            frames.append(item)
            if len(frames) == count:
                return frames
        # heartbeats (1 s) bring us back here on an idle stream
        assert time.monotonic() < deadline, f"got {len(frames)} of {count} frames in {within}s: {frames}"
    raise AssertionError(f"stream ended after {len(frames)} of {count} frames: {frames}")


def sse_lines(response: httpx.Response) -> Iterator[str]:
    """Lines split only on CRLF, LF and CR, as the SSE spec says.

    Not `response.iter_lines()`: it uses `str.splitlines`, which also breaks
    on U+2028, U+0085 and friends, legal inside a `data:` line.
    """
    buffer = ""
    for text in response.iter_text():
        buffer += text
        *lines, buffer = _LINE_END.split(buffer)
        yield from lines
    if buffer:
        yield buffer


def events_of(response: httpx.Response) -> Iterator[Frame | Comment]:
    return parse_sse(sse_lines(response))


def stream_frames(server: LiveServer, token: str, count: int, **kwargs) -> list[Frame]:
    with open_stream(server, token, **kwargs) as response:
        assert response.status_code == 200, response.read()
        return read_frames(events_of(response), count)


def history(server: LiveServer, token: str) -> list[dict]:
    """Every retained message of the token's scope, via GET /api/realtime/messages."""
    found: list[dict] = []
    after = None
    while True:
        params = {"token": token, "limit": "1000", **({"after": after} if after else {})}
        body = httpx.get(server.url + "/api/realtime/messages", params=params, timeout=10).json()
        found += body["messages"]
        if not body["messages"]:
            return found
        after = body["cursor"]


def other_epoch(cursor: str) -> str:
    epoch = cursor.partition("-")[0]
    return "00000000" if epoch != "00000000" else "11111111"


# -- which worker served a connection ----------------------------------------------------------


def serving_worker(server: LiveServer, sock) -> int | None:
    """The pid of the gunicorn worker holding the server end of `sock` (a connected client socket)."""
    client_port = sock.getsockname()[1]
    inode = None
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            parts = line.split()
            local_port = int(parts[1].split(":")[1], 16)
            remote_port = int(parts[2].split(":")[1], 16)
            if local_port == server.port and remote_port == client_port:
                inode = parts[9]
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in server.worker_pids():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


def streams_open(server: LiveServer) -> int:
    """Open streams summed over the workers (`realtime_streams_open` in /metrics)."""
    return int(server.metric("realtime_streams_open"))


# -- publishers and subscribers in threads ---------------------------------------------------


class Publisher(threading.Thread):
    """Publishes `count` messages over keep-alive connections, preferring worker `prefer`.

    After each response it looks up which worker served the connection, and
    drops the connection when it is the other one, so publishes end up spread
    over both workers on purpose rather than by the kernel's luck.
    """

    def __init__(self, server: LiveServer, channels: list[str], topics: list[str], count: int,
                 prefer: int, seed: int, pause_s: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.server, self.channels, self.topics, self.count = server, channels, topics, count
        self.prefer, self.pause_s = prefer, pause_s
        self.rng = random.Random(seed)
        self.published: list[dict] = []
        self.served_by: Counter[int | None] = Counter()
        self.error: BaseException | None = None

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        try:
            for n in range(self.count):
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
                body = json.dumps({"channel": self.rng.choice(self.channels), "topic": self.rng.choice(self.topics),
                                   "data": {"n": n, "by": self.name}})
                conn.request("POST", "/api/realtime/publish", body=body,
                             headers={"Authorization": f"Bearer {PUBLISH_KEY}", "Content-Type": "application/json"})
                response = conn.getresponse()
                text = response.read()
                assert response.status == 201, text
                self.published.append(json.loads(text))
                pid = serving_worker(self.server, conn.sock)
                self.served_by[pid] += 1
                if pid != self.prefer:
                    conn.close()
                    conn = None
                time.sleep(self.rng.random() * self.pause_s)  # pacing, not waiting for a condition
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            if conn is not None:
                conn.close()


class BackgroundPublisher(threading.Thread):
    """Publishes on one channel every few ms until stopped; a publish cut by a crash is retried."""

    def __init__(self, server: LiveServer, channel: str) -> None:
        super().__init__(daemon=True)
        self.server, self.channel = server, channel
        self.acknowledged: list[int] = []
        self.uncertain = 0  # requests cut off: stored or not, history tells
        self.stopping = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stopping.is_set() and n < 2000:
            n += 1
            try:
                response = httpx.post(self.server.url + "/api/realtime/publish",
                                      json={"channel": self.channel, "topic": "t", "data": n},
                                      headers={"Authorization": f"Bearer {PUBLISH_KEY}"}, timeout=5)
                if response.status_code == 201:
                    self.acknowledged.append(response.json()["id"])
                else:
                    self.uncertain += 1
            except httpx.HTTPError:
                self.uncertain += 1
            self.stopping.wait(0.01)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
        assert not self.is_alive()


class Subscriber(threading.Thread):
    """An SSE client that keeps its last cursor and reconnects until stopped.

    With `drop_probability`, it drops the connection after any received item
    (also right after `retry:`, mid-replay, on a heartbeat), like a flaky
    network; every reconnect sends the last cursor back, by `Last-Event-ID`
    or `?last_event_id=`.
    """

    def __init__(self, server: LiveServer, channel: str, topics: list[str], *, seed: int,
                 drop_probability: float = 0.0, cursor_in_query: bool = False) -> None:
        super().__init__(daemon=True)
        self.server, self.channel, self.topics = server, channel, topics
        self.rng = random.Random(seed)
        self.drop_probability = drop_probability
        self.cursor_in_query = cursor_in_query
        self.cursor: str | None = None
        self.received: list[int] = []
        self.resets: list[Frame] = []
        self.connections = 0
        # How each connection ended: "shutdown" (the server's last comment said
        # so), "eof", "dropped" (by us) or "error"; one entry per ended connection.
        self.endings: list[str] = []
        self.failures: list[str] = []
        self.transport_errors: list[str] = []
        self.unavailable = 0  # 503s while the database was away: the client waits and tries again
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)
        assert not self.is_alive(), f"{self.name} did not stop"

    def run(self) -> None:
        token = None
        while not self.stopping.is_set():
            try:
                if token is None:
                    token = self.server.token(self.channel, self.topics)  # needs no database
                cursor = self.cursor
                kwargs = {"query_cursor": cursor} if self.cursor_in_query else {"header_cursor": cursor}
                with open_stream(self.server, token, bearer=self.rng.random() < 0.3, **kwargs) as response:
                    if response.status_code == 401:
                        token = None
                        continue
                    if response.status_code == 503 and "Retry-After" in response.headers:
                        self.unavailable += 1
                        response.read()
                        self.stopping.wait(0.2)
                        continue
                    if response.status_code != 200:
                        self.failures.append(f"{response.status_code} {response.read()!r}")
                        continue
                    self.connections += 1
                    ending = "error"
                    try:
                        ending = self._read(response)
                    finally:
                        self.endings.append(ending)
            except (httpx.HTTPError, OSError) as exc:
                # The server went away (kill, reload): reconnect like EventSource does.
                self.transport_errors.append(type(exc).__name__)
            except Exception as exc:  # a malformed frame: fail the test, not just this thread
                self.failures.append(repr(exc))
            self.stopping.wait(0.05)  # a short `retry:`

    def _read(self, response: httpx.Response) -> str:
        shutdown = False
        for item in events_of(response):
            if self.stopping.is_set():
                return "dropped"
            shutdown = isinstance(item, Comment) and item.text.startswith("server shutting down")
            if isinstance(item, Frame) and item.event == "reset":
                self.resets.append(item)
                self.cursor = item.id
            elif isinstance(item, Frame) and item.data:
                self.received.append(item.envelope["id"])
                self.cursor = item.id
            if self.rng.random() < self.drop_probability:
                return "dropped"
        return "shutdown" if shutdown else "eof"


def open_connection(subscriber: Subscriber) -> int | None:
    """The index of the subscriber's open connection, or None between connections."""
    index = subscriber.connections - 1
    return index if index >= 0 and len(subscriber.endings) == index else None


def assert_exactly_once(subscribers: list[Subscriber], expected: dict[tuple[str, str], list[int]]) -> None:
    for sub in subscribers:
        want = sorted(i for (channel, topic), ids in expected.items() if channel == sub.channel
                      and topic in sub.topics for i in ids)
        duplicates = [i for i, n in Counter(sub.received).items() if n > 1]
        missing = sorted(set(want) - set(sub.received))
        assert sub.received == want, (
            f"{sub.name} ({sub.channel} {sub.topics}, {sub.connections} connections): "
            f"{len(sub.received)} received, {len(want)} expected; missing {missing[:20]}, "
            f"duplicates {duplicates[:20]}, unexpected {sorted(set(sub.received) - set(want))[:20]}, "
            f"transport errors {Counter(sub.transport_errors)}"
        )
        assert not sub.failures, sub.failures


def publish_sentinels(server: LiveServer, subscribers: list[Subscriber]) -> list[dict]:
    """One last message on every (channel, topic) a subscriber watches, then wait until each has its own.

    Streams deliver in id order, so a subscriber holding the sentinel of its
    scope holds everything published before it, duplicates included: nothing
    can arrive late after this. On timeout, `assert_exactly_once` names what
    is missing.
    """
    scopes = sorted({(s.channel, topic) for s in subscribers for topic in s.topics})
    sentinels = [server.publish(channel, topic, "sentinel") for channel, topic in scopes]

    def has_sentinel(sub: Subscriber) -> bool:
        last = max(m["id"] for m in sentinels if m["channel"] == sub.channel and m["topic"] in sub.topics)
        return last in sub.received

    try:
        wait_until(lambda: all(has_sentinel(s) for s in subscribers), timeout=30, interval=0.05)
    except AssertionError:
        pass
    return sentinels
