"""HTTP endpoints of docs/protocol.md §4 "Jobs: events and runs": translate requests to `Jobs` calls.

Every input is checked before anything is written; failures raise `JobError`s,
which common/errors.py turns into JSON. Nothing here touches the database.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, current_app

from common.request_input import bearer_matches, bearer_token, check_content_type, json_body

from .errors import EventTooLarge, InvalidCancelToken, InvalidEvent, InvalidEventKey, RunNotFound
from .extension import Jobs
from .records import Run

blueprint = Blueprint("jobs", __name__, url_prefix="/api")


def _jobs() -> Jobs:
    return current_app.extensions["jobs"]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(timezone.utc).isoformat(timespec="microseconds")


def run_json(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "function": run.function_id,
        "status": run.status,
        "output": run.output,
        "error": run.error,
        "attempt": run.attempt,
        "steps": [{"id": s.id, "status": s.status, "attempts": s.attempts} for s in run.steps],
        "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at),
        "ended_at": _iso(run.ended_at),
    }


def require_event_key(jobs: Jobs, action: str) -> None:
    """With JOBS_EVENT_KEY set, whatever starts or stops runs needs it as a bearer token (401)."""
    if jobs.event_key and not bearer_matches(jobs.event_key):
        raise InvalidEventKey(f"{action} needs 'Authorization: Bearer <JOBS_EVENT_KEY>'")


@blueprint.post("/events")
def send_events() -> tuple[dict[str, Any], int]:
    jobs = _jobs()
    require_event_key(jobs, "sending events")
    body = json_body(jobs.max_body_bytes, too_large=EventTooLarge)
    items = body if isinstance(body, list) else [body]
    if not all(isinstance(item, dict) for item in items):
        raise InvalidEvent(
            'the body must be an event {"name": ..., "data": {...}} or a list of them', code="invalid_json"
        )
    return jobs.send_many([(item.get("name"), item.get("data", {})) for item in items]), 202


@blueprint.get("/runs/<run_id>")
def get_run(run_id: str) -> dict[str, Any]:
    run = _jobs().run(run_id)
    if run is None:
        raise RunNotFound(f"there is no run {run_id!r}; run ids come from POST /api/events")
    return run_json(run)


@blueprint.post("/runs/<run_id>/cancel")
def cancel_run(run_id: str) -> tuple[dict[str, Any], int]:
    jobs = _jobs()
    # The operator's key, or the run's own cancel capability (capabilities.py). Where no key is
    # needed, a bearer that is no current capability of this run is still refused: its page
    # learns that it must ask for a new one.
    token = bearer_token()
    if token is None or not jobs.cancel_tokens.allows(token, run_id):
        require_event_key(jobs, "cancelling a run without its cancel token")
        if token is not None and not jobs.event_key:
            raise InvalidCancelToken(
                "the bearer token is not a current cancel token of this run; ask the app for a new one"
            )
    check_content_type()  # no body is read, but a cross-site form must not get this far
    jobs.cancel(run_id)
    return run_json(jobs.run(run_id)), 202
