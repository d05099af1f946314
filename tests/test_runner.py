"""`Runner.execute`: how each way a function ends becomes the run's next state (runner.py's table).

Runs are claimed by hand, time is a fake clock: a backoff or a sleep has passed
when the clock says so, and "not claimable yet" is a claim that returns None.
"""
from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import select

from common.database import DatabaseUnavailable, as_utc
from jobs import NonRetriableError
from jobs.runner import backoff_s
from jobs.tables import runs
from conftest import FakeClock, app_on


@pytest.fixture
def app(database_url):
    yield from app_on(database_url, JOBS_EAGER=False)  # these tests claim by hand


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def jobs(app, clock):
    jobs = app.extensions["jobs"]
    jobs.runs.now = clock
    return jobs


@pytest.fixture
def calls() -> Counter:
    return Counter()


def start(jobs, body, retries: int = 3) -> str:
    jobs.function(id="job", trigger="test.job", retries=retries)(body)
    return jobs.send("test.job", {})["runs"][0]["id"]


def claim(jobs, owner: str = "w1", lease_s: float = 30):
    return jobs.runs.claim(jobs.registry.ids, jobs.registry.concurrency_limits, owner=owner, lease_s=lease_s)


def execute(jobs, stopping=lambda: False) -> str:
    held = claim(jobs)
    assert held is not None, "the run is due"
    return jobs.runner.execute(held, stopping)


def wait_until_due(jobs, clock) -> float:
    """Advance the clock a quarter second at a time until the run can be claimed; return the wait."""
    waited = 0.0
    while (due := claim(jobs, owner="probe")) is None:
        assert waited < 3600, "never due again"
        clock.advance(0.25)
        waited += 0.25
    jobs.runs.release(due)  # hand it back, due now, for execute()
    return waited


def row(jobs, run_id: str):
    with jobs.runs.engine.connect() as conn:
        return conn.execute(select(runs).where(runs.c.id == run_id)).one()


def lifecycle(app, run_id: str) -> list[dict]:
    found = app.extensions["realtime"].store.read_after(f"run.{run_id}", None, 0, 100)
    return [m.data for m in found if m.topic == "run"]


def stored_steps(jobs, run_id: str) -> dict[str, str]:
    return {s.id: s.status for s in jobs.run(run_id).steps}


def crashes(jobs, run_id: str) -> int:
    return row(jobs, run_id).crashes


def away(monkeypatch, store, method: str, times: int) -> Counter:
    """Make `store.method` raise DatabaseUnavailable on its first `times` calls; count its calls."""
    real, calls = getattr(store, method), Counter()

    def blip(*args, **kwargs):
        calls[method] += 1
        if calls[method] <= times:
            raise DatabaseUnavailable("the database is unavailable; try again shortly")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, method, blip)
    return calls


def test_a_returned_value_completes_the_run_with_its_output(app, jobs, clock):
    run_id = start(jobs, lambda ctx: {"rows": ctx.step.run("fetch", lambda: (1, 2))})
    assert execute(jobs) == "completed"
    run = jobs.run(run_id)
    assert (run.status, run.attempt, run.output, run.error) == ("completed", 1, {"rows": [1, 2]}, None)
    assert run.ended_at == clock.now and row(jobs, run_id).lease_owner is None
    assert lifecycle(app, run_id) == [
        {"status": "queued"}, {"status": "running"}, {"status": "completed", "output": {"rows": [1, 2]}},
    ]
    clock.advance(3600)
    assert claim(jobs) is None


def test_a_non_retriable_error_fails_the_run_at_once(app, jobs, clock, calls):
    def picky(ctx):
        calls["picky"] += 1
        raise NonRetriableError("the input can never work")

    run_id = start(jobs, picky, retries=5)
    assert execute(jobs) == "failed"
    run = jobs.run(run_id)
    assert (run.status, run.attempt, run.error) == ("failed", 1, "NonRetriableError")
    assert lifecycle(app, run_id)[-1] == {"status": "failed", "error": run.error}
    clock.advance(3600)
    assert claim(jobs) is None and calls["picky"] == 1


def test_an_exception_retries_after_exponential_backoff(jobs, clock, calls):
    def flaky(ctx):
        ctx.step.run("once", lambda: calls.update(["once"]))
        raise RuntimeError(f"attempt {ctx.attempt} broke")

    jobs.runner.retry_base_s = 2.0
    run_id = start(jobs, flaky)
    assert execute(jobs) == "retrying"
    run, held = jobs.run(run_id), row(jobs, run_id)
    assert (run.status, run.attempt, run.error) == ("running", 2, "RuntimeError")
    assert held.lease_owner is None and as_utc(held.available_at) == clock.now + timedelta(seconds=2)

    assert wait_until_due(jobs, clock) == 2.0
    assert execute(jobs) == "retrying"
    assert wait_until_due(jobs, clock) == 4.0
    assert jobs.run(run_id).attempt == 3 and calls["once"] == 1


def test_the_backoff_is_capped(jobs, clock):
    assert [backoff_s(attempt, 1.0, 5.0) for attempt in range(1, 6)] == [1, 2, 4, 5, 5]
    jobs.runner.retry_base_s, jobs.runner.retry_max_s = 2.0, 3.0
    start(jobs, lambda ctx: 1 / 0, retries=5)
    waits = []
    for _ in range(3):
        assert execute(jobs) == "retrying"
        waits.append(wait_until_due(jobs, clock))
    assert waits == [2.0, 3.0, 3.0]


def test_a_run_fails_when_its_retries_are_used_up(app, jobs, clock, calls):
    def doomed(ctx):
        calls["doomed"] += 1
        raise ZeroDivisionError("division by zero")

    run_id = start(jobs, doomed, retries=1)
    assert execute(jobs) == "retrying"
    clock.advance(jobs.runner.retry_base_s)
    assert execute(jobs) == "failed"
    run = jobs.run(run_id)
    assert (run.status, run.attempt, run.error) == ("failed", 2, "ZeroDivisionError")
    assert lifecycle(app, run_id)[-1] == {"status": "failed", "error": run.error}
    clock.advance(3600)
    assert claim(jobs) is None and calls["doomed"] == 2


@pytest.mark.parametrize("lease", ["held", "lapsed"])
def test_a_cancel_request_cancels_the_run(app, jobs, clock, calls, lease):
    def body(ctx):
        calls["function"] += 1
        ctx.step.run("work", lambda: calls.update(["work"]))

    run_id = start(jobs, body)
    held = claim(jobs, lease_s=30)
    jobs.cancel(run_id)
    if lease == "lapsed":  # its worker died: the next worker sees the request before calling the function
        clock.advance(30)
        held = claim(jobs, owner="w2")
    assert jobs.runner.execute(held) == "cancelled"
    run = jobs.run(run_id)
    assert (run.status, run.ended_at) == ("cancelled", clock.now)
    assert calls["work"] == 0 and calls["function"] == (1 if lease == "held" else 0)
    assert lifecycle(app, run_id)[-1] == {"status": "cancelled"}
    assert claim(jobs) is None


def test_a_sleep_hands_the_run_back_until_its_wake_up_time(jobs, clock, calls):
    def napper(ctx):
        ctx.step.run("before", lambda: calls.update(["before"]))
        ctx.step.sleep("nap", 30)
        return "rested"

    run_id = start(jobs, napper)
    assert execute(jobs) == "sleeping"
    held = row(jobs, run_id)
    wake_up = clock.now + timedelta(seconds=30)
    assert (held.status, held.lease_owner, as_utc(held.available_at)) == ("running", None, wake_up)
    assert wait_until_due(jobs, clock) == 30.0
    assert execute(jobs) == "completed"
    assert jobs.run(run_id).output == "rested" and calls == Counter(before=1)


def test_a_stopping_worker_releases_the_run_at_a_step_boundary(app, jobs, clock, calls):
    def two_steps(ctx):
        ctx.step.run("a", lambda: calls.update(["a"]))
        ctx.step.run("b", lambda: calls.update(["b"]))
        return "done"

    run_id = start(jobs, two_steps)
    assert execute(jobs, stopping=lambda: calls["a"] > 0) == "released"
    held = row(jobs, run_id)
    assert (held.status, held.lease_owner, held.ended_at) == ("running", None, None)
    assert stored_steps(jobs, run_id) == {"a": "completed"}

    other = claim(jobs, owner="w2")  # at once: no clock advance
    assert other is not None and other.run.id == run_id
    assert jobs.runner.execute(other) == "completed"
    assert calls == Counter(a=1, b=1)
    assert [m["status"] for m in lifecycle(app, run_id)] == ["queued", "running", "completed"]


def test_a_step_with_the_longest_id_can_publish(jobs):
    step_id = "s" * 100
    run_id = start(jobs, lambda ctx: ctx.step.run(step_id, lambda: ctx.publish(ctx.channel, "log", "inside")))
    assert execute(jobs) == "completed"
    assert stored_steps(jobs, run_id) == {step_id: "completed", f"{step_id}/publish:1": "completed"}


def test_a_lost_lease_stops_the_execution_without_writing(app, jobs, clock, calls):
    usurper = []

    def slow():
        if not usurper:  # the step outlives the lease, and another worker takes the run
            clock.advance(31)
            usurper.append(claim(jobs, owner="w2"))
        calls["slow"] += 1
        return "slow"

    run_id = start(jobs, lambda ctx: ctx.step.run("slow", slow))
    assert execute(jobs) == "lease_lost"
    [other] = usurper
    held, run = row(jobs, run_id), jobs.run(run_id)
    assert (held.status, held.lease_owner, run.output, run.error) == ("running", other.token, None, None)
    assert stored_steps(jobs, run_id) == {"slow": "running"}, "the step's result was not recorded"
    assert [m["status"] for m in lifecycle(app, run_id)] == ["queued", "running"]

    assert jobs.runner.execute(other) == "completed"
    assert jobs.run(run_id).output == "slow" and calls["slow"] == 2


# -- the database away for a moment (issue 17, item 9) -------------------------------


@pytest.mark.parametrize("write", ["mark_started", "finish"])
def test_a_runs_own_write_is_tried_again_while_the_database_is_away(app, jobs, monkeypatch, write):
    waits = []

    def wait(seconds):
        waits.append(seconds)
        assert claim(jobs, owner="other") is None, "the run stays held"

    jobs.runner.wait = wait
    run_id = start(jobs, lambda ctx: ctx.step.run("work", lambda: "done"))
    tries = away(monkeypatch, jobs.runs, write, times=3)
    assert execute(jobs) == "completed"
    assert tries[write] == 4 and waits == [0.25, 0.5, 1.0]
    run = jobs.run(run_id)
    assert (run.status, run.attempt, run.output, crashes(jobs, run_id)) == ("completed", 1, "done", 0)
    assert [(s.id, s.attempts) for s in run.steps] == [("work", 1)]
    assert [m["status"] for m in lifecycle(app, run_id)] == ["queued", "running", "completed"]


@pytest.mark.parametrize("where", ["in the step's code", "recording its start", "recording its result"])
def test_the_database_away_during_a_step_hands_the_run_back_uncounted(jobs, clock, monkeypatch, calls, where):
    def work():
        calls["work"] += 1
        if where == "in the step's code" and calls["work"] == 1:
            raise DatabaseUnavailable("the database is unavailable; try again shortly")
        return "done"

    run_id = start(jobs, lambda ctx: ctx.step.run("work", work))
    if where != "in the step's code":
        away(monkeypatch, jobs.journal, {"recording its start": "start", "recording its result": "complete"}[where], 1)
    waits = []
    jobs.runner.wait = waits.append
    away(monkeypatch, jobs.journal, "hand_back", 2)  # still away when the runner hands the run back
    assert execute(jobs) == "handed_back"
    assert waits == [0.25, 0.5]
    run, held = jobs.run(run_id), row(jobs, run_id)
    assert (run.status, run.attempt, run.error, run.steps) == ("running", 1, None, ())
    assert (held.lease_owner, held.crashes) == (None, 0)

    assert wait_until_due(jobs, clock) == jobs.runner.retry_base_s
    assert execute(jobs) == "completed"
    run = jobs.run(run_id)
    assert (run.status, run.attempt, run.output, crashes(jobs, run_id)) == ("completed", 1, "done", 0)
    assert [(s.id, s.status, s.attempts) for s in run.steps] == [("work", "completed", 1)]


def test_a_step_keeps_the_attempts_it_had_before_the_database_went_away(jobs, clock, calls):
    def work():
        calls["work"] += 1
        if calls["work"] == 1:
            raise RuntimeError("a failure of its own")
        if calls["work"] == 2:
            raise DatabaseUnavailable("the database is unavailable; try again shortly")
        return "done"

    run_id = start(jobs, lambda ctx: ctx.step.run("work", work))
    assert execute(jobs) == "retrying"
    wait_until_due(jobs, clock)
    assert execute(jobs) == "handed_back"
    run = jobs.run(run_id)
    assert (run.attempt, [(s.id, s.status, s.attempts) for s in run.steps]) == (2, [("work", "failed", 1)])

    wait_until_due(jobs, clock)
    assert execute(jobs) == "completed"
    run = jobs.run(run_id)
    assert (run.attempt, [(s.id, s.status, s.attempts) for s in run.steps]) == (2, [("work", "completed", 2)])
    assert crashes(jobs, run_id) == 0
