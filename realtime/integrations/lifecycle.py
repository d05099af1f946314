"""The messages every integration publishes, shaped as this project's own runs publish them
(jobs/extension.py `_announce`): `{"status": "running"}`, `{"status": "completed", "output": ...}`,
`{"status": "failed", "error": "ValueError"}`, `{"status": "cancelled"}` on topic `run`. The error is its
type alone unless it is a `PublicError` (common/errors.py `describe`): browsers read it."""
from __future__ import annotations

import logging
from typing import Any

from common.errors import AppError, describe

from ..errors import InvalidRequest, MessageTooLarge
from ..publisher import shared_publisher
from ..text_streams import TextStream

log = logging.getLogger(__name__)

RUN_TOPIC = "run"


def channel_for(task_id: str) -> str:
    return f"run.{task_id}"


def publish_progress(task_id: str | None, topic: str, data: Any) -> None:
    """A task's own message on its channel; raises when there is no task or the message is bad."""
    if not task_id:
        raise RuntimeError("publish() needs a running task: it publishes on run.<task id>")
    shared_publisher().publish(channel_for(task_id), topic, data, run_id=task_id)


def text_stream(task_id: str | None, topic: str, number: int) -> TextStream:
    """The task's `number`th text stream on its channel (docs/protocol.md §11): its id is the
    same on every retry of the task, so a retry restarts it (`seq` 0) instead of adding to it."""
    if not task_id:
        raise RuntimeError("text_stream() needs a running task: it streams on run.<task id>")
    return shared_publisher().text_stream(channel_for(task_id), topic, f"{task_id}:text:{number}", run_id=task_id)


def running(task_id: str) -> None:
    _announce(task_id, {"status": "running"})


def completed(task_id: str, output: Any) -> None:
    _announce(task_id, {"status": "completed", "output": output})


def failed(task_id: str, error: BaseException | str) -> None:
    text = error if isinstance(error, str) else describe(error)
    _announce(task_id, {"status": "failed", "error": text})


def cancelled(task_id: str) -> None:
    _announce(task_id, {"status": "cancelled"})


def _announce(task_id: str, data: dict[str, Any]) -> None:
    """Publish a lifecycle message, never failing the task for it: a queue's signal handler
    or callback must not turn a finished task into a failed one."""
    try:
        try:
            shared_publisher().publish(channel_for(task_id), RUN_TOPIC, data, run_id=task_id)
        except (MessageTooLarge, InvalidRequest) as exc:
            if not (isinstance(exc, MessageTooLarge) or exc.code == "invalid_data"):
                raise
            # An output that is too large or not JSON stays with the queue's result backend.
            shared_publisher().publish(channel_for(task_id), RUN_TOPIC, {"status": data["status"], "truncated": True},
                                       run_id=task_id)
    except (AppError, OSError) as exc:  # the database away (503), DATABASE_URL unset, a bad task id
        log.warning("could not publish %s of task %s: %s", data["status"], task_id, exc)
