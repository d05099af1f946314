"""One subscriber's event stream: `retry:`, replay from the store, then live.

A plain generator of frames (bytes), so the same code serves the HTTP
endpoint and `flask realtime tail`. Its four phases, in order:

1. `retry:` first, which also makes the WSGI server send the headers at once.
2. Subscribe to live messages *before* reading history (dispatch.py says why
   that leaves no gap).
3. Replay: every retained message after the cursor, page by page, oldest
   first; `reset` first if the cursor cannot be honoured exactly.
4. Live: frames from the dispatcher, skipping ids already replayed, and the
   `: keep-alive` comments the dispatcher queues on quiet streams. With a
   `writer` the dispatcher writes them itself while the stream waits
   (fastpath.py).

It ends when the process shuts down (the client reconnects elsewhere with its
cursor), when the client stopped reading and its buffer overflowed, or when a
direct write found the client gone.
"""
from __future__ import annotations

import json
from typing import Iterator, Sequence

from .cursor import Cursor
from .dispatch import Dispatcher, message_frame
from .fastpath import SocketWriter
from .sse import format_event
from .store import MessageStore

REPLAY_PAGE = 500


def resolve_cursor(store: MessageStore, channel: str, cursor: Cursor | None) -> tuple[int, dict | None]:
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
    return through, {"reason": reason, "cursor": str(Cursor(store.epoch, through))}


def reset_frame(reset: dict) -> bytes:
    # The reset carries the position it continues from as its id, so a
    # client that drops right after it resumes from there, not from the
    # cursor that could not be honoured.
    return format_event(id=reset["cursor"], event="reset", data=json.dumps(reset)).encode()


def event_stream(
    dispatcher: Dispatcher,
    channel: str,
    topics: Sequence[str] | None,
    cursor: Cursor | None,
    *,
    retry_ms: int,
    writer: SocketWriter | None = None,
) -> Iterator[bytes]:
    store = dispatcher.store
    yield format_event(retry=retry_ms).encode()
    subscription = dispatcher.subscribe(channel, topics, writer)
    try:
        last_id, reset = resolve_cursor(store, channel, cursor)
        if reset is not None:
            yield reset_frame(reset)

        epoch = store.epoch
        first_page = True
        while True:
            page = store.read_after(channel, topics, last_id, REPLAY_PAGE)
            if first_page and cursor is not None and reset is None:
                # A prune between resolve_cursor() and this read would have
                # removed messages right after the cursor: look once more.
                through = store.pruned_through(channel)
                if through > last_id:
                    yield reset_frame({"reason": "history_truncated", "cursor": str(Cursor(epoch, through))})
            first_page = False
            for message in page:
                yield message_frame(message, epoch)
                last_id = message.id
            if len(page) < REPLAY_PAGE:
                break
        subscription.sent_through = last_id

        while True:
            frames = subscription.take()
            subscription.finish_unsent()  # a direct write the socket took only in part
            if subscription.closed_reason is not None:
                break
            chunk = []
            for message_id, frame in frames:
                if message_id == 0 or message_id > subscription.sent_through:  # 0: keep-alive
                    chunk.append(frame)
                    subscription.sent_through = max(subscription.sent_through, message_id)
            if chunk:
                yield b"".join(chunk)  # one write for everything that queued up

        if subscription.closed_reason == "shutdown":
            yield format_event(comment="server shutting down; reconnect with Last-Event-ID").encode()
    finally:
        dispatcher.unsubscribe(subscription)
