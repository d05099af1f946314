"""Replay pages shared by streams that ask for the same one together (a reconnect storm)."""
from __future__ import annotations

import threading

from datetime import datetime, timezone

from realtime.replay import ReplayPage, ReplayReads
from realtime.store import Message, Page

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
