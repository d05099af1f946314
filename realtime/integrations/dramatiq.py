"""Dramatiq: `RealtimeMiddleware` announces each message's lifecycle; `publish` reports progress.

    broker.add_middleware(RealtimeMiddleware())

    @dramatiq.actor
    def generate_report(pages):
        publish("status", {"percent": 50})       # on run.<message id>
        return {"pages": pages}

The channel is `run.<message_id>` (what `actor.send(...)` returns). `running`
before each attempt; `completed` with the return value; `failed` with the error
only once Dramatiq rejects the message for good (`after_nack`, whatever the order
of the middleware): an attempt that `Retries` will retry publishes nothing, and
the next attempt says `running` again. A skipped message (an age limit) is
`cancelled`.
"""
from __future__ import annotations

import threading
from typing import Any

from dramatiq import Middleware
from dramatiq.broker import Broker, MessageProxy

from ..text_streams import TextStream
from . import lifecycle

# The message each worker thread is processing, for `publish` (Dramatiq runs one per thread).
_current = threading.local()


def publish(topic: str, data: Any) -> None:
    """Publish `data` on `run.<the current message's id>`, topic `topic` (from inside an actor)."""
    message = getattr(_current, "message", None)
    lifecycle.publish_progress(message.message_id if message is not None else None, topic, data)


def text_stream(topic: str, number: int = 1) -> TextStream:
    """A text stream on the current task's channel (docs/protocol.md §11), the same id on its retries."""
    message = getattr(_current, "message", None)
    return lifecycle.text_stream(message.message_id if message is not None else None, topic, number)


class RealtimeMiddleware(Middleware):
    def __init__(self) -> None:
        # The last attempt's error per message, until Dramatiq either retries or rejects it; written by
        # worker threads, read by the consumer thread that nacks.
        self._errors: dict[str, BaseException | None] = {}
        self._lock = threading.Lock()

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        _current.message = message
        lifecycle.running(message.message_id)

    def after_process_message(
        self, broker: Broker, message: MessageProxy, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        _current.message = None
        with self._lock:
            if exception is None:
                self._errors.pop(message.message_id, None)
            else:
                self._errors[message.message_id] = exception
        if exception is None:
            lifecycle.completed(message.message_id, result)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        _current.message = None
        if message.failed:  # a nack follows: it must not announce the message again
            with self._lock:
                self._errors[message.message_id] = None
        lifecycle.cancelled(message.message_id)

    def after_nack(self, broker: Broker, message: MessageProxy) -> None:
        with self._lock:
            known = message.message_id in self._errors
            error = self._errors.pop(message.message_id, None)
        if error is not None or not known:
            lifecycle.failed(message.message_id, error if error is not None else "rejected by the worker")
