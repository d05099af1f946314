"""Replay pages shared by the streams that ask for the same one at about the same time.

After a deploy every client reconnects at once, most of them with the same
cursor (they were all up to date). One read of "channel C after id N" then
serves all of them: the first stream to ask reads, the others asking while it
reads wait for its page, and those asking within `ttl_s` after get it from
memory. Reads run a few at a time (`concurrency`), so a storm of replays
leaves the connection pool to publishes and the dispatcher.

Those turns are the bound on a storm's replays (stream admission only covers
the request's setup, admission.py), so waiting for one must not silence a
stream: a stream waits for a turn, or for the read it shares, at most
`wait_s`, then gets `ReplayBusy`, sends a keep-alive and asks again
(stream.py; docs/protocol.md §6, a keep-alive at least every heartbeat).

A page is read up to the dispatcher's current position, which is at or past
the history end of every stream already subscribed: each stream keeps the
messages up to its own `history_through`, and gets the rest live. A stream
that subscribed after the position moved on still shares the page if nothing
was published on its channel since the read (`quiet_after`): messages on
other channels do not make a storm read again.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from . import sse
from .errors import RealtimeError
from .store import MessageStore, Page, Ranges

#: A page's name: (channel, topics, after id), or the Ranges of a stream of several channels.
Key = "tuple[str, tuple[str, ...] | None, int] | Ranges"


class ReplayBusy(RealtimeError):
    """No page within the stream's wait: every read turn stayed taken, or the read it shares still runs.

    Raised only inside a stream, after its headers: the stream catches it (stream.py).
    """


@dataclass(frozen=True)
class ReplayPage:
    """A replay page and its frames, one per message: built once for every stream that shares
    the page (in a reconnect storm, building them per stream was a quarter of the worker's CPU)."""

    page: Page
    frames: tuple[bytes, ...]

    def up_to(self, through: int) -> ReplayPage:
        """The part a stream may replay: its ids up to `through` (the rest comes to it live)."""
        mine = self.page.up_to(through)
        return self if mine is self.page else ReplayPage(mine, self.frames[: len(mine)])


@dataclass
class _Read:
    """One read of a page, and the streams waiting for it."""

    done: threading.Event
    through: int = 0  # the page holds the messages up to this id
    page: ReplayPage | None = None
    error: BaseException | None = None
    expires: float = float("inf")


class ReplayReads:
    #: The turns to read: gevent's semaphore under its monkey-patching. A test may bring one
    #: whose timed waits run out on its own clock.
    semaphore_class: Callable[[int], Any] = threading.BoundedSemaphore

    def __init__(
        self,
        store: MessageStore,
        horizon: Callable[[], int],
        *,
        page_size: int,
        page_bytes: int,
        ttl_s: float = 1.0,
        concurrency: int = 4,
        clock: Callable[[], float] = time.monotonic,
        quiet_after: Callable[[str, int], bool] = lambda channel, after_id: False,
    ) -> None:
        self.store = store
        self.page_size, self.page_bytes = page_size, page_bytes
        self.ttl_s = ttl_s
        self._horizon = horizon  # the dispatcher's position: how far a shared read may go
        self._quiet_after = quiet_after  # no message of the channel after this id, up to the position
        self._clock = clock
        self._lock = threading.Lock()
        self._reads: dict[Key, _Read] = {}
        # The finished reads in the order they finished, which is the order they expire in (one
        # ttl_s after): forgetting the expired ones looks at those only, not at every read kept.
        self._finished: deque[tuple[Key, _Read]] = deque()
        self._slots = self.semaphore_class(concurrency)

    def page(
        self, channel: str, topics: Sequence[str] | None, after_id: int, through: int, *, wait_s: float | None = None
    ) -> ReplayPage:
        """The messages after `after_id` and up to `through`, as `MessageStore.read_after` reads them.

        Raises ReplayBusy when no turn to read, nor the shared read's page, came within `wait_s`
        (None: no limit); the read itself is bounded by the database's time limit.
        """
        return self._page((channel, tuple(topics) if topics is not None else None, after_id), (channel,), through, wait_s)

    def page_of(self, ranges: Ranges, through: int, *, wait_s: float | None = None) -> ReplayPage:
        """The same for several channels, as `MessageStore.read_after_many` reads them (docs/protocol.md §12):
        streams of the same channels, topics and starts share it."""
        return self._page(ranges, ranges.channels, through, wait_s)

    def _page(self, key: Key, channels: tuple[str, ...], through: int, wait_s: float | None) -> ReplayPage:
        while True:
            with self._lock:
                read = self._reads.get(key)
                stale = read is None or read.error is not None or self._clock() >= read.expires or (
                    read.done.is_set() and not self._covers(read, channels, through)
                )
                if stale:
                    read = self._reads[key] = _Read(threading.Event())
            if stale:
                self._read(key, read, through, wait_s)
            elif not read.done.wait(wait_s):
                raise ReplayBusy(f"the shared replay read did not finish within {wait_s:g} s")
            if read.error is not None:
                raise read.error
            if self._covers(read, channels, through):
                return read.page.up_to(through)
            # A shared read that stopped short of this stream's history end: read again.

    def _covers(self, read: _Read, channels: tuple[str, ...], through: int) -> bool:
        return read.through >= through or all(self._quiet_after(channel, read.through) for channel in channels)

    def _read(self, key: Key, read: _Read, through: int, wait_s: float | None) -> None:
        try:
            if not self._slots.acquire(timeout=wait_s):
                # Its sharers get this too: each sends a keep-alive, and one of them reads next.
                raise ReplayBusy(f"no replay read turn came free within {wait_s:g} s")
            try:
                read.through = max(through, self._horizon())
                if isinstance(key, Ranges):
                    page = self.store.read_after_many(key, self.page_size, self.page_bytes, read.through)
                else:
                    channel, topics, after_id = key
                    page = self.store.read_after(channel, topics, after_id, self.page_size, self.page_bytes, read.through)
                epoch = self.store.epoch
                read.page = ReplayPage(
                    page, tuple(sse.message_frame(f"{epoch}-{m.id}", m.topic, m.envelope_json()) for m in page)
                )
            finally:
                self._slots.release()
        except BaseException as exc:
            read.error = exc
            raise
        finally:
            with self._lock:
                read.expires = self._clock() + self.ttl_s
                self._finished.append((key, read))
            read.done.set()
            self._forget_expired()

    def _forget_expired(self) -> None:
        now = self._clock()
        with self._lock:
            while self._finished and self._finished[0][1].expires <= now:
                key, read = self._finished.popleft()
                if self._reads.get(key) is read:  # not already replaced by a newer read of the page
                    del self._reads[key]
