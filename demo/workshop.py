"""The spec lab: `/workshop` serves each case of demo/spec_cases.py, byte for byte.

    GET /workshop                             the page (templates/workshop.html)
    GET /workshop/cases                       every case as JSON
    GET /workshop/cases/<name>                the case's first answer (curl, fetch)
    GET /workshop/cases/<name>?attempt=N      its N-th answer, as the N-th request would get it
    GET /workshop/cases/<name>?lab=ID         the answer to this lab's next request: what an
                                              EventSource gets as it reconnects
    GET /workshop/cases/<name>/requests?lab=ID  the requests this lab made: attempt, time,
                                              the Last-Event-ID header the browser sent
                                              (its first 256 bytes, then its size)

A lab id is chosen by the page for each run. The requests of each (lab, case) are
kept in this process's memory, bounded in bytes, count and time (demo/lab_log.py): run
the lab on one process (`make run`, or gunicorn with one worker) so every reconnect
finds its lab.
"""
from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any

from flask import Blueprint, Response, current_app, render_template, request

from common.errors import AppError

from .lab_log import LabLog, LabRequest, shown
from .spec_cases import CASES, SPEC_URL, SpecCase

blueprint = Blueprint("workshop", __name__, url_prefix="/workshop")

_LAB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class UnknownCase(AppError):
    status = 404
    code = "unknown_case"


class InvalidLab(AppError):
    code = "invalid_lab"


@blueprint.record_once
def _create_lab_log(state: Any) -> None:
    # A lab in use is never evicted for another visitor's new one (demo/lab_log.py).
    state.app.extensions["workshop_lab_log"] = LabLog(busy_s=30.0)


def _lab_log() -> LabLog:
    return current_app.extensions["workshop_lab_log"]


def _case(name: str) -> SpecCase:
    case = CASES.get(name)
    if case is None:
        raise UnknownCase(f"there is no spec-lab case {name!r}; GET /workshop/cases lists them")
    return case


def _lab_id() -> str:
    lab = request.args.get("lab", "")
    if not _LAB_ID.fullmatch(lab):
        raise InvalidLab("'lab' must be 1-64 letters, digits, '-' or '_': an id the page picks for one run")
    return lab


# The cases are fixed data: their JSON, and the page's sections of it, are built once.
CASES_JSON = [case.to_json() for case in CASES.values()]
SECTIONS: dict[str, list[dict[str, Any]]] = {}  # in the cases' order: the spec's section order
for case_json in CASES_JSON:
    SECTIONS.setdefault(case_json["section"], []).append(case_json)


@blueprint.get("")
def page() -> str:
    return render_template("workshop.html", cases=CASES_JSON, sections=SECTIONS.items(), spec_url=SPEC_URL)


@blueprint.get("/cases")
def cases() -> dict[str, Any]:
    return {"cases": CASES_JSON}


@blueprint.get("/cases/<name>")
def answer(name: str) -> Response:
    case = _case(name)
    last_event_id = request.headers.get("Last-Event-ID")
    log = _lab_log()
    if "lab" in request.args:
        lab = _lab_id()
        attempt, started = log.next_attempt(lab, name)
    else:
        raw = request.args.get("attempt", "1")
        if not re.fullmatch(r"[0-9]{1,3}", raw) or int(raw) < 1:
            raise InvalidLab("'attempt' must be a number from 1 to 999", code="invalid_attempt")
        lab, attempt = None, int(raw)
    scripted = case.answer(attempt)
    if lab is not None:
        ms = round((log.clock() - started) * 1000)
        log.record(lab, name, LabRequest(attempt, ms, last_event_id, scripted.status))
    response = Response(scripted.render(shown(last_event_id)), status=scripted.status)
    if scripted.content_type is None:
        del response.headers["Content-Type"]
    else:
        response.headers["Content-Type"] = scripted.content_type
    response.headers["Cache-Control"] = "no-cache"
    return response


@blueprint.get("/cases/<name>/requests")
def lab_requests(name: str) -> dict[str, Any]:
    _case(name)
    return {"requests": [asdict(entry) for entry in _lab_log().requests(_lab_id(), name)]}
