"""`ctx.text_stream` in job functions: retries, crashes and cancels (jobs/steps.py, cancels.py; issue 20).

Eager mode and a fake clock where the run's timing is the test's; a real
worker on real threads where a cancel must reach a step still writing.
"""
from __future__ import annotations

import threading

import pytest

from conftest import FakeClock, app_on, wait_until
from jobs.worker import Worker


class Crash(BaseException):
    """Stands in for kill -9: nothing below the function gets to record anything."""


def folded(realtime, run_id: str) -> dict[str, dict]:
    """The run's text streams as a reload shows them (replay folds them)."""
    page = realtime.store.read_after(f"run.{run_id}", ["answer"], 0, 1000)
    return {m.data["text_stream"]: m.data for m in page}


def live(realtime, run_id: str) -> list[dict]:
    return [m.data for m in realtime.store.read_new(0, 10_000) if m.channel == f"run.{run_id}" and m.topic == "answer"]


@pytest.fixture
def app(database_url):
    yield from app_on(database_url, REALTIME_TEXT_FLUSH_MS=None)


@pytest.fixture
def realtime(app):
    return app.extensions["realtime"]


@pytest.fixture
def jobs(app):
    jobs = app.extensions["jobs"]
    jobs.runs.now = FakeClock()
    return jobs


def test_a_retried_step_restarts_its_text_stream_and_the_page_shows_one_attempt(jobs, realtime):
    attempts = []

    @jobs.function(id="answer", trigger="test.answer", retries=1)
    def answer(ctx):
        def generate():
            attempts.append(1)
            with ctx.text_stream(ctx.channel, "answer") as out:
                out.write(f"attempt {len(attempts)}: ")
                realtime.text_flusher.flush()
                if len(attempts) == 1:
                    raise TimeoutError("the model stopped answering")
                out.write("the whole answer")
            return "ok"

        return ctx.step.run("generate", generate)

    run_id = jobs.send("test.answer", {})["runs"][0]["id"]
    jobs.runs.now.advance(60)
    jobs.drain()
    assert jobs.run(run_id).status == "completed"
    sid = f"{run_id}:generate/text:1"  # the same for both attempts
    assert folded(realtime, run_id) == {
        sid: {"text_stream": sid, "seq": 3, "text": "attempt 2: the whole answer", "status": "completed"},
    }
    statuses = [(d["seq"], d.get("status")) for d in live(realtime, run_id) if "text" in d or "status" in d]
    assert statuses == [(0, None), (2, "failed"), (0, None), (3, "completed")]


def test_a_completed_step_does_not_stream_again_when_a_later_step_is_retried(jobs, realtime):
    @jobs.function(id="twice", trigger="test.twice", retries=1)
    def twice(ctx):
        def generate():
            with ctx.text_stream(ctx.channel, "answer") as out:
                out.write("once")
        ctx.step.run("generate", generate)
        ctx.step.run("fragile", lambda: ctx.attempt > 1 or 1 / 0)

    run_id = jobs.send("test.twice", {})["runs"][0]["id"]
    jobs.runs.now.advance(60)
    jobs.drain()
    assert jobs.run(run_id).status == "completed"
    assert [d["seq"] for d in live(realtime, run_id)] == [0, 1, 2]


def test_a_run_resumed_after_its_worker_died_ends_the_dead_text_stream_then_streams_anew(jobs, realtime):
    crash = {"now": True}

    @jobs.function(id="fragile", trigger="test.fragile")
    def fragile(ctx):
        def generate():
            out = ctx.text_stream(ctx.channel, "answer").__enter__()
            out.write("half an ans")
            realtime.text_flusher.flush()
            if crash["now"]:
                realtime.text_flusher._streams.clear()  # the process and its flusher are gone
                raise Crash()
            out.write("wer")
            out.__exit__(None, None, None)

        ctx.step.run("generate", generate)

    with pytest.raises(Crash):
        jobs.send("test.fragile", {})
    run_id = _only_run(jobs)
    sid = f"{run_id}:generate/text:1"
    assert folded(realtime, run_id)[sid]["text"] == "half an ans" and "status" not in folded(realtime, run_id)[sid]
    crash["now"] = False
    jobs.runs.now.advance(jobs.lease_s)
    assert jobs.drain() == 1
    ends = [(d["seq"], d.get("status"), d.get("error")) for d in live(realtime, run_id) if "status" in d or "text" in d]
    assert ends == [(0, None, None), (2, "failed", "interrupted"), (0, None, None), (3, "completed", None)]
    assert folded(realtime, run_id)[sid]["text"] == "half an answer"


def test_a_worker_that_outlived_its_lease_stores_nothing_after_the_retry_started(jobs, realtime):
    """A worker stalls mid-answer (alive, its lease lapsing), another resumes the run and retries the
    step; then the stalled one wakes and goes on writing. Nothing it writes lands after the new
    attempt's start, its next write raises, and the page shows the new attempt's text only."""
    from realtime.text_streams import TextStreamSuperseded

    stalled: dict = {}

    @jobs.function(id="stalling", trigger="test.stalling")
    def stalling(ctx):
        def generate():
            if not stalled:
                out = ctx.text_stream(ctx.channel, "answer").__enter__()
                out.write("first ")
                realtime.text_flusher.flush()
                stalled["out"] = out
                raise Crash()  # the worker stops here, its text stream still open in its flusher
            with ctx.text_stream(ctx.channel, "answer") as out:
                out.write("second")
                realtime.text_flusher.flush()
                stalled["out"].write("late ")  # the stalled worker wakes up
                realtime.text_flusher.flush()
                with pytest.raises(TextStreamSuperseded):
                    stalled["out"].write("later")
                out.write(" attempt")

        ctx.step.run("generate", generate)

    with pytest.raises(Crash):
        jobs.send("test.stalling", {})
    run_id = _only_run(jobs)
    jobs.runs.now.advance(jobs.lease_s)
    assert jobs.drain() == 1
    sid = f"{run_id}:generate/text:1"
    assert folded(realtime, run_id)[sid] == {"text_stream": sid, "seq": 3, "text": "second attempt", "status": "completed"}
    stored = live(realtime, run_id)
    restart = max(i for i, d in enumerate(stored) if d["seq"] == 0)  # the retry's start
    assert [d.get("delta") for d in stored[restart:]] == [None, "second", " attempt", ""]


def _only_run(jobs) -> str:
    from sqlalchemy import select

    from jobs.tables import runs

    with jobs.runs.engine.connect() as conn:
        [run_id] = conn.execute(select(runs.c.id)).scalars().all()
    return run_id


def test_a_run_that_crashed_for_good_ends_its_text_streams(app, jobs, realtime):
    @jobs.function(id="doomed", trigger="test.doomed")
    def doomed(ctx):
        out = ctx.text_stream(ctx.channel, "answer").__enter__()
        out.write("never finished")
        realtime.text_flusher.flush()
        realtime.text_flusher._streams.clear()
        raise Crash()

    for _ in range(jobs.runs.max_crashes):
        with pytest.raises(Crash):
            jobs.send("test.doomed", {}) if _ == 0 else jobs.drain()
        jobs.runs.now.advance(jobs.lease_s)
    assert jobs.drain() == 0
    run_id = _only_run(jobs)
    assert jobs.run(run_id).error.startswith("WorkerCrashed")
    [data] = folded(realtime, run_id).values()
    assert (data["status"], data["error"]) == ("failed", "interrupted")


@pytest.fixture
def threaded(database_url):
    """Runs wait for a real worker; text streams flush on their own thread."""
    for app in app_on(database_url, JOBS_EAGER=False, REALTIME_TEXT_FLUSH_MS=20):
        app.extensions["realtime"].start()
        yield app


def test_a_cancel_reaches_a_step_that_is_still_writing(threaded):
    jobs, realtime = threaded.extensions["jobs"], threaded.extensions["realtime"]
    writing = threading.Event()
    writes_after_cancel = []
    cancelled = threading.Event()

    @jobs.function(id="endless", trigger="test.endless")
    def endless(ctx):
        def generate():
            with ctx.text_stream(ctx.channel, "answer") as out:
                while True:  # an LLM that never stops: only the cancel ends it
                    out.write("token ")
                    writing.set()
                    if cancelled.is_set():
                        writes_after_cancel.append(1)
                    threading.Event().wait(0.005)  # the model's pace

        ctx.step.run("generate", generate)

    run_id = jobs.send("test.endless", {})["runs"][0]["id"]
    worker = Worker(jobs.runs, jobs.runner, threads=1, poll_s=0.05)
    worker.start()
    try:
        assert writing.wait(30)
        jobs.cancel(run_id)
        cancelled.set()
        wait_until(lambda: jobs.run(run_id).status == "cancelled", timeout=30, what="the run cancelled")
    finally:
        worker.shutdown(wait=True)
    [data] = folded(realtime, run_id).values()
    assert data["status"] == "cancelled"
    assert data["text"] == "token " * (len(data["text"]) // len("token "))  # the text so far, kept whole
    assert len(writes_after_cancel) < len(data["text"]) // len("token ")


def test_cancel_tokens_cancel_their_own_run_only(app, jobs):
    from jobs.capabilities import CancelTokens

    @jobs.function(id="idle", trigger="test.idle")
    def idle(ctx):
        return None

    jobs.eager = False  # the runs stay queued
    mine, other = [r["id"] for r in jobs.send_many([("test.idle", {}), ("test.idle", {})])["runs"]]
    client = app.test_client()
    expired = CancelTokens("test-secret", ttl_s=-1).issue(mine)
    forged = CancelTokens("another-secret").issue(mine)
    for token in (jobs.cancel_token(other), expired, forged, "garbage", realtime_token(app)):
        response = client.post(f"/api/runs/{mine}/cancel", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, token
        assert response.get_json()["error"]["code"] == "invalid_cancel_token"
    assert jobs.run(mine).status == "queued"
    response = client.post(f"/api/runs/{mine}/cancel", headers={"Authorization": f"Bearer {jobs.cancel_token(mine)}"})
    assert response.status_code == 202 and response.get_json()["status"] == "cancelled"
    assert jobs.run(other).status == "queued"


def test_a_cancel_token_passes_where_the_operator_key_is_required(app, jobs):
    @jobs.function(id="idle", trigger="test.idle")
    def idle(ctx):
        return None

    jobs.eager = False
    [run_id] = [r["id"] for r in jobs.send_many([("test.idle", {})])["runs"]]
    jobs.event_key = "operator-key"
    client = app.test_client()
    response = client.post(f"/api/runs/{run_id}/cancel", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401 and response.get_json()["error"]["code"] == "invalid_event_key"
    response = client.post(f"/api/runs/{run_id}/cancel", headers={"Authorization": f"Bearer {jobs.cancel_token(run_id)}"})
    assert response.status_code == 202


def realtime_token(app) -> str:
    """A subscription token: signed by the same key, but no cancel capability."""
    return app.extensions["realtime"].create_token("run.x", ["run"]).token
