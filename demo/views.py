"""The demo's routes: the page, starting a report or a question, their tokens and the PDF.

    GET  /                 the page (templates/index.html); `/?run=<id>` picks runs up again
    POST /demo/reports     send `report.requested`, answer the run and a subscription token
    POST /demo/ask         send `ask.requested` {"prompt"}, answer the same for the answer's run
    POST /demo/token       a fresh token for a run's channel (the client's token refresh)
    GET  /reports/<run_id> the report's PDF, once its run has saved it

The browser gets tokens, never the SECRET_KEY that signs them. Like the app's
authorization policy (app.py), the demo lets anyone watch any run; a real app
would check here that the run belongs to the signed-in user.

Each grant also holds a `cancel_token` (jobs/capabilities.py): the page's
Stop sends it to `POST /api/runs/<id>/cancel`, as only a key that never goes
to a browser could otherwise. It is handed out for the demo's own runs, to
anyone, as watching them is; a real app would check the run is the user's.

Starting a run needs JOBS_EVENT_KEY when that key is set, like
`POST /api/events`. The page cannot send it (keys never go to a browser): a
server with that key runs with DEMO_ENABLED off (app.py).
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, render_template
from flask.typing import ResponseReturnValue

from common.errors import AppError, error_response
from common.request_input import bearer_matches, check_content_type, json_object
from jobs import Jobs
from jobs.errors import InvalidEventKey
from jobs.records import is_id

from .ask import InvalidAskRequest, answer_question, check_prompt
from .report import REPORT_FILE, generate_report

blueprint = Blueprint("demo", __name__)

# What the page shows of a run, by its kind, and the topics of channel `run.<run_id>` it
# subscribes to for it: a report's progress, log lines and status; an answer's text stream
# and status.
TOPICS = {"report": ("status", "log", "run"), "ask": ("answer", "run")}
KINDS = {generate_report.id: "report", answer_question.id: "ask"}


def _grant_json(run_id: str, kind: str, *, cancel: bool, **extra: Any) -> dict[str, Any]:
    """What the page gets for a run: its kind, a subscription grant, a cancel token if `cancel`, `extra`."""
    grant = current_app.extensions["realtime"].create_token(f"run.{run_id}", TOPICS[kind])
    body = {"run_id": run_id, "kind": kind, **grant.to_json(), **extra}
    jobs = current_app.extensions.get("jobs")
    if cancel and jobs is not None:
        body["cancel_token"] = jobs.cancel_token(run_id)
    return body


@blueprint.get("/")
def index() -> str:
    return render_template("index.html", jobs_available="jobs" in current_app.extensions)


class JobsUnavailable(AppError):
    status = 503
    code = "jobs_unavailable"


class NoFunction(AppError):
    status = 503


@blueprint.post("/demo/reports")
def start_report() -> ResponseReturnValue:
    jobs = _jobs_to_start_runs()
    check_content_type()  # the page sends `{}`, which is not read; a cross-site form must not get here
    return _started(jobs, "report.requested", {"title": "Sales report"}, "report")


@blueprint.post("/demo/ask")
def ask() -> ResponseReturnValue:
    jobs = _jobs_to_start_runs()
    prompt = json_object().get("prompt")
    try:
        check_prompt(prompt)  # here too, so a bad prompt is a 400 rather than a failed run
    except InvalidAskRequest as exc:
        raise AppError(str(exc), code="invalid_prompt") from None
    return _started(jobs, "ask.requested", {"prompt": prompt}, "ask", prompt=prompt)


def _jobs_to_start_runs() -> Jobs:
    jobs = current_app.extensions.get("jobs")
    if jobs is None:
        raise JobsUnavailable(
            "the job runner is not installed in this app, so no run can start; "
            "runs already started can still be watched with /?run=<id>"
        )
    if jobs.event_key and not bearer_matches(jobs.event_key):
        raise InvalidEventKey(
            "this server sets JOBS_EVENT_KEY, which the demo page cannot send (keys never go to a browser). "
            "The demo needs JOBS_EVENT_KEY unset, or DEMO_ENABLED off on a server that keeps the key; "
            "a script may send 'Authorization: Bearer <JOBS_EVENT_KEY>'"
        )
    return jobs


def _started(jobs: Jobs, event: str, data: dict[str, Any], kind: str, **extra: Any) -> ResponseReturnValue:
    """Send `event`; answer the grant of the run it started."""
    runs = jobs.send(event, data).get("runs") or []
    if not runs:
        raise NoFunction(f"no job function is registered for the event {event!r}", code=f"no_{kind}_function")
    return _grant_json(runs[0]["id"], kind, cancel=True, **extra), 201


@blueprint.post("/demo/token")
def refresh_token() -> ResponseReturnValue:
    run_id = json_object().get("run_id")
    if not isinstance(run_id, str) or not run_id:
        return error_response(400, "invalid_run_id", "the body must be {\"run_id\": \"<id of a report run>\"}")
    # create_token checks the channel name: an id with other characters is a 400. A run that is
    # not the demo's (or is gone) is watched as a report, as before runs had kinds.
    jobs = current_app.extensions.get("jobs")
    run = jobs.run(run_id) if jobs is not None else None
    kind = KINDS.get(run.function_id) if run is not None else None
    if kind == "ask":  # the page shows the question beside its answer
        prompt = jobs.runs.event(run.event_id).data.get("prompt")
        return _grant_json(run_id, kind, cancel=True, prompt=prompt)
    return _grant_json(run_id, kind or "report", cancel=kind is not None)


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
