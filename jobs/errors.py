"""Errors of the jobs package.

`JobError` is the root of what a client can get wrong (a bad event, an unknown
run, ...): like `RealtimeError`, each subclass carries its HTTP `status` and
snake_case `code` as class attributes and a `message` for the person who has to
fix the request; common/errors.py turns them into docs/protocol.md §3 JSON.

`NonRetriableError` is different: job code raises it to say "retrying cannot
help", and the run fails at once instead of after its retries.
"""
from __future__ import annotations

from common.errors import AppError


class JobError(AppError):
    """The root of the jobs package's errors."""


class InvalidEvent(JobError):
    """An event body, name or data the contract does not allow (400)."""

    code = "invalid_event"


class EventTooLarge(JobError):
    status = 413
    code = "event_too_large"


class InvalidEventKey(JobError):
    status = 401
    code = "invalid_event_key"


class InvalidCancelToken(JobError):
    status = 401
    code = "invalid_cancel_token"


class RunNotFound(JobError):
    status = 404
    code = "run_not_found"


class RunFinished(JobError):
    """The run already ended: there is nothing left to cancel (409)."""

    status = 409
    code = "run_finished"


class NonRetriableError(Exception):
    """Raise from a job function or step to fail the run now, without retries."""
