"""Replay pages shared by streams that ask for the same one together (a reconnect storm)."""
from __future__ import annotations

import json
import threading

from datetime import datetime, timezone

import httpx
import psycopg
import pytest

import sseclient
from common.database import Database
from conftest import PUBLISH_KEY, wait_until
from realtime import sse
from realtime.dispatch import Dispatcher
from realtime.replay import ReplayBusy, ReplayPage, ReplayReads
from realtime.store import Message, MessageStore, Page
from realtime.stream import open_stream
from test_dispatch import Feed

CREATED = datetime(2026, 11, 28, tzinfo=timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Store:
    """Ten messages of channel c, ids 1-10, read as MessageStore.read_after reads them (at most
    `limit`, `more` when cut there); counts reads; a read may be held until released."""

    epoch = "e"

    def __init__(self) -> None:
        self.reads: list[tuple[int, int | None]] = []
        self.release = threading.Event()
        self.release.set()

    def read_after(self, channel, topics, after_id, limit, max_bytes, through) -> Page:
        self.reads.append((after_id, through))
        self.release.wait(30)
        ids = [n for n in range(after_id + 1, 11) if through is None or n <= through]
        return Page(tuple(Message(n, channel, "t", "{}", None, CREATED) for n in ids[:limit]), len(ids) > limit)


def test_streams_asking_together_share_one_read():
    store, horizon = Store(), [10]
    replays = ReplayReads(store, lambda: horizon[0], page_size=500, page_bytes=1 << 20, clock=Clock())
    store.release.clear()  # the first read waits until every stream has asked
    results: list[ReplayPage] = []
    threads = [threading.Thread(target=lambda: results.append(replays.page("c", None, 3, 10))) for _ in range(20)]
    for thread in threads:
        thread.start()
    store.release.set()
    for thread in threads:
        thread.join(30)
    assert store.reads == [(3, 10)], "one read for 20 streams"
    assert all([m.id for m in page.page] == list(range(4, 11)) for page in results)


def test_a_stream_gets_only_its_history_and_a_page_expires():
    store, horizon, clock = Store(), [10], Clock()
    replays = ReplayReads(store, lambda: horizon[0], page_size=500, page_bytes=1 << 20, clock=clock, ttl_s=1.0)
    assert [m.id for m in replays.page("c", None, 0, 6).page] == [1, 2, 3, 4, 5, 6], "7-10 come live to it"
    assert store.reads == [(0, 10)], "read up to the dispatcher's position, for the streams that follow"
    later = replays.page("c", None, 0, 9)
    assert [m.id for m in later.page] == list(range(1, 10)) and not later.page.more
    assert len(store.reads) == 1
    replays.page("c", ["other"], 0, 9)  # other topics: another page
    clock.now += 1.0
    replays.page("c", None, 0, 9)  # expired: read again
    assert len(store.reads) == 3


def test_pages_of_a_storm_of_distinct_channels_are_forgotten_once_expired():
    """10,000 streams of 10,000 channels each read a page of their own: the pages are kept for
    their ttl, then forgotten, a read at a time, and a page read again is kept while it lives."""
    store, clock = Store(), Clock()
    replays = ReplayReads(store, lambda: 10, page_size=500, page_bytes=1 << 20, clock=clock, ttl_s=1.0)
    for n in range(10_000):
        replays.page(f"c{n}", None, 0, 10)
        clock.now += 0.001  # a storm: a thousand reads a second
    assert 900 <= len(replays._reads) <= 1001, "only the last second's pages are kept"
    replays.page("c9999", None, 0, 10)  # still fresh: shared, not read again
    assert len(store.reads) == 10_000
    clock.now += 1.0
    replays.page("c9999", None, 0, 10)  # expired: read again, and kept
    assert len(store.reads) == 10_001 and list(replays._reads) == [("c9999", None, 0)]


def test_a_stream_whose_history_ends_past_a_shared_read_reads_again():
    store, horizon = Store(), [5]
    replays = ReplayReads(store, lambda: horizon[0], page_size=500, page_bytes=1 << 20, clock=Clock())
    assert [m.id for m in replays.page("c", None, 0, 5).page] == [1, 2, 3, 4, 5]
    horizon[0] = 8  # messages 6-8 were dispatched; a stream subscribing now has them as history
    assert [m.id for m in replays.page("c", None, 0, 8).page] == list(range(1, 9))
    assert store.reads == [(0, 5), (0, 8)]


def test_a_page_serves_a_later_history_end_while_its_channel_is_quiet():
    store, horizon, quiet = Store(), [5], [True]
    replays = ReplayReads(store, lambda: horizon[0], page_size=500, page_bytes=1 << 20, clock=Clock(),
                          quiet_after=lambda channel, after_id: quiet[0])
    assert [m.id for m in replays.page("c", None, 0, 5).page] == [1, 2, 3, 4, 5]
    horizon[0] = 8  # 6-8 were published on other channels
    assert [m.id for m in replays.page("c", None, 0, 8).page] == [1, 2, 3, 4, 5]
    assert store.reads == [(0, 5)], "shared: nothing of channel c after 5"
    quiet[0] = False  # one of 6-8 was c's
    assert [m.id for m in replays.page("c", None, 0, 8).page] == list(range(1, 9))
    assert store.reads == [(0, 5), (0, 8)]


def test_a_failed_read_fails_its_waiters_and_the_next_stream_reads_again():
    class Failing(Store):
        def read_after(self, *args, **kwargs):
            if not self.reads:
                self.reads.append("failed")
                raise RuntimeError("database away")
            return super().read_after(*args, **kwargs)

    store = Failing()
    replays = ReplayReads(store, lambda: 10, page_size=500, page_bytes=1 << 20, clock=Clock())
    try:
        replays.page("c", None, 0, 10)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the error reaches the stream")
    assert [m.id for m in replays.page("c", None, 0, 10).page] == list(range(1, 11))


def test_a_page_stops_at_its_limit_and_the_stream_pages_on():
    store = Store()
    replays = ReplayReads(store, lambda: 10, page_size=4, page_bytes=1 << 20, clock=Clock())
    first = replays.page("c", None, 0, 10)
    assert [m.id for m in first.page] == [1, 2, 3, 4] and first.page.more
    assert [m.id for m in replays.page("c", None, 4, 10).page] == [5, 6, 7, 8]
    last = replays.page("c", None, 8, 10)
    assert [m.id for m in last.page] == [9, 10] and not last.page.more
    assert len(first.frames) == 4, "one frame per message of the page"


def test_a_stream_waits_for_a_turn_to_read_at_most_its_wait():
    """Reads take turns; a stream that gets none within `wait_s`, or whose shared read is still
    running then, hears ReplayBusy (and sends a keep-alive, stream.py) instead of waiting on."""
    store = Store()
    replays = ReplayReads(store, lambda: 10, page_size=500, page_bytes=1 << 20, clock=Clock(), concurrency=1)
    store.release.clear()  # the one turn is taken by a read that waits
    first = threading.Thread(target=replays.page, args=("c", None, 0, 10), daemon=True)
    first.start()
    try:
        wait_until(lambda: store.reads == [(0, 10)], what="the first read under way")
        with pytest.raises(ReplayBusy):
            replays.page("c", None, 5, 10, wait_s=0)  # another page: no turn
        with pytest.raises(ReplayBusy):
            replays.page("c", None, 0, 10, wait_s=0)  # the same page: its read still runs
    finally:
        store.release.set()
    first.join(30)
    assert [m.id for m in replays.page("c", None, 5, 10, wait_s=0).page] == [6, 7, 8, 9, 10]
    assert store.reads == [(0, 10), (5, 10)], "no read for the stream that found no turn"


def _message_ids(write: bytes) -> list[int]:
    return [json.loads(line[len(b"data: "):])["id"] for line in write.split(b"\n") if line.startswith(b"data: ")]


class TurnsTakenUntilFreed:
    """Turns to read that other streams' reads hold until `freed`: a timed wait for one lasts its
    whole time on the test's clock and ends without a turn. Nothing waits for real."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.freed = False
        self.waits: list[float] = []

    def acquire(self, timeout: float | None = None) -> bool:
        if self.freed:
            return True
        assert timeout is not None, "a stream waiting for a turn without a limit would wait in silence"
        self.waits.append(timeout)
        self.clock.now += timeout
        return False

    def release(self) -> None:
        pass


def test_a_stream_without_a_turn_to_replay_sends_keep_alives_then_its_page(tmp_path):
    """Its turn is waited for until a keep-alive is due: then the keep-alive, and it waits again."""
    db = Database(f"sqlite:///{tmp_path / 'd.sqlite3'}")
    store, clock = MessageStore(db), Clock()
    kept = store.append("c", "t", "1")
    dispatcher = Dispatcher(store, Feed(), heartbeat_s=4.0, clock=clock)
    turns = TurnsTakenUntilFreed(clock)

    class Replays(ReplayReads):
        semaphore_class = staticmethod(lambda concurrency: turns)

    dispatcher.replays = Replays(store, lambda: dispatcher.position, page_size=500, page_bytes=1 << 20,
                                 clock=clock, quiet_after=dispatcher.quiet_after)
    stream = open_stream(dispatcher, "c", None, None, retry_ms=100)
    assert next(stream) == b"retry: 100\n\n"
    assert next(stream) == sse.KEEP_ALIVE
    assert next(stream) == sse.KEEP_ALIVE
    assert turns.waits == [dispatcher.heartbeat_s - dispatcher.tick_s] * 2, "each until a keep-alive was due"
    turns.freed = True
    assert _message_ids(next(stream)) == [kept.id]
    stream.close()
    dispatcher.stop()
    db.dispose()


class StormStream(threading.Thread):
    """One client of a storm: opens its stream (again after a 503, when Retry-After says) and
    reads it until its one message came, noting whether a keep-alive came first."""

    def __init__(self, server, token: str) -> None:
        super().__init__(daemon=True)
        self.server, self.token = server, token
        self.kept_alive = threading.Event()
        self.received: list[int] = []
        self.refused = 0
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            while not self.received:
                with sseclient.open_stream(self.server, self.token, read_timeout=10) as response:
                    if response.status_code == 503:
                        self.refused += 1
                        response.read()
                        threading.Event().wait(float(response.headers["Retry-After"]))  # as a client would
                        continue
                    assert response.status_code == 200, response.read()
                    for item in sseclient.events_of(response):
                        if isinstance(item, sseclient.Comment):
                            self.kept_alive.set()
                        elif item.data:
                            self.received.append(item.envelope["id"])
                            break
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.mark.integration
@pytest.mark.postgres
def test_a_storm_of_streams_whose_replays_cannot_read_yet_keeps_its_clients(start_server, postgres_url):
    """200 streams open at once on one worker while no replay read can finish (a transaction
    locks the messages): each waits for its turn to read with keep-alives, not in silence behind
    the few reads that have the turns, then gets its message once the reads go through."""
    server = start_server(postgres_url, workers=1, DEMO_ENABLED=True)
    channels = [f"storm.{n}" for n in range(200)]  # one replay read each: none is shared
    response = httpx.post(server.url + "/api/realtime/publish", timeout=30,
                          json={"messages": [{"channel": c, "topic": "t", "data": c} for c in ["warm-up", *channels]]},
                          headers={"Authorization": f"Bearer {PUBLISH_KEY}"})
    assert response.status_code == 201, response.text
    published = {m["channel"]: m["id"] for m in response.json()["messages"]}
    # The worker reads where it stands, once, with its first stream: not during the storm.
    sseclient.stream_frames(server, server.token("warm-up", ["t"]), 1)
    tokens = [server.token(channel, ["t"]) for channel in channels]
    with psycopg.connect(postgres_url.replace("postgresql+psycopg", "postgresql")) as locker:
        locker.execute("LOCK TABLE realtime_messages IN ACCESS EXCLUSIVE MODE")
        streams = [StormStream(server, token) for token in tokens]
        wait_until(lambda: all(s.kept_alive.is_set() or s.error for s in streams),
                   what="a keep-alive on every stream waiting to replay")
        assert not any(s.received for s in streams), "no replay read went through the lock"
        locker.rollback()
    for stream in streams:
        stream.join(30)
    assert [s.error for s in streams if s.error] == []
    assert {c: s.received for c, s in zip(channels, streams)} == {c: [published[c]] for c in channels}
    # Admission may have turned some away for a while (the clients came back): each one is counted.
    assert server.metric("realtime_stream_admission_refused_total") == sum(s.refused for s in streams)
