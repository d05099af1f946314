"""The event stream against a real `gunicorn -c gunicorn.conf.py` (CONTRACT §3-§4, issue 2).

What a subscriber depends on, checked on parsed events (never on how bytes
were chunked), on SQLite and on PostgreSQL: replay then live, resume from a
cursor, exactly-once delivery under reconnect chaos, worker crashes, reloads
and shutdowns, heartbeats and reset frames.

Tests that only read and publish share one server per backend
(`shared_server`, each test on its own channels); tests that kill, reload or
reconfigure the server start their own.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Iterator

import httpx
import psycopg
import pytest

from conftest import (
    PG_ADMIN_URL,
    PUBLISH_KEY,
    ROOT,
    LiveServer,
    _create_pg_database,
    _drop_pg_database,
    skip_or_fail,
    wait_until,
)

pytestmark = pytest.mark.integration

SUBSCRIBE = "/api/realtime/subscribe"
ENVELOPE_KEYS = ["id", "channel", "topic", "data", "run_id", "created_at"]
RETRY_MS = 200  # what LiveServer sets
_LINE_END = re.compile(r"\r\n|\r(?!$)|\n")  # a CR at the end may be half of a CRLF


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path) -> str:
    """conftest's `database_url`, with the PostgreSQL run marked `postgres`."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'live.sqlite3'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def shared_server(request, tmp_path_factory) -> Iterator[LiveServer]:
    """One 2-worker gunicorn per backend for the tests that neither kill nor reconfigure it."""
    tmp = tmp_path_factory.mktemp(f"shared-{request.param}")
    pg_name = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'shared.sqlite3'}"
    else:
        pg_name = _create_pg_database()
        if pg_name is None:
            skip_or_fail("PostgreSQL is not reachable on 127.0.0.1:5432")
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{pg_name}"
    server = LiveServer(tmp / "gunicorn.log", url)
    try:
        yield server.start()
    finally:
        server.stop()
        if pg_name:
            _drop_pg_database(pg_name)


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
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
        assert not self.is_alive(), f"{self.name} did not stop"

    def run(self) -> None:
        token = None
        while not self.stopping.is_set():
            try:
                if token is None:
                    token = self.server.token(self.channel, self.topics)
                cursor = self.cursor
                kwargs = {"query_cursor": cursor} if self.cursor_in_query else {"header_cursor": cursor}
                with open_stream(self.server, token, bearer=self.rng.random() < 0.3, **kwargs) as response:
                    if response.status_code == 401:
                        token = None
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


# -- 1. replay then live ---------------------------------------------------------------------


def test_replay_then_live_frames_and_headers(shared_server):
    server = shared_server
    published = [
        server.publish("replay.1", "status", {"percent": 10}, run_id="run-1"),
        server.publish("replay.1", "hidden", {"not": "in the token"}),
        server.publish("replay.other", "status", {"other": "channel"}),
        server.publish("replay.1", "log", {"line": "é ✓ \u2028 \n"}),
    ]
    token = server.token("replay.1", ["status", "log"])

    with open_stream(server, token) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        items = events_of(response)
        first = next(items)
        assert first == Frame(None, "message", "", RETRY_MS), "the first frame is `retry:`"
        replayed = read_frames(items, 2)
        live_published = [
            server.publish("replay.1", "log", [1, 2, 3]),
            server.publish("replay.1", "hidden", "nope"),
            server.publish("replay.other", "log", "nope"),
            server.publish("replay.1", "status", None, run_id="run-2"),
        ]
        live = read_frames(items, 2)

    expected = [published[0], published[3], live_published[0], live_published[3]]
    frames = replayed + live
    assert [f.envelope for f in frames] == expected, "replay oldest first, then live, only the token's topics"
    assert [f.event for f in frames] == [e["topic"] for e in expected]
    for frame in frames:
        assert list(frame.envelope) == ENVELOPE_KEYS
        assert datetime.fromisoformat(frame.envelope["created_at"]).utcoffset() is not None
    # `id:` is the cursor /messages hands out after that same message.
    for n, frame in enumerate(frames, start=1):
        body = httpx.get(server.url + "/api/realtime/messages",
                         params={"token": token, "limit": str(n)}, timeout=10).json()
        assert body["cursor"] == frame.id
    assert len({f.id for f in frames}) == len(frames)


def test_headers_and_retry_arrive_before_any_message(shared_server):
    server = shared_server
    token = server.token("empty.1", ["t"])
    with open_stream(server, token) as response:
        # We are here, with status and headers, while the channel is still empty.
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        raw = b""
        chunks = response.iter_raw()
        while len(raw) < len(b"retry: 200\n\n"):
            raw += next(chunks)
        assert raw.startswith(b"retry: 200\n\n"), raw
        published = server.publish("empty.1", "t", {"first": True})
        while not message_frames(raw):
            raw += next(chunks)
    assert message_frames(raw)[0].envelope == published


def message_frames(raw: bytes) -> list[Frame]:
    return [f for f in parse_sse(raw.decode().split("\n")) if isinstance(f, Frame) and f.data]


# -- 2. resume -------------------------------------------------------------------------------


def test_resume_from_header_and_from_query_header_wins(shared_server):
    server = shared_server
    ids = [server.publish("resume.1", "t", n)["id"] for n in range(5)]
    token = server.token("resume.1", ["t"])
    cursors = [f.id for f in stream_frames(server, token, 5)]

    from_header = stream_frames(server, token, 3, header_cursor=cursors[1])
    assert [f.envelope["id"] for f in from_header] == ids[2:]
    from_query = stream_frames(server, token, 3, query_cursor=cursors[1])
    assert [f.envelope["id"] for f in from_query] == ids[2:]
    bearer_and_query = stream_frames(server, token, 2, query_cursor=cursors[2], bearer=True)
    assert [f.envelope["id"] for f in bearer_and_query] == ids[3:]
    # Both: the header (what EventSource sends on reconnect) wins.
    both = stream_frames(server, token, 1, header_cursor=cursors[3], query_cursor=cursors[0])
    assert [f.envelope["id"] for f in both] == ids[4:]
    # Resuming at the newest message replays nothing, then goes live.
    with open_stream(server, token, header_cursor=cursors[4]) as response:
        items = events_of(response)
        next(items)
        live = server.publish("resume.1", "t", "live")
        assert read_frames(items, 1)[0].envelope == live


# -- 3. chaos --------------------------------------------------------------------------------


def test_chaos_reconnecting_subscribers_get_every_message_once_in_order(shared_server):
    server = shared_server
    channels, topics = ["chaos.a", "chaos.b", "chaos.c"], ["x", "y", "z"]
    rng = random.Random(2)
    # A little history before anyone connects.
    early = [server.publish(rng.choice(channels), rng.choice(topics), {"early": n}) for n in range(10)]
    subscribers = [
        Subscriber(server, rng.choice(channels), sorted(rng.sample(topics, rng.randint(1, 3))), seed=n,
                   drop_probability=0.08, cursor_in_query=n % 3 == 0)
        for n in range(20)
    ]
    workers = server.worker_pids()
    publishers = [Publisher(server, channels, topics, count=50, prefer=workers[n % 2], seed=100 + n)
                  for n in range(4)]
    for thread in subscribers + publishers:
        thread.start()
    try:
        for publisher in publishers:
            publisher.join(timeout=60)
            assert not publisher.is_alive(), "publisher did not finish in 60 s"
            assert publisher.error is None, repr(publisher.error)
        messages = early + [m for p in publishers for m in p.published]
        messages += publish_sentinels(server, subscribers)
        expected: dict[tuple[str, str], list[int]] = {}
        for m in sorted(messages, key=lambda m: m["id"]):
            expected.setdefault((m["channel"], m["topic"]), []).append(m["id"])
    finally:
        for sub in subscribers:
            sub.stop()
    served = sum((p.served_by for p in publishers), Counter())
    assert set(workers) <= set(served), f"publishes served by {dict(served)}, workers {workers}"
    assert sum(s.connections for s in subscribers) > 2 * len(subscribers), "subscribers hardly reconnected"
    assert_exactly_once(subscribers, expected)


# -- 4./5. crashes, reloads, shutdown --------------------------------------------------------


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


def run_disruption(server: LiveServer, channel: str, disrupt) -> list[Subscriber]:
    """Subscribers and a publisher run while `disrupt()` acts; then each must hold the whole history."""
    subscribers = [Subscriber(server, channel, ["t"], seed=n, cursor_in_query=n % 2 == 1) for n in range(8)]
    publisher = BackgroundPublisher(server, channel)
    for thread in [*subscribers, publisher]:
        thread.start()
    try:
        wait_until(lambda: all(len(s.received) >= 5 for s in subscribers), what="subscribers receiving")
        disrupt(subscribers)
        mark = len(publisher.acknowledged)
        wait_until(lambda: len(publisher.acknowledged) >= mark + 20, what="publishing after the disruption")
        publisher.stop()
        publish_sentinels(server, subscribers)
        stored = [m["id"] for m in history(server, server.token(channel, ["t"]))]
        assert set(publisher.acknowledged) <= set(stored), "an acknowledged publish was lost"
    finally:
        publisher.stop()
        for sub in subscribers:
            sub.stop()
    assert_exactly_once(subscribers, {(channel, "t"): stored})
    return subscribers


def test_kill_9_of_workers_loses_nothing(start_server, database_url):
    server = start_server(database_url)

    def kill_both_workers(subscribers):
        for pid in server.worker_pids():
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: pid not in server.worker_pids() and len(server.worker_pids()) == 2,
                       what="gunicorn to replace the killed worker")

    subscribers = run_disruption(server, "kill.1", kill_both_workers)
    assert all(s.connections >= 2 for s in subscribers), "every subscriber lost its worker and reconnected"


def open_connection(subscriber: Subscriber) -> int | None:
    """The index of the subscriber's open connection, or None between connections."""
    index = subscriber.connections - 1
    return index if index >= 0 and len(subscriber.endings) == index else None


def test_sighup_reload_ends_streams_itself_and_loses_nothing(start_server, database_url):
    """A reload ends every open stream with the shutdown comment: the old workers do not wait
    for their streams, which never end by themselves, for the whole graceful timeout (set far
    beyond the test's patience here, so a held reload fails the test)."""
    server = start_server(database_url, gunicorn_args=["--graceful-timeout", "600"])
    open_at_reload: dict[Subscriber, int | None] = {}

    def reload(subscribers):
        old = set(server.worker_pids())
        open_at_reload.update({s: open_connection(s) for s in subscribers})
        server.signal(signal.SIGHUP)
        wait_until(lambda: not old & set(server.worker_pids()) and len(server.worker_pids()) == 2,
                   timeout=60, what="old workers to exit after SIGHUP")

    subscribers = run_disruption(server, "reload.1", reload)
    ended = {s.name: s.endings[i] for s, i in open_at_reload.items() if i is not None}
    assert len(ended) >= len(subscribers) - 1, "nearly every subscriber had a stream open at the reload"
    assert set(ended.values()) == {"shutdown"}, ended
    assert all(s.connections >= 2 for s in subscribers)


def test_sigterm_ends_streams_and_the_master_exits(start_server, database_url):
    """SIGTERM ends every stream with the shutdown comment, and the master exits cleanly
    without waiting out a graceful timeout set far beyond the test's patience."""
    server = start_server(database_url, gunicorn_args=["--graceful-timeout", "600"])
    token = server.token("term.1", ["t"])
    last_lines: dict[int, str] = {}
    opened = threading.Barrier(5, timeout=10)

    def watch(n: int) -> None:
        with open_stream(server, token) as response:
            opened.wait()
            for line in sse_lines(response):
                if line:
                    last_lines[n] = line

    readers = [threading.Thread(target=watch, args=(n,), daemon=True) for n in range(4)]
    for reader in readers:
        reader.start()
    opened.wait()
    wait_until(lambda: streams_open(server) == 4, what="4 open streams")
    server.signal(signal.SIGTERM)
    for reader in readers:
        reader.join(timeout=60)
        assert not reader.is_alive(), "a stream outlived SIGTERM"
    assert server.process.wait(timeout=60) == 0
    assert set(last_lines.values()) == {": server shutting down; reconnect with Last-Event-ID"}


def streams_open(server: LiveServer) -> int:
    """Open streams summed over workers: ask /stats on connections until both workers answered."""
    seen: dict[int, int] = {}
    for _ in range(40):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            conn.request("GET", "/api/realtime/stats")
            response = conn.getresponse()
            streams = json.loads(response.read())["streams"]
            seen[serving_worker(server, conn.sock)] = streams
        finally:
            conn.close()
        if len(seen) >= len(server.worker_pids()):
            break
    return sum(seen.values())


@pytest.mark.postgres
def test_postgres_listen_connection_lost_then_live_again(start_server, postgres_url):
    """The cross-process wake-up (LISTEN) is a connection too; losing it must not stall streams."""
    server = start_server(postgres_url)
    token = server.token("listen.1", ["t"])
    with open_stream(server, token) as response:
        items = events_of(response)
        first = server.publish("listen.1", "t", 1)
        assert read_frames(items, 1)[0].envelope == first
        database = postgres_url.rpartition("/")[2]
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND query LIKE 'LISTEN%%'", (database,)).fetchall()
        assert killed, "no LISTEN connection found"
        second = server.publish("listen.1", "t", 2)
        assert read_frames(items, 1, within=5)[0].envelope == second


def test_a_client_that_stops_reading_is_cut_off_then_resumes(start_server, tmp_path):
    """A stalled reader must not make the server buffer without bound (issue 2): its stream ends
    once REALTIME_STREAM_BUFFER frames wait, and it resumes from the store with its cursor."""
    server = start_server(f"sqlite:///{tmp_path / 'slow.sqlite3'}", REALTIME_STREAM_BUFFER=5)
    token = server.token("slow.1", ["t"])
    received, cursor, connections = [], None, 0
    with open_stream(server, token) as response:
        connections += 1
        items = events_of(response)
        next(items)  # retry:
        # 12 MB while we read nothing: far more than the socket buffers hold.
        published = [server.publish("slow.1", "t", "x" * 300_000)["id"] for _ in range(40)]
        for item in items:
            if isinstance(item, Frame) and item.data:
                received.append(item.envelope["id"])
                cursor = item.id
    assert len(received) < len(published), "the stalled stream was never cut off"
    while len(received) < len(published) and connections < 10:
        with open_stream(server, token, header_cursor=cursor) as response:
            connections += 1
            for frame in read_frames(events_of(response), len(published) - len(received)):
                received.append(frame.envelope["id"])
                cursor = frame.id
    assert received == published


# -- 6. heartbeats ---------------------------------------------------------------------------


def test_idle_stream_sends_keep_alive_comments(shared_server):
    """An idle stream carries only keep-alive comments. Their timing, at least one every
    REALTIME_HEARTBEAT_S, is tested with an injected clock (tests/test_dispatch.py)."""
    server = shared_server
    token = server.token("idle.1", ["t"])
    with open_stream(server, token) as response:
        lines = sse_lines(response)
        assert [next(lines), next(lines)] == [f"retry: {RETRY_MS}", ""]
        assert [next(lines) for _ in range(6)] == [": keep-alive", ""] * 3


# -- 7. reset frames -------------------------------------------------------------------------


def test_cursor_from_another_database_gets_unknown_cursor_reset(shared_server):
    server = shared_server
    ids = [server.publish("reset.1", "t", n)["id"] for n in range(3)]
    token = server.token("reset.1", ["t"])
    real = stream_frames(server, token, 1)[0].id
    foreign = f"{other_epoch(real)}-{ids[-1]}"

    with open_stream(server, token, header_cursor=foreign) as response:
        frames = read_frames(events_of(response), 4)
    reset, replay = frames[0], frames[1:]
    assert reset.event == "reset"
    assert json.loads(reset.data) == {"reason": "unknown_cursor", "cursor": reset.id}
    assert [f.envelope["id"] for f in replay] == ids, "then every retained message"
    # The reset's id resumes right after it: the same messages, no second reset.
    again = stream_frames(server, token, 3, header_cursor=reset.id)
    assert [f.event for f in again] == ["t"] * 3
    assert [f.envelope["id"] for f in again] == ids


def test_cursor_older_than_pruned_history_gets_history_truncated(start_server, database_url):
    server = start_server(database_url, REALTIME_RETENTION_S=1)
    old = [server.publish("trunc.1", "t", n) for n in range(3)]
    server.publish("trunc.other", "t", "also old")
    token = server.token("trunc.1", ["t"])
    cursors = [f.id for f in stream_frames(server, token, 3)]
    newest_old = datetime.fromisoformat(old[-1]["created_at"]).timestamp()
    wait_until(lambda: time.time() > newest_old + 1.05, what="the first messages to pass retention")

    env = {**os.environ, "DATABASE_URL": server.database_url, "SECRET_KEY": "live-test-secret",
           "FLASK_REALTIME_RETENTION_S": "1"}
    pruned = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "realtime", "prune"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert pruned.returncode == 0, pruned.stderr
    assert "pruned 4 messages" in pruned.stdout
    kept = [server.publish("trunc.1", "t", n)["id"] for n in range(3, 5)]

    frames = stream_frames(server, token, 3, header_cursor=cursors[0])
    reset = frames[0]
    assert reset.event == "reset"
    assert json.loads(reset.data) == {"reason": "history_truncated", "cursor": reset.id}
    assert [f.envelope["id"] for f in frames[1:]] == kept, "continues from the oldest retained message"
    after_reset = stream_frames(server, token, 2, header_cursor=reset.id)
    assert [(f.event, f.envelope["id"]) for f in after_reset] == [("t", i) for i in kept]
    # A client that saw the last pruned message lost nothing: no reset.
    seen_all = stream_frames(server, token, 2, query_cursor=cursors[-1])
    assert [(f.event, f.envelope["id"]) for f in seen_all] == [("t", i) for i in kept]


# -- valid input a browser must be able to send ------------------------------------------------


def test_largest_valid_token_works_in_the_query(shared_server):
    """EventSource cannot set headers, so a browser sends the token as `?token=` (CONTRACT §3)."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-"
    rng = random.Random(1)
    channel = "".join(rng.choice(alphabet) for _ in range(200))
    topics = ["".join(rng.choice(alphabet) for _ in range(100)) for _ in range(50)]
    token = shared_server.token(channel, topics)
    published = shared_server.publish(channel, topics[-1], "big token")
    with open_stream(shared_server, token) as response:
        assert response.status_code == 200, (response.status_code, response.read()[:200])
        assert read_frames(events_of(response), 1)[0].envelope == published
