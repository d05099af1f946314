"""What the jobs package counts (docs/protocol.md §8), for `GET /metrics` and `flask jobs worker --metrics-port`.

Labels are bounded: a function id (the app registers a handful) and a run
status. Never a run id or an event name, which clients choose.

The counter and the histogram count in the process that ended a run, once its
transaction committed. `jobs_runs_due` is not counted anywhere: it is read from
the database at scrape time, so it is the same whichever process answers.
"""
from __future__ import annotations

import logging
from typing import Iterable

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import event
from sqlalchemy.orm import Session

from common.database import DatabaseUnavailable

from .records import Run
from .runs import RunStore

log = logging.getLogger(__name__)

RUNS_FINISHED = Counter(
    "jobs_runs_finished_total", "Runs that ended, by function and status (completed, failed, cancelled).",
    ["function", "status"],
)
RUN_DURATION = Histogram(
    "jobs_run_duration_seconds",
    "From a run's first start to its end, retries and sleeps included; runs cancelled before they started "
    "are not observed.",
    ["function"],
    buckets=(0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0),
)

#: How long a scrape waits for the database under gevent: a scrape must not hang on a stall.
DUE_QUERY_TIMEOUT_S = 2.0


def count_when_committed(session: Session, run: Run) -> None:
    """Count `run`'s end once `session`'s transaction commits; a rollback counts nothing."""
    event.listen(session, "after_commit", lambda _session: _record(run), once=True)


def _record(run: Run) -> None:
    RUNS_FINISHED.labels(run.function_id, run.status).inc()
    if run.started_at is not None and run.ended_at is not None:
        RUN_DURATION.labels(run.function_id).observe(max(0.0, (run.ended_at - run.started_at).total_seconds()))


def due_runs_collector(runs: RunStore):  # noqa: ANN201 - a common.metrics.ScrapeCollector
    """`jobs_runs_due` at scrape time: runs a free worker could claim now. Nothing when the database is away."""

    def collect() -> Iterable[GaugeMetricFamily]:
        # Either way the scrape answers without it, and the gap in the series shows.
        try:
            with runs.db.time_limit(DUE_QUERY_TIMEOUT_S):
                due = runs.count_due()
        except DatabaseUnavailable as exc:
            log.warning("jobs_runs_due not collected: %s", exc.message)
            return []
        except Exception:  # a bug here must not cost the other metrics
            log.exception("jobs_runs_due not collected")
            return []
        family = GaugeMetricFamily(
            "jobs_runs_due", "Runs queued or running whose time has come and that no live lease holds: the backlog."
        )
        family.add_metric([], due)
        return [family]

    return collect
