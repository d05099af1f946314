"""RQ: progress from inside a job, and its lifecycle from RQ's callbacks.

    @realtime_job                                 # publishes "running" as the job starts
    def generate_report(pages):
        publish("status", {"percent": 50})        # on run.<job id>
        return {"pages": pages}

    job = enqueue(queue, generate_report, 3)      # queue.enqueue(...) with on_success/on_failure/on_stopped

RQ has callbacks for a job's end but none for its start, hence the decorator.
The callbacks run in the worker: `on_success` publishes `completed` with the
return value, `on_failure` `failed` with the error (RQ also calls it for a job
whose work horse died, when it cleans up abandoned jobs), `on_stopped`
(`rq.command.send_stop_job_command`) `cancelled`. A forked work horse ends with
`os._exit`, so its last NOTIFY may never leave: streams then see its messages at
their safety poll (REALTIME_SAFETY_POLL_S, 1 s), never later.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

from rq import Queue, get_current_job
from rq.job import Callback, Job

from ..text_streams import TextStream
from . import lifecycle

F = TypeVar("F", bound=Callable[..., Any])


def publish(topic: str, data: Any) -> None:
    """Publish `data` on `run.<the current job's id>`, topic `topic` (from inside a running job)."""
    job = get_current_job()
    lifecycle.publish_progress(job.id if job is not None else None, topic, data)


def text_stream(topic: str, number: int = 1) -> TextStream:
    """A text stream on the current task's channel (docs/protocol.md §11), the same id on its retries."""
    job = get_current_job()
    return lifecycle.text_stream(job.id if job is not None else None, topic, number)


def realtime_job(func: F) -> F:
    """Publish `running` on the job's channel when `func` starts as an RQ job."""

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        job = get_current_job()
        if job is not None:
            lifecycle.running(job.id)
        return func(*args, **kwargs)

    return run  # type: ignore[return-value]


def on_success(job: Job, connection: Any, result: Any, *args: Any, **kwargs: Any) -> None:
    lifecycle.completed(job.id, result)


def on_failure(job: Job, connection: Any, exc_type: type | None, exc_value: BaseException | None, *args: Any) -> None:
    lifecycle.failed(job.id, exc_value if exc_value is not None else getattr(exc_type, "__name__", "unknown error"))


def on_stopped(job: Job, connection: Any) -> None:
    lifecycle.cancelled(job.id)


CALLBACKS = {"on_success": Callback(on_success), "on_failure": Callback(on_failure), "on_stopped": Callback(on_stopped)}


def enqueue(queue: Queue, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Job:
    """`queue.enqueue(func, *args, **kwargs)` with this module's callbacks."""
    return queue.enqueue(func, *args, **CALLBACKS, **kwargs)
