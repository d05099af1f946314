"""The demo: a report job whose progress the page at `/` shows live.

It uses the project as any app would: `report` is a job function that
publishes progress (jobs/, realtime/), `files` keeps each report's PDF,
`pdf` draws it, `views` serves the page, starts reports and hands out tokens.
"""
from __future__ import annotations

from flask import Flask

from common.database import database_for
from jobs import Jobs

from .files import FileStore
from .report import generate_report

DEFAULTS = {
    "DEMO_REPORT_STEP_S": 1.0,  # how long each of the report's three steps takes
}


class Demo:
    def __init__(self, app: Flask | None = None, *, jobs: Jobs | None = None) -> None:
        if app is not None:
            self.init_app(app, jobs=jobs)

    def init_app(self, app: Flask, *, jobs: Jobs | None = None) -> None:
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        self.files = FileStore(database_for(app))
        jobs = jobs or app.extensions["jobs"]
        jobs.register(generate_report)
        jobs.on_prune(self.files.delete_for_runs)  # a report goes with its run (JOBS_RETENTION_S)
        app.extensions["demo"] = self
