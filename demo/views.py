"""The demo's routes: the page, starting a report, its tokens and its PDF.

    GET  /                 the page (templates/index.html); `/?run=<id>` picks runs up again
    POST /demo/reports     send `report.requested`, answer the run and a subscription token
    POST /demo/token       a fresh token for a run's channel (the client's token refresh)
    GET  /reports/<run_id> the report's PDF, once its run has saved it

The browser gets tokens, never the SECRET_KEY that signs them. Like the app's
authorization policy (app.py), the demo lets anyone watch any run; a real app
would check here that the run belongs to the signed-in user.

Starting a report starts a run, so it needs JOBS_EVENT_KEY when that key is
set, like `POST /api/events`. The page cannot send it (keys never go to a
browser): a server with that key runs with DEMO_ENABLED off (app.py).
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, render_template
from flask.typing import ResponseReturnValue

from common.errors import AppError, error_response
from common.request_input import bearer_matches, check_content_type, json_object
from jobs.errors import InvalidEventKey
from jobs.records import is_id
from realtime import Grant

from .report import REPORT_FILE

blueprint = Blueprint("demo", __name__)

# A report run publishes on channel `run.<run_id>`: progress, log lines and its status.
REPORT_TOPICS = ("status", "log", "run")


def _grant_json(run_id: str, grant: Grant) -> dict[str, Any]:
    return {"run_id": run_id, **grant.to_json()}


def _token_for(run_id: str) -> Grant:
    return current_app.extensions["realtime"].create_token(f"run.{run_id}", REPORT_TOPICS)


@blueprint.get("/")
def index() -> str:
    return render_template("index.html", jobs_available="jobs" in current_app.extensions)


@blueprint.post("/demo/reports")
def start_report() -> ResponseReturnValue:
    jobs = current_app.extensions.get("jobs")
    if jobs is None:
        return error_response(
            503, "jobs_unavailable",
            "the job runner is not installed in this app, so no report can start; "
            "runs already started can still be watched with /?run=<id>",
        )
    if jobs.event_key and not bearer_matches(jobs.event_key):
        raise InvalidEventKey(
            "this server sets JOBS_EVENT_KEY, which the demo page cannot send (keys never go to a browser). "
            "The demo needs JOBS_EVENT_KEY unset, or DEMO_ENABLED off on a server that keeps the key; "
            "a script may send 'Authorization: Bearer <JOBS_EVENT_KEY>'"
        )
    check_content_type()  # the page sends `{}`, which is not read; a cross-site form must not get here
    sent = jobs.send("report.requested", {"title": "Sales report"})
    runs = sent.get("runs") or []
    if not runs:
        return error_response(
            503, "no_report_function", "no job function is registered for the event 'report.requested'"
        )
    run_id = runs[0]["id"]
    return _grant_json(run_id, _token_for(run_id)), 201


@blueprint.post("/demo/token")
def refresh_token() -> ResponseReturnValue:
    run_id = json_object().get("run_id")
    if not isinstance(run_id, str) or not run_id:
        return error_response(400, "invalid_run_id", "the body must be {\"run_id\": \"<id of a report run>\"}")
    # create_token checks the channel name: an id with other characters is a 400.
    return _grant_json(run_id, _token_for(run_id))


class ReportNotFound(AppError):
    status = 404
    code = "report_not_found"


@blueprint.get("/reports/<run_id>")
def download(run_id: str) -> Response:
    # Only ids shaped like ours reach the query (PostgreSQL refuses a NUL with an error).
    stored = current_app.extensions["demo"].files.load(run_id, REPORT_FILE) if is_id(run_id) else None
    if stored is None:
        raise ReportNotFound(
            f"there is no report for run {run_id!r} (yet); it exists once the run's "
            "status on channel run.<run_id> says 'done'"
        )
    return Response(
        stored.content,
        mimetype=stored.content_type,
        headers={"Content-Disposition": f'inline; filename="report-{run_id}.pdf"'},
    )
