"""Exactly once, in order, whatever happens to the connection or the server (CONTRACT §4, issue 2).

Against a real `gunicorn -c gunicorn.conf.py`, on SQLite and on PostgreSQL:
subscribers that drop their connections at random, kill -9 of workers,
SIGHUP reloads, SIGTERM, a lost LISTEN connection and a client that stops
reading. Every subscriber must end up with every message of its scope once,
in id order. The SSE client is tests/sseclient.py.
"""
from __future__ import annotations

import os
import random
import signal
import threading
from collections import Counter

import psycopg
import pytest

from conftest import PG_ADMIN_URL, LiveServer, wait_until
from sseclient import (
    BackgroundPublisher,
    Frame,
    Publisher,
    Subscriber,
    assert_exactly_once,
    events_of,
    history,
    open_connection,
    open_stream,
    publish_sentinels,
    read_frames,
    sse_lines,
    streams_open,
)
from test_stream_live import database_url  # noqa: F401 - the PostgreSQL run marked `postgres`

pytestmark = pytest.mark.integration


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
    server = start_server(database_url, DEMO_ENABLED=True)

    def kill_both_workers(subscribers):
        for pid in server.worker_pids():
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: pid not in server.worker_pids() and len(server.worker_pids()) == 2,
                       what="gunicorn to replace the killed worker")

    subscribers = run_disruption(server, "kill.1", kill_both_workers)
    assert all(s.connections >= 2 for s in subscribers), "every subscriber lost its worker and reconnected"

def test_sighup_reload_ends_streams_itself_and_loses_nothing(start_server, database_url):
    """A reload ends every open stream with the shutdown comment: the old workers do not wait
    for their streams, which never end by themselves, for the whole graceful timeout (set far
    beyond the test's patience here, so a held reload fails the test)."""
    server = start_server(database_url, DEMO_ENABLED=True, gunicorn_args=["--graceful-timeout", "600"])
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
    server = start_server(database_url, DEMO_ENABLED=True, gunicorn_args=["--graceful-timeout", "600"])
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

@pytest.mark.postgres
def test_postgres_listen_connection_lost_then_live_again(start_server, postgres_url):
    """The cross-process wake-up (LISTEN) is a connection too: when it is lost, the feed reconnects
    by itself (CONTRACT §5 "Change feed lost"). The safety poll is set far beyond the test's
    patience, so the second message can only arrive through the new LISTEN connection."""
    server = start_server(postgres_url, workers=1, DEMO_ENABLED=True, REALTIME_SAFETY_POLL_S=3600)
    database = postgres_url.rpartition("/")[2]

    def listeners() -> set[int]:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            return {pid for (pid,) in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND query LIKE 'LISTEN%%'", (database,))}

    token = server.token("listen.1", ["t"])
    with open_stream(server, token) as response:
        items = events_of(response)
        first = server.publish("listen.1", "t", 1)
        assert read_frames(items, 1)[0].envelope == first
        [lost] = listeners()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (lost,)).fetchone() == (True,)
        # A NOTIFY sent before the new LISTEN is heard by no one: publish once it listens.
        wait_until(lambda: listeners() - {lost}, what="the worker listening again")
        second = server.publish("listen.1", "t", 2)
        assert read_frames(items, 1)[0].envelope == second


def test_a_client_that_stops_reading_is_cut_off_then_resumes(start_server, tmp_path):
    """A stalled reader must not make the server buffer without bound (issue 2): its stream ends
    once REALTIME_STREAM_BUFFER frames wait, and it resumes from the store with its cursor."""
    server = start_server(f"sqlite:///{tmp_path / 'slow.sqlite3'}", DEMO_ENABLED=True, REALTIME_STREAM_BUFFER=5)
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
