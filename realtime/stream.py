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

It ends when the process shuts down (the client reconnects elsewhere with its
cursor) or when the client stopped reading and its queue overflowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from . import sse
from .cursor import Cursor
from .dispatch import Dispatcher
from .store import MessageStore

REPLAY_PAGE = 500


@dataclass(frozen=True)
class Reset:
    """Why a cursor could not be honoured, and the position the stream goes on from."""

    reason: str  # "history_truncated" | "unknown_cursor"
    cursor: str

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "cursor": self.cursor}

    def frame(self) -> bytes:
        return sse.reset_frame(self.reason, self.cursor)


def resolve_cursor(store: MessageStore, channel: str, cursor: Cursor | None) -> tuple[int, Reset | None]:
    """Where to continue: (read after this id, the reset to report or None).

    A cursor that cannot be honoured exactly continues from the oldest
    retained message, and says why (CONTRACT §4):
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


def event_stream(
    dispatcher: Dispatcher,
    channel: str,
    topics: Sequence[str] | None,
    cursor: Cursor | None,
    *,
    retry_ms: int,
) -> Iterator[bytes]:
    store = dispatcher.store
    yield sse.retry_frame(retry_ms)
    subscription = dispatcher.subscribe(channel, topics)
    try:
        last_id, reset = resolve_cursor(store, channel, cursor)
        if reset is not None:
            yield reset.frame()

        epoch = store.epoch
        first_page = True
        while True:
            page = store.read_after(channel, topics, last_id, REPLAY_PAGE)
            if first_page and cursor is not None and reset is None:
                # A prune between resolve_cursor() and this read would have
                # removed messages right after the cursor: look once more.
                through = store.pruned_through(channel)
                if through > last_id:
                    yield Reset("history_truncated", str(Cursor(epoch, through))).frame()
            first_page = False
            for message in page:
                yield sse.message_frame(f"{epoch}-{message.id}", message.topic, message.envelope_json())
                last_id = message.id
            if len(page) < REPLAY_PAGE:
                break

        while True:
            queued = subscription.take()
            if subscription.closed_reason is not None:
                break
            chunk = []
            for message_id, frame in queued:
                if message_id == 0 or message_id > last_id:  # 0: a keep-alive
                    chunk.append(frame)
                    last_id = max(last_id, message_id)
            if chunk:
                yield b"".join(chunk)

        if subscription.closed_reason == "shutdown":
            yield sse.SHUTDOWN
    finally:
        dispatcher.unsubscribe(subscription)
