"""JOBS_RETENTION_S: ended runs past it are deleted with their steps, their events once no run of
them remains, and the demo's report files; by `flask jobs prune` and by the workers on a schedule
shared through the database, a small batch at a time. On SQLite and on PostgreSQL.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, inspect, select, text

from common.database import make_engine
from conftest import FakeClock, app_on, wait_until
from jobs import NonRetriableError
from jobs import extension as jobs_extension
from jobs import worker as jobs_worker
from jobs.tables import create_schema, events, runs, steps

RETENTION_S = 7 * 24 * 3600  # the default


@pytest.fixture
def app(database_url):
    yield from app_on(database_url, JOBS_EAGER=False, DEMO_ENABLED=True, DEMO_REPORT_STEP_S=0, JOBS_POLL_S=0.01)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def jobs(app, clock):
    jobs = app.extensions["jobs"]
    jobs.runs.now = clock

    @jobs.function(id="noop", trigger="test.noop")
    def noop(ctx):
        ctx.step.run("only", lambda: 1)

    @jobs.function(id="broken", trigger="test.broken")
    def broken(ctx):
        raise NonRetriableError("no")

    @jobs.function(id="napper", trigger="test.nap")
    def napper(ctx):
        ctx.step.sleep("nap", 30 * 24 * 3600)

    # One event, two runs: the event stays while either does.
    jobs.function(id="pair-quick", trigger="test.pair")(lambda ctx: "done")
    jobs.function(id="pair-slow", trigger="test.pair")(lambda ctx: ctx.step.sleep("nap", 30 * 24 * 3600))
    return jobs


def run_ids(sent: dict) -> list[str]:
    return [run["id"] for run in sent["runs"]]


def rows(app, table, column) -> set:
    with app.extensions["database"].engine.connect() as conn:
        return set(conn.execute(select(column).select_from(table)).scalars())


def test_prune_deletes_what_ended_before_the_retention_and_nothing_else(app, client, jobs, clock):
    [report] = run_ids(jobs.send("report.requested", {"days": 2}))
    [failed] = run_ids(jobs.send("test.broken", {}))
    [sleeping] = run_ids(jobs.send("test.nap", {}))
    quick, slow = run_ids(pair := jobs.send("test.pair", {}))
    [cancelled] = run_ids(cancelled_event := jobs.send("test.noop", {}))
    jobs.cancel(cancelled)  # before it started
    lonely = jobs.send("nobody.listens", {})["ids"][0]
    jobs.drain()
    assert client.get(f"/reports/{report}").status_code == 200
    assert {jobs.run(r).status for r in (report, quick)} == {"completed"}
    assert (jobs.run(failed).status, jobs.run(cancelled).status, jobs.run(sleeping).status) == (
        "failed", "cancelled", "running")

    clock.advance(RETENTION_S - 1)
    [recent] = run_ids(jobs.send("test.noop", {}))
    jobs.drain()
    assert jobs.prune() == 0, "nothing ended a whole retention ago yet"

    clock.advance(2)
    assert jobs.prune() == 4
    for gone in (report, failed, cancelled, quick):
        assert jobs.run(gone) is None
        assert client.get(f"/api/runs/{gone}").status_code == 404
    assert rows(app, runs, runs.c.id) == {sleeping, slow, recent}
    assert rows(app, steps, steps.c.run_id) == {sleeping, slow, recent}
    # Events go with their last run; the pair's stays while its slow run lives; one that
    # started nothing goes too.
    remaining_events = rows(app, events, events.c.id)
    assert pair["ids"][0] in remaining_events and lonely not in remaining_events
    assert cancelled_event["ids"][0] not in remaining_events and len(remaining_events) == 3
    # The demo's file went with its run.
    assert app.extensions["demo"].files.load(report, "report.pdf") is None
    assert client.get(f"/reports/{report}").status_code == 404
    assert jobs.prune() == 0


def test_prune_goes_in_batches(app, jobs, clock, monkeypatch):
    ended = run_ids(jobs.send_many([("test.noop", {})] * 5))
    jobs.drain()
    clock.advance(RETENTION_S + 1)
    age = timedelta(seconds=RETENTION_S)
    assert jobs.runs.prune(age, 2) == (2, 2)
    assert jobs.runs.prune(age, 2) == (2, 2)
    assert jobs.runs.prune(age, 2) == (1, 1)
    assert jobs.runs.prune(age, 2) == (0, 0)
    assert not rows(app, runs, runs.c.id) & set(ended)

    more = run_ids(jobs.send_many([("test.noop", {})] * 5))
    jobs.drain()
    clock.advance(RETENTION_S + 1)
    monkeypatch.setattr(jobs_extension, "PRUNE_BATCH", 2)
    assert jobs.prune() == len(more)


def test_the_prune_command_says_how_many_runs_it_removed(app, jobs, clock, runner):
    jobs.send_many([("test.noop", {})] * 3)
    jobs.drain()
    assert runner.invoke(args=["jobs", "prune"]).output == "pruned 0 runs\n"
    clock.advance(RETENTION_S + 1)
    assert runner.invoke(args=["jobs", "prune"]).output == "pruned 3 runs\n"


def test_retention_comes_from_the_config(database_url):
    for app in app_on(database_url, JOBS_RETENTION_S=60, JOBS_PRUNE_INTERVAL_S=5):
        retention = app.extensions["jobs"].retention
        assert (retention.max_age, retention.interval_s) == (timedelta(seconds=60), 5.0)


def test_one_turn_per_interval_among_all_workers(jobs, clock):
    take = jobs.runs.take_turn
    assert take("prune", 300) is True, "the first caller ever"
    assert take("prune", 300) is False, "anyone else, until the interval passed"
    clock.advance(299)
    assert take("prune", 300) is False
    clock.advance(1)
    assert take("prune", 300) is True
    assert take("prune", 300) is False
    assert take("another-task", 300) is True, "each task has its own turn"


def test_a_worker_prunes_on_its_schedule_a_batch_at_a_time_and_still_claims(app, jobs, clock, monkeypatch):
    monkeypatch.setattr(jobs_worker, "PRUNE_BATCH", 2)
    old = run_ids(jobs.send_many([("test.noop", {})] * 7))
    jobs.drain()
    clock.advance(RETENTION_S + 1)
    [queued] = run_ids(jobs.send("test.noop", {}))

    worker = jobs.new_worker(1)
    worker.start()
    try:
        wait_until(lambda: not rows(app, runs, runs.c.id) & set(old), what="the old runs to be pruned")
        wait_until(lambda: jobs.run(queued).status == "completed", what="the queued run")
        assert jobs.runs.take_turn("prune", jobs.retention.interval_s) is False, "the worker took this interval's turn"
    finally:
        worker.shutdown(wait=True)


def test_a_worker_without_retention_never_prunes(jobs):
    from jobs.worker import Worker

    worker = Worker(jobs.runs, jobs.runner, threads=1, poll_s=0.01)
    assert worker.retention is None
    assert jobs.new_worker(1).retention == jobs.retention


def test_the_schema_adds_the_retention_indexes_to_an_older_database(database_url):
    engine = make_engine(database_url)
    try:
        create_schema(engine)
        with engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_job_runs_ended"))
            conn.execute(text("DROP INDEX ix_job_events_created"))
        create_schema(engine)
        create_schema(engine)  # every process starts with it: a second time changes nothing
        with engine.connect() as conn:
            names = {index["name"] for table in ("job_runs", "job_events") for index in inspect(conn).get_indexes(table)}
        assert {"ix_job_runs_ended", "ix_job_runs_event", "ix_job_events_created"} <= names
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(runs)).scalar() == 0
    finally:
        engine.dispose()
