"""Fan-out inside one process: one reader of new rows, any number of streams.

A stream never queries for live messages itself. The dispatcher, one thread
(a greenlet under gevent) per process, waits on the change feed, reads the new
rows once, builds each frame once, and hands the same bytes to every
subscription of that channel. Database reads per message are the same for 1
stream and for 10,000, and an idle stream holds a small queue, no connection.

The hand-over from history to live has no gap because of one lock: a stream
registers its subscription under the same lock under which the dispatcher
delivers a batch and advances `last_id`. Either the stream was registered
before the batch (and receives it live), or the batch is at most `last_id`,
hence already committed (store.py), hence in the history the stream reads
after registering. Overlap is possible and removed by id in stream.py.
"""
from __future__ import annotations

import errno
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from common.greenlets import current_greenlet, interrupt

from . import metrics, sse
from .changes import ChangeFeed
from .replay import ReplayReads
from .store import Message, MessageStore

log = logging.getLogger(__name__)

REPLAY_PAGE = 500  # messages per replay read ...
REPLAY_PAGE_BYTES = 256 * 1024  # ... and bytes of data, but its first message

Frame = tuple[int, bytes]  # (message id, the frame's bytes); id 0 is a keep-alive
Clock = Callable[[], float]


class Channel:
    """The streams of one channel, and the one wake-up they share.

    The dispatcher queues a batch's frames on every subscription of the
    channel, then wakes the channel once: one event set per channel and batch,
    not one per stream. A stream reads `event` *before* it looks at its queue,
    and `wake()` swaps in a fresh event before setting the old one, so a frame
    queued after the stream's look is never slept through.
    """

    __slots__ = ("name", "subscriptions", "event", "last_id")

    def __init__(self, name: str, position: int = 0) -> None:
        self.name = name
        self.subscriptions: set[Subscription] = set()
        self.event = threading.Event()
        # The newest message of the channel the dispatcher delivered while this
        # object existed, or the dispatcher's position when it was made: after
        # `last_id`, nothing of the channel went past unseen.
        self.last_id = position

    def wake(self) -> None:
        event, self.event = self.event, threading.Event()
        event.set()


class Subscription:
    """A bounded queue of frames for one stream, filled by the dispatcher.

    Bounded twice: in frames (`limit`, REALTIME_STREAM_BUFFER) and in bytes,
    since 1,000 frames of the largest allowed message would be half a gigabyte.
    """

    max_pending_bytes = 8 * 1024 * 1024

    __slots__ = (
        "channel", "topics", "closed_reason", "quiet_since", "writer", "writing_since",
        "sent_frames", "sent_bytes", "history_through", "_limit", "_pending", "_pending_bytes",
    )

    def __init__(self, channel: Channel, topics: Iterable[str] | None, limit: int, now: float) -> None:
        self.channel = channel
        # A tuple: a few topics are found in it as fast as in a frozenset, at a quarter of the memory.
        self.topics = tuple(sorted(set(topics))) if topics is not None else None
        self.closed_reason: str | None = None
        self.quiet_since = now  # when a frame was last queued
        # The greenlet that writes this stream to its client (None outside
        # gevent), and since when it has been handing bytes to the server: a
        # client that stops reading leaves it blocked there (see cut_stalled).
        self.writer = current_greenlet()
        self.writing_since: float | None = None
        self.sent_frames = self.sent_bytes = 0  # for the log line a stream writes when it ends
        self.history_through: int | None = None  # the last id its replay reads; later ones come live
        self._limit = limit
        # A list, swapped out whole by take(): an empty one is 56 bytes where a
        # deque is over 600, and an idle stream's queue is nearly always empty.
        self._pending: list[Frame] = []
        self._pending_bytes = 0

    @property
    def queued(self) -> int:
        """Frames waiting for the stream to take them."""
        return len(self._pending)

    def offer(self, message: Message, frame: bytes, now: float) -> bool:
        """Queue the frame if the stream wants it; True when it was queued (the caller wakes the channel)."""
        if self.closed_reason is not None:
            return False
        if self.topics is not None and message.topic not in self.topics:
            return False
        if len(self._pending) >= self._limit or self._pending_bytes > self.max_pending_bytes:
            # A client that stops reading must not grow the server: end its
            # stream; it resumes from the store with its cursor.
            self.close("overflow")
            return False
        self._queue((message.id, frame), now)
        return True

    def keep_alive(self, now: float) -> bool:
        if self.closed_reason is None and not self._pending:
            self._queue((0, sse.KEEP_ALIVE), now)
            return True
        return False

    def _queue(self, frame: Frame, now: float) -> None:
        self._pending.append(frame)
        self._pending_bytes += len(frame[1])
        self.quiet_since = now

    def take(self) -> list[Frame]:
        """Wait for frames and return all queued so far; [] once closed.

        No timeout here: keep-alives are queued by the dispatcher like
        messages. A timeout per wait would arm and cancel a timer on every
        wake-up, which at 1,000 streams cost more than the frames themselves.
        """
        while not self._pending and self.closed_reason is None:
            event = self.channel.event  # before looking again: see Channel
            if not self._pending and self.closed_reason is None:
                event.wait()
        frames, self._pending = self._pending, []
        self._pending_bytes = 0
        return frames

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
        self._pending.clear()
        self._pending_bytes = 0
        self.channel.wake()

    def cut(self, reason: str) -> None:
        """Close, and if the stream is blocked writing to its client, end that write now."""
        self.close(reason)
        if self.writing_since is not None and self.writer is not None:
            # gunicorn treats a reset as a client that went away: it closes
            # the connection and logs nothing above debug.
            interrupt(self.writer, ConnectionResetError(errno.ECONNRESET, f"stream cut: {reason}"))


@dataclass(frozen=True)
class Hole:
    """A missing id below `through`, which committed: settled once these `writers` ended."""

    through: int
    writers: frozenset[str]


class Dispatcher:
    """Reads new rows once per process and offers each frame to the streams of its channel.

    `clock` (monotonic seconds) is injected so tests move time instead of
    sleeping; they call `dispatch_new()` and `send_keep_alives()` themselves
    and never `start()` the reader thread.
    """

    batch_size = 500
    batch_bytes = 4 * 1024 * 1024

    def __init__(
        self,
        store: MessageStore,
        feed: ChangeFeed,
        *,
        heartbeat_s: float = 15.0,
        buffer_size: int = 1000,
        send_timeout_s: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.store = store
        self.buffer_size = buffer_size
        self.heartbeat_s = heartbeat_s
        self.send_timeout_s = send_timeout_s
        # Look for quiet streams often enough that none stays silent longer
        # than heartbeat_s, whatever the phase of this loop.
        self.tick_s = min(1.0, heartbeat_s / 4)
        self._feed = feed
        self._clock = clock
        self._lock = threading.Lock()
        self._channels: dict[str, Channel] = {}
        self._last_id: int | None = None  # set by prime()
        self._hole: Hole | None = None
        #: Replay pages shared by streams that ask for the same one together (a reconnect storm).
        self.replays = ReplayReads(
            store, lambda: self._last_id or 0, page_size=REPLAY_PAGE, page_bytes=REPLAY_PAGE_BYTES, clock=clock,
            quiet_after=self.quiet_after,
        )
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._stopped = threading.Event()  # wakes the ticker at once

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def feed(self) -> ChangeFeed:
        return self._feed

    @property
    def position(self) -> int:
        """Where live delivery stands: every settled message up to here was dispatched."""
        return self._last_id or 0

    @property
    def stream_count(self) -> int:
        with self._lock:
            return sum(len(channel.subscriptions) for channel in self._channels.values())

    def start(self) -> None:
        """Start the reader and the ticker once (lazily: never at import, always after a fork).

        Two threads, so that keep-alives and send timeouts depend on nothing
        but the clock: the reader may wait on a database that is away.
        """
        with self._lock:
            if self._threads or self._stopping:
                return
            self._threads = [
                threading.Thread(target=self._read_forever, name="realtime-reader", daemon=True),
                threading.Thread(target=self._tick_forever, name="realtime-ticker", daemon=True),
            ]
            for thread in self._threads:
                thread.start()

    def prime(self) -> None:
        """Fix where live delivery starts, once: after the settled messages of this moment.

        Everything up to it is history, which each stream reads itself. It
        needs the database, so streams call it before their response starts.
        """
        if self._last_id is None:
            with self._lock:
                if self._last_id is None:
                    self._last_id = self.store.settled_id()

    def subscribe(self, channel: str, topics: Iterable[str] | None) -> Subscription:
        self.prime()
        with self._lock:
            if self._stopping:
                subscription = Subscription(Channel(channel), topics, self.buffer_size, self._clock())
                subscription.close("shutdown")
                return subscription
            if channel not in self._channels:
                self._channels[channel] = Channel(channel, position=self._last_id or 0)
            subscription = Subscription(self._channels[channel], topics, self.buffer_size, self._clock())
            subscription.channel.subscriptions.add(subscription)
            # Its history ends here: everything after comes live.
            subscription.history_through = self._last_id
        return subscription

    def quiet_after(self, channel: str, after_id: int) -> bool:
        """True when no message of `channel` up to `position` is newer than `after_id`.

        Known only for a channel with streams, since before `after_id`: its
        messages all passed through `_deliver`. A replay page read up to
        `after_id` is then complete up to `position` (replay.py).
        """
        with self._lock:
            known = self._channels.get(channel)
            return known is not None and known.last_id <= after_id

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            channel = subscription.channel
            channel.subscriptions.discard(subscription)
            if not channel.subscriptions and self._channels.get(channel.name) is channel:
                del self._channels[channel.name]

    def notify_appended(self) -> None:
        """This process committed a message: look now rather than at the next poll."""
        self._feed.poke()

    def stop(self, wait_s: float = 0.0) -> None:
        """End every stream now (their clients reconnect elsewhere) and stop reading.

        With `wait_s`, wait that long for the reader and the ticker to end, so
        that no database call of theirs is still running when the engine goes.
        """
        with self._lock:
            self._stopping = True
            subscriptions = [s for channel in self._channels.values() for s in channel.subscriptions]
            self._channels.clear()
            threads = list(self._threads)
        self._stopped.set()
        for subscription in subscriptions:
            # A stream blocked on a client that stopped reading must not hold
            # the reload or shutdown for the whole graceful timeout.
            subscription.cut("shutdown")
        self._feed.poke()
        if wait_s > 0:
            deadline = time.monotonic() + wait_s
            for thread in threads:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))

    @property
    def waiting_on_a_hole(self) -> bool:
        """A hole below a committed id waits for writers to end: the reader looks again soon."""
        return self._hole is not None

    def dispatch_new(self) -> int:
        """Read every row after `last_id` once and deliver it, in id order; return how many rows.

        On PostgreSQL an id may be missing below one that committed: its
        writer is still in flight, or rolled back. Delivery stops at such a
        hole until every writer in flight when it was seen has ended; then
        everything up to the newest id of that read is settled, and a hole
        still there was a rollback (store.py's module docstring).
        """
        total = 0
        while self._last_id is not None:
            settled = self._last_id
            if self._hole is not None:
                if self.store.any_in_flight(self._hole.writers):
                    break
                settled, self._hole = self._hole.through, None
            rows = self.store.read_new(self._last_id, self.batch_size, self.batch_bytes)
            ready = []
            expected = self._last_id + 1
            for message in rows:
                if message.id > expected and message.id > settled:
                    self._hole = Hole(through=rows[-1].id, writers=self.store.writers_in_flight())
                    break
                ready.append(message)
                expected = message.id + 1
            if ready:
                self._deliver(ready)
                total += len(ready)
            if settled > self._last_id and len(ready) == len(rows):
                self._last_id = settled  # a rolled-back id at the end of a settled read
            if self._hole is not None or not rows.more:
                break
        return total

    def _deliver(self, rows: list[Message]) -> None:
        epoch = self.store.epoch
        now = self._clock()
        woken: dict[str, Channel] = {}
        with self._lock:
            for message in rows:
                if message.id <= self._last_id:
                    continue
                channel = self._channels.get(message.channel)
                if channel is not None:
                    channel.last_id = message.id
                    # One bytes object for every subscriber of the channel.
                    frame = sse.message_frame(f"{epoch}-{message.id}", message.topic, message.envelope_json())
                    queued = sum(s.offer(message, frame, now) for s in channel.subscriptions)
                    if queued:
                        woken[channel.name] = channel
                        metrics.FRAMES_SENT.inc(queued)
                        metrics.PUBLISH_TO_SEND.observe(max(0.0, time.time() - message.created_at.timestamp()))
                self._last_id = message.id
            for channel in woken.values():
                channel.wake()

    def send_keep_alives(self) -> None:
        """Queue `: keep-alive` for every stream that was quiet for about heartbeat_s."""
        now = self._clock()
        quiet_since = now - (self.heartbeat_s - self.tick_s)
        with self._lock:
            for channel in self._channels.values():
                queued = [s.keep_alive(now) for s in channel.subscriptions if s.quiet_since <= quiet_since]
                if any(queued):
                    channel.wake()

    def cut_stalled(self) -> int:
        """End the streams blocked writing to a client for send_timeout_s; return how many.

        A client that stops reading fills its socket buffers, and the stream's
        write then waits: the queue bound cannot see it, and the stream would
        hold its greenlet, its buffers and any reload until the client goes.
        """
        stalled_since = self._clock() - self.send_timeout_s
        with self._lock:
            stalled = [
                s for channel in self._channels.values() for s in channel.subscriptions
                if s.writing_since is not None and s.writing_since <= stalled_since
            ]
        for subscription in stalled:
            subscription.cut("send_timeout")
        return len(stalled)

    def _read_forever(self) -> None:
        backoff = 0.1
        while not self._stopping:
            try:
                self.prime()  # at once, so streams opened later need no database to start
                timeout = 0.005 if self.waiting_on_a_hole else self.tick_s
                if (self._feed.wait(timeout=timeout) or self.waiting_on_a_hole) and not self._stopping:
                    self.dispatch_new()
                backoff = 0.1
            except Exception as exc:
                # The database is away: the streams stay open on keep-alives,
                # and get every message from last_id on once it is back.
                log.warning("realtime reader: %s; retrying in %.1f s", type(exc).__name__, backoff)
                threading.Event().wait(backoff)
                backoff = min(backoff * 2, 2.0)
        self._feed.close()

    def _tick_forever(self) -> None:
        while not self._stopping:
            self._stopped.wait(self.tick_s)
            try:
                self.send_keep_alives()
                self.cut_stalled()
            except Exception:
                log.exception("realtime ticker failed")
