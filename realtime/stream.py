"""One subscriber's event stream: `retry:`, replay from the store, then live.

A plain generator of frames (bytes), so the same code serves the HTTP
endpoint and `flask realtime tail`. Its four phases, in order:

1. `retry:` first, which also makes the WSGI server send the headers at once.
2. Subscribe to live messages *before* reading history (dispatch.py says why
   that leaves no gap).
3. Replay: every retained message after the cursor, page by page, oldest
   first; `reset` first if the cursor cannot be honoured exactly.
4. Live: frames from the dispatcher, skipping ids already replayed, and the
   `: keep-alive` comments it queues on quiet streams; everything queued
   since the last wake-up goes out as one write.

While the database is away, replay waits and sends keep-alives, and live
frames wait in the dispatcher: the stream stays open and misses nothing.

A stream of several channels (docs/protocol.md §12) runs the same phases over
a `Scope` of all of them: one subscription, one replay read per page for
every channel, one cursor. Each channel may start from its own position
(`since`), and `reset` names the channels it concerns.
It ends when the process shuts down (the client reconnects elsewhere with its
cursor) or when the client stopped reading: its queue overflowed, or a write
waited REALTIME_SEND_TIMEOUT_S (dispatch.py cuts it).
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

from common.database import DatabaseUnavailable

from . import metrics, sse
from .cursor import Cursor
from .dispatch import Clock, Dispatcher, Subscription
from .replay import ReplayBusy, ReplayPage
from .store import MessageStore, Page, Ranges

log = logging.getLogger(__name__)

WRITE_BYTES = 64 * 1024  # frames joined into one write up to about this size


@dataclass(frozen=True)
class Reset:
    """Why a cursor could not be honoured, and the position the stream goes on from."""

    reason: str  # "history_truncated" | "unknown_cursor"
    cursor: str
    #: On a stream of several channels, the channels it concerns: the others go on exactly.
    channels: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        if self.channels is None:
            return {"reason": self.reason, "cursor": self.cursor}
        return {"reason": self.reason, "cursor": self.cursor, "channels": list(self.channels)}

    def frame(self) -> bytes:
        return sse.reset_frame(self.reason, self.cursor, self.channels)


def pruned_after(page: Page, after_id: int, epoch: str) -> Reset | None:
    """`history_truncated` when messages right after `after_id` were pruned before `page` was read
    (its mark comes from the page's own snapshot): said, never skipped silently."""
    if page.pruned_through > after_id:
        return Reset("history_truncated", str(Cursor(epoch, page.pruned_through)))
    return None


def resolve_cursor(store: MessageStore, channel: str, cursor: Cursor | None) -> tuple[int, Reset | None]:
    """Where to continue: (read after this id, the reset to report or None).

    A cursor that cannot be honoured exactly continues from the oldest
    retained message, and says why (docs/protocol.md §6):
    - `history_truncated`: messages after it were pruned;
    - `unknown_cursor`: it comes from another database, or it is ahead of
      every message (the database was restored from an older backup): kept
      as is, it would silently skip the next messages.
    """
    if cursor is None:
        return 0, None
    through = store.pruned_through(channel)
    if cursor.epoch != store.epoch:
        reason = "unknown_cursor"
    elif cursor.message_id < through:
        reason = "history_truncated"
    elif cursor.message_id > through and cursor.message_id > store.last_id():
        reason = "unknown_cursor"
    else:
        return cursor.message_id, None
    return through, Reset(reason, str(Cursor(store.epoch, through)))


def open_stream(
    dispatcher: Dispatcher,
    channel: str,
    topics: Sequence[str] | None,
    cursor: Cursor | None,
    *,
    retry_ms: int,
    request_id: str | None = None,
) -> Iterator[bytes]:
    """Place the cursor now, then return the stream's frames.

    What needs the database before the first byte happens here, so a
    database that is away is a 503 with Retry-After, not a stream that opens
    and then says nothing.
    """
    dispatcher.prime()
    store = dispatcher.store
    store.epoch  # read once per process, here: never inside the stream, after its headers went out
    if cursor is not None and cursor.epoch == store.epoch and cursor.message_id <= dispatcher.position:
        # The usual resume, the one a reconnect storm is made of: no lookup per
        # stream. Whether messages after the cursor were pruned is read with
        # the first replay page, which streams from one cursor share.
        start: tuple[int, Reset | None] = (cursor.message_id, None)
    else:
        start = resolve_cursor(store, channel, cursor)
    return event_stream(dispatcher, OneChannel(channel, topics), cursor, start, retry_ms=retry_ms, request_id=request_id)


def resolve_starts(
    store: MessageStore,
    position: int,
    channels: Sequence[str],
    cursor: Cursor | None,
    *,
    since: Mapping[str, Cursor | None] | None = None,
    progress: Cursor | None = None,
) -> tuple[dict[str, int], Reset | None]:
    """Where each channel of a stream of several continues (docs/protocol.md §12): (after this id, by
    channel; the reset to report or None).

    Without `since`, every channel continues from `cursor`. With it, a channel it names starts from
    its own position (None: its oldest retained message), the others from `cursor`, and `progress`
    (the `Last-Event-ID` a reconnecting EventSource sends, its URL unchanged) moves each one on to
    itself when later: the stream is in id order, so a client that got the frame of id N has every
    message of every channel whose start was below N, up to N. A cursor of another database counts
    as lower than any of this one's.

    A start from another database, or ahead of every message, is `unknown_cursor`: that channel
    starts from its oldest retained message, and the reset names it. Whether messages after a start
    were pruned is read with each replay page (`Scope.pruned`), so this needs no lookup per channel.
    """
    epoch = store.epoch
    starts: dict[str, int] = {}
    unknown: list[str] = []
    newest: int | None = None
    for channel in channels:
        at = cursor
        if since is not None:
            at = _later(since.get(channel, cursor), progress, epoch)
        if at is None:
            starts[channel] = 0
            continue
        if at.epoch == epoch and at.message_id > position:
            newest = store.last_id() if newest is None else newest
        if at.epoch != epoch or (at.message_id > position and at.message_id > (newest or 0)):
            unknown.append(channel)
            starts[channel] = 0
        else:
            starts[channel] = at.message_id
    if not unknown:
        return starts, None
    return starts, Reset("unknown_cursor", str(Cursor(epoch, 0)), tuple(unknown))


def _later(start: Cursor | None, progress: Cursor | None, epoch: str) -> Cursor | None:
    if start is None or progress is None:
        return start or progress
    if start.epoch == progress.epoch:
        return start if start.message_id >= progress.message_id else progress
    return start if start.epoch == epoch else progress


def open_scope_stream(
    dispatcher: Dispatcher,
    scope: Mapping[str, Sequence[str] | None],
    cursor: Cursor | None,
    *,
    since: Mapping[str, Cursor | None] | None = None,
    progress: Cursor | None = None,
    retry_ms: int,
    request_id: str | None = None,
) -> Iterator[bytes]:
    """`open_stream` for several channels (docs/protocol.md §12): their starts placed now, then the frames."""
    dispatcher.prime()
    store = dispatcher.store
    store.epoch  # read before the first byte, as open_stream does
    starts, reset = resolve_starts(store, dispatcher.position, list(scope), cursor, since=since, progress=progress)
    ranges = Ranges.of(scope, starts)
    resumed = progress or cursor or next((c for c in (since or {}).values() if c is not None), None)
    return event_stream(
        dispatcher, Scope(ranges), resumed, (ranges.first, reset), retry_ms=retry_ms, request_id=request_id
    )


class OneChannel:
    """What a stream of one channel subscribes to and replays: the form since the first version.
    Held by every idle stream for hours: two slots, nothing more."""

    __slots__ = ("channel", "topics")
    prunes_known_per_channel = False  # the first page's prune mark means lost messages only after a cursor

    def __init__(self, channel: str, topics: Sequence[str] | None) -> None:
        self.channel, self.topics = channel, topics

    @property
    def channels(self) -> tuple[str, ...]:
        return (self.channel,)

    def subscribe(self, dispatcher: Dispatcher) -> Subscription:
        return dispatcher.subscribe(self.channel, self.topics)

    def settle(self, store: MessageStore) -> None:
        store.settled_through(self.channel)

    def page(self, dispatcher: Dispatcher, after_id: int, through: int, wait_s: float) -> ReplayPage:
        return dispatcher.replays.page(self.channel, self.topics, after_id, through, wait_s=wait_s)

    def pruned(self, page: Page, after_id: int, epoch: str) -> Reset | None:
        return pruned_after(page, after_id, epoch)


class Scope:
    """What a stream of several channels subscribes to and replays (docs/protocol.md §12): each
    channel with its topics (None: all) and the id after which it starts."""

    prunes_known_per_channel = True  # each page says which channels were pruned past their start

    def __init__(self, ranges: Ranges) -> None:
        self.ranges = ranges
        self.channels = ranges.channels

    def subscribe(self, dispatcher: Dispatcher) -> Subscription:
        return dispatcher.subscribe_many({channel: topics for channel, topics, _ in self.ranges.items})

    def settle(self, store: MessageStore) -> None:
        store.settled_through_all(self.channels)

    def page(self, dispatcher: Dispatcher, after_id: int, through: int, wait_s: float) -> ReplayPage:
        return dispatcher.replays.page_of(self.ranges.after(after_id), through, wait_s=wait_s)

    def pruned(self, page: Page, after_id: int, epoch: str) -> Reset | None:
        """`history_truncated` for the channels pruned past where they start (the page's SQL says which).

        Retention deletes a prefix of ids, every channel's (prune.py): no message of any channel
        is retained at or below the highest mark, so every channel goes on from there, and the
        channels not named lose nothing."""
        if page.pruned_through > after_id:
            return Reset("history_truncated", str(Cursor(epoch, page.pruned_through)), page.pruned_channels)
        return None


def event_stream(
    dispatcher: Dispatcher,
    scope: OneChannel | Scope,
    cursor: Cursor | None,
    start: tuple[int, Reset | None],
    *,
    retry_ms: int,
    request_id: str | None = None,
) -> Iterator[bytes]:
    store, clock = dispatcher.store, dispatcher.clock
    resume: str | None = None  # for the log line at the end; no dict held for hours per idle stream
    yield sse.retry_frame(retry_ms)
    subscription = scope.subscribe(dispatcher)
    opened = clock()
    metrics.STREAMS_OPENED.inc()
    metrics.STREAMS_OPEN.inc()
    try:
        last_id, reset = start
        epoch = store.epoch
        replayed: list[bytes] = [reset.frame()] if reset is not None else []
        # Whether a prune mark past the position means lost messages: always after the first
        # page; on the first, only for a cursor (without one, the stream starts at the oldest).
        check_prune = scope.prunes_known_per_channel or (cursor is not None and reset is None)
        quiet_since = clock()
        while subscription.closed_reason is None:
            try:
                # A replay read waits at most a heartbeat: a stream opened as
                # the database stalls keeps its client with keep-alives.
                with store.db.time_limit(dispatcher.heartbeat_s):
                    if not subscription.history_settled:
                        # This process started while a transaction on the channel was in
                        # flight: its messages below history_through may still commit.
                        scope.settle(store)
                        subscription.history_settled = True
                    shared = scope.page(
                        dispatcher, last_id, subscription.history_through,
                        # A turn to read (replay.py) is waited for until a keep-alive is due.
                        max(0.0, quiet_since + dispatcher.heartbeat_s - dispatcher.tick_s - clock()),
                    )
            except (DatabaseUnavailable, ReplayBusy) as away:
                if clock() - quiet_since >= dispatcher.heartbeat_s - dispatcher.tick_s:
                    replayed.append(sse.KEEP_ALIVE)
                if replayed:  # quiet since the last write, however often it asked in between
                    yield from _write(subscription, clock, replayed)
                    replayed, quiet_since = [], clock()
                if isinstance(away, DatabaseUnavailable):
                    threading.Event().wait(dispatcher.tick_s)  # the database is away: do not spin
                continue
            page = shared.page
            pruned = scope.pruned(page, last_id, epoch) if check_prune else None
            if pruned is not None:
                reset = pruned
                replayed.append(reset.frame())
                last_id = page.pruned_through
            check_prune = True
            if cursor is not None and resume is None:
                resume = reset.reason if reset is not None else "exact"
                metrics.RESUMES.labels(resume).inc()
            yield from _write(subscription, clock, itertools.chain(replayed, shared.frames))
            metrics.FRAMES_SENT.inc(len(page))
            last_id = page[-1].id if page else last_id
            replayed, quiet_since = [], clock()
            if not page.more:
                break
        # Live from here, maybe for hours: hold no page and no frame of the replay.
        shared = page = replayed = None  # type: ignore[assignment]

        while True:
            queued = subscription.take()
            if subscription.closed_reason is not None:
                break
            frames = []
            for message_id, frame in queued:
                if message_id == 0 or message_id > last_id:  # 0: a keep-alive
                    frames.append(frame)
                    last_id = max(last_id, message_id)
            yield from _write(subscription, clock, frames)

        if subscription.closed_reason == "shutdown":
            yield sse.SHUTDOWN
    finally:
        dispatcher.unsubscribe(subscription)
        _ended(subscription, scope.channels, clock() - opened, request_id, resume)


def _ended(subscription: Subscription, channels: tuple[str, ...], duration: float, request_id: str | None,
           resume: str | None) -> None:
    """The metrics and the log line of a stream that ended (a function of its own: every local
    of event_stream is held in each idle stream's generator, for hours)."""
    reason = subscription.closed_reason or "client_gone"
    metrics.STREAMS_OPEN.dec()
    metrics.STREAMS_CLOSED.labels(reason).inc()
    # The channel's hash, never its name: channel names may name users or runs.
    channel_hash = hashlib.sha256(" ".join(channels).encode()).hexdigest()[:12]
    log.info(
        "stream ended: channel %s, %s, %d frames, %d bytes in %.1f s",
        channel_hash, reason, subscription.sent_frames, subscription.sent_bytes, duration,
        extra={"request_id": request_id, **({"resume": resume} if resume else {}),
               "channel_hash": channel_hash, "close_reason": reason,
               "duration_s": round(duration, 3), "frames": subscription.sent_frames,
               "bytes": subscription.sent_bytes},
    )


def _write(subscription: Subscription, clock: Clock, frames: Iterable[bytes]) -> Iterator[bytes]:
    """Frames as few writes as possible, none much over WRITE_BYTES, each timed.

    Small frames are joined (one write per wake-up); a large frame goes out
    on its own, the very bytes object every subscriber shares, never a copy.
    `writing_since` lets the dispatcher cut a client that stopped reading.
    """
    batch: list[bytes] = []
    size = 0
    for frame in frames:
        subscription.sent_frames += frame is not sse.KEEP_ALIVE  # frames that carry an event
        subscription.sent_bytes += len(frame)
        if batch and size + len(frame) > WRITE_BYTES:
            subscription.writing_since = clock()
            yield batch[0] if len(batch) == 1 else b"".join(batch)
            batch, size = [], 0
        batch.append(frame)
        size += len(frame)
    if batch:
        subscription.writing_since = clock()
        yield batch[0] if len(batch) == 1 else b"".join(batch)
    subscription.writing_since = None
