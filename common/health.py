"""Health probes (docs/protocol.md §7): is the process alive, is it ready for traffic?

    GET /healthz   200 while the process serves requests; touches nothing else
    GET /readyz    200 when every check passes; 503 with each failing check's
                   reason when one fails or the process is shutting down

A load balancer takes an instance out of rotation on /readyz and back in when
it recovers; an orchestrator restarts it only when /healthz fails. So a
database outage must never fail /healthz: restarting would not bring the
database back, and would end every open stream.
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
        self.stopping = False
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        app.extensions["health"] = self

    def add(self, name: str, check: Check) -> None:
        self.checks[name] = check

    def shutdown(self) -> None:
        """The process is going away (gunicorn.conf.py): not ready any more."""
        self.stopping = True

    def report(self) -> tuple[bool, dict[str, str]]:
        results = {}
        for name, check in self.checks.items():
            try:
                problem = check()
            except Exception as exc:  # a check that fails is a failing check, never a 500
                problem = f"{type(exc).__name__}: {exc}"
            results[name] = "ok" if problem is None else problem
        if self.stopping:
            results["process"] = "shutting down"
        return all(result == "ok" for result in results.values()), results


@blueprint.get("/healthz")
def healthz() -> ResponseReturnValue:
    return {"status": "ok"}


@blueprint.get("/readyz")
def readyz() -> ResponseReturnValue:
    ready, checks = current_app.extensions["health"].report()
    body = {"status": "ready" if ready else "unready", "checks": checks}
    return (body, 200) if ready else (body, 503, {"Retry-After": "2"})
