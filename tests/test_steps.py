"""`ctx.step` and `ctx.publish` at the unit level: memoized steps, step ids, boundaries.

(`describe`, the error a failed step stores, is tested in tests/test_errors.py.)

Each test claims a run by hand and builds the `Context` of one execution the way
the runner does; "resuming" hands the run back and claims it again, so the next
`Context` only knows what the journal stored.
"""
from __future__ import annotations

from collections import Counter

import pytest

from jobs import NonRetriableError
from jobs.steps import Cancelled, Context, Steps
from conftest import app_on


@pytest.fixture
def app(tmp_path):
    # Sent runs stay queued: the tests claim them by hand.
    yield from app_on(f"sqlite:///{tmp_path / 'steps.sqlite3'}", JOBS_EAGER=False)


@pytest.fixture
def jobs(app):
    jobs = app.extensions["jobs"]
    jobs.function(id="unit", trigger="test.unit")(lambda ctx: None)  # never called: tests drive ctx
    jobs.send("test.unit", {})
    return jobs


@pytest.fixture
def claim(jobs):
    return take(jobs, "w1")


@pytest.fixture
def calls() -> Counter:
    return Counter()


def take(jobs, owner: str):
    claim = jobs.runs.claim(jobs.registry.ids, {}, owner=owner, lease_s=30)
    assert claim is not None
    return claim


def execution(jobs, claim, stopping=lambda: False) -> Context:
    steps = Steps(jobs.journal, claim, jobs.journal.steps_of(claim.run.id), stopping)
    return Context(claim, jobs.runs.event(claim.run.event_id), jobs.realtime.publish, steps)


def resumed(jobs, claim) -> Context:
    """The next execution of the run, by another worker, after this one handed it back."""
    jobs.runs.release(claim)
    return execution(jobs, take(jobs, "w2"))


def stored_steps(jobs, run_id: str) -> list[tuple[str, str, int]]:
    return [(s.id, s.status, s.attempts) for s in jobs.run(run_id).steps]


def published(app, channel: str) -> list[object]:
    return [m.data for m in app.extensions["realtime"].store.read_after(channel, None, 0, 100) if m.topic == "log"]


def test_a_completed_step_returns_its_stored_output_without_running_again(jobs, claim, calls):
    def fetch(n):
        calls["fetch"] += 1
        return {"rows": n}

    assert execution(jobs, claim).step.run("fetch", fetch, 3) == {"rows": 3}
    assert resumed(jobs, claim).step.run("fetch", fetch, 99) == {"rows": 3}
    assert calls["fetch"] == 1
    assert stored_steps(jobs, claim.run.id) == [("fetch", "completed", 1)]


def test_the_first_run_returns_what_a_replay_returns(jobs, claim):
    value = (1, {"nested": (2.5, None)}, "Zürich")
    first = execution(jobs, claim).step.run("value", lambda: value)
    replay = resumed(jobs, claim).step.run("value", lambda: pytest.fail("a completed step ran again"))
    assert first == replay == [1, {"nested": [2.5, None]}, "Zürich"]


def test_a_step_id_used_twice_in_one_run_is_refused(jobs, claim, calls):
    ctx = execution(jobs, claim)
    ctx.step.run("x" * 100, lambda: calls.update(["first"]))  # 100 characters is still a valid id
    with pytest.raises(NonRetriableError, match="used twice"):
        ctx.step.run("x" * 100, lambda: calls.update(["second"]))
    with pytest.raises(NonRetriableError, match="used twice"):
        ctx.step.sleep("x" * 100, 1)
    assert calls == Counter(first=1)


@pytest.mark.parametrize("step_id", ["", "has space", "publish:1", "x" * 101, "ünïcode", 42, None])
def test_an_invalid_step_id_is_refused(jobs, claim, calls, step_id):
    with pytest.raises(NonRetriableError, match="must match"):
        execution(jobs, claim).step.run(step_id, lambda: calls.update(["ran"]))
    assert not calls
    assert stored_steps(jobs, claim.run.id) == []


@pytest.mark.parametrize("result", [object(), {1, 2}, float("nan"), "\udc80"], ids=["object", "set", "nan", "surrogate"])
def test_a_result_that_is_not_json_fails_the_step_for_good(jobs, claim, result):
    with pytest.raises(NonRetriableError, match="the result of step 'odd' must be JSON-serializable"):
        execution(jobs, claim).step.run("odd", lambda: result)
    assert stored_steps(jobs, claim.run.id) == [("odd", "failed", 1)]


def test_publish_outside_a_step_is_a_step_of_its_own_and_is_not_repeated_on_resume(app, jobs, claim, calls):
    def body(ctx, resumed: bool) -> None:
        ctx.publish(ctx.channel, "log", {"n": 1})
        ctx.step.run("work", lambda: calls.update(["work"]))
        ctx.publish("elsewhere", "log", {"n": 2})
        if resumed:
            ctx.publish(ctx.channel, "log", {"n": 3})

    channel = claim.run.channel
    body(execution(jobs, claim), resumed=False)
    assert [s[0] for s in stored_steps(jobs, claim.run.id)] == ["publish:1", "work", "publish:2"]
    body(resumed(jobs, claim), resumed=True)

    assert [s[0] for s in stored_steps(jobs, claim.run.id)] == ["publish:1", "work", "publish:2", "publish:3"]
    assert published(app, channel) == [{"n": 1}, {"n": 3}]
    assert published(app, "elsewhere") == [{"n": 2}]
    assert calls == Counter(work=1)


def test_publishes_inside_a_step_are_counted_apart_so_a_replay_never_shifts_the_others(app, jobs, claim):
    """A replay skips a completed step's code with its publishes (issue 17, item 3)."""
    def body(ctx, resumed: bool) -> None:
        ctx.publish(ctx.channel, "log", "start")
        ctx.step.run("inner", lambda: ctx.publish(ctx.channel, "log", "inside"))
        if resumed:
            ctx.publish(ctx.channel, "log", "done")

    body(execution(jobs, claim), resumed=False)
    body(resumed(jobs, claim), resumed=True)

    assert [s[0] for s in stored_steps(jobs, claim.run.id)] == ["publish:1", "inner", "inner/publish:1", "publish:2"]
    assert published(app, claim.run.channel) == ["start", "inside", "done"]


def test_a_retried_step_publishes_each_of_its_messages_once(app, jobs, claim):
    def body(ctx, attempt: int) -> None:
        def flaky():
            ctx.publish(ctx.channel, "log", f"trying, attempt {attempt}")
            if attempt == 1:
                raise RuntimeError("broke")
            ctx.publish(ctx.channel, "log", "worked")

        ctx.step.run("flaky", flaky)

    with pytest.raises(RuntimeError):
        body(execution(jobs, claim), attempt=1)
    body(resumed(jobs, claim), attempt=2)

    assert stored_steps(jobs, claim.run.id) == [
        ("flaky", "completed", 2), ("flaky/publish:1", "completed", 1), ("flaky/publish:2", "completed", 1),
    ]
    # Matched by position within the step: the retry's first message is taken as sent.
    assert published(app, claim.run.channel) == ["trying, attempt 1", "worked"]


@pytest.mark.parametrize("boundary", ["run", "sleep", "publish"])
def test_a_cancel_requested_before_a_step_stops_the_run_there(app, jobs, claim, calls, boundary):
    ctx = execution(jobs, claim)
    jobs.cancel(claim.run.id)
    assert jobs.run(claim.run.id).status == "running", "a held run is only asked to stop"
    next_step = {
        "run": lambda: ctx.step.run("next", lambda: calls.update(["next"])),
        "sleep": lambda: ctx.step.sleep("nap", 60),
        "publish": lambda: ctx.publish(ctx.channel, "log", {"n": 1}),
    }[boundary]
    with pytest.raises(Cancelled):
        next_step()
    assert not calls
    assert stored_steps(jobs, claim.run.id) == []
    assert published(app, claim.run.channel) == []
