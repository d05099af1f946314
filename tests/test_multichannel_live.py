"""Several channels on one stream against a real gunicorn with gevent workers, on SQLite and
PostgreSQL (docs/protocol.md §12): exactly once under chaos, and channels added and removed at
random moments while several publishers publish.

The subscribers here behave as a browser's EventSource does: the URL of a connection stays the
same across its reconnects (token, `last_event_id`, `since`), and each reconnect sends the last
`id:` it received as `Last-Event-ID`. Changing channels is a new URL, built from where each
channel stands.
"""
from __future__ import annotations

import random
import threading
from collections import Counter

import httpx
import pytest

from conftest import LiveServer, wait_until
from sseclient import Comment, Frame, Publisher, events_of, read_frames

pytestmark = pytest.mark.integration

SUBSCRIBE = "/api/realtime/subscribe"
TOPICS = ["x", "y"]


def token_for(server: LiveServer, channels: list[str]) -> str:
    response = httpx.post(server.url + "/api/realtime/token",
                          json={"channels": {channel: TOPICS for channel in channels}}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["token"]


def position(cursor: str) -> int:
    return int(cursor.rpartition("-")[2])


class PageSubscriber(threading.Thread):
    """A page watching several channels on one stream; it drops its connection at random and, with
    `change_probability`, adds or removes a channel at random moments."""

    def __init__(self, server: LiveServer, channels: list[str], pool: list[str], *, seed: int,
                 drop_probability: float, change_probability: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.server, self.pool = server, pool
        self.rng = random.Random(seed)
        self.drop_probability, self.change_probability = drop_probability, change_probability
        self.channels = list(channels)
        # The URL: the other channels' cursor, and where the channels of `since` start (None: 0).
        self.base: str | None = None
        self.since: dict[str, str | None] = {}
        self.header: str | None = None  # the last id: received since the URL was made
        self.epoch: str | None = None
        self.received: dict[str, list[int]] = {}
        self.removed_at: dict[str, int] = {}  # a channel's position when it was last removed
        self.changes = self.connections = 0
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.token = token_for(server, self.channels)

    # -- where each channel stands, as the server computes it (docs/protocol.md §12) ----------

    def _at(self, start: str | None) -> int:
        ids = [position(c) for c in (start, self.header) if c is not None]
        return max(ids, default=0)

    def positions(self) -> dict[str, int]:
        return {c: self._at(self.since[c] if c in self.since else self.base) for c in self.channels}

    def _cursor(self, message_id: int) -> str | None:
        return f"{self.epoch}-{message_id}" if message_id and self.epoch else None

    def change(self) -> None:
        """Add a channel from the pool, or remove one; the new URL keeps every other channel exact."""
        stands = self.positions()
        joining = [c for c in self.pool if c not in self.channels]
        if len(self.channels) > 1 and (not joining or self.rng.random() < 0.4):
            leaving = self.rng.choice(self.channels)
            self.removed_at[leaving] = stands.pop(leaving)
        else:
            added = self.rng.choice(joining)
            stands[added] = self.removed_at.pop(added, 0)  # back from where it left, or from its beginning
        base = Counter(stands.values()).most_common(1)[0][0]
        self.channels = sorted(stands)
        self.base = self._cursor(base)
        self.since = {c: self._cursor(at) for c, at in stands.items() if at != base}
        self.header = None
        self.token = token_for(self.server, self.channels)
        self.changes += 1

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)
        assert not self.is_alive(), f"{self.name} did not stop"

    def run(self) -> None:
        while not self.stopping.is_set():
            params = {"token": self.token}
            if self.base is not None:
                params["last_event_id"] = self.base
            if self.since:
                params["since"] = ",".join(f"{c}:{at or 0}" for c, at in sorted(self.since.items()))
            headers = {"Last-Event-ID": self.header} if self.header else {}
            try:
                with httpx.stream("GET", self.server.url + SUBSCRIBE, params=params, headers=headers,
                                  timeout=httpx.Timeout(10.0, read=5.0)) as response:
                    if response.status_code == 401:
                        self.token = token_for(self.server, self.channels)
                        continue
                    if response.status_code != 200:
                        self.failures.append(f"{response.status_code} {response.read()!r}")
                        continue
                    self.connections += 1
                    self._read(response)
            except (httpx.HTTPError, OSError):
                pass
            except Exception as exc:  # a malformed frame: fail the test
                self.failures.append(repr(exc))
            self.stopping.wait(0.02)

    def _read(self, response: httpx.Response) -> None:
        for item in events_of(response):
            if self.stopping.is_set():
                return
            if isinstance(item, Frame) and item.event == "reset":
                self.failures.append(f"unexpected reset {item.data}")
            elif isinstance(item, Frame) and item.data:
                envelope = item.envelope
                self.epoch = item.id.rpartition("-")[0]
                self.received.setdefault(envelope["channel"], []).append(envelope["id"])
                self.header = item.id
            elif not isinstance(item, (Frame, Comment)):
                continue
            if self.rng.random() < self.change_probability:
                self.change()
                return
            if self.rng.random() < self.drop_probability:
                return  # reconnect with the same URL and Last-Event-ID, as EventSource does


def assert_each_channel_exactly_once(subscribers: list[PageSubscriber], published: list[dict]) -> None:
    by_channel: dict[str, list[int]] = {}
    for message in sorted(published, key=lambda m: m["id"]):
        by_channel.setdefault(message["channel"], []).append(message["id"])
    for sub in subscribers:
        assert not sub.failures, (sub.name, sub.failures[:5])
        for channel in set(sub.received) | set(sub.channels):
            through = sub.removed_at.get(channel) if channel not in sub.channels else None
            want = [i for i in by_channel.get(channel, []) if through is None or i <= through]
            got = sub.received.get(channel, [])
            assert got == want, (
                f"{sub.name} {channel} ({sub.connections} connections, {sub.changes} changes): "
                f"missing {sorted(set(want) - set(got))[:10]}, duplicates "
                f"{[i for i, n in Counter(got).items() if n > 1][:10]}, "
                f"unexpected {sorted(set(got) - set(want))[:10]}"
            )


def run_pages(server: LiveServer, subscribers: list[PageSubscriber], channels: list[str], per_publisher: int) -> None:
    rng = random.Random(7)
    early = [server.publish(rng.choice(channels), rng.choice(TOPICS), {"early": n}) for n in range(15)]
    workers = server.worker_pids()
    publishers = [Publisher(server, channels, TOPICS, count=per_publisher, prefer=workers[n % 2], seed=50 + n)
                  for n in range(3)]
    for thread in subscribers + publishers:
        thread.start()
    try:
        for publisher in publishers:
            publisher.join(timeout=120)
            assert not publisher.is_alive() and publisher.error is None, repr(publisher.error)
        for sub in subscribers:  # no more changes: the sentinels say when each page has caught up
            sub.change_probability = 0.0
        published = early + [m for p in publishers for m in p.published]
        sentinels = [server.publish(channel, "x", "sentinel") for channel in channels]
        published += sentinels

        def caught_up(sub: PageSubscriber) -> bool:
            return all(s["id"] in sub.received.get(s["channel"], []) for s in sentinels if s["channel"] in sub.channels)

        try:
            wait_until(lambda: all(caught_up(s) for s in subscribers), timeout=30, interval=0.05)
        except AssertionError:
            pass  # the assertion below names what is missing
    finally:
        for sub in subscribers:
            sub.stop()
    assert_each_channel_exactly_once(subscribers, published)


def test_chaos_several_channels_on_one_stream_every_message_once_in_order(shared_server):
    channels = [f"page.{n}" for n in range(5)]
    subscribers = [
        PageSubscriber(shared_server, sorted(random.Random(n).sample(channels, 3)), channels, seed=n,
                       drop_probability=0.08)
        for n in range(8)
    ]
    run_pages(shared_server, subscribers, channels, per_publisher=60)
    assert sum(s.connections for s in subscribers) > 3 * len(subscribers), "subscribers hardly reconnected"
    for sub in subscribers:  # one stream in id order: never an id below the last, within a connection
        assert all(ids == sorted(ids) for ids in sub.received.values())


def test_channels_added_and_removed_at_random_moments_under_publishing_load(shared_server):
    channels = [f"mix.{n}" for n in range(6)]
    subscribers = [
        PageSubscriber(shared_server, sorted(random.Random(10 + n).sample(channels, 2)), channels, seed=10 + n,
                       drop_probability=0.05, change_probability=0.04)
        for n in range(8)
    ]
    run_pages(shared_server, subscribers, channels, per_publisher=60)
    assert sum(s.changes for s in subscribers) >= 2 * len(subscribers), "channels hardly changed"
    assert any(s.removed_at for s in subscribers) and any(len(s.received) > 2 for s in subscribers)


@pytest.mark.postgres
def test_a_transaction_open_on_one_channel_keeps_the_stream_in_id_order(start_server, postgres_url):
    """On PostgreSQL a message can commit after a later one of another channel (dispatch.py holds).
    A stream of both channels must still send them in id order: the later one waits, never goes
    first (the earlier one would then be skipped as already passed)."""
    from sqlalchemy.orm import Session

    from conftest import app_on

    server = start_server(postgres_url, workers=1, DEMO_ENABLED=True)  # one worker: one dispatcher
    token = token_for(server, ["held.a", "held.b"])
    timeout = httpx.Timeout(10.0, read=5.0)
    for app in app_on(postgres_url):
        realtime = app.extensions["realtime"]
        with httpx.stream("GET", server.url + SUBSCRIBE, params={"token": token}, timeout=timeout) as both, \
                httpx.stream("GET", server.url + SUBSCRIBE, params={"token": server.token("held.b", ["x"])},
                             timeout=timeout) as b_alone:
            items, b_items = events_of(both), events_of(b_alone)
            first = server.publish("held.b", "x", "first")
            assert [f.envelope["id"] for f in read_frames(items, 1)] == [first["id"]]
            assert [f.envelope["id"] for f in read_frames(b_items, 1)] == [first["id"]]
            with Session(realtime.engine) as session:
                held = realtime.publish("held.a", "x", "committed late", session=session)
                later = server.publish("held.b", "x", "committed first")
                # The sentinel: a stream of b alone got it, so the dispatcher has passed it on.
                assert [f.envelope["id"] for f in read_frames(b_items, 1)] == [later["id"]]
                session.commit()
            assert [f.envelope["id"] for f in read_frames(items, 2)] == [held.id, later["id"]]

