"""Job functions and the registry that maps event names to them.

    @function(id="generate-report", trigger="report.requested", retries=3)
    def generate_report(ctx): ...

    jobs.register(generate_report)      # or @jobs.function(...) to do both at once

A `JobFunction` is a plain description (id, trigger, retry and concurrency
policy) around the callable; it knows nothing about storage or threads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .types import JSON

if TYPE_CHECKING:
    from .steps import Context

# Event names: "report.requested", "app/user.signup" (Inngest's style).
EVENT_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,199}")
FUNCTION_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,99}")

Handler = Callable[["Context"], JSON]


@dataclass(frozen=True)
class JobFunction:
    id: str
    trigger: str
    handler: Handler
    retries: int = 3  # retries after the first attempt, so retries=3 means up to 4 attempts
    concurrency: int | None = None  # at most this many runs executing at once, across all workers

    def __post_init__(self) -> None:
        if not FUNCTION_ID_PATTERN.fullmatch(self.id):
            raise ValueError(f"function id {self.id!r} must match {FUNCTION_ID_PATTERN.pattern}")
        if not EVENT_NAME_PATTERN.fullmatch(self.trigger):
            raise ValueError(f"trigger {self.trigger!r} must match {EVENT_NAME_PATTERN.pattern}")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1 or None (unlimited)")

    @property
    def max_attempts(self) -> int:
        return self.retries + 1

    def __call__(self, ctx: "Context") -> JSON:
        return self.handler(ctx)


def function(
    *, id: str, trigger: str, retries: int = 3, concurrency: int | None = None
) -> Callable[[Handler], JobFunction]:
    """Describe `handler` as a job function triggered by events named `trigger`."""

    def wrap(handler: Handler) -> JobFunction:
        return JobFunction(id, trigger, handler, retries, concurrency)

    return wrap


class Registry:
    def __init__(self) -> None:
        self._by_id: dict[str, JobFunction] = {}

    def add(self, job_function: JobFunction) -> JobFunction:
        if job_function.id in self._by_id and self._by_id[job_function.id] is not job_function:
            raise ValueError(f"a different function is already registered as {job_function.id!r}")
        self._by_id[job_function.id] = job_function
        return job_function

    def get(self, function_id: str) -> JobFunction | None:
        return self._by_id.get(function_id)

    def triggered_by(self, event_name: str) -> list[JobFunction]:
        """The functions an event named `event_name` starts, in registration order."""
        return [f for f in self._by_id.values() if f.trigger == event_name]

    @property
    def ids(self) -> list[str]:
        return list(self._by_id)

    @property
    def concurrency_limits(self) -> dict[str, int]:
        return {f.id: f.concurrency for f in self._by_id.values() if f.concurrency is not None}
