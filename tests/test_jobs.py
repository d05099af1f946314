"""Jobs in eager mode: runs execute inline when sent, time is a fake clock.

No threads and no sleeping: a retry's backoff or a step.sleep passes when the
test advances the clock and calls `jobs.drain()`.
"""
from __future__ import annotations

from collections import Counter
from datetime import datetime

import pytest
from sqlalchemy import func, select

from conftest import FakeClock
from jobs import NonRetriableError
from jobs.tables import events, runs

RUN_KEYS = ["id", "function", "status", "output", "error", "attempt", "steps", "created_at", "started_at", "ended_at"]


class Crash(BaseException):
    """Stands in for kill -9: nothing below the function gets to record anything."""


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def jobs(app, clock):
    app.config["DEMO_REPORT_STEP_S"] = 0
    jobs = app.extensions["jobs"]
    assert jobs.eager, "TESTING apps run jobs eagerly by default"
    jobs.runs.now = clock
    return jobs


@pytest.fixture
def calls() -> Counter:
    return Counter()


def messages(app, run_id: str, topic: str | None = None) -> list[tuple[str, object]]:
    found = app.extensions["realtime"].store.read_after(f"run.{run_id}", None, 0, 1000)
    return [(m.topic, m.data) for m in found if topic is None or m.topic == topic]


def send(jobs, name: str, data: dict | None = None) -> str:
    body = jobs.send(name, data or {})
    assert len(body["runs"]) == 1
    return body["runs"][0]["id"]


def steps(jobs, run_id: str) -> dict[str, tuple[str, int]]:
    return {s.id: (s.status, s.attempts) for s in jobs.run(run_id).steps if not s.id.startswith("publish:")}


# -- the HTTP API -------------------------------------------------------------------


def test_post_event_returns_ids_and_runs(client, jobs):
    response = client.post("/api/events", json={"name": "report.requested", "data": {"days": 3}})
    assert response.status_code == 202
    body = response.get_json()
    assert list(body) == ["ids", "runs"]
    [event_id] = body["ids"]
    [run] = body["runs"]
    assert run == {"id": run["id"], "function": "generate-report", "event_id": event_id}

    response = client.get(f"/api/runs/{run['id']}")
    assert response.status_code == 200
    detail = response.get_json()
    assert list(detail) == RUN_KEYS
    assert detail["status"] == "completed"
    assert detail["attempt"] == 1
    assert detail["error"] is None
    assert detail["output"]["url"] == f"/reports/{run['id']}"
    assert [s["id"] for s in detail["steps"] if ":" not in s["id"]] == ["fetch", "process", "generate"]
    assert all(s == {"id": s["id"], "status": "completed", "attempts": 1} for s in detail["steps"])
    for key in ("created_at", "started_at", "ended_at"):
        assert datetime.fromisoformat(detail[key]).tzinfo is not None


def test_post_a_list_of_events_and_events_nobody_listens_to(client, jobs):
    response = client.post("/api/events", json=[
        {"name": "report.requested", "data": {"days": 1}},
        {"name": "nobody.listens"},  # accepted and stored; it starts no run
    ])
    assert response.status_code == 202
    body = response.get_json()
    assert len(body["ids"]) == 2
    assert [r["event_id"] for r in body["runs"]] == body["ids"][:1]


@pytest.mark.parametrize(
    "body, code",
    [
        ({"name": "bad name", "data": {}}, "invalid_event_name"),
        ({"name": "", "data": {}}, "invalid_event_name"),
        ({"name": 42, "data": {}}, "invalid_event_name"),
        ({"data": {}}, "invalid_event_name"),
        ({"name": "x" * 201}, "invalid_event_name"),
        ({"name": "report.requested", "data": [1, 2]}, "invalid_event_data"),
        ({"name": "report.requested", "data": "text"}, "invalid_event_data"),
        ({"name": "report.requested", "data": None}, "invalid_event_data"),
        ([], "invalid_events"),
        ([{"name": "a.b"}] * 101, "invalid_events"),
        ([{"name": "a.b"}, "not an object"], "invalid_json"),
        ("just a string", "invalid_json"),
        # one bad event refuses the whole batch, before anything is stored
        ([{"name": "report.requested"}, {"name": "report.requested", "data": 1}], "invalid_event_data"),
    ],
)
def test_bad_events_are_refused_and_nothing_is_written(app, client, jobs, body, code):
    response = client.post("/api/events", json=body)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == code
    assert response.get_json()["error"]["message"]
    with app.extensions["database"].engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(events)).scalar() == 0
        assert conn.execute(select(func.count()).select_from(runs)).scalar() == 0


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b'{"name": "a.b", "data": {"x": NaN}}', b""])
def test_malformed_bodies_are_400(client, jobs, raw):
    response = client.post("/api/events", data=raw, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_json"


def test_data_that_is_not_storable_text_is_400(client, jobs):
    raw = b'{"name": "report.requested", "data": {"title": "\\udc80"}}'  # a lone surrogate
    response = client.post("/api/events", data=raw, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_event_data"


def test_oversize_event_data_is_413(app, client, jobs):
    jobs.max_event_bytes = 1000
    response = client.post("/api/events", json={"name": "report.requested", "data": {"title": "x" * 1000}})
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "event_too_large"


def test_event_key_is_required_when_set(client, jobs):
    jobs.event_key = "sekrit"
    event = {"name": "nobody.listens", "data": {}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sekrit"}):
        response = client.post("/api/events", json=event, headers=headers)
        assert response.status_code == 401
        assert response.get_json()["error"]["code"] == "invalid_event_key"
    assert client.post("/api/events", json=event, headers={"Authorization": "Bearer sekrit"}).status_code == 202


def test_cancel_needs_the_event_key_when_set(client, jobs):
    jobs.eager = False  # leave it queued
    run_id = send(jobs, "report.requested")
    jobs.event_key = "sekrit"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sekrit"}):
        response = client.post(f"/api/runs/{run_id}/cancel", headers=headers)
        assert response.status_code == 401
        assert response.get_json()["error"]["code"] == "invalid_event_key"
        assert "JOBS_EVENT_KEY" in response.get_json()["error"]["message"]
    assert jobs.run(run_id).status == "queued"
    response = client.post(f"/api/runs/{run_id}/cancel", headers={"Authorization": "Bearer sekrit"})
    assert response.status_code == 202 and response.get_json()["status"] == "cancelled"


def test_the_event_key_comes_from_the_config(tmp_path):
    from conftest import app_on

    for app in app_on(f"sqlite:///{tmp_path / 'key.sqlite3'}", DEMO_ENABLED=True, JOBS_EVENT_KEY="from-config"):
        jobs = app.extensions["jobs"]
        jobs.eager = False
        run_id = send(jobs, "report.requested")
        client = app.test_client()
        assert client.post(f"/api/runs/{run_id}/cancel").status_code == 401
        assert client.post(f"/api/runs/{run_id}/cancel", headers={"Authorization": "Bearer from-config"}).status_code == 202


def test_unknown_runs_are_404(client, jobs):
    for method, url, code in [
        ("get", "/api/runs/nope", "run_not_found"),
        ("get", "/api/runs/0123456789abcdef", "run_not_found"),
        ("get", "/api/runs/%00", "run_not_found"),
        ("post", "/api/runs/nope/cancel", "run_not_found"),
        ("post", "/api/runs/%00%ff/cancel", "run_not_found"),
    ]:
        response = getattr(client, method)(url)
        assert response.status_code == 404
        assert response.get_json()["error"]["code"] == code


# -- steps, retries, failures ---------------------------------------------------------


def test_a_completed_step_runs_once_when_the_function_then_fails_twice(app, jobs, clock, calls):
    @jobs.function(id="flaky", trigger="test.flaky", retries=2)
    def flaky(ctx):
        value = ctx.step.run("once", lambda: calls.update(["once"]) or {"n": 41})
        if ctx.attempt < 3:
            raise RuntimeError(f"attempt {ctx.attempt} broke")
        return value["n"] + 1

    jobs.runner.retry_base_s = 1.0
    run_id = send(jobs, "test.flaky")
    run = jobs.run(run_id)
    assert (run.status, run.attempt, run.error) == ("running", 2, "RuntimeError")

    clock.advance(1)  # first backoff: 1 s
    assert jobs.drain() == 1
    clock.advance(1)  # second backoff: 2 s, not over yet
    assert jobs.drain() == 0
    clock.advance(1)
    assert jobs.drain() == 1

    run = jobs.run(run_id)
    assert (run.status, run.attempt, run.output, run.error) == ("completed", 3, 42, None)
    assert calls["once"] == 1
    assert steps(jobs, run_id) == {"once": ("completed", 1)}
    assert [d["status"] for _, d in messages(app, run_id, "run")] == ["queued", "running", "completed"]


def test_retries_back_off_exponentially_then_the_run_fails(app, jobs, clock, calls):
    @jobs.function(id="doomed", trigger="test.doomed", retries=3)
    def doomed(ctx):
        ctx.step.run("try", lambda: calls.update(["try"]) or 1 / 0)

    jobs.runner.retry_base_s = 2.0
    run_id = send(jobs, "test.doomed")
    waits = []
    while jobs.run(run_id).status == "running":
        waited = 0
        while jobs.drain() == 0:
            clock.advance(1)
            waited += 1
        waits.append(waited)
    assert waits == [2, 4, 8]
    run = jobs.run(run_id)
    assert (run.status, run.attempt, run.error) == ("failed", 4, "ZeroDivisionError")
    assert calls["try"] == 4
    assert steps(jobs, run_id) == {"try": ("failed", 4)}
    assert messages(app, run_id, "run")[-1] == ("run", {"status": "failed", "error": run.error})


def test_non_retriable_error_fails_at_once(jobs, calls):
    @jobs.function(id="picky", trigger="test.picky", retries=5)
    def picky(ctx):
        calls["picky"] += 1
        raise NonRetriableError("the input can never work")

    run = jobs.run(send(jobs, "test.picky"))
    assert (run.status, run.attempt, run.error) == ("failed", 1, "NonRetriableError")
    assert calls["picky"] == 1


@pytest.mark.parametrize(
    "body",
    [
        lambda ctx: ctx.step.run("bad", lambda: object()),
        lambda ctx: {1, 2},
        lambda ctx: "\udc80",
        lambda ctx: [ctx.step.run("twice", int), ctx.step.run("twice", int)],
        lambda ctx: ctx.step.run("no spaces please", int),
    ],
    ids=["step result not JSON", "return value not JSON", "not UTF-8", "step id used twice", "bad step id"],
)
def test_programming_errors_fail_without_retrying(jobs, body):
    jobs.function(id="odd", trigger="test.odd", retries=3)(body)
    run = jobs.run(send(jobs, "test.odd"))
    # The message names the mistake for the developer, not for the browsers watching the run.
    assert (run.status, run.attempt, run.error) == ("failed", 1, "NonRetriableError")


def test_step_sleep_frees_the_thread_and_resumes_later(app, jobs, clock, calls):
    @jobs.function(id="napper", trigger="test.nap")
    def napper(ctx):
        ctx.step.run("before", lambda: calls.update(["before"]))
        ctx.step.sleep("nap", 60)
        ctx.step.run("after", lambda: calls.update(["after"]))
        return "rested"

    run_id = send(jobs, "test.nap")
    assert jobs.run(run_id).status == "running"
    assert steps(jobs, run_id) == {"before": ("completed", 1), "nap": ("sleeping", 1)}
    clock.advance(59)
    assert jobs.drain() == 0
    clock.advance(1)
    assert jobs.drain() == 1
    assert jobs.run(run_id).output == "rested"
    assert steps(jobs, run_id) == {"before": ("completed", 1), "nap": ("completed", 1), "after": ("completed", 1)}
    assert calls == Counter(before=1, after=1)


def test_a_crashed_run_resumes_after_its_lease_without_repeating_steps_or_messages(app, jobs, clock, calls):
    crash = {"now": True}

    @jobs.function(id="fragile", trigger="test.fragile")
    def fragile(ctx):
        ctx.publish(ctx.channel, "log", {"n": 1})
        ctx.step.run("a", lambda: calls.update(["a"]))
        ctx.publish(ctx.channel, "log", {"n": 2})
        if crash["now"]:
            raise Crash()
        ctx.step.run("b", lambda: calls.update(["b"]))
        ctx.publish(ctx.channel, "log", {"n": 3})
        return "done"

    with pytest.raises(Crash):
        send(jobs, "test.fragile")
    [run_id] = [r.id for r in _all_runs(jobs)]
    crash["now"] = False
    assert jobs.drain() == 0, "the lease still holds the run"
    clock.advance(jobs.lease_s)
    assert jobs.drain() == 1

    assert jobs.run(run_id).status == "completed"
    assert calls == Counter(a=1, b=1)
    assert messages(app, run_id) == [
        ("run", {"status": "queued"}),
        ("run", {"status": "running"}),
        ("log", {"n": 1}),
        ("log", {"n": 2}),
        ("log", {"n": 3}),
        ("run", {"status": "completed", "output": "done"}),
    ]


def test_a_publish_inside_a_step_never_swallows_a_later_one(app, jobs, clock, calls):
    """Issue 17, item 3: the replay after the retry skips "inner", publish and all."""
    @jobs.function(id="chatty", trigger="test.chatty", retries=1)
    def chatty(ctx):
        ctx.publish(ctx.channel, "log", "start")
        ctx.step.run("inner", lambda: ctx.publish(ctx.channel, "log", "inside"))
        ctx.step.run("flaky", lambda: calls.update(["flaky"]) or calls["flaky"] > 1 or 1 / 0)
        ctx.publish(ctx.channel, "log", "done")

    run_id = send(jobs, "test.chatty")
    clock.advance(jobs.runner.retry_base_s)
    assert jobs.drain() == 1

    assert jobs.run(run_id).status == "completed" and calls["flaky"] == 2
    assert messages(app, run_id, "log") == [("log", "start"), ("log", "inside"), ("log", "done")]


def _all_runs(jobs):
    with jobs.runs.engine.connect() as conn:
        return conn.execute(select(runs)).all()


# -- cancel ---------------------------------------------------------------------------


def test_cancel_a_queued_run(app, client, jobs, calls):
    jobs.eager = False  # leave it queued
    run_id = send(jobs, "report.requested")
    response = client.post(f"/api/runs/{run_id}/cancel")
    assert response.status_code == 202
    assert response.get_json()["status"] == "cancelled"
    assert jobs.drain() == 0
    assert [d["status"] for _, d in messages(app, run_id, "run")] == ["queued", "cancelled"]

    response = client.post(f"/api/runs/{run_id}/cancel")
    assert response.status_code == 409
    assert response.get_json()["error"]["code"] == "run_finished"


def test_cancel_a_running_run_stops_it_before_its_next_step(app, jobs, calls):
    @jobs.function(id="long", trigger="test.long")
    def long(ctx):
        ctx.step.run("first", lambda: calls.update(["first"]) or jobs.cancel(ctx.run_id))
        ctx.step.run("second", lambda: calls.update(["second"]))

    run_id = send(jobs, "test.long")
    run = jobs.run(run_id)
    assert (run.status, run.ended_at is not None) == ("cancelled", True)
    assert calls == Counter(first=1)
    assert [d["status"] for _, d in messages(app, run_id, "run")] == ["queued", "running", "cancelled"]


def test_cancel_a_sleeping_run_and_a_finished_one(client, jobs):
    @jobs.function(id="sleepy", trigger="test.sleepy")
    def sleepy(ctx):
        ctx.step.sleep("nap", 3600)

    run_id = send(jobs, "test.sleepy")
    assert client.post(f"/api/runs/{run_id}/cancel").get_json()["status"] == "cancelled"

    done_id = send(jobs, "report.requested")
    response = client.post(f"/api/runs/{done_id}/cancel")
    assert response.status_code == 409
    assert jobs.run(done_id).status == "completed"


def test_an_output_too_large_to_publish_still_completes_the_run(app, jobs):
    limit = app.extensions["realtime"].max_message_bytes

    @jobs.function(id="big", trigger="test.big", retries=0)
    def big(ctx):
        return {"blob": "x" * limit}

    run_id = send(jobs, "test.big")
    run = jobs.run(run_id)
    assert run.status == "completed" and len(run.output["blob"]) == limit  # all of it, in the run
    assert messages(app, run_id, "run")[-1] == ("run", {"status": "completed", "truncated": True})


def test_a_database_error_in_a_step_is_not_shown_to_browsers(app, jobs):
    from sqlalchemy.exc import OperationalError

    @jobs.function(id="db-down", trigger="test.db", retries=0)
    def db_down(ctx):
        raise OperationalError("SELECT secret_column FROM t WHERE k = %(k)s", {"k": "hunter2"}, Exception("boom"))

    run_id = send(jobs, "test.db")
    assert jobs.run(run_id).error == "OperationalError"
    assert "hunter2" not in str(messages(app, run_id)) and "secret_column" not in str(messages(app, run_id))
