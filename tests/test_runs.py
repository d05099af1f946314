"""The run store's guarantees, on SQLite and on PostgreSQL: atomic claims, leases, fencing, limits,
crash counting, and the schema migration of databases made before a column existed.

Also the thread pool in-process (plain OS threads, no gevent) as the store's first real client.
"""
from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import Boolean, Column, DateTime, Integer, MetaData, String, Table, Text, insert, inspect, select, text

from common.database import add_missing_columns, make_engine
from conftest import FakeClock, app_on, wait_until
from jobs.records import LeaseLost
from jobs.tables import create_schema, runs, steps


@pytest.fixture
def app(database_url):
    # These tests claim by hand or start the pool themselves.
    yield from app_on(database_url, JOBS_EAGER=False, DEMO_ENABLED=True, DEMO_REPORT_STEP_S=0)


@pytest.fixture
def jobs(app):
    jobs = app.extensions["jobs"]

    @jobs.function(id="noop", trigger="test.noop")
    def noop(ctx):
        return "ok"

    return jobs


def claim(jobs, owner: str = "w1", lease_s: float = 10.0):
    registry = jobs.registry
    return jobs.runs.claim(registry.ids, registry.concurrency_limits, owner=owner, lease_s=lease_s)


def test_concurrent_claims_take_each_run_exactly_once(jobs):
    sent = jobs.send_many([("test.noop", {"i": i}) for i in range(40)])
    expected = sorted(r["id"] for r in sent["runs"])
    claimed: list[str] = []
    start = threading.Barrier(6)

    def claimer(name: str) -> None:
        start.wait()
        while (got := claim(jobs, owner=name)) is not None:
            claimed.append(got.run.id)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == expected


def test_a_lapsed_lease_is_reclaimed_and_the_old_holder_is_fenced_off(jobs):
    clock = FakeClock()
    jobs.runs.now = clock
    jobs.send("test.noop", {})
    first = claim(jobs, owner="first", lease_s=10)
    assert claim(jobs, owner="second") is None

    clock.advance(5)
    assert jobs.runs.renew([first.token], 10) == 1
    clock.advance(9)
    assert claim(jobs, owner="second") is None, "renewed: still held"

    clock.advance(2)
    second = claim(jobs, owner="second", lease_s=10)
    assert second.run.id == first.run.id and second.token != first.token
    with pytest.raises(LeaseLost):
        jobs.journal.start(first, "step")
    with pytest.raises(LeaseLost):
        jobs.runs.finish(first, "completed", output_json="1")
    assert jobs.runs.renew([first.token], 10) == 0
    jobs.runs.finish(second, "completed", output_json="2")
    assert jobs.run(first.run.id).output == 2


def test_concurrency_limit_holds_across_workers(jobs):
    @jobs.function(id="single", trigger="test.single", concurrency=1)
    def single(ctx):
        return None

    jobs.send_many([("test.single", {}), ("test.single", {})])
    first = claim(jobs, owner="a")
    assert first.run.function_id == "single"
    assert claim(jobs, owner="b") is None
    jobs.runs.finish(first, "completed")
    second = claim(jobs, owner="b")
    assert second is not None and second.run.id != first.run.id


def test_concurrency_limit_under_racing_claimers(jobs):
    @jobs.function(id="pair", trigger="test.pair", concurrency=2)
    def pair(ctx):
        return None

    jobs.send_many([("test.pair", {})] * 12)
    start = threading.Barrier(6)
    claimed = []

    def claimer(name: str) -> None:
        start.wait()
        got = claim(jobs, owner=name)
        if got is not None:
            claimed.append(got)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == 2


def test_the_thread_pool_executes_runs(app, jobs):
    sent = jobs.send_many([("report.requested", {"days": 2})] * 5)
    jobs.worker.start()
    for run in sent["runs"]:
        wait_until(lambda: jobs.run(run["id"]).status == "completed", what=f"run {run['id']}")
    assert app.extensions["demo"].files.load(sent["runs"][0]["id"], "report.pdf").content.startswith(b"%PDF")


def crashes(jobs, run_id: str) -> int:
    with jobs.runs.engine.connect() as conn:
        return conn.execute(select(runs.c.crashes).where(runs.c.id == run_id)).scalar_one()


def run_messages(app, run_id: str) -> list[dict]:
    found = app.extensions["realtime"].store.read_after(f"run.{run_id}", None, 0, 100)
    return [m.data for m in found if m.topic == "run"]


def test_a_run_whose_worker_keeps_dying_fails_after_max_crashes(app, jobs):
    """Each claim of a lapsed lease is a worker that died mid-run (CONTRACT §5)."""
    clock = FakeClock()
    jobs.runs.now = clock
    assert jobs.runs.max_crashes == 3  # JOBS_MAX_CRASHES' default
    [sent] = jobs.send("test.noop", {})["runs"]
    held = claim(jobs, owner="w0", lease_s=10)
    for death in (1, 2):
        clock.advance(10)  # its worker died: the lease lapses
        held = claim(jobs, owner=f"w{death}", lease_s=10)
        assert held.run.id == sent["id"] and crashes(jobs, sent["id"]) == death, "resumed"

    clock.advance(11)  # the third death
    [later] = jobs.send("test.noop", {})["runs"]  # due after the crashed run, which claims look at first
    other = claim(jobs, owner="w3")
    assert other.run.id == later["id"], "the claim failed the crashed run and took the next one"
    run = jobs.run(sent["id"])
    assert run.status == "failed" and run.ended_at == clock.now
    assert run.error == "WorkerCrashed: the run's worker died 3 times mid-run (JOBS_MAX_CRASHES=3)"
    assert crashes(jobs, sent["id"]) == 3
    # Announced like any outcome (no `running`: these claims never started the function).
    assert run_messages(app, sent["id"]) == [{"status": "queued"}, {"status": "failed", "error": run.error}]
    with pytest.raises(LeaseLost):  # the last holder, had it only stalled, is fenced off
        jobs.runs.finish(held, "completed", output_json="1")
    jobs.runs.finish(other, "completed")
    clock.advance(3600)
    assert claim(jobs) is None, "a failed run is never claimed again"


def test_a_run_to_cancel_is_cancelled_however_often_its_worker_died(app, jobs):
    clock = FakeClock()
    jobs.runs.now = clock
    [sent] = jobs.send("test.noop", {})["runs"]
    claim(jobs, lease_s=10)
    jobs.cancel(sent["id"])  # held: its worker is asked to stop before its next step, then dies
    for _ in range(jobs.runs.max_crashes):
        clock.advance(10)
        held = claim(jobs, lease_s=10)
    assert jobs.runner.execute(held) == "cancelled"
    assert run_messages(app, sent["id"])[-1] == {"status": "cancelled"}


def test_max_crashes_comes_from_the_config(database_url):
    for app in app_on(database_url, JOBS_EAGER=False, JOBS_MAX_CRASHES=1):  # yields once, then cleans up
        assert app.extensions["jobs"].runs.max_crashes == 1


def test_runs_handed_back_on_purpose_are_not_crashes(jobs):
    """A stopping worker, a sleep and a retry clear `lease_owner`: the next claim is no crash."""
    clock = FakeClock()
    jobs.runs.now = clock
    [sent] = jobs.send("test.noop", {})["runs"]
    for _ in range(2 * jobs.runs.max_crashes):
        held = claim(jobs, lease_s=10)
        jobs.runs.release(held)  # a worker stopping at a step boundary
        held = claim(jobs, lease_s=10)
        jobs.runs.release(held, at=clock.now + timedelta(seconds=60))  # a sleep
        clock.advance(60)
        held = claim(jobs, lease_s=10)
        jobs.runs.retry(held, at=clock.now + timedelta(seconds=60), error="RuntimeError: again")  # a backoff
        clock.advance(60)
    assert jobs.run(sent["id"]).status == "running" and crashes(jobs, sent["id"]) == 0
    assert claim(jobs) is not None


# job_runs as it was before the `crashes` column.
OLD_RUNS = Table(
    "job_runs",
    MetaData(),
    Column("id", String(32), primary_key=True),
    Column("function_id", String(100), nullable=False),
    Column("event_id", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("output", Text),
    Column("error", Text),
    Column("cancel_requested", Boolean, nullable=False),
    Column("lease_owner", String(64)),
    Column("available_at", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("ended_at", DateTime(timezone=True)),
)


def test_the_schema_adds_new_columns_to_a_database_made_before_them(database_url):
    engine = make_engine(database_url)
    try:
        OLD_RUNS.create(engine)
        now = FakeClock()()
        with engine.begin() as conn:
            conn.execute(insert(OLD_RUNS).values(
                id="0123456789abcdef", function_id="noop", event_id="fedcba9876543210", status="running",
                attempt=1, cancel_requested=False, lease_owner="w:1", available_at=now, created_at=now,
            ))
        create_schema(engine)
        create_schema(engine)  # every process starts with it: a second time changes nothing
        with engine.connect() as conn:
            assert {c["name"] for c in inspect(conn).get_columns("job_runs")} == set(runs.c.keys())
            assert conn.execute(select(runs.c.id, runs.c.crashes)).all() == [("0123456789abcdef", 0)]
    finally:
        engine.dispose()


def test_the_schema_widens_step_ids_in_a_database_made_when_they_were_narrower(postgres_url):
    """SQLite ignores a VARCHAR's length; PostgreSQL would refuse `<100-character step>/publish:1`."""
    engine = make_engine(postgres_url)
    try:
        create_schema(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE job_steps ALTER COLUMN id TYPE VARCHAR(100)")  # as it was made
        create_schema(engine)
        with engine.connect() as conn:
            [width] = [c["type"].length for c in inspect(conn).get_columns("job_steps") if c["name"] == "id"]
        assert width == steps.c.id.type.length == 200
    finally:
        engine.dispose()


def test_add_missing_columns_adds_nullable_and_defaulted_columns_and_refuses_others(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'old.sqlite3'}")
    try:
        old = Table("things", MetaData(), Column("id", Integer, primary_key=True))
        old.create(engine)
        with engine.begin() as conn:
            conn.execute(insert(old).values(id=1))
        newer = Table(
            "things", MetaData(), Column("id", Integer, primary_key=True),
            Column("note", Text), Column("size", Integer, nullable=False, server_default=text("7")),
        )
        add_missing_columns(engine, newer)
        with engine.connect() as conn:
            assert conn.execute(select(newer)).all() == [(1, None, 7)]

        # Existing rows could have no value for it: a migration by hand.
        newest = Table("things", MetaData(), Column("id", Integer, primary_key=True),
                       Column("owner", String(10), nullable=False))
        with pytest.raises(RuntimeError, match="things.owner is missing and NOT NULL"):
            add_missing_columns(engine, newest)
    finally:
        engine.dispose()
