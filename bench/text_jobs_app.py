"""The app of bench/texts.py's cancel phase: the real app plus a job that streams until cancelled.

    gunicorn -c gunicorn.conf.py "bench.text_jobs_app:create_app()"      (the HTTP side)
    flask --app "bench.text_jobs_app:create_app()" jobs worker             (runs the job)

The job writes a token to a text stream every 20 ms (`ctx.text_stream`) until its run is
cancelled: then `write` raises `jobs.Cancelled`, and the job appends "<run id> <CLOCK_MONOTONIC
time>" to the file BENCH_CANCEL_LOG names before letting it propagate. CLOCK_MONOTONIC is
system-wide: bench/texts.py compares it with the time it sent `POST /api/runs/<id>/cancel`.
"""
from __future__ import annotations

import os
import time

from app import create_app as create_real_app
from jobs import Cancelled


def create_app():  # noqa: ANN201
    app = create_real_app()
    extension = app.extensions["jobs"]

    @extension.function(id="bench-stream", trigger="bench.stream", retries=0)
    def stream_until_cancelled(ctx):
        with ctx.text_stream(ctx.channel, "answer") as out:
            try:
                while True:
                    out.write(" tok")
                    time.sleep(0.02)
            except Cancelled:
                raised = time.monotonic()
                with open(os.environ["BENCH_CANCEL_LOG"], "a") as log:
                    log.write(f"{ctx.run_id} {raised:.6f}\n")
                raise

    return app
