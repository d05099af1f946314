"""`Worker` on real OS threads: drain, the claim loop, lease renewal, shutdown, its thread limit.

Job functions block on `threading.Event`s the test sets; conditions are awaited
with `wait_until`, never by sleeping.
"""
from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy import func, select

from common.database import DatabaseUnavailable, as_utc
from conftest import FakeClock, app_on, wait_until
from jobs.tables import runs
from jobs.worker import Worker


@pytest.fixture
def app(database_url):
    yield from app_on(database_url, JOBS_EAGER=False, JOBS_POLL_S=0.01)  # runs wait for a worker


@pytest.fixture
def jobs(app):
    return app.extensions["jobs"]


@pytest.fixture
def go() -> threading.Event:
    """Lets blocked job functions carry on; set at teardown too, so a failing test never hangs."""
    return threading.Event()


@pytest.fixture
def new_worker(jobs, go):
    made: list[Worker] = []

    def new(*, threads: int = 1, lease_s: float = 30.0, name: str | None = None) -> Worker:
        worker = Worker(jobs.runs, jobs.runner, threads=threads, lease_s=lease_s, poll_s=0.01, name=name)
        made.append(worker)
        return worker

    yield new
    go.set()
    for worker in made:
        worker.shutdown(wait=True)


def send(jobs, n: int = 1) -> list[str]:
    return [r["id"] for r in jobs.send_many([("test.job", {"i": i}) for i in range(n)])["runs"]]


def status(jobs, run_id: str) -> str:
    return jobs.run(run_id).status


def row(jobs, run_id: str):
    with jobs.runs.engine.connect() as conn:
        return conn.execute(select(runs).where(runs.c.id == run_id)).one()


def leased(jobs) -> int:
    """How many runs a worker holds (claimed, executing or about to)."""
    with jobs.runs.engine.connect() as conn:
        query = select(func.count()).select_from(runs).where(runs.c.lease_owner.is_not(None))
        return conn.execute(query).scalar_one()


def test_drain_executes_every_due_run_inline_and_counts_them(jobs, new_worker):
    threads = []

    @jobs.function(id="job", trigger="test.job")
    def job(ctx):
        threads.append(threading.get_ident())
        return ctx.event.data["i"]

    ids = send(jobs, 3)
    worker = new_worker()
    assert worker.drain() == 3
    assert [jobs.run(i).output for i in ids] == [0, 1, 2]
    assert threads == [threading.get_ident()] * 3
    assert worker.drain() == 0


def test_runs_sent_while_the_pool_runs_complete_and_shutdown_ends_it(jobs):
    @jobs.function(id="job", trigger="test.job")
    def job(ctx):
        return ctx.step.run("double", lambda: ctx.event.data["i"] * 2)

    worker = jobs.worker
    worker.start()
    ids = send(jobs, 5)
    for run_id in ids:
        wait_until(lambda: status(jobs, run_id) == "completed", what=f"run {run_id}")
    assert [jobs.run(i).output for i in ids] == [0, 2, 4, 6, 8]

    worker.shutdown(wait=True)
    [late] = send(jobs)
    assert status(jobs, late) == "queued", "a stopped worker claims nothing"
    assert worker.drain() == 0


def test_a_held_run_keeps_its_lease_while_it_runs(jobs, new_worker, go):
    clock = FakeClock()
    jobs.runs.now = clock
    started = threading.Event()

    @jobs.function(id="job", trigger="test.job")
    def job(ctx):
        return ctx.step.run("block", lambda: started.set() or go.wait(30))

    [run_id] = send(jobs)
    new_worker(lease_s=0.3).start()  # renews every 0.1 s of real time
    assert started.wait(15)
    for _ in range(2):
        clock.advance(60)  # far past the lease: only renewals keep the run held
        wait_until(lambda: as_utc(row(jobs, run_id).available_at) > clock.now, what="a renewed lease")
        assert jobs.runs.claim(["job"], {}, owner="thief", lease_s=30) is None
    go.set()
    wait_until(lambda: status(jobs, run_id) == "completed", what="the run")
    assert [(s.id, s.attempts) for s in jobs.run(run_id).steps] == [("block", 1)]


def test_shutdown_hands_a_run_back_at_its_next_step_and_another_worker_finishes_it(jobs, new_worker, go):
    calls = Counter()
    between = threading.Event()

    @jobs.function(id="job", trigger="test.job")
    def job(ctx):
        ctx.step.run("a", lambda: calls.update(["a"]))
        between.set()
        go.wait(30)
        ctx.step.run("b", lambda: calls.update(["b"]))
        return "done"

    [run_id] = send(jobs)
    first = new_worker(name="first")
    first.start()
    assert between.wait(15)
    first.shutdown()
    go.set()
    first.shutdown(wait=True)

    held = row(jobs, run_id)
    assert (held.status, held.lease_owner) == ("running", None), "released, not finished"
    assert [(s.id, s.status) for s in jobs.run(run_id).steps] == [("a", "completed")]
    assert new_worker(name="second").drain() == 1
    assert jobs.run(run_id).output == "done"
    assert calls == Counter(a=1, b=1)


def test_a_stopping_worker_keeps_renewing_until_its_step_ends(jobs, new_worker, go):
    """SIGTERM lets the step in progress finish: its lease must outlive a long step,
    or another worker would start the same step while it still runs."""
    clock = FakeClock()
    jobs.runs.now = clock
    started = threading.Event()

    @jobs.function(id="job", trigger="test.job")
    def job(ctx):
        ctx.step.run("long", lambda: started.set() or go.wait(30))
        ctx.step.run("next", lambda: None)

    [run_id] = send(jobs)
    worker = new_worker(lease_s=0.3)
    worker.start()
    assert started.wait(15)
    worker.shutdown()  # the step is still running
    for _ in range(2):
        clock.advance(60)
        wait_until(lambda: as_utc(row(jobs, run_id).available_at) > clock.now, what="a renewed lease")
        assert jobs.runs.claim(["job"], {}, owner="thief", lease_s=30) is None
    go.set()
    worker.shutdown(wait=True)
    held = row(jobs, run_id)
    assert (held.status, held.lease_owner) == ("running", None), "handed back after the step"
    assert [(s.id, s.status, s.attempts) for s in jobs.run(run_id).steps] == [("long", "completed", 1)]


def test_a_run_keeps_its_lease_while_its_outcome_waits_for_the_database(jobs, new_worker, go, monkeypatch):
    """Issue 17, item 9: a blip at the end of a run is no crash."""
    clock = FakeClock()
    jobs.runs.now = clock
    database_away, retrying = threading.Event(), threading.Event()
    database_away.set()
    finish = jobs.runs.finish

    def finish_unless_away(*args, **kwargs):
        if database_away.is_set():
            raise DatabaseUnavailable("the database is unavailable; try again shortly")
        return finish(*args, **kwargs)

    monkeypatch.setattr(jobs.runs, "finish", finish_unless_away)
    jobs.runner.wait = lambda seconds: retrying.set() or go.wait(30)

    @jobs.function(id="job", trigger="test.job")
    def job(ctx):
        return ctx.step.run("work", lambda: "done")

    [run_id] = send(jobs)
    new_worker(lease_s=0.3).start()  # renews every 0.1 s of real time
    assert retrying.wait(15)
    for _ in range(2):
        clock.advance(60)  # far past the lease: only renewals keep the run held
        wait_until(lambda: as_utc(row(jobs, run_id).available_at) > clock.now, what="a renewed lease")
        assert jobs.runs.claim(["job"], {}, owner="thief", lease_s=30) is None
    database_away.clear()
    go.set()
    wait_until(lambda: status(jobs, run_id) == "completed", what="the run")
    run = jobs.run(run_id)
    assert (run.output, run.attempt, row(jobs, run_id).crashes) == ("done", 1, 0)
    assert [(s.id, s.attempts) for s in run.steps] == [("work", 1)]


def test_claims_failing_while_the_database_is_away_do_not_stop_renewals(jobs, new_worker, go, monkeypatch):
    clock = FakeClock()
    jobs.runs.now = clock
    started = threading.Event()
    claim = jobs.runs.claim

    def claim_until_started(*args, **kwargs):
        if started.is_set():
            raise DatabaseUnavailable("the database is unavailable; try again shortly")
        return claim(*args, **kwargs)

    monkeypatch.setattr(jobs.runs, "claim", claim_until_started)

    @jobs.function(id="job", trigger="test.job")
    def job(ctx):
        return ctx.step.run("block", lambda: started.set() or go.wait(30))

    [run_id] = send(jobs)
    new_worker(threads=2, lease_s=0.3).start()  # a free thread: the loop goes on claiming
    assert started.wait(15)
    for _ in range(2):
        clock.advance(60)
        wait_until(lambda: as_utc(row(jobs, run_id).available_at) > clock.now, what="a renewed lease")
        assert claim(["job"], {}, owner="thief", lease_s=30) is None
    go.set()
    wait_until(lambda: status(jobs, run_id) == "completed", what="the run")
    assert row(jobs, run_id).crashes == 0


def test_a_worker_never_holds_more_runs_than_its_threads(jobs, new_worker):
    turns = threading.Semaphore(0)
    lock = threading.Lock()
    active, peak = [0], [0]

    @jobs.function(id="job", trigger="test.job")
    def job(ctx):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        turns.acquire(timeout=30)
        with lock:
            active[0] -= 1

    ids = send(jobs, 5)
    new_worker(threads=2).start()
    for done in range(len(ids)):
        busy = min(2, len(ids) - done)
        wait_until(lambda: active[0] == busy, what=f"{busy} busy threads")
        assert leased(jobs) == busy, "the others stay queued for other workers"
        turns.release()
        wait_until(lambda: sum(status(jobs, i) == "completed" for i in ids) == done + 1, what=f"{done + 1} done")
    assert peak[0] == 2
