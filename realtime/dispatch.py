"""Fan-out inside one process: one reader of new rows, any number of streams.

A stream never queries for live messages itself. The dispatcher, one thread
(a greenlet under gevent) per process, waits on the change feed, reads the new
rows once, builds each frame once, and hands the same bytes to every
subscription of that channel. Database reads per message are the same for 1
stream and for 10,000, and an idle stream holds a small queue, no connection.

Holes (visibility.py). On PostgreSQL an id can be missing below one that
committed: its transaction is still in flight, or rolled back. The reader then
asks which transactions are in flight and which channels they may write, and
*holds* the messages of those channels only (a `Hold` per transaction and
channel key), delivering every other channel's at once. When a transaction
ends, the held messages of its channels are read again and delivered, in id
order, each once. One slow transaction on channel A never delays channel B.

The hand-over from history to live has no gap because of one lock: a stream
registers its subscription under the lock under which the dispatcher
delivers and moves `position` and its holds. Its history then ends where live
delivery of its channel stands (`history_through`): the position, or just
before the first message of the channel still held. Overlap is possible and
removed by id in stream.py.

A stream of several channels (docs/protocol.md §12) is one subscription
registered with each of its channels (`SeveralChannels`). Its frames must
leave in id order across channels, so they wait in it while one of its
channels is held, and go to its queue, sorted, once none is held below them
(`_release_deferred`). Its history ends at the position: when one of its
channels is held as it subscribes, its replay first waits for the
transactions that may write them (stream.py), then reads up to the position.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable, Mapping

from common.database import DatabaseUnavailable

from . import metrics, sse
from .changes import ChangeFeed
from .holds import Holds
from .replay import ReplayReads
from .schema import intent_key
from .store import Message, MessageStore, Page
from .subscription import Channel, Frame, SeveralChannels, Subscription
from .ticker import Ticker
from .visibility import backoff

__all__ = ["Channel", "Clock", "Dispatcher", "Frame", "SeveralChannels", "Subscription"]

log = logging.getLogger(__name__)

REPLAY_PAGE = 500  # messages per replay read ...
REPLAY_PAGE_BYTES = 256 * 1024  # ... and bytes of data, but its first

Clock = Callable[[], float]
def _has_hole(rows: Page, after_id: int) -> bool:
    """Whether an id is missing between `after_id` and the page's last."""
    return bool(rows) and rows[-1].id - after_id != len(rows)


class Dispatcher(Ticker):
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
        self._deferring: set[SeveralChannels] = set()  # streams of several channels with frames waiting
        self._position: int | None = None  # set by prime()
        self._holds = Holds()
        self._priming = threading.Lock()
        self._prime_failed_at = float("-inf")
        #: Replay pages shared by streams that ask for the same one together (a reconnect storm).
        self.replays = ReplayReads(
            store, lambda: self._position or 0, page_size=REPLAY_PAGE, page_bytes=REPLAY_PAGE_BYTES, clock=clock,
            quiet_after=self.quiet_after,
        )
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._stopped = threading.Event()  # wakes the ticker at once

    clock = property(lambda self: self._clock, doc="The dispatcher's monotonic clock (a test's, in tests).")
    feed = property(lambda self: self._feed, doc="Where the reader learns of new rows.")

    @property
    def position(self) -> int:
        """Where live delivery stands: every message up to here was dispatched, or is held."""
        return self._position or 0

    @property
    def stream_count(self) -> int:
        with self._lock:
            return len(self._subscriptions())

    def _subscriptions(self) -> set[Subscription]:
        """Every subscription once (one of several channels is in each of its channels' sets)."""
        return {s for channel in self._channels.values() for s in channel.subscriptions}

    def start(self) -> None:
        """Start the reader and the ticker (ticker.py says why two) once: lazily, after a fork."""
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
        """Fix where live delivery starts, once: after the last id drawn at this moment.

        Everything up to it is history, which each stream reads itself. It
        needs the database, so streams call it before their response starts.
        It waits for no transaction: the channels of those in flight are held
        (and their streams' history waits for them, stream.py).
        """
        if self._position is not None:
            return
        with self._priming:
            if self._position is not None:
                return
            if self._clock() - self._prime_failed_at < self.tick_s:
                # Streams queued behind an attempt that just failed: answer them now, not
                # after a database call each, one after another (docs/protocol.md §7's 10 s).
                raise DatabaseUnavailable("the database is unavailable; try again shortly")
            try:
                drawn = self.store.last_drawn()
                writers = self.store.writers()  # looked at after `drawn`
                # The database's epoch, read once per process, now: a stream that opens while
                # the database stalls must not need it before its first byte (stream.py).
                self.store.epoch  # noqa: B018
            except DatabaseUnavailable:
                self._prime_failed_at = self._clock()
                raise
            with self._lock:
                self._holds = Holds().adding(writers, drawn, self._clock(), from_prime=True)
                self._position = drawn

    def subscribe(self, channel: str, topics: Iterable[str] | None) -> Subscription:
        self.prime()
        with self._lock:
            if self._stopping:
                subscription = Subscription(Channel(channel), topics, self.buffer_size, self._clock())
                subscription.close("shutdown")
                return subscription
            # Its history ends where live delivery of its channel stands: everything after comes live.
            key = intent_key(channel)
            held_after = self._holds.after(key)
            through = self.position if held_after is None else min(held_after, self.position)
            if channel not in self._channels:
                self._channels[channel] = Channel(channel, position=through)
            subscription = Subscription(self._channels[channel], topics, self.buffer_size, self._clock())
            subscription.channel.subscriptions.add(subscription)
            subscription.history_through = through
            subscription.history_settled = not self._holds.from_prime(key)
        return subscription

    def subscribe_many(self, scope: Mapping[str, Iterable[str] | None]) -> SeveralChannels:
        """One subscription for several channels, each with its topics (None: all): docs/protocol.md §12."""
        self.prime()
        keys = {channel: intent_key(channel) for channel in scope}
        with self._lock:
            subscription = SeveralChannels(scope, keys.values(), self.buffer_size, self._clock(), self._deferring)
            if self._stopping:
                subscription.close("shutdown")
                return subscription
            position = self.position
            held = False
            for name, key in keys.items():
                held_after = self._holds.after(key)
                held = held or held_after is not None
                if name not in self._channels:
                    self._channels[name] = Channel(name, position=position if held_after is None else min(held_after, position))
                channel = self._channels[name]
                channel.subscriptions.add(subscription)
                subscription.channels.append(channel)
            # Its history ends at the position; while a channel is held, what it holds below the
            # position may still commit, so the replay waits for those transactions (stream.py).
            subscription.history_through = position
            subscription.history_settled = not held
        return subscription

    def quiet_after(self, channel: str, after_id: int) -> bool:
        """True when no message of `channel` up to `position` is newer than `after_id`.

        Known only for a channel with streams, since before `after_id`: its
        messages all passed through `_deliver`. A replay page read up to
        `after_id` is then complete up to `position` (replay.py).
        """
        with self._lock:
            known = self._channels.get(channel)
            return known is not None and known.delivered_through <= after_id and self._holds.after(intent_key(channel)) is None

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._deferring.discard(subscription)
            for channel in subscription.channels:
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
            subscriptions = self._subscriptions()
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
        """Messages are held for transactions in flight: the reader looks again soon."""
        return bool(self._holds)

    def _next_look_s(self) -> float:
        """How long the reader may wait for the feed: soon while messages are held, backing off."""
        if not self._holds:
            return self.tick_s
        oldest = min(h.since for h in self._holds.by_entry.values())
        return min(self.tick_s, backoff(self._clock() - oldest))

    def dispatch_new(self) -> int:
        """Deliver what was committed since the last look, in id order; return how many messages.

        First the held messages whose transactions ended, then every new row:
        the rows of channels no transaction in flight may still write go out
        at once; the others wait in a hold (the module docstring).
        """
        if self._position is None:
            return 0
        total = self._release_ended()
        while True:
            position = self._position
            rows = self.store.read_new(position, self.batch_size, self.batch_bytes)
            if not rows:
                break
            holds = self._holds
            if _has_hole(rows, position):
                # Who may still fill it (looked at after the read), then the rows again: a
                # transaction that ended between the two looks is in this read.
                writers = self.store.writers()
                rows = self.store.read_new(position, self.batch_size, self.batch_bytes, through=rows[-1].id)
                if _has_hole(rows, position):
                    holds = holds.adding(writers, position, self._clock())
            total += self._deliver([m for m in rows if not holds.held(m)], position=rows[-1].id, holds=holds)
            if not rows.more:
                break
        return total

    def _release_ended(self) -> int:
        """Deliver the held messages of the transactions that ended since the last look."""
        if not self._holds:
            return 0
        writers = self.store.writers()
        before = self._holds
        after, ended = before.without_ended(writers)
        self.store.probe.waiting_on({h.writer for h in after.by_entry.values()}, "live delivery")
        if not ended:
            return 0
        with self._lock:
            # From here on a new stream's history reaches past the released messages,
            # and the ones it replays arrive again live, removed by id (stream.py).
            self._holds = after
        keys = None if any(h.writer.keys is None for h in ended) else sorted(
            {key for h in ended for key in h.writer.keys or ()}
        )
        after_id, total = min(h.after_id for h in ended), 0
        while True:
            rows = self.store.read_new(after_id, self.batch_size, self.batch_bytes, through=self._position, keys=keys)
            if not rows:
                break
            total += self._deliver([m for m in rows if before.held(m) and not after.held(m)], release=False)
            after_id = rows[-1].id
            if not rows.more:
                break
        with self._lock:
            # Only now, with every released message among them: a stream of several channels
            # gets the released ones and those of its other channels in id order.
            self._release_deferred()
        return total

    def _deliver(
        self, rows: list[Message], *, position: int | None = None, holds: Holds | None = None, release: bool = True
    ) -> int:
        """Offer each message's frame to the streams of its channel; then move `position` and the holds
        (and, with `release`, queue what streams of several channels may now send)."""
        epoch = self.store.epoch
        now, wall = self._clock(), time.time()
        woken: dict[str, Channel] = {}
        sent = 0
        with self._lock:
            for message in rows:
                channel = self._channels.get(message.channel)
                if channel is not None:
                    channel.delivered_through = max(channel.delivered_through, message.id)
                    # One bytes object for every subscriber of the channel.
                    frame = sse.message_frame(f"{epoch}-{message.id}", message.topic, message.envelope_json())
                    queued = sum(s.offer(message, frame, now) for s in channel.subscriptions)
                    if queued:
                        woken[channel.name] = channel
                        sent += queued
                        metrics.PUBLISH_TO_SEND.observe(max(0.0, wall - message.created_at.timestamp()))
            if position is not None:
                self._position = position
            if holds is not None:
                self._holds = holds
            if release and self._deferring:
                self._release_deferred()
            for channel in woken.values():
                channel.wake()
        metrics.FRAMES_SENT.inc(sent)  # once per read, not per message (one lock and one write of a file each)
        return len(rows)

    def _release_deferred(self) -> None:
        """Queue the frames of streams of several channels up to where none of their channels is held
        (under the lock, after the holds moved)."""
        now = self._clock()
        holds = self._holds
        for subscription in list(self._deferring):
            through = None
            if holds:
                held = [after for after in map(holds.after, subscription.keys) if after is not None]
                through = min(held) if held else None
            if subscription.release(through, now):
                subscription.channel.wake()
            if not subscription.deferred:
                self._deferring.discard(subscription)

    def _read_forever(self) -> None:
        backoff = 0.1
        while not self._stopping:
            try:
                self.prime()  # at once, so streams opened later need no database to start
                timeout = self._next_look_s()
                if (self._feed.wait(timeout=timeout) or self.waiting_on_a_hole) and not self._stopping:
                    self.dispatch_new()
                backoff = 0.1
            except Exception as exc:
                # The database is away: the streams stay open on keep-alives,
                # and get every message after `position` once it is back.
                log.warning("realtime reader: %s; retrying in %.1f s", type(exc).__name__, backoff)
                threading.Event().wait(backoff)
                backoff = min(backoff * 2, 2.0)
        self._feed.close()
