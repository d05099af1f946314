"""The run store's guarantees, on SQLite and on PostgreSQL: atomic claims, leases, fencing, limits.

Also the thread pool in-process (plain OS threads, no gevent) as the store's first real client.
"""
from __future__ import annotations

import threading

import pytest

from conftest import FakeClock, app_on, wait_until
from jobs.records import LeaseLost


@pytest.fixture
def app(database_url):
    # These tests claim by hand or start the pool themselves.
    yield from app_on(database_url, JOBS_EAGER=False, DEMO_REPORT_STEP_S=0)


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
