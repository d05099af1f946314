"""`Jobs`, the Flask extension: the Python API and the glue between the parts.

    jobs = Jobs(app, realtime=realtime)   # or Jobs() then init_app(...)

    @jobs.function(id="generate-report", trigger="report.requested", retries=3)
    def generate_report(ctx): ...

    jobs.send("report.requested", {"title": "Q3"})   # -> {"ids": [...], "runs": [...]}

One instance per app, in `app.extensions["jobs"]`. It reads the `JOBS_*`
keys once in `init_app` and hands plain values to the run store, runner and
worker, which never look at Flask.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Callable, Sequence

from flask import Flask
from sqlalchemy import event
from sqlalchemy.orm import Session

from common import jsontext
from common.database import Database, DatabaseUnavailable, database_for
from common.config import flag
from common.metrics import add_scrape_collector
from realtime.errors import MessageTooLarge

from . import metrics
from .capabilities import CancelTokens
from .errors import EventTooLarge, InvalidEvent, RunNotFound
from .registry import EVENT_NAME_PATTERN, Handler, JobFunction, Registry, function
from .runner import Runner
from .journal import StepJournal
from .records import COMPLETED, FAILED, FINISHED, NewEvent, Run, is_id
from .runs import PruneHook, RunStore
from .tables import create_schema
from .worker import PRUNE_BATCH, SILENT_AFTER_HEARTBEATS, Retention, Worker, last_heartbeat

log = logging.getLogger(__name__)

DEFAULTS = {
    "JOBS_EMBEDDED": True,
    "JOBS_THREADS": 4,
    "JOBS_EVENT_KEY": None,
    # A larger event `data` is refused (413). An event starts runs and carries references, not
    # content; a full batch of 100 then stays near 3 MiB, parsed in one call (issue 18).
    "JOBS_MAX_EVENT_BYTES": 32768,
    "JOBS_MAX_CRASHES": 3,  # a run whose worker died this many times mid-run fails (docs/protocol.md §7)
    "JOBS_RETENTION_S": 7 * 24 * 3600,  # ended runs, their steps and events are deleted after this
    "JOBS_PRUNE_INTERVAL_S": 300,  # how often one of the workers prunes
    # Beyond docs/protocol.md §2: tuning knobs with safe defaults (README, Configuration).
    "JOBS_LEASE_S": 30,  # a killed worker's runs resume this long after its last renewal
    "JOBS_POLL_S": 0.5,  # how often a worker looks for runs queued by other processes
    "JOBS_RETRY_BASE_S": 1.0,  # first retry after 1 s, then 2, 4, ...
    "JOBS_RETRY_MAX_S": 600,
    "JOBS_CANCEL_TOKEN_TTL_S": 300,  # a run-scoped cancel capability (capabilities.py) is good this long
}

MAX_EVENTS_PER_REQUEST = 100
#: Room in a `POST /api/events` body for what surrounds the events' data: names, brackets, spaces.
EVENTS_BODY_ROOM = 64 * 1024


def check_event(name: Any, data: Any) -> None:
    if not isinstance(name, str) or not EVENT_NAME_PATTERN.fullmatch(name):
        raise InvalidEvent(
            "an event 'name' must be 1-200 characters from A-Z a-z 0-9 _ . : / -, "
            "starting with a letter or digit (like 'report.requested')",
            code="invalid_event_name",
        )
    if not isinstance(data, dict):
        raise InvalidEvent("an event's 'data' must be a JSON object", code="invalid_event_data")


class Jobs:
    def __init__(self, app: Flask | None = None, **kwargs: Any) -> None:
        self.registry = Registry()
        if app is not None:
            self.init_app(app, **kwargs)

    def init_app(self, app: Flask, *, db: Database | None = None, realtime: Any = None) -> None:
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        # Eager mode runs each run inline when it is sent; the default in tests.
        app.config.setdefault("JOBS_EAGER", app.testing)
        config = app.config
        self.embedded = flag(config["JOBS_EMBEDDED"])
        self.eager = flag(config["JOBS_EAGER"])
        self.event_key: str | None = config["JOBS_EVENT_KEY"] or None
        self.max_event_bytes = int(config["JOBS_MAX_EVENT_BYTES"])
        self.lease_s = float(config["JOBS_LEASE_S"])
        self.poll_s = float(config["JOBS_POLL_S"])
        self.retention = Retention(
            max_age=timedelta(seconds=float(config["JOBS_RETENTION_S"])),
            interval_s=float(config["JOBS_PRUNE_INTERVAL_S"]),
        )
        self.realtime = realtime or app.extensions["realtime"]
        self.cancel_tokens = CancelTokens(config["SECRET_KEY"], ttl_s=float(config["JOBS_CANCEL_TOKEN_TTL_S"]))

        db = db or database_for(app)
        db.add_schema(create_schema)  # made at the first call, not here: see common/database.py
        self.runs = RunStore(db, on_status=self._announce, max_crashes=int(config["JOBS_MAX_CRASHES"]))
        add_scrape_collector(app, metrics.due_runs_collector(self.runs))  # jobs_runs_due, read at scrape time
        self.journal = StepJournal(self.runs)
        self.runner = Runner(
            self.runs,
            self.journal,
            self.registry,
            self.realtime.publish,
            retry_base_s=float(config["JOBS_RETRY_BASE_S"]),
            retry_max_s=float(config["JOBS_RETRY_MAX_S"]),
            context=app.app_context,  # job code may use current_app, like a request
            texts=self.realtime,
        )
        self.worker = self.new_worker(int(config["JOBS_THREADS"]))

        app.extensions["jobs"] = self
        # In the serving process, after gunicorn forked (gunicorn.conf.py), or
        # at the first request under `flask run`; never at import or in
        # `flask` commands (the worker command starts its own).
        self._runs_pool = self.embedded and not self.eager
        app.before_request(self.start)

    def start(self) -> None:
        """Start the embedded pool, if this app runs one (idempotent)."""
        if self._runs_pool:
            self.worker.start()

    def new_worker(self, threads: int) -> Worker:
        return Worker(
            self.runs, self.runner, threads=threads, lease_s=self.lease_s, poll_s=self.poll_s,
            retention=self.retention,
        )

    # -- functions ------------------------------------------------------------------

    def register(self, job_function: JobFunction) -> JobFunction:
        return self.registry.add(job_function)

    def function(
        self, *, id: str, trigger: str, retries: int = 3, concurrency: int | None = None
    ) -> Callable[[Handler], JobFunction]:
        """Decorator: describe a job function and register it here."""
        describe = function(id=id, trigger=trigger, retries=retries, concurrency=concurrency)
        return lambda handler: self.register(describe(handler))

    # -- events and runs ----------------------------------------------------------

    @property
    def max_body_bytes(self) -> int:
        """The body limit of `POST /api/events`: a full batch of the largest events (docs/protocol.md §3.3)."""
        return MAX_EVENTS_PER_REQUEST * self.max_event_bytes + EVENTS_BODY_ROOM

    def send(self, name: str, data: dict[str, Any]) -> dict[str, Any]:
        """Send one event; the body of the `POST /api/events` 202 (docs/protocol.md §4)."""
        return self.send_many([(name, data)])

    def send_many(self, items: Sequence[tuple[Any, Any]]) -> dict[str, Any]:
        """Send events; each starts one run per function it triggers. All or nothing."""
        if not 1 <= len(items) <= MAX_EVENTS_PER_REQUEST:
            raise InvalidEvent(f"send 1 to {MAX_EVENTS_PER_REQUEST} events at a time", code="invalid_events")
        new_events = []
        for name, data in items:
            check_event(name, data)
            try:
                data_json = jsontext.encode(data, max_bytes=self.max_event_bytes)
            except jsontext.NotJSON as exc:
                raise InvalidEvent(f"an event's 'data' must be JSON: {exc}", code="invalid_event_data") from None
            except jsontext.TooLarge as exc:
                raise EventTooLarge(
                    f"an event's 'data' is {exc} (JOBS_MAX_EVENT_BYTES). Send a reference to large input instead."
                ) from None
            new_events.append(NewEvent(name, data_json, [f.id for f in self.registry.triggered_by(name)]))
        created = self.runs.add_events(new_events)
        if self.eager:
            self.worker.drain()
        else:
            self.worker.wake()
        return {
            "ids": [event.id for event, _ in created],
            "runs": [
                {"id": run.id, "function": run.function_id, "event_id": event.id}
                for event, event_runs in created
                for run in event_runs
            ],
        }

    def run(self, run_id: str) -> Run | None:
        return self.runs.run(run_id) if is_id(run_id) else None

    def cancel(self, run_id: str) -> None:
        """Cancel a queued or running run (RunNotFound, RunFinished otherwise)."""
        if not is_id(run_id):
            raise RunNotFound(f"there is no run {run_id!r}; run ids come from POST /api/events")
        self.runs.cancel(run_id)

    def cancel_token(self, run_id: str) -> str:
        """A capability to cancel `run_id`, and nothing else, for JOBS_CANCEL_TOKEN_TTL_S: for the
        page that started the run (`POST /api/runs/<id>/cancel` with `Authorization: Bearer <it>`)."""
        return self.cancel_tokens.issue(run_id)

    # -- retention ------------------------------------------------------------------

    def on_prune(self, hook: PruneHook) -> PruneHook:
        """Register `hook(session, run_ids)`, called in the transaction that deletes those runs,
        so what an app keeps per run (the demo's report files) is deleted with them."""
        self.runs.on_prune.append(hook)
        return hook

    def prune(self) -> int:
        """Delete every run that ended more than JOBS_RETENTION_S ago now, batch after batch
        (the workers also do it on a schedule); return how many runs."""
        total = 0
        while True:
            removed_runs, removed_events = self.runs.prune(self.retention.max_age, PRUNE_BATCH)
            total += removed_runs
            if max(removed_runs, removed_events) < PRUNE_BATCH:
                return total

    # -- workers -------------------------------------------------------------------

    def workers_problem(self) -> str | None:
        """Runs are waiting and no worker has polled in SILENT_AFTER_HEARTBEATS heartbeats:
        /readyz's warning `jobs_workers` (app.py), the demo page's "no job worker" hint.

        Nothing waiting, nothing to say: a web process without a pool, its workers
        elsewhere, is fine, and so is an app that sends no event. Eager mode runs
        each run as it is sent.
        """
        if self.eager:
            return None
        heartbeat_s = self.worker.heartbeat_s
        seen = last_heartbeat(self.runs, heartbeat_s)
        silent_s = None if seen is None else (self.runs.now() - seen).total_seconds()
        if silent_s is not None and silent_s <= SILENT_AFTER_HEARTBEATS * heartbeat_s:
            return None
        due = self.runs.count_due()
        if not due:
            return None
        since = "yet" if silent_s is None else f"in the last {silent_s:.0f} s"
        waiting = "1 run is" if due == 1 else f"{due} runs are"
        return f"{waiting} waiting and no job worker has polled {since}: start one with `flask --app app jobs worker`"

    def drain(self) -> int:
        """Eager mode: execute every due run now, inline (e.g. after advancing a test clock)."""
        return self.worker.drain()

    def shutdown(self, wait: bool = False) -> None:
        """Stop the embedded pool (gunicorn.conf.py calls this on SIGTERM); see `Worker.shutdown`."""
        self.worker.shutdown(wait)

    # -- lifecycle messages ---------------------------------------------------------

    def _end_text_streams(self, run_id: str) -> None:
        try:
            self.realtime.end_interrupted_text_streams(run_id)
        except DatabaseUnavailable as exc:
            log.warning("run %s: its interrupted text streams could not be ended: %s", run_id, exc.message)

    def _announce(self, session: Session, run: Run) -> None:
        """Publish the run's new status on `run.<id>`, topic `run`, in the transaction that set it;
        count an end in the metrics once that transaction commits."""
        if run.status in FINISHED:
            metrics.count_when_committed(session, run)
        if run.status == FAILED and (run.error or "").startswith("WorkerCrashed"):
            # Its last worker died mid-run: so may have its text streams (runner.py ends them on a resume).
            event.listen(session, "after_commit", lambda _session: self._end_text_streams(run.id), once=True)
        data: dict[str, Any] = {"status": run.status}
        if run.status == COMPLETED:
            data["output"] = run.output
        elif run.status == FAILED:
            data["error"] = run.error
        try:
            self.realtime.publish(run.channel, "run", data, run_id=run.id, session=session)
        except MessageTooLarge:
            # The size is checked before any SQL, so the transaction goes on;
            # the whole output or error stays readable at GET /api/runs/<id>.
            data = {"status": run.status, "truncated": True}
            self.realtime.publish(run.channel, "run", data, run_id=run.id, session=session)
