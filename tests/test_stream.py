"""One subscriber's stream without HTTP: retry, reset, replay, the hand-over to live, shutdown."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest

from realtime import sse
from realtime.cursor import Cursor
from realtime.dispatch import Dispatcher
from realtime.stream import Reset, event_stream, resolve_cursor
from test_dispatch import Clock, Feed, store  # noqa: F401 - the shared fixture


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def dispatcher(store, clock):  # noqa: F811
    dispatcher = Dispatcher(store, Feed(), heartbeat_s=4.0, buffer_size=50, clock=clock)
    yield dispatcher
    dispatcher.stop()


def _ids(frames: list[bytes]) -> list[int]:
    return [json.loads(f.split(b"data: ", 1)[1])["id"] for f in frames if f.startswith(b"id: ")]


def test_retry_first_then_replay_then_live(store, dispatcher):  # noqa: F811
    old = store.append("c", "t", "1")
    stream = event_stream(dispatcher, "c", None, None, retry_ms=100)
    assert next(stream) == b"retry: 100\n\n"
    assert next(stream) == sse.message_frame(f"{store.epoch}-{old.id}", "t", old.envelope_json())
    live = store.append("c", "t", "2")
    dispatcher.dispatch_new()
    assert _ids([next(stream)]) == [live.id]
    stream.close()
    assert dispatcher.stream_count == 0


def test_only_the_given_topics_are_replayed_and_streamed(store, dispatcher):  # noqa: F811
    store.append("c", "skip", "1")
    wanted = store.append("c", "keep", "2")
    stream = event_stream(dispatcher, "c", ["keep"], None, retry_ms=100)
    next(stream)
    assert _ids([next(stream)]) == [wanted.id]
    store.append("c", "skip", "3")
    live = store.append("c", "keep", "4")
    dispatcher.dispatch_new()
    assert _ids([next(stream)]) == [live.id]
    stream.close()


def test_a_message_committed_during_replay_is_sent_once(store, dispatcher, clock, monkeypatch):  # noqa: F811
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
    live = store.append("c", "t", "3")
    dispatcher.dispatch_new()
    frames.append(next(stream))  # the queued copy of message 2 is skipped
    assert _ids(frames) == [first.id, racing[0], live.id]
    clock.now += dispatcher.heartbeat_s
    dispatcher.send_keep_alives()
    assert next(stream) == sse.KEEP_ALIVE
    stream.close()


def live_stream(store, dispatcher):  # noqa: F811
    """A stream past its replay: the next frames it yields come from the dispatcher."""
    store.append("c", "t", "history")
    stream = event_stream(dispatcher, "c", None, None, retry_ms=100)
    next(stream)  # retry:
    next(stream)  # the one replayed message; the stream is subscribed
    return stream


def test_frames_queued_since_the_last_wake_up_go_out_as_one_write(store, dispatcher):  # noqa: F811
    stream = live_stream(store, dispatcher)
    appended = [store.append("c", "t", str(n)) for n in range(3)]
    dispatcher.dispatch_new()
    write = next(stream)
    assert write == b"".join(
        sse.message_frame(f"{store.epoch}-{m.id}", "t", m.envelope_json()) for m in appended
    )
    stream.close()


def test_shutdown_ends_the_stream_with_a_comment(dispatcher):
    stream = event_stream(dispatcher, "c", None, None, retry_ms=100)
    next(stream)
    dispatcher.stop()
    assert next(stream) == sse.SHUTDOWN
    with pytest.raises(StopIteration):
        next(stream)


def test_an_overflowing_stream_ends_without_the_shutdown_comment(store, dispatcher):  # noqa: F811
    stream = live_stream(store, dispatcher)
    for n in range(dispatcher.buffer_size + 1):
        store.append("c", "t", str(n))
    dispatcher.dispatch_new()
    with pytest.raises(StopIteration):
        next(stream)
    assert dispatcher.stream_count == 0


def test_stream_from_a_cursor_of_another_database_resets(store, dispatcher):  # noqa: F811
    kept = store.append("c", "t", "1")
    stream = event_stream(dispatcher, "c", None, Cursor("0" * 8, 99), retry_ms=100)
    next(stream)
    assert next(stream) == sse.reset_frame("unknown_cursor", f"{store.epoch}-0")
    assert _ids([next(stream)]) == [kept.id]
    stream.close()


def test_resolve_cursor(store):  # noqa: F811
    newest = store.append("c", "t", "1")
    assert resolve_cursor(store, "c", None) == (0, None)
    assert resolve_cursor(store, "c", Cursor(store.epoch, newest.id)) == (newest.id, None)
    # Ahead of every message: the database was restored from an older backup.
    assert resolve_cursor(store, "c", Cursor(store.epoch, newest.id + 50)) == (
        0, Reset("unknown_cursor", f"{store.epoch}-0")
    )
    store.append("c", "t", "2")
    store.prune(timedelta(0))
    assert resolve_cursor(store, "c", Cursor(store.epoch, newest.id)) == (
        newest.id + 1, Reset("history_truncated", f"{store.epoch}-{newest.id + 1}")
    )


def test_a_prune_between_cursor_check_and_replay_is_reported(store, dispatcher, monkeypatch):  # noqa: F811
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
    assert next(stream) == sse.reset_frame("history_truncated", f"{store.epoch}-{kept_before.id}")
    assert pruned == [2]
    assert _ids([next(stream)]) == [kept_before.id + 1]
    stream.close()
