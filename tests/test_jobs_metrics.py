"""The jobs' metrics (CONTRACT §6), in-process: read with prometheus_client before and after.

`jobs_runs_finished_total` and `jobs_run_duration_seconds` count once the
transaction that ended a run commits; `jobs_runs_due` is read from the database
at scrape time. The same from a `flask jobs worker --metrics-port` is in
test_jobs_live.py.
"""
from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from common.metrics import registry, scrape_collectors
from conftest import FakeClock, app_on
from jobs import NonRetriableError
from jobs.records import COMPLETED


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app(database_url):
    yield from app_on(database_url, JOBS_EAGER=False)


@pytest.fixture
def jobs(app, clock):
    jobs = app.extensions["jobs"]
    jobs.runs.now = clock

    @jobs.function(id="metered", trigger="test.metered")
    def metered(ctx):
        ctx.step.run("work", lambda: clock.advance(5))  # the run takes 5 s of the test's clock
        return "ok"

    @jobs.function(id="metered-broken", trigger="test.metered-broken", retries=0)
    def broken(ctx):
        raise NonRetriableError("no")

    return jobs


def finished(function: str, status: str) -> float:
    return REGISTRY.get_sample_value("jobs_runs_finished_total", {"function": function, "status": status}) or 0.0


def durations(function: str) -> tuple[float, float]:
    """(count, sum) of jobs_run_duration_seconds for `function`."""
    labels = {"function": function}
    return (REGISTRY.get_sample_value("jobs_run_duration_seconds_count", labels) or 0.0,
            REGISTRY.get_sample_value("jobs_run_duration_seconds_sum", labels) or 0.0)


def due(app) -> float | None:
    return registry(scrape_collectors(app)).get_sample_value("jobs_runs_due")


def send(jobs, name: str) -> str:
    return jobs.send(name, {})["runs"][0]["id"]


def test_a_completed_run_is_counted_with_its_duration(jobs):
    before, (count, total) = finished("metered", "completed"), durations("metered")
    send(jobs, "test.metered")
    assert finished("metered", "completed") == before, "queued: nothing ended yet"
    assert jobs.drain() == 1
    assert finished("metered", "completed") == before + 1
    assert durations("metered") == (count + 1, total + 5.0)


def test_failed_and_cancelled_runs_are_counted_by_status(jobs):
    failed_before = finished("metered-broken", "failed")
    send(jobs, "test.metered-broken")
    jobs.drain()
    assert finished("metered-broken", "failed") == failed_before + 1

    cancelled_before, (count, _) = finished("metered", "cancelled"), durations("metered")
    jobs.cancel(send(jobs, "test.metered"))  # before it ever started
    assert finished("metered", "cancelled") == cancelled_before + 1
    assert durations("metered")[0] == count, "a run that never started has no duration"


def test_a_rolled_back_end_counts_nothing(jobs, clock):
    run = jobs.run(send(jobs, "test.metered"))
    ended = replace(run, status=COMPLETED, started_at=clock.now, ended_at=clock.now)
    before, (count, _) = finished("metered", "completed"), durations("metered")
    with pytest.raises(RuntimeError):
        with jobs.runs.write() as session:
            jobs.runs.on_status(session, ended)  # what finish() calls, in its transaction
            raise RuntimeError("the transaction fails after the run was announced")
    assert (finished("metered", "completed"), durations("metered")[0]) == (before, count)

    with jobs.runs.write() as session:
        jobs.runs.on_status(session, ended)
    assert (finished("metered", "completed"), durations("metered")[0]) == (before + 1, count + 1)


def test_runs_due_is_read_from_the_database_at_scrape_time(app, jobs, clock):
    assert due(app) == 0
    send(jobs, "test.metered")
    send(jobs, "test.metered")
    assert due(app) == 2
    claim = jobs.runs.claim(jobs.registry.ids, {}, owner="w", lease_s=10)
    assert due(app) == 1, "a run a live lease holds is not due"
    clock.advance(10)
    assert due(app) == 2, "its lease lapsed: due again (a crashed worker's run)"
    jobs.runs.release(claim, at=clock.now + timedelta(seconds=60))
    assert due(app) == 1, "a run sleeping or backing off is not due until its time"


def test_metrics_endpoint_serves_the_jobs_metrics(app, client, jobs):
    send(jobs, "test.metered")
    jobs.drain()
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))}
    assert {"jobs_runs_finished", "jobs_run_duration_seconds", "jobs_runs_due"} <= set(families)
    [sample] = families["jobs_runs_due"].samples
    assert sample.value == 0


def test_runs_due_is_left_out_not_raised_when_the_database_is_away(tmp_path):
    from app import create_app

    # Nothing listens on port 1: every connection is refused at once.
    app = create_app({"TESTING": True, "SECRET_KEY": "s", "DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/none"})
    try:
        [collect] = [c for c in scrape_collectors(app) if c.__qualname__.startswith("due_runs_collector")]
        assert list(collect()) == []
        response = app.test_client().get("/metrics")
        assert response.status_code == 200
        assert "jobs_runs_due" not in response.get_data(as_text=True)
        assert "jobs_runs_finished_total" in response.get_data(as_text=True)
    finally:
        app.extensions["jobs"].shutdown()
        app.extensions["realtime"].shutdown()
        app.extensions["database"].dispose()
