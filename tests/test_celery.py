"""realtime.integrations.celery against a real Celery worker, RabbitMQ, gunicorn and PostgreSQL."""
from __future__ import annotations

import importlib
import secrets
import sys
from types import SimpleNamespace

import pytest

from readme import code_block
from workers import FAILURES, Worker, as_pairs, live_server_on_postgres, read_run, require_broker, wait_for_progress

# Beside the README's code: this test's own queue, two tasks that fail, and one that runs until revoked.
EXTRA = '''
import os

app.conf.task_default_queue = os.environ["REALTIME_TEST_QUEUE"]
app.conf.broker_connection_retry_on_startup = True


@app.task(base=RealtimeTask, bind=True)
def broken(self):
    self.publish("status", {"percent": 50})
    insert_alice()


@app.task(base=RealtimeTask, bind=True)
def out_of_paper(self):
    print_the_report()


@app.task(base=RealtimeTask, bind=True)
def answer(self, words):
    with self.text_stream("answer") as out:
        for word in words:
            out.write(word + " ")
    return len(words)


@app.task(base=RealtimeTask, bind=True)
def endless(self):
    import time

    self.publish("status", {"percent": 1})
    while True:
        time.sleep(0.1)
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_broker("RabbitMQ", 5672)
    yield from live_server_on_postgres(tmp_path_factory.mktemp("celery"))


@pytest.fixture(scope="module")
def tasks(server, tmp_path_factory, request):
    """The README's tasks as a module, a worker consuming this test's queue, and the module here to send."""
    tmp = tmp_path_factory.mktemp("celery-tasks")
    name = f"celery_tasks_{secrets.token_hex(4)}"
    (tmp / f"{name}.py").write_text(code_block("base=RealtimeTask") + FAILURES + EXTRA)
    queue = f"realtime-test-{secrets.token_hex(4)}"
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("REALTIME_TEST_QUEUE", queue)
    monkeypatch.syspath_prepend(str(tmp))
    worker = Worker(["celery", "-A", name, "worker", "-Q", queue, "--concurrency", "1", "--without-gossip",
                     "--without-mingle", "--without-heartbeat", "--loglevel", "warning"],
                    tmp, server.database_url, tmp / "worker.log")
    module = importlib.import_module(name)
    try:
        yield SimpleNamespace(module=module, worker=worker)
    finally:
        module.app.close()
        worker.stop()
        sys.modules.pop(name, None)
        monkeypatch.undo()


def test_progress_and_lifecycle_reach_the_stream_in_order_once(server, tasks):
    namespace = vars(tasks.module).copy()
    exec(code_block("generate_report.delay(3)"), namespace)
    received = read_run(server, namespace["task_id"], ["status", "run"], tasks.worker)
    assert as_pairs(received) == [
        ("run", {"status": "running"}),
        ("status", {"percent": 33}), ("status", {"percent": 66}), ("status", {"percent": 100}),
        ("run", {"status": "completed", "output": {"pages": 3}}),
    ]
    assert {m.run_id for m in received} == {namespace["task_id"]}


def test_a_task_streams_text_that_a_client_reads_as_the_whole_answer(server, tasks):
    words = [f"word{n}" for n in range(500)]
    task_id = tasks.module.answer.delay(words).id
    received = read_run(server, task_id, ["answer", "run"], tasks.worker)
    text, seq, status = "", None, None
    for message in received:
        data = message.data
        if message.topic != "answer":
            continue
        assert data["text_stream"] == f"{task_id}:text:1"
        if "text" in data:
            text, seq, status = data["text"], data["seq"], data.get("status")
        elif data["seq"] == seq + 1:
            text, seq, status = text + data["delta"], data["seq"], data.get("status")
    assert (text, status) == (" ".join(words) + " ", "completed")
    assert received[-1].data == {"status": "completed", "output": 500}


def test_a_failing_task_ends_failed_with_its_error_type_only(server, tasks):
    task_id = tasks.module.broken.delay().id
    assert as_pairs(read_run(server, task_id, ["status", "run"], tasks.worker)) == [
        ("run", {"status": "running"}),
        ("status", {"percent": 50}),
        ("run", {"status": "failed", "error": "UniqueViolation"}),  # no DETAIL, no alice@example.com
    ]


def test_a_public_error_shows_its_message(server, tasks):
    task_id = tasks.module.out_of_paper.delay().id
    assert as_pairs(read_run(server, task_id, ["run"], tasks.worker)) == [
        ("run", {"status": "running"}),
        ("run", {"status": "failed", "error": "PublicError: the printer is out of paper"}),
    ]


def test_a_task_revoked_while_it_runs_says_cancelled(server, tasks):
    """`revoke(terminate=True)` ends the pool process running it; the worker sends `task_revoked`."""
    task_id = tasks.module.endless.delay().id
    wait_for_progress(server, task_id)
    tasks.module.app.control.revoke(task_id, terminate=True)
    assert as_pairs(read_run(server, task_id, ["status", "run"], tasks.worker)) == [
        ("run", {"status": "running"}),
        ("status", {"percent": 1}),
        ("run", {"status": "cancelled"}),
    ]


def test_publish_outside_a_running_task_is_a_clear_error(tasks):
    with pytest.raises(RuntimeError, match="needs a running task"):
        tasks.module.generate_report.publish("status", {})
