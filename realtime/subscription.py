"""A stream's place in the dispatcher: its queue of frames, and the channel it shares a wake-up with.

The dispatcher (dispatch.py) fills queues; a stream (stream.py) takes from its
own. Neither touches the database.
"""
from __future__ import annotations

import errno
import threading
from typing import Iterable

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
