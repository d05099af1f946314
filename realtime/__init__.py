"""Durable realtime channels streamed over server-sent events.

    publish() ──> store (SQL table) ──> change feed ──> dispatcher ──> streams ──> SSE clients
                  append, in id order   NOTIFY / poll    one read,       replay, then live
                                                          many streams

Modules, one idea each: `sse` (every frame of the wire format), `cursor`,
`tokens`, `names`, `store` (the only SQL, with `schema`, `appends`, `reads`,
`queries`, `visibility`, `prune` and `folding` beside it), `changes` (cross-process
wake-up), `dispatch` (in-process fan-out, with `ticker`: keep-alives and send
timeouts), `stream` (one subscriber),
`text_streams` (text that grows while a job writes it, and its flusher),
`client` (a Python subscriber, with `backoff`), `extension` (the Flask
extension and Python API), `views` (HTTP), `cli` (`flask realtime ...`).
"""
from .errors import RealtimeError
from .extension import Realtime
from .store import Message
from .tokens import Grant

__all__ = ["Grant", "Message", "Realtime", "RealtimeError"]
