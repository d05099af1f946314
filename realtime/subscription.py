"""A stream's place in the dispatcher: its queue of frames, and the channel it shares a wake-up with.

The dispatcher (dispatch.py) fills queues; a stream (stream.py) takes from its
own. Neither touches the database.
"""
from __future__ import annotations

import errno
import threading
from typing import Iterable, Mapping

from common.greenlets import current_greenlet, interrupt

from . import sse
from .reads import Message

Frame = tuple[int, bytes]  # (message id, the frame's bytes); id 0 is a keep-alive


class Channel:
    """The streams of one channel, and the one wake-up they share.

    The dispatcher queues a batch's frames on every subscription of the
    channel, then wakes the channel once: one event set per channel and batch,
    not one per stream. A stream reads `event` *before* it looks at its queue,
    and `wake()` swaps in a fresh event before setting the old one, so a frame
    queued after the stream's look is never slept through.
    """

    __slots__ = ("name", "subscriptions", "event", "delivered_through")

    def __init__(self, name: str, position: int = 0) -> None:
        self.name = name
        self.subscriptions: set[Subscription] = set()
        self.event = threading.Event()
        # The newest message of the channel the dispatcher delivered while this
        # object existed, or where the first stream's history ended when it was
        # made: after `delivered_through`, nothing of the channel went past unseen.
        self.delivered_through = position

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
        "sent_frames", "sent_bytes", "history_through", "history_settled", "_limit", "_pending", "_pending_bytes",
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
        self.history_through = 0  # the last id its replay reads; later ones come live
        # False when a transaction in flight as this process started may still commit messages
        # of the channel at or below history_through: the replay waits for it first (stream.py).
        self.history_settled = True
        self._limit = limit
        # A list, swapped out whole by take(): an empty one is 56 bytes where a
        # deque is over 600, and an idle stream's queue is nearly always empty.
        self._pending: list[Frame] = []
        self._pending_bytes = 0

    @property
    def queued(self) -> int:
        """Frames waiting for the stream to take them."""
        return len(self._pending)

    @property
    def channels(self) -> list[Channel]:
        """The channels it is registered with (SeveralChannels: each of its own)."""
        return [self.channel]

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
        wake-up, which with many streams cost more than the frames themselves (bench/README.md).
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


class SeveralChannels(Subscription):
    """One stream's queue for several channels (docs/protocol.md §12), registered with each of them.

    Frames must reach the stream in id order across its channels, and each once: the stream
    skips an id at or below the last it sent. Within a channel the dispatcher delivers in id
    order, but not across channels: while a transaction in flight holds channel A back after
    id 10 (dispatch.py), B's 12 goes out at once and A's 11 comes later. So the frames offered
    here wait in `_deferred` until the dispatcher says how far none of the stream's channels
    is held (`release`), and go to the queue sorted by id. Its wake-up is its own `Channel`, not
    one of its channels': the dispatcher wakes it when `release` queued something.
    """

    __slots__ = ("channels", "topics_of", "keys", "_deferred", "_deferred_bytes", "_deferring")

    def __init__(
        self, scope: Mapping[str, Iterable[str] | None], keys: Iterable[int], limit: int, now: float,
        deferring: set[SeveralChannels],
    ) -> None:
        super().__init__(Channel(""), None, limit, now)
        self.channels: list[Channel] = []  # the dispatcher's, set as it registers this subscription
        self.topics_of = {c: tuple(sorted(set(t))) if t is not None else None for c, t in scope.items()}
        self.keys = tuple(keys)  # the channels' intent keys, to ask the holds about
        self._deferred: list[Frame] = []
        self._deferred_bytes = 0
        self._deferring = deferring  # the dispatcher's set of subscriptions with deferred frames

    @property
    def queued(self) -> int:
        return len(self._pending) + len(self._deferred)

    def offer(self, message: Message, frame: bytes, now: float) -> bool:
        if self.closed_reason is not None:
            return False
        topics = self.topics_of[message.channel]
        if topics is not None and message.topic not in topics:
            return False
        # Frames waiting for a held channel count toward both bounds, as queued ones do.
        if self.queued >= self._limit or self._pending_bytes + self._deferred_bytes > self.max_pending_bytes:
            self.close("overflow")
            return False
        if not self._deferred:
            self._deferring.add(self)
        self._deferred.append((message.id, frame))
        self._deferred_bytes += len(frame)
        return True

    def release(self, through: int | None, now: float) -> bool:
        """Queue the deferred frames up to id `through` (None: all), in id order; True if any was."""
        if self.closed_reason is not None:
            self._deferred.clear()
            self._deferred_bytes = 0
            return False
        self._deferred.sort(key=_frame_id)
        if through is None:
            ready, self._deferred = self._deferred, []
        else:
            cut = next((n for n, (message_id, _) in enumerate(self._deferred) if message_id > through), len(self._deferred))
            ready, self._deferred = self._deferred[:cut], self._deferred[cut:]
        for frame in ready:
            self._queue(frame, now)
            self._deferred_bytes -= len(frame[1])
        return bool(ready)

    @property
    def deferred(self) -> bool:
        return bool(self._deferred)

    def keep_alive(self, now: float) -> bool:
        if super().keep_alive(now):
            self.channel.wake()  # its own wake-up, which waking one of its channels does not set
            return True
        return False

    def close(self, reason: str) -> None:
        self._deferred.clear()
        self._deferred_bytes = 0
        super().close(reason)


def _frame_id(frame: Frame) -> int:
    return frame[0]
