"""In-process fan-out, driven by hand: an injected clock, a fake change feed, no reader thread."""
from __future__ import annotations

import threading

import pytest

from common.database import Database
from realtime import sse
from realtime.dispatch import Channel, Dispatcher, Subscription
from realtime.store import Message, MessageStore


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Feed:
    """A change feed that records pokes; tests call dispatch_new() instead of waiting on it."""

    def __init__(self) -> None:
        self.pokes = 0

    def wait(self, timeout: float) -> bool:
        raise AssertionError("the reader thread must not run in these tests")

    def poke(self) -> None:
        self.pokes += 1

    def close(self) -> None:
        pass


@pytest.fixture
def store(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'd.sqlite3'}")
    yield MessageStore(db)
    db.dispose()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def dispatcher(store, clock):
    dispatcher = Dispatcher(store, Feed(), heartbeat_s=4.0, buffer_size=5, clock=clock)
    yield dispatcher
    dispatcher.stop()


def _message(n: int, topic: str = "t") -> Message:
    return Message(n, "c", topic, "{}", None, None)


def _message_ids(subscription: Subscription) -> list[int]:
    return [message_id for message_id, _ in subscription.take() if message_id]  # 0: keep-alive


def test_subscription_filters_topics_and_queues_in_order():
    subscription = Subscription(Channel("c"), ["a"], limit=10, now=0.0)
    subscription.offer(_message(1, "a"), b"f1", now=1.0)
    subscription.offer(_message(2, "b"), b"f2", now=2.0)
    subscription.offer(_message(3, "a"), b"f3", now=3.0)
    assert subscription.take() == [(1, b"f1"), (3, b"f3")]
    assert subscription.quiet_since == 3.0


def test_a_subscription_that_is_not_drained_closes_instead_of_growing():
    subscription = Subscription(Channel("c"), None, limit=3, now=0.0)
    for n in range(1, 5):
        subscription.offer(_message(n), b"f", now=0.0)
    assert subscription.closed_reason == "overflow"
    assert subscription.take() == []


def test_the_buffer_is_bounded_in_bytes_too():
    subscription = Subscription(Channel("c"), None, limit=1000, now=0.0)
    big = b"x" * (1024 * 1024)
    for n in range(1, 11):
        subscription.offer(_message(n), big, now=0.0)
    assert subscription.closed_reason == "overflow"


def test_dispatch_routes_by_channel_and_reads_once_for_any_number_of_streams(store, dispatcher):
    few = [dispatcher.subscribe("c", None)]
    store.append("c", "t", "1")
    reads = store.reads
    dispatcher.dispatch_new()
    assert store.reads - reads == 1
    assert len(_message_ids(few[0])) == 1

    many = [dispatcher.subscribe("c", None) for _ in range(1000)]
    other = dispatcher.subscribe("other", None)
    store.append("c", "t", "2")
    reads = store.reads
    dispatcher.dispatch_new()
    assert store.reads - reads == 1
    assert all(len(_message_ids(s)) == 1 for s in few + many)
    assert other.queued == 0, "nothing for another channel"
    assert dispatcher.stream_count == 1002


def test_a_channel_is_quiet_after_an_id_until_a_message_of_its_own_is_dispatched(store, dispatcher):
    """What lets a replay page read before serve a stream that subscribes later (replay.py)."""
    store.append("c", "t", "history")
    dispatcher.subscribe("c", None)
    read_through = dispatcher.position
    assert dispatcher.quiet_after("c", read_through)
    store.append("elsewhere", "t", "1")
    dispatcher.dispatch_new()
    assert dispatcher.position > read_through
    assert dispatcher.quiet_after("c", read_through), "another channel's messages do not count"
    own = store.append("c", "t", "2")
    dispatcher.dispatch_new()
    assert not dispatcher.quiet_after("c", read_through), "a page read up to there misses `own`"
    assert dispatcher.quiet_after("c", own.id)
    assert not dispatcher.quiet_after("nobody", dispatcher.position), "a channel without streams is not watched"
    before_d = dispatcher.position - 1
    dispatcher.subscribe("d", None)
    assert not dispatcher.quiet_after("d", before_d), "not known for the time before its first stream"


def test_every_subscriber_of_a_channel_gets_the_same_frame_object(store, dispatcher):
    subscriptions = [dispatcher.subscribe("c", None) for _ in range(3)]
    message = store.append("c", "status", '{"p": 1}')
    dispatcher.dispatch_new()
    frames = [s.take() for s in subscriptions]
    assert frames[0] == [(message.id, sse.message_frame(f"{store.epoch}-{message.id}", "status", message.envelope_json()))]
    assert frames[0][0][1] is frames[1][0][1] is frames[2][0][1], "built once, shared, never copied"


def test_live_delivery_starts_after_the_newest_message_when_the_first_stream_subscribes(store, dispatcher):
    store.append("c", "t", "before anyone subscribed")
    subscription = dispatcher.subscribe("c", None)
    dispatcher.dispatch_new()
    assert subscription.queued == 0, "history is the stream's to read, not the dispatcher's"
    live = store.append("c", "t", "live")
    dispatcher.dispatch_new()
    assert _message_ids(subscription) == [live.id]


def test_keep_alives_go_only_to_streams_quiet_for_a_heartbeat(store, dispatcher, clock):
    quiet = dispatcher.subscribe("c", ["quiet-topic"])
    busy = dispatcher.subscribe("c", None)
    clock.now += dispatcher.heartbeat_s - dispatcher.tick_s  # both have been quiet long enough
    message = store.append("c", "busy-topic", "1")
    dispatcher.dispatch_new()  # ... but now `busy` got a message
    dispatcher.send_keep_alives()
    assert quiet.take() == [(0, sse.KEEP_ALIVE)]
    assert [message_id for message_id, _ in busy.take()] == [message.id]


def test_no_keep_alive_before_a_stream_was_quiet_for_about_a_heartbeat(dispatcher, clock):
    subscription = dispatcher.subscribe("c", None)
    clock.now += dispatcher.heartbeat_s - dispatcher.tick_s - 0.01
    dispatcher.send_keep_alives()
    assert subscription.queued == 0
    clock.now += 0.01
    dispatcher.send_keep_alives()
    assert subscription.take() == [(0, sse.KEEP_ALIVE)]
    dispatcher.send_keep_alives()  # the keep-alive reset the quiet time
    assert subscription.queued == 0


def test_a_keep_alive_is_not_queued_behind_waiting_frames(store, dispatcher, clock):
    subscription = dispatcher.subscribe("c", None)
    message = store.append("c", "t", "1")
    dispatcher.dispatch_new()
    clock.now += 100  # the stream has not taken its frame for a long time
    dispatcher.send_keep_alives()
    assert [message_id for message_id, _ in subscription.take()] == [message.id], "it has bytes to read already"


def test_notify_appended_pokes_the_feed(dispatcher):
    dispatcher.notify_appended()
    assert dispatcher._feed.pokes == 1


def test_stop_ends_every_subscription(dispatcher):
    subscription = dispatcher.subscribe("c", None)
    dispatcher.stop()
    assert subscription.closed_reason == "shutdown"
    assert subscription.take() == []
    assert dispatcher.subscribe("c", None).closed_reason == "shutdown"
    assert dispatcher.stream_count == 0


def test_a_batch_wakes_each_channel_once_however_many_streams_and_messages(store, dispatcher, monkeypatch):
    wakes: list[str] = []
    wake = Channel.wake
    monkeypatch.setattr(Channel, "wake", lambda channel: (wakes.append(channel.name), wake(channel)))
    streams = [dispatcher.subscribe("c", None) for _ in range(3)] + [dispatcher.subscribe("d", None)]
    for n in range(5):
        store.append("c", "t", str(n))
    store.append("d", "t", "1")
    store.append("nobody-listens", "t", "1")
    dispatcher.dispatch_new()
    assert sorted(wakes) == ["c", "d"]
    assert [s.queued for s in streams] == [5, 5, 5, 1]


def test_a_waiting_stream_wakes_when_its_channel_is_woken():
    channel = Channel("c")
    subscription = Subscription(channel, None, limit=10, now=0.0)
    channel.subscriptions.add(subscription)
    taken: list = []
    waiter = threading.Thread(target=lambda: taken.append(subscription.take()))
    waiter.start()
    subscription.offer(_message(1), b"f1", now=0.0)
    channel.wake()
    waiter.join(timeout=30)  # a guard against a hang, not a timing
    assert taken == [[(1, b"f1")]]


def test_closing_wakes_a_waiting_stream_with_nothing():
    channel = Channel("c")
    subscription = Subscription(channel, None, limit=10, now=0.0)
    taken: list = []
    waiter = threading.Thread(target=lambda: taken.append(subscription.take()))
    waiter.start()
    subscription.close("shutdown")
    waiter.join(timeout=30)
    assert taken == [[]]


def test_a_stream_blocked_writing_for_the_send_timeout_is_cut(dispatcher, clock):
    writing = dispatcher.subscribe("c", None)
    idle = dispatcher.subscribe("c", None)
    writing.writing_since = clock()
    clock.now += dispatcher.send_timeout_s - 0.1
    assert dispatcher.cut_stalled() == 0
    clock.now += 0.1
    assert dispatcher.cut_stalled() == 1
    assert (writing.closed_reason, idle.closed_reason) == ("send_timeout", None)


def test_streams_queued_behind_a_failed_prime_are_answered_at_once(store, clock, monkeypatch):
    """A worker's first streams while the database stalls: one attempt waits out its time limit,
    the streams queued behind it get their 503 right after, not one time limit each."""
    from common.database import DatabaseUnavailable

    attempts = []

    def away():
        attempts.append(clock.now)
        raise DatabaseUnavailable("away")

    dispatcher = Dispatcher(store, Feed(), heartbeat_s=4.0, clock=clock)
    monkeypatch.setattr(store, "last_drawn", away)
    for _ in range(3):
        with pytest.raises(DatabaseUnavailable):
            dispatcher.prime()
    assert len(attempts) == 1, "the others did not ask the database again"
    clock.now += dispatcher.tick_s
    with pytest.raises(DatabaseUnavailable):
        dispatcher.prime()
    assert len(attempts) == 2, "a while later, it tries again"
    monkeypatch.undo()
    clock.now += dispatcher.tick_s
    dispatcher.prime()
    assert dispatcher.position == store.last_id()
    dispatcher.stop()
