"""In-process fan-out and the replay-to-live hand-over, without HTTP."""
from __future__ import annotations

import json

import pytest

from database import make_engine
from realtime.cursor import Cursor
from realtime.dispatch import KEEP_ALIVE_FRAME, Dispatcher, Subscription
from realtime.store import Message, MessageStore
from realtime.stream import event_stream


@pytest.fixture
def store(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'd.sqlite3'}")
    store = MessageStore(engine)
    store.create_schema()
    yield store
    engine.dispose()


@pytest.fixture
def dispatcher(store):
    # A poll interval of an hour: the reader thread stays asleep, and the
    # tests call dispatch_new() themselves, deterministically.
    dispatcher = Dispatcher(store, poll_s=3600, heartbeat_s=0.2, buffer_size=5)
    yield dispatcher
    dispatcher.stop()


def _message(n: int, topic: str = "t") -> Message:
    return Message(n, "c", topic, "{}", None, None)


def test_subscription_filters_topics_and_queues_in_order():
    subscription = Subscription("c", ["a"], limit=10)
    subscription.offer(_message(1, "a"), b"f1")
    subscription.offer(_message(2, "b"), b"f2")
    subscription.offer(_message(3, "a"), b"f3")
    assert subscription.take() == [(1, b"f1"), (3, b"f3")]


def test_a_subscription_that_is_not_drained_closes_instead_of_growing():
    subscription = Subscription("c", None, limit=3)
    for n in range(1, 5):
        subscription.offer(_message(n), b"f")
    assert subscription.closed_reason == "overflow"
    assert subscription.take() == []


def _message_ids(subscription: Subscription) -> list[int]:
    return [message_id for message_id, _ in subscription.take() if message_id]  # 0: keep-alive


def test_the_buffer_is_bounded_in_bytes_too():
    subscription = Subscription("c", None, limit=1000)
    big = b"x" * (1024 * 1024)
    for n in range(1, 11):
        subscription.offer(_message(n), big)
    assert subscription.closed_reason == "overflow"


def test_dispatch_routes_by_channel_and_reads_once_for_any_number_of_streams(store, dispatcher):
    few = [dispatcher.subscribe("c", None)]
    store.append("c", "t", "1")
    reads = store.reads
    dispatcher.dispatch_new()
    reads_for_one = store.reads - reads
    assert len(_message_ids(few[0])) == 1

    many = [dispatcher.subscribe("c", None) for _ in range(1000)]
    other = dispatcher.subscribe("other", None)
    store.append("c", "t", "2")
    reads = store.reads
    dispatcher.dispatch_new()
    assert store.reads - reads == reads_for_one == 1
    assert all(len(_message_ids(s)) == 1 for s in few + many)
    assert _message_ids(other) == []  # returns with the next keep-alive
    assert dispatcher.stream_count == 1002


def test_keep_alives_go_only_to_streams_quiet_for_a_heartbeat(store, dispatcher):
    quiet = dispatcher.subscribe("c", ["quiet-topic"])
    busy = dispatcher.subscribe("c", None)
    quiet.quiet_since -= 1
    busy.quiet_since -= 1
    message = store.append("c", "busy-topic", "1")
    dispatcher.dispatch_new()
    dispatcher.send_keep_alives()
    assert quiet.take() == [KEEP_ALIVE_FRAME]
    assert [message_id for message_id, _ in busy.take()] == [message.id]


def test_stop_ends_every_subscription(dispatcher):
    subscription = dispatcher.subscribe("c", None)
    dispatcher.stop()
    assert subscription.closed_reason == "shutdown"
    assert dispatcher.subscribe("c", None).closed_reason == "shutdown"


def _ids(frames: list[bytes]) -> list[int]:
    return [json.loads(f.split(b"data: ", 1)[1])["id"] for f in frames if f.startswith(b"id: ")]


def test_a_message_committed_during_replay_is_sent_once(store, dispatcher, monkeypatch):
    first = store.append("c", "t", "1")
    read_after = store.read_after
    racing: list[int] = []

    def read_after_while_someone_publishes(*args, **kwargs):
        # Between the stream's subscribe and its history read, a message is
        # published and dispatched: it reaches both the history and the queue.
        if not racing:
            racing.append(store.append("c", "t", "2").id)
            dispatcher.dispatch_new()
        return read_after(*args, **kwargs)

    monkeypatch.setattr(store, "read_after", read_after_while_someone_publishes)
    stream = event_stream(dispatcher, "c", None, None, retry_ms=100)
    frames = [next(stream) for _ in range(3)]  # retry, then the two replayed messages
    assert frames[0] == b"retry: 100\n\n"
    live = store.append("c", "t", "3")
    dispatcher.dispatch_new()
    frames.append(next(stream))  # the queued copy of message 2 is skipped
    assert _ids(frames) == [first.id, racing[0], live.id]
    assert next(stream) == b": keep-alive\n\n"  # queued by the dispatcher's thread
    stream.close()
    assert dispatcher.stream_count == 0


def test_stream_from_a_cursor_of_another_database_resets(store, dispatcher):
    kept = store.append("c", "t", "1")
    stream = event_stream(dispatcher, "c", None, Cursor("0" * 8, 99), retry_ms=100)
    next(stream)
    reset = next(stream)
    assert reset.startswith(f"id: {store.epoch}-0\nevent: reset\ndata: ".encode())
    assert json.loads(reset.split(b"data: ", 1)[1]) == {"reason": "unknown_cursor", "cursor": f"{store.epoch}-0"}
    assert _ids([next(stream)]) == [kept.id]
    stream.close()


def test_a_cursor_ahead_of_every_message_is_unknown_not_silently_kept(store):
    from realtime.stream import resolve_cursor

    newest = store.append("c", "t", "1")
    assert resolve_cursor(store, "c", Cursor(store.epoch, newest.id)) == (newest.id, None)
    assert resolve_cursor(store, "c", Cursor(store.epoch, newest.id + 50)) == (
        0, {"reason": "unknown_cursor", "cursor": f"{store.epoch}-0"}
    )


def test_a_prune_between_cursor_check_and_replay_is_reported(store, dispatcher, monkeypatch):
    from datetime import timedelta

    old = store.append("c", "t", "1")
    kept_before = store.append("c", "t", "2")
    read_after = store.read_after
    pruned: list[int] = []

    def read_after_a_prune(*args, **kwargs):
        if not pruned:  # the pruner runs right after the stream checked the cursor
            pruned.append(store.prune(timedelta(0)))
            store.append("c", "t", "3")
        return read_after(*args, **kwargs)

    monkeypatch.setattr(store, "read_after", read_after_a_prune)
    stream = event_stream(dispatcher, "c", None, Cursor(store.epoch, old.id), retry_ms=100)
    next(stream)
    reset = next(stream)
    assert pruned == [2]
    assert json.loads(reset.split(b"data: ", 1)[1]) == {
        "reason": "history_truncated", "cursor": f"{store.epoch}-{kept_before.id}"
    }
    assert _ids([next(stream)]) == [kept_before.id + 1]
    stream.close()
