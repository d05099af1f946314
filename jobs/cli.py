"""`flask --app app jobs worker|prune`: a standalone worker process with real OS threads; retention by hand."""
from __future__ import annotations

import logging
import signal

import click
from flask import current_app
from flask.cli import AppGroup

from common import metrics

group = AppGroup("jobs", help="Background jobs: run a worker, prune old runs.")


@group.command("worker")
@click.option("--threads", type=int, default=None, help="Threads in the pool (default: JOBS_THREADS).")
@click.option(
    "--metrics-port", type=click.IntRange(1, 65535), default=None,
    help="Serve this worker's Prometheus metrics on http://0.0.0.0:PORT/metrics.",
)
def worker(threads: int | None, metrics_port: int | None) -> None:
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
    if metrics_port is not None:
        # A worker serves no HTTP otherwise: the runs it ends are counted in
        # this process, so they are scraped here (jobs_runs_due as well).
        metrics.serve(metrics_port, metrics.scrape_collectors(current_app))
        click.echo(f"jobs worker: metrics on port {metrics_port}", err=True)
    click.echo(f"jobs worker {pool.name}: {pool.threads} threads, functions: {', '.join(jobs.registry.ids)}", err=True)
    pool.run()


@group.command("prune")
def prune() -> None:
    """Delete runs that ended more than JOBS_RETENTION_S ago now (workers also do it on a schedule)."""
    removed = current_app.extensions["jobs"].prune()
    click.echo(f"pruned {removed} runs")
