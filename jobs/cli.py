"""`flask --app app jobs worker`: a standalone worker process with real OS threads."""
from __future__ import annotations

import logging
import signal

import click
from flask import current_app
from flask.cli import AppGroup

group = AppGroup("jobs", help="Background jobs: run a worker.")


@group.command("worker")
@click.option("--threads", type=int, default=None, help="Threads in the pool (default: JOBS_THREADS).")
def worker(threads: int | None) -> None:
    """Execute runs until SIGTERM or Ctrl-C; then finish the current steps and hand the runs back."""
    # One line per run outcome on stderr, unless the app configured logging itself.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    jobs = current_app.extensions["jobs"]
    pool = jobs.new_worker(threads or int(current_app.config["JOBS_THREADS"]))

    def stop(signum: int, _frame: object) -> None:
        click.echo(f"jobs worker: {signal.Signals(signum).name}, finishing current steps", err=True)
        pool.shutdown()
        # A second signal exits at once; the runs resume elsewhere when their leases lapse.
        signal.signal(signum, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    click.echo(f"jobs worker {pool.name}: {pool.threads} threads, functions: {', '.join(jobs.registry.ids)}", err=True)
    pool.run()
