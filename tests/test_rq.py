"""realtime.integrations.rq against a real RQ worker, Redis, gunicorn and PostgreSQL."""
from __future__ import annotations

import importlib
import secrets
import sys
from types import SimpleNamespace

import pytest

from readme import code_block
from workers import FAILURES, Worker, as_pairs, live_server_on_postgres, read_run, require_broker, wait_for_progress

REDIS_URL = "redis://127.0.0.1:6379/0"

# Beside the README's job: two that fail, and one that runs until it is stopped.
EXTRA = '''

@realtime_job
def broken():
    publish("status", {"percent": 50})
    insert_alice()


@realtime_job
def out_of_paper():
    print_the_report()


@realtime_job
def endless():
    import time

    publish("status", {"percent": 1})
    while True:
        time.sleep(0.1)
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_broker("Redis", 6379)
    yield from live_server_on_postgres(tmp_path_factory.mktemp("rq"))


@pytest.fixture(scope="module")
def jobs(server, tmp_path_factory):
    """The README's job as a module, and an RQ worker on this test's own queue."""
    tmp = tmp_path_factory.mktemp("rq-jobs")
    name = f"rq_jobs_{secrets.token_hex(4)}"
    (tmp / f"{name}.py").write_text(code_block("@realtime_job") + FAILURES + EXTRA)
    queue = f"realtime-test-{secrets.token_hex(4)}"
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.syspath_prepend(str(tmp))
    worker = Worker(["rq.cli", "worker", "--url", REDIS_URL, "--quiet", queue],
                    tmp, server.database_url, tmp / "worker.log")
    try:
        yield SimpleNamespace(module=importlib.import_module(name), worker=worker, queue=queue)
    finally:
        worker.stop()
        sys.modules.pop(name, None)
        monkeypatch.undo()


def enqueue_as_the_readme_does(jobs, *args: object) -> dict:
    namespace = vars(jobs.module).copy()
    code = code_block("Queue(\"reports\"").replace('Queue("reports"', f'Queue("{jobs.queue}"')
    code = code.replace("Redis()", f"Redis.from_url({REDIS_URL!r})")
    exec(code, namespace)
    namespace["queue"].connection.close()
    return namespace


def test_progress_and_lifecycle_reach_the_stream_in_order_once(server, jobs):
    job_id = enqueue_as_the_readme_does(jobs)["job_id"]
    received = read_run(server, job_id, ["status", "run"], jobs.worker)
    assert as_pairs(received) == [
        ("run", {"status": "running"}),
        ("status", {"percent": 33}), ("status", {"percent": 66}), ("status", {"percent": 100}),
        ("run", {"status": "completed", "output": {"pages": 3}}),
    ]
    assert {m.run_id for m in received} == {job_id}


def enqueue_job(jobs, function) -> str:
    from redis import Redis
    from rq import Queue

    from realtime.integrations.rq import enqueue

    with Redis.from_url(REDIS_URL) as redis:
        return enqueue(Queue(jobs.queue, connection=redis), function).id


def test_a_failing_job_ends_failed_with_its_error_type_only(server, jobs):
    job_id = enqueue_job(jobs, jobs.module.broken)
    assert as_pairs(read_run(server, job_id, ["status", "run"], jobs.worker)) == [
        ("run", {"status": "running"}),
        ("status", {"percent": 50}),
        ("run", {"status": "failed", "error": "UniqueViolation"}),  # no DETAIL, no alice@example.com
    ]


def test_a_public_error_shows_its_message(server, jobs):
    job_id = enqueue_job(jobs, jobs.module.out_of_paper)
    assert as_pairs(read_run(server, job_id, ["run"], jobs.worker)) == [
        ("run", {"status": "running"}),
        ("run", {"status": "failed", "error": "PublicError: the printer is out of paper"}),
    ]


def test_a_stopped_job_says_cancelled(server, jobs):
    """`rq.command.send_stop_job_command` kills the work horse; the worker runs `on_stopped`."""
    from redis import Redis
    from rq import Queue
    from rq.command import send_stop_job_command

    from realtime.integrations.rq import enqueue

    with Redis.from_url(REDIS_URL) as redis:
        job = enqueue(Queue(jobs.queue, connection=redis), jobs.module.endless)
        wait_for_progress(server, job.id)
        send_stop_job_command(redis, job.id)
        assert as_pairs(read_run(server, job.id, ["status", "run"], jobs.worker)) == [
            ("run", {"status": "running"}),
            ("status", {"percent": 1}),
            ("run", {"status": "cancelled"}),
        ]


def test_publish_outside_a_job_is_a_clear_error(jobs):
    from realtime.integrations.rq import publish

    with pytest.raises(RuntimeError, match="needs a running task"):
        publish("status", {})
