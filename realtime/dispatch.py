"""Fan-out inside one process: one reader of new rows, any number of streams.

A stream never queries for live messages itself. The dispatcher, one thread
(a greenlet under gevent) per process, waits on the change feed, reads the new
rows once, formats each frame once, and hands it to the subscriptions of that
channel. Database reads per message are therefore the same for 1 stream and
for 10,000, and an idle stream holds a small in-memory queue, no connection.

The hand-over from history to live has no gap because of one lock: a stream
registers its subscription under the same lock under which the dispatcher
delivers a batch and advances `last_id`. Either the stream was registered
before the batch (and receives it live), or the batch is at most `last_id`,
hence already committed (store.py), hence in the history the stream reads
after registering. Overlap is possible and removed by id in stream.py.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Iterable

from .fastpath import SocketWriter
from .sse import KEEP_ALIVE, format_event
from .store import Message, MessageStore

log = logging.getLogger(__name__)

Frame = tuple[int, bytes]  # (message id, the frame's bytes); id 0 is a keep-alive
KEEP_ALIVE_FRAME: Frame = (0, KEEP_ALIVE.encode())


def message_frame(message: Message, epoch: str) -> bytes:
    """CONTRACT §4: `id:` the cursor, `event:` the topic, `data:` the envelope."""
    return format_event(
        id=f"{epoch}-{message.id}", event=message.topic, data=message.envelope_json()
    ).encode()


class Subscription:
    """A bounded queue of frames for one stream, filled by the dispatcher.

    Bounded twice: in frames (`limit`, REALTIME_STREAM_BUFFER) and in bytes,
    since 1,000 frames of the largest allowed message would be half a gigabyte.

    With a `writer` (fastpath.py), a frame offered while the stream is parked
    in `take()` with nothing queued is written to the client at once instead.
    `sent_through` is the highest message id the client was given, by either
    path, so neither repeats a message the other already sent.
    """

    max_pending_bytes = 8 * 1024 * 1024

    __slots__ = (
        "channel", "topics", "closed_reason", "quiet_since", "sent_through", "writer", "unsent",
        "_limit", "_pending", "_pending_bytes", "_ready", "_parked",
    )

    def __init__(
        self, channel: str, topics: Iterable[str] | None, limit: int, writer: SocketWriter | None = None
    ) -> None:
        self.channel = channel
        self.topics = frozenset(topics) if topics is not None else None
        self.closed_reason: str | None = None
        self.quiet_since = time.monotonic()  # when a frame was last queued or sent
        self.sent_through = 0
        self.writer = writer
        self.unsent = b""  # the part of a direct write the socket did not take
        self._limit = limit
        self._pending: deque[Frame] = deque()
        self._pending_bytes = 0
        self._ready = threading.Event()
        self._parked = False

    def offer(self, message: Message, frame: bytes) -> None:
        if self.closed_reason is not None:
            return
        if self.topics is not None and message.topic not in self.topics:
            return
        if self._can_send_now():
            if message.id > self.sent_through:
                self._send_now(message.id, frame)
            return
        if len(self._pending) >= self._limit or self._pending_bytes > self.max_pending_bytes:
            # A client that stops reading must not grow the server: end its
            # stream; it resumes from the store with its cursor.
            self.close("overflow")
            return
        self._queue((message.id, frame))

    def keep_alive(self) -> None:
        if self.closed_reason is not None or self._pending or self.unsent:
            return
        if self._can_send_now():
            self._send_now(*KEEP_ALIVE_FRAME)
        else:
            self._queue(KEEP_ALIVE_FRAME)

    def _can_send_now(self) -> bool:
        return self._parked and self.writer is not None and not self._pending and not self.unsent

    def _send_now(self, message_id: int, frame: bytes) -> None:
        try:
            self.unsent = self.writer.try_send(frame)
        except OSError:
            self.close("gone")
            return
        self.sent_through = max(self.sent_through, message_id)
        self.quiet_since = time.monotonic()
        if self.unsent:
            self._ready.set()  # the stream's greenlet finishes the write, then goes on

    def _queue(self, frame: Frame) -> None:
        self._pending.append(frame)
        self._pending_bytes += len(frame[1])
        self.quiet_since = time.monotonic()
        self._ready.set()

    def take(self) -> list[Frame]:
        """Wait for frames and return all queued so far; [] once closed.

        No timeout here: keep-alives are queued by the dispatcher like
        messages. A timeout per wait would arm and cancel a timer on every
        wake-up, which at 1,000 streams cost more than the frames themselves.
        """
        if not self._pending and self.closed_reason is None and not self.unsent:
            self._parked = True  # all yielded so far is written: direct writes may go
            try:
                self._ready.wait()
            finally:
                self._parked = False
        self._ready.clear()  # clear before draining, so an offer after this is not missed
        frames = []
        while self._pending:
            frames.append(self._pending.popleft())
        self._pending_bytes = 0
        return frames

    def finish_unsent(self) -> None:
        """Write the rest of a direct write, blocking this greenlet until the client takes it."""
        rest, self.unsent = self.unsent, b""
        if rest:
            try:
                self.writer.send_all(rest)
            except OSError:
                self.close("gone")

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
        self._pending.clear()  # `unsent` stays: half a chunk must still be finished
        self._pending_bytes = 0
        self._ready.set()


class Dispatcher:
    batch_size = 500

    def __init__(
        self,
        store: MessageStore,
        *,
        poll_s: float = 0.25,
        heartbeat_s: float = 15.0,
        buffer_size: int = 1000,
    ) -> None:
        self.store = store
        self.buffer_size = buffer_size
        self.heartbeat_s = heartbeat_s
        # Look for quiet streams often enough that none stays silent longer
        # than heartbeat_s, whatever the phase of this loop.
        self._tick_s = min(1.0, heartbeat_s / 4)
        self.delivered = 0  # frames handed to subscriptions, for stats
        self._feed = store.change_feed(poll_s)
        self._lock = threading.Lock()
        self._by_channel: dict[str, set[Subscription]] = {}
        self._last_id = 0
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def stream_count(self) -> int:
        with self._lock:
            return sum(len(subs) for subs in self._by_channel.values())

    def start(self) -> None:
        """Start the reader thread once (lazily: never at import, always after a fork)."""
        with self._lock:
            if self._thread is not None or self._stopping:
                return
            self._last_id = self.store.last_id()
            self._thread = threading.Thread(target=self._run, name="realtime-dispatcher", daemon=True)
            self._thread.start()

    def subscribe(
        self, channel: str, topics: Iterable[str] | None, writer: SocketWriter | None = None
    ) -> Subscription:
        self.start()
        subscription = Subscription(channel, topics, self.buffer_size, writer)
        with self._lock:
            if self._stopping:
                subscription.close("shutdown")
            else:
                self._by_channel.setdefault(channel, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            subs = self._by_channel.get(subscription.channel)
            if subs is not None:
                subs.discard(subscription)
                if not subs:
                    del self._by_channel[subscription.channel]

    def notify_appended(self) -> None:
        """This process committed a message: look now rather than at the next poll."""
        self._feed.poke()

    def stop(self) -> None:
        """End every stream now (their clients reconnect elsewhere) and stop reading."""
        with self._lock:
            self._stopping = True
            subscriptions = [s for subs in self._by_channel.values() for s in subs]
            self._by_channel.clear()
        for subscription in subscriptions:
            subscription.close("shutdown")
        self._feed.poke()

    def dispatch_new(self) -> int:
        """Read every row after `last_id` once and deliver it; return how many rows."""
        total = 0
        while True:
            rows = self.store.read_new(self._last_id, self.batch_size)
            if rows:
                self._deliver(rows)
                total += len(rows)
            if len(rows) < self.batch_size:
                return total

    def _deliver(self, rows: list[Message]) -> None:
        epoch = self.store.epoch
        with self._lock:
            for message in rows:
                if message.id <= self._last_id:
                    continue
                subs = self._by_channel.get(message.channel)
                if subs:
                    frame = message_frame(message, epoch)
                    for subscription in subs:
                        subscription.offer(message, frame)
                    self.delivered += len(subs)
                self._last_id = message.id

    def send_keep_alives(self) -> None:
        """Queue `: keep-alive` for every stream that was quiet for about heartbeat_s."""
        quiet_since = time.monotonic() - (self.heartbeat_s - self._tick_s)
        with self._lock:
            for subs in self._by_channel.values():
                for subscription in subs:
                    if subscription.quiet_since <= quiet_since:
                        subscription.keep_alive()

    def _run(self) -> None:
        backoff = 0.1
        next_beat = time.monotonic() + self._tick_s
        while not self._stopping:
            try:
                if self._feed.wait(timeout=self._tick_s) and not self._stopping:
                    self.dispatch_new()
                if time.monotonic() >= next_beat:
                    self.send_keep_alives()
                    next_beat = time.monotonic() + self._tick_s
                backoff = 0.1
            except Exception:
                log.exception("realtime dispatcher failed; retrying in %.1f s", backoff)
                threading.Event().wait(backoff)
                backoff = min(backoff * 2, 5.0)
        self._feed.close()
