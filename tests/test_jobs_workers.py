"""Whether any job worker polls: its heartbeat, and /readyz's `jobs_workers` warning (issue 19, item 5).

Runs queued with no worker used to wait forever while /readyz said ready. The
clock of the run store is a FakeClock: a worker's silence is made by moving it.
"""
from __future__ import annotations

import pytest

from conftest import FakeClock, app_on, wait_until
from jobs.worker import HEARTBEAT_TASK, Worker, last_heartbeat

HINT = "start one with `flask --app app jobs worker`"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app(database_url, clock):
    # Runs wait for a worker, as under the workshop's JOBS_EMBEDDED=false.
    for app in app_on(database_url, JOBS_EAGER=False, JOBS_POLL_S=0.01):
        app.extensions["jobs"].runs.now = clock
        yield app


@pytest.fixture
def jobs(app):
    jobs = app.extensions["jobs"]
    jobs.function(id="job", trigger="test.job")(lambda ctx: "done")
    return jobs


def readyz(client) -> dict:
    response = client.get("/readyz")
    body = response.get_json()
    # A warning never makes the process unready (on PostgreSQL, its LISTEN may still be starting).
    checks_pass = all(result == "ok" for result in body["checks"].values())
    assert response.status_code == (200 if checks_pass else 503), body
    return body


def test_readyz_warns_while_runs_wait_and_no_worker_has_polled_lately(app, jobs, clock):
    client = app.test_client()
    # No worker ever, and nothing waits: a web process whose workers run elsewhere, or an app without jobs.
    assert "warnings" not in readyz(client)

    jobs.send("test.job", {})
    assert readyz(client)["warnings"] == {
        "jobs_workers": f"1 run is waiting and no job worker has polled yet: {HINT}"
    }

    jobs.runs.take_turn(HEARTBEAT_TASK, Worker.heartbeat_s)  # what a worker of any process does as it polls
    assert "warnings" not in readyz(client)
    clock.advance(3 * Worker.heartbeat_s)  # three heartbeats missed: still within the allowance
    assert "warnings" not in readyz(client)
    clock.advance(1)
    jobs.send("test.job", {})
    assert readyz(client)["warnings"] == {
        "jobs_workers": f"2 runs are waiting and no job worker has polled in the last 16 s: {HINT}"
    }


def test_a_polling_worker_beats_once_a_heartbeat_and_a_stopped_one_falls_silent(app, jobs, clock, monkeypatch):
    monkeypatch.setattr(Worker, "heartbeat_s", 0.05)  # a beat every 0.05 s of real time
    worker = jobs.new_worker(1)  # the embedded pool's kind, and `flask jobs worker`'s
    worker.start()
    try:
        wait_until(lambda: last_heartbeat(jobs.runs, 0.05) == clock.now, what="the first heartbeat")
        clock.advance(60)
        wait_until(lambda: last_heartbeat(jobs.runs, 0.05) == clock.now, what="a heartbeat a minute later")
    finally:
        worker.shutdown(wait=True)
    beat = clock.now
    clock.advance(60)
    assert last_heartbeat(jobs.runs, 0.05) == beat, "a stopped worker says nothing"
    jobs.send("test.job", {})
    assert readyz(app.test_client())["warnings"] == {
        "jobs_workers": f"1 run is waiting and no job worker has polled in the last 60 s: {HINT}"
    }
