"""One subscriber's stream without HTTP: retry, reset, replay, the hand-over to live, shutdown."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest

from realtime import sse
from realtime.cursor import Cursor
from realtime.dispatch import Dispatcher
from common.database import DatabaseUnavailable
from realtime.stream import WRITE_BYTES, Reset, open_stream, resolve_cursor
from test_dispatch import Clock, Feed, store  # noqa: F401 - the shared fixture


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def dispatcher(store, clock):  # noqa: F811
    dispatcher = Dispatcher(store, Feed(), heartbeat_s=0.2, buffer_size=50, clock=clock)
    yield dispatcher
    dispatcher.stop()


def _ids(writes: list[bytes]) -> list[int]:
    """The message ids in what the stream wrote, one write holding one or more frames."""
    frames = [f for write in writes for f in write.split(b"\n\n") if f.startswith(b"id: ")]
    return [json.loads(f.split(b"data: ", 1)[1])["id"] for f in frames if b"event: reset" not in f]


def test_retry_first_then_replay_then_live(store, dispatcher):  # noqa: F811
    old = store.append("c", "t", "1")
    stream = open_stream(dispatcher, "c", None, None, retry_ms=100)
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
    stream = open_stream(dispatcher, "c", ["keep"], None, retry_ms=100)
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
    stream = open_stream(dispatcher, "c", None, None, retry_ms=100)
    frames = [next(stream) for _ in range(2)]  # retry, then the two replayed messages in one write
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
    stream = open_stream(dispatcher, "c", None, None, retry_ms=100)
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
    stream = open_stream(dispatcher, "c", None, None, retry_ms=100)
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
    stream = open_stream(dispatcher, "c", None, Cursor("0" * 8, 99), retry_ms=100)
    next(stream)
    reset = sse.reset_frame("unknown_cursor", f"{store.epoch}-0")
    assert next(stream) == reset + sse.message_frame(f"{store.epoch}-{kept.id}", "t", kept.envelope_json())
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
        if not pruned:  # the pruner runs right after the stream placed its cursor, as its page is read
            pruned.append(store.prune(timedelta(0)))
            store.append("c", "t", "3")
        return read_after(*args, **kwargs)

    monkeypatch.setattr(store, "read_after", read_after_a_prune)
    stream = open_stream(dispatcher, "c", None, Cursor(store.epoch, old.id), retry_ms=100)
    next(stream)
    write = next(stream)
    assert pruned == [2]
    assert write == sse.reset_frame("history_truncated", f"{store.epoch}-{kept_before.id}")
    dispatcher.dispatch_new()  # the message appended after the stream subscribed comes live
    assert _ids([next(stream)]) == [kept_before.id + 1]
    stream.close()


def test_a_large_frame_is_written_alone_as_the_object_every_subscriber_shares(store, dispatcher):  # noqa: F811
    store.append("c", "t", "history")
    streams = [open_stream(dispatcher, "c", None, None, retry_ms=100) for _ in range(2)]
    for stream in streams:
        next(stream), next(stream)  # retry:, the replay: now live
    big = store.append("c", "t", '"' + "x" * (WRITE_BYTES + 10) + '"')
    small = store.append("c", "t", "1")
    dispatcher.dispatch_new()
    writes = [[next(stream), next(stream)] for stream in streams]
    assert writes[0][0] is writes[1][0], "the big frame is the same bytes object for both"
    assert _ids(writes[0]) == [big.id, small.id]
    for stream in streams:
        stream.close()


def test_replay_waits_for_the_database_with_keep_alives_and_misses_nothing(
    store, dispatcher, clock, monkeypatch  # noqa: F811
):
    kept = store.append("c", "t", "1")
    read_replay = store.read_after
    failures = [DatabaseUnavailable("away"), DatabaseUnavailable("still away")]

    def read_replay_an_outage(*args, **kwargs):
        if failures:
            clock.now += dispatcher.heartbeat_s  # each failed read takes a while
            raise failures.pop(0)
        return read_replay(*args, **kwargs)

    monkeypatch.setattr(store, "read_after", read_replay_an_outage)
    stream = open_stream(dispatcher, "c", None, None, retry_ms=100)
    assert next(stream) == b"retry: 100\n\n"
    assert [next(stream), next(stream)] == [sse.KEEP_ALIVE, sse.KEEP_ALIVE]
    assert _ids([next(stream)]) == [kept.id]
    stream.close()


def test_a_cursor_past_what_this_process_has_seen_needs_the_database_before_any_byte(
    store, dispatcher, monkeypatch  # noqa: F811
):
    """Usually a resume needs no lookup of its own (the first replay page tells whether the cursor
    was pruned); a cursor ahead of the dispatcher is checked against the database first."""
    def away(*args, **kwargs):
        raise DatabaseUnavailable("away")

    monkeypatch.setattr(store, "pruned_through", away)
    with pytest.raises(DatabaseUnavailable):
        open_stream(dispatcher, "c", None, Cursor(store.epoch, dispatcher.position + 1), retry_ms=100)
    assert dispatcher.stream_count == 0


def test_a_process_that_never_read_the_epoch_reads_it_before_any_byte(store, dispatcher, monkeypatch):  # noqa: F811
    """A worker that boots while the database is away: its first stream is a 503, not a stream
    that sends its headers and then breaks off with a traceback in the server's log."""
    def away(*args, **kwargs):
        raise DatabaseUnavailable("away")

    monkeypatch.setattr(store, "_epoch", None)
    monkeypatch.setattr(store, "_load_epoch", away)
    with pytest.raises(DatabaseUnavailable):
        open_stream(dispatcher, "c", None, None, retry_ms=100)
    assert dispatcher.stream_count == 0


def test_streams_replaying_one_shared_page_share_its_frames(store, dispatcher):  # noqa: F811
    """A storm's streams replay the same page (replay.py): its frames are built once, and a
    stream whose history ends earlier takes the start of the same frames."""
    ids = [store.append("c", "t", str(n)).id for n in range(3)]
    dispatcher.dispatch_new()
    first = dispatcher.replays.page("c", None, 0, ids[-1])
    again = dispatcher.replays.page("c", None, 0, ids[-1])
    shorter = dispatcher.replays.page("c", None, 0, ids[1])
    assert _ids(first.frames) == ids and len(shorter.frames) == 2
    assert all(a is b for a, b in zip(first.frames, again.frames))
    assert all(a is b for a, b in zip(first.frames, shorter.frames))


def test_a_prune_between_two_replay_pages_is_reported_not_skipped(store, dispatcher, monkeypatch):  # noqa: F811
    """Issue 17: the prune mark was read with a stream's first page only; every page must know."""
    ids = [store.append("c", "t", str(n)).id for n in range(6)]
    dispatcher.prime()
    dispatcher.replays.page_size = 2
    read_after, reads = store.read_after, []

    def read_after_a_prune_before_the_second_page(*args, **kwargs):
        reads.append(args[2])
        if len(reads) == 2:
            store.prune(timedelta(0))  # the pruner runs while the stream sends its first page
        return read_after(*args, **kwargs)

    monkeypatch.setattr(store, "read_after", read_after_a_prune_before_the_second_page)
    stream = open_stream(dispatcher, "c", None, Cursor(store.epoch, ids[0]), retry_ms=100)
    next(stream)
    assert _ids([next(stream)]) == ids[1:3]
    assert next(stream) == sse.reset_frame("history_truncated", f"{store.epoch}-{ids[-1]}")
    live = store.append("c", "t", '"live"')
    dispatcher.dispatch_new()
    assert _ids([next(stream)]) == [live.id]
    stream.close()


def test_a_history_page_knows_of_a_prune_after_its_cursor_was_checked(app, monkeypatch):
    realtime = app.extensions["realtime"]
    store = realtime.store
    first = realtime.publish("c", "t", 1)
    realtime.publish("c", "t", 2)
    read_after = store.read_after

    def pruned_first(*args, **kwargs):
        store.prune(timedelta(0))
        return read_after(*args, **kwargs)

    monkeypatch.setattr(store, "read_after", pruned_first)
    messages, cursor, reset = realtime.history("c", None, f"{store.epoch}-{first.id}", 10)
    assert messages == [] and reset is not None and reset.reason == "history_truncated"
    assert cursor == f"{store.epoch}-{first.id + 1}"
