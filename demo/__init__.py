"""The demo: a report job whose progress the page at `/` shows live, and an answer that streams in.

It uses the project as any app would: `report` is a job function that
publishes progress (jobs/, realtime/), `files` keeps each report's PDF,
`pdf` draws it; `ask` is a job function that streams an answer as a text
stream; `views` serves the page, starts runs and hands out tokens.
"""
from __future__ import annotations

import os

from flask import Flask

from common.database import database_for
from jobs import Jobs

from .ask import answer_question
from .files import FileStore
from .report import generate_report

DEFAULTS = {
    "DEMO_REPORT_STEP_S": 1.0,  # how long each of the report's three steps takes
    # The local answer generator (demo/ask.py): its pace, and its length (0: 150-400 tokens, by the prompt).
    "DEMO_ASK_TOKENS_PER_S": 40.0,
    "DEMO_ASK_TOKENS": 0,
}
# An OpenAI-compatible server for the answers instead of the local generator: the variables every
# OpenAI client reads, from the environment unless the config sets them.
OPENAI_DEFAULTS = {"OPENAI_BASE_URL": None, "OPENAI_API_KEY": None, "OPENAI_MODEL": "gpt-4o-mini"}


class Demo:
    def __init__(self, app: Flask | None = None, *, jobs: Jobs | None = None) -> None:
        if app is not None:
            self.init_app(app, jobs=jobs)

    def init_app(self, app: Flask, *, jobs: Jobs | None = None) -> None:
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        for key, value in OPENAI_DEFAULTS.items():
            app.config.setdefault(key, os.environ.get(key) or value)
        self.files = FileStore(database_for(app))
        jobs = jobs or app.extensions["jobs"]
        jobs.register(generate_report)
        jobs.register(answer_question)
        jobs.on_prune(self.files.delete_for_runs)  # a report goes with its run (JOBS_RETENTION_S)
        app.extensions["demo"] = self
