"""Health probes (docs/protocol.md §7): is the process alive, is it ready for traffic?

    GET /healthz   200 while the process serves requests; touches nothing else
    GET /readyz    200 when every check passes; 503 with each failing check's
                   reason when one fails or the process is shutting down; and,
                   whatever the status, "warnings" with each warning's reason
                   while it has one

A load balancer takes an instance out of rotation on /readyz and back in when
it recovers; an orchestrator restarts it only when /healthz fails. So a
database outage must never fail /healthz: restarting would not bring the
database back, and would end every open stream.

For the same reason a warning never fails /readyz: it names what another part
of the system lacks, which this instance needs not to serve its streams, such
as job workers (`jobs_workers`: runs wait and no worker polls, issue 19 item 5).
Every instance would say it at once, and taking them all out of rotation would
start no worker. The key is there only while there is something to say, so a
healthy answer stays `{"status": "ready", "checks": {...}}`.
"""
from __future__ import annotations

from typing import Callable

from flask import Blueprint, Flask, current_app
from flask.typing import ResponseReturnValue

#: A check returns None when healthy, else a short reason for operators.
Check = Callable[[], "str | None"]

blueprint = Blueprint("health", __name__)


class Health:
    def __init__(self, app: Flask | None = None) -> None:
        self.checks: dict[str, Check] = {}
        self.warnings: dict[str, Check] = {}
        self.stopping = False
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        app.extensions["health"] = self

    def add(self, name: str, check: Check) -> None:
        self.checks[name] = check

    def warn(self, name: str, check: Check) -> None:
        """Add a check that is reported under "warnings" and never makes the process unready."""
        self.warnings[name] = check

    def shutdown(self) -> None:
        """The process is going away (gunicorn.conf.py): not ready any more."""
        self.stopping = True

    def report(self) -> tuple[bool, dict[str, str]]:
        results = {}
        for name, check in self.checks.items():
            problem = _problem(check)
            results[name] = "ok" if problem is None else problem
        if self.stopping:
            results["process"] = "shutting down"
        return all(result == "ok" for result in results.values()), results

    def report_warnings(self) -> dict[str, str]:
        """The reason of each warning that has one."""
        found = {name: _problem(check) for name, check in self.warnings.items()}
        return {name: problem for name, problem in found.items() if problem is not None}


def _problem(check: Check) -> str | None:
    try:
        return check()
    except Exception as exc:  # a check that fails is a failing check, never a 500
        return f"{type(exc).__name__}: {exc}"


@blueprint.get("/healthz")
def healthz() -> ResponseReturnValue:
    return {"status": "ok"}


@blueprint.get("/readyz")
def readyz() -> ResponseReturnValue:
    health = current_app.extensions["health"]
    ready, checks = health.report()
    body: dict[str, object] = {"status": "ready" if ready else "unready", "checks": checks}
    if warnings := health.report_warnings():
        body["warnings"] = warnings
    return (body, 200) if ready else (body, 503, {"Retry-After": "2"})
