"""The database goes away, stalls or is locked: what clients see (CONTRACT §5, issue 8).

Against a real `gunicorn -c gunicorn.conf.py`. PostgreSQL faults happen in a
TCP proxy between the app and the shared server (tests/faultproxy.py), never
to the server itself; SQLite is locked by a second process. After each fault,
every subscriber must hold every stored message once, in order.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid

import httpx
import pytest

from conftest import PUBLISH_KEY, LiveServer, wait_until
from faultproxy import FaultProxy
from pgbouncer import pgbouncer  # noqa: F401 - the fixture
from sseclient import (
    BackgroundPublisher,
    Comment,
    Subscriber,
    assert_exactly_once,
    events_of,
    history,
    open_stream,
    publish_sentinels,
    read_frames,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy(postgres_url):
    """A TCP proxy in front of the test's fresh PostgreSQL database."""
    with FaultProxy("127.0.0.1", 5432) as proxy:
        yield proxy


def publish(server: LiveServer, channel: str, data: object, **headers: str) -> httpx.Response:
    return httpx.post(
        server.url + "/api/realtime/publish",
        json={"channel": channel, "topic": "t", "data": data},
        headers={"Authorization": f"Bearer {PUBLISH_KEY}", **headers},
        timeout=30,
    )


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "database_unavailable"
    assert int(response.headers["Retry-After"]) > 0


def readyz(server: LiveServer) -> httpx.Response:
    return httpx.get(server.url + "/readyz", timeout=30)


def keep_alives(items, count: int) -> list[str]:
    """The next `count` comments of a stream, failing on any frame with data."""
    comments = []
    for item in items:
        if isinstance(item, Comment):
            comments.append(item.text)
            if len(comments) == count:
                return comments
        else:
            assert not item.data, f"a frame while nothing was published: {item}"
    raise AssertionError(f"the stream ended after {comments}")


@pytest.mark.postgres
def test_a_database_cut_keeps_streams_open_workers_booting_and_loses_nothing(start_server, proxy, postgres_url):
    server = start_server(proxy.url_for(postgres_url), DEMO_ENABLED=True)
    channel = "cut.1"
    subscribers = [Subscriber(server, channel, ["t"], seed=n, cursor_in_query=n % 2 == 1) for n in range(4)]
    publisher = BackgroundPublisher(server, channel)
    idle_token = server.token("cut.idle", ["t"])
    with open_stream(server, idle_token, read_timeout=30) as idle:
        idle_items = events_of(idle)
        next(idle_items)  # retry:
        for thread in [*subscribers, publisher]:
            thread.start()
        try:
            wait_until(lambda: all(len(s.received) >= 3 for s in subscribers), what="subscribers receiving")
            proxy.cut()

            assert httpx.get(server.url + "/healthz", timeout=10).json() == {"status": "ok"}
            wait_until(lambda: readyz(server).status_code == 503, what="/readyz to turn 503")
            body = readyz(server).json()
            assert body["status"] == "unready" and body["checks"]["database"] != "ok", body
            assert_unavailable(publish(server, channel, "during the cut"))
            assert_unavailable(httpx.post(server.url + "/api/events", json={"name": "a.b", "data": {}}, timeout=30))
            assert keep_alives(idle_items, 3) == ["keep-alive"] * 3, "open streams keep their keep-alives"

            # A worker that starts during the outage boots and serves; the master stays.
            old = set(server.worker_pids())
            os.kill(sorted(old)[0], signal.SIGKILL)
            wait_until(lambda: len(set(server.worker_pids()) - old) == 1 and len(server.worker_pids()) == 2,
                       what="a new worker booted during the outage")
            assert server.process.poll() is None
            assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200

            proxy.restore()
            wait_until(lambda: readyz(server).status_code == 200, what="/readyz ready again")
            mark = len(publisher.acknowledged)
            wait_until(lambda: len(publisher.acknowledged) >= mark + 10, what="publishing after the outage")
            publisher.stop()
            publish_sentinels(server, subscribers)
            stored = [m["id"] for m in history(server, server.token(channel, ["t"]))]
            assert set(publisher.acknowledged) <= set(stored), "an acknowledged publish was lost"
        finally:
            publisher.stop()
            for sub in subscribers:
                sub.stop()
    assert publisher.uncertain > 0, "some publishes met the outage"
    assert_exactly_once(subscribers, {(channel, "t"): stored})


@pytest.mark.postgres
def test_a_stalled_database_answers_503_and_a_retried_publish_is_stored_once(start_server, proxy, postgres_url):
    server = start_server(proxy.url_for(postgres_url), workers=1, DEMO_ENABLED=True)
    wait_until(lambda: readyz(server).status_code == 200, what="the worker ready: it listens, it knows the newest id")
    first = publish(server, "stall.1", "before")
    assert first.status_code == 201
    token = server.token("stall.1", ["t"])
    key = str(uuid.uuid4())

    proxy.stall()
    assert_unavailable(publish(server, "stall.1", "retried", **{"Idempotency-Key": key}))
    assert readyz(server).status_code == 503
    # A stream opened during the stall: headers, retry:, then keep-alives while the replay waits.
    with open_stream(server, token, read_timeout=30) as stream:
        assert stream.status_code == 200
        items = events_of(stream)
        next(items)  # retry:
        assert keep_alives(items, 2) == ["keep-alive"] * 2
        proxy.restore()
        replayed = read_frames(items, 1)
        assert replayed[0].envelope == first.json()
        again = publish(server, "stall.1", "retried", **{"Idempotency-Key": key})
        assert again.status_code == 201, again.text
        live = read_frames(items, 1)
        assert live[0].envelope == again.json()
    retried = [m for m in history(server, token) if m["data"] == "retried"]
    assert len(retried) == 1, "the publish cut short by the stall and its retry stored one message"
    repeat = publish(server, "stall.1", "retried", **{"Idempotency-Key": key})
    assert repeat.json() == again.json() and repeat.headers["Idempotent-Replayed"] == "true"


def test_sqlite_locked_by_another_process_does_not_freeze_the_worker(start_server, tmp_path):
    path = tmp_path / "locked.sqlite3"
    server = start_server(f"sqlite:///{path}", workers=1, DEMO_ENABLED=True)
    assert publish(server, "lock.1", "before").status_code == 201
    token = server.token("lock.1", ["t"])
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sqlite3, sys\n"
            f"db = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "db.execute('BEGIN IMMEDIATE')\n"
            "print('locked', flush=True)\n"
            "sys.stdin.readline()\n"
            "db.execute('ROLLBACK')\n"
        )],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        with open_stream(server, token, read_timeout=30) as stream:
            items = events_of(stream)
            next(items)
            read_frames(items, 1)  # the replayed message: the stream is live
            assert holder.stdout.readline() == "locked\n"
            # The lock holds the publish for the whole busy timeout (5 s), in SQLite's C code on a
            # thread of gevent's pool: the worker's stream, other requests and database reads go on
            # meanwhile (CONTRACT §5 "gevent and blocking calls"). The order of the answers says so,
            # not a clock: the second keep-alive, due a heartbeat after the publish went out, a
            # health check and a read of the history all come before the publish's own answer.
            answers: list[str] = []
            locked: list[httpx.Response] = []

            def publish_while_locked() -> None:
                locked.append(publish(server, "lock.1", "while locked"))
                answers.append("publish")

            waiting = threading.Thread(target=publish_while_locked)
            waiting.start()
            assert keep_alives(items, 2) == ["keep-alive"] * 2
            answers.append("keep-alives")
            assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
            answers.append("healthz")
            assert [m["data"] for m in history(server, token)] == ["before"]
            answers.append("history")
            waiting.join(timeout=30)
            assert answers == ["keep-alives", "healthz", "history", "publish"], "served while the publish waits"
            assert_unavailable(locked[0])
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.wait(timeout=30) == 0
            after = publish(server, "lock.1", "after")
            assert after.status_code == 201
            assert read_frames(items, 1)[0].envelope == after.json()
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()
        holder.stdin.close()
        holder.stdout.close()


@pytest.mark.postgres
def test_behind_pgbouncer_in_transaction_mode_with_a_direct_listen_url(start_server, pgbouncer, postgres_url):
    server = start_server(pgbouncer.url_for(postgres_url), DEMO_ENABLED=True, REALTIME_LISTEN_URL=postgres_url)
    token = server.token("bouncer.1", ["t"])
    with open_stream(server, token) as stream:
        items = events_of(stream)
        next(items)
        # More than psycopg's default prepare threshold (5): prepared statements would fail here.
        published = [publish(server, "bouncer.1", n) for n in range(12)]
        assert [p.status_code for p in published] == [201] * 12, published[-1].text
        frames = read_frames(items, 12)
    assert [f.envelope for f in frames] == [p.json() for p in published]


@pytest.mark.postgres
def test_listen_through_pgbouncer_fails_silently_but_messages_still_arrive(start_server, pgbouncer, postgres_url):
    """Without REALTIME_LISTEN_URL, LISTEN goes through the pooler and never hears a NOTIFY:
    the safety poll still brings each message within REALTIME_SAFETY_POLL_S. (Nothing tells
    the app it is behind a pooler, so prepared statements are turned off by hand.)"""
    server = start_server(pgbouncer.url_for(postgres_url), workers=1, DEMO_ENABLED=True, DATABASE_PREPARED_STATEMENTS="false")
    token = server.token("bouncer.2", ["t"])
    with open_stream(server, token) as stream:
        items = events_of(stream)
        next(items)
        published = [publish(server, "bouncer.2", n).json() for n in range(3)]
        assert [f.envelope for f in read_frames(items, 3)] == published

