"""Celery: `RealtimeTask`, a task base class that publishes progress and lifecycle (docs/protocol.md §10).

    @app.task(base=RealtimeTask, bind=True)
    def generate_report(self, pages):
        self.publish("status", {"percent": 50})     # on run.<task id>
        with self.text_stream("answer") as out:      # an LLM's answer, growing in the page
            out.write("Here is the report")
        return {"pages": pages}                      # -> {"status": "completed", "output": ...} on topic run

The lifecycle comes from Celery's signals, in the worker: `task_prerun` (running),
`task_success` (completed, with the return value), `task_failure` (failed, with
the error), `task_revoked` (cancelled). A retry publishes nothing of its own: the
next attempt says `running` again. Only tasks with this base are announced.
"""
from __future__ import annotations

from typing import Any

from celery import Task, signals

from ..text_streams import TextStream
from . import lifecycle


class RealtimeTask(Task):
    def publish(self, topic: str, data: Any) -> None:
        """Publish `data` on `run.<this task's id>`, topic `topic` (from inside the running task)."""
        lifecycle.publish_progress(self.request.id, topic, data)

    def text_stream(self, topic: str, number: int = 1) -> TextStream:
        """A text stream on `run.<this task's id>` (docs/protocol.md §11); `number` tells a task's
        several streams apart, and keeps each one's id across the task's retries."""
        return lifecycle.text_stream(self.request.id, topic, number)


def _ours(task: Any) -> bool:
    return isinstance(task, RealtimeTask)


@signals.task_prerun.connect
def _running(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    if _ours(sender) and task_id:
        lifecycle.running(task_id)


@signals.task_success.connect
def _completed(sender: Any = None, result: Any = None, **_: Any) -> None:
    if _ours(sender) and sender.request.id:
        lifecycle.completed(sender.request.id, result)


@signals.task_failure.connect
def _failed(sender: Any = None, task_id: str | None = None, exception: BaseException | None = None, **_: Any) -> None:
    if _ours(sender) and task_id:
        lifecycle.failed(task_id, exception if exception is not None else "unknown error")


@signals.task_revoked.connect
def _cancelled(sender: Any = None, request: Any = None, **_: Any) -> None:
    if _ours(sender) and request is not None and request.id:
        lifecycle.cancelled(request.id)
