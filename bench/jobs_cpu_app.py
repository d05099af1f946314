"""The app bench/cpu_step.py serves: the real app plus a job whose one step computes.

    gunicorn -c gunicorn.conf.py "bench.jobs_cpu_app:create_app()"

`BENCH_JOBS_POOL=greenlets` swaps the job pool for a stdlib ThreadPoolExecutor,
whose threads gevent's monkey-patching turns into greenlets: the configuration
jobs/worker.py avoids, kept here to show what it would cost.
"""
from __future__ import annotations

import os
import time

from app import create_app as create_real_app


def burn(seconds: float) -> int:
    """Pure Python arithmetic for `seconds`: holds the GIL the whole time, never yields to gevent."""
    deadline = time.perf_counter() + seconds
    loops = 0
    while time.perf_counter() < deadline:
        loops += sum(i * i for i in range(100)) and 1
    return loops


def create_app():  # noqa: ANN201
    app = create_real_app()
    extension = app.extensions["jobs"]

    @extension.function(id="bench-cpu", trigger="bench.cpu", retries=0)
    def cpu_bound(ctx):
        return ctx.step.run("burn", burn, float(ctx.event.data.get("seconds", 2.0)))

    if os.environ.get("BENCH_JOBS_POOL") == "greenlets":
        from concurrent.futures import ThreadPoolExecutor

        from jobs import worker

        worker.make_executor = lambda threads: ThreadPoolExecutor(threads)
    return app
