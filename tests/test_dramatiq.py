"""realtime.integrations.dramatiq against a real Dramatiq worker, Redis, gunicorn and PostgreSQL."""
from __future__ import annotations

import importlib
import secrets
import sys
from types import SimpleNamespace

import pytest

from readme import code_block
from workers import FAILURES, Worker, as_pairs, live_server_on_postgres, read_run, require_broker

# Beside the README's actor: one that fails, is retried once, then fails for good; one that fails at once.
EXTRA = '''

@dramatiq.actor(max_retries=1, min_backoff=10, max_backoff=10)
def broken():
    publish("status", {"percent": 50})
    insert_alice()


@dramatiq.actor(max_retries=0)
def out_of_paper():
    print_the_report()
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_broker("Redis", 6379)
    yield from live_server_on_postgres(tmp_path_factory.mktemp("dramatiq"))


@pytest.fixture(scope="module")
def actors(server, tmp_path_factory):
    """The README's actors as a module (on this test's own Redis namespace), and a worker for them."""
    tmp = tmp_path_factory.mktemp("dramatiq-actors")
    name = f"dramatiq_actors_{secrets.token_hex(4)}"
    namespace = f"realtime-test-{secrets.token_hex(4)}"
    code = code_block("RealtimeMiddleware()").replace(
        'RedisBroker(url="redis://127.0.0.1:6379/0")', f'RedisBroker(url="redis://127.0.0.1:6379/0", namespace="{namespace}")'
    )
    assert namespace in code
    (tmp / f"{name}.py").write_text(code + FAILURES + EXTRA)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.syspath_prepend(str(tmp))
    worker = Worker(["dramatiq", name, "--processes", "1", "--threads", "2"], tmp, server.database_url,
                    tmp / "worker.log")
    module = importlib.import_module(name)
    try:
        yield SimpleNamespace(module=module, worker=worker)
    finally:
        worker.stop()
        module.broker.close()
        sys.modules.pop(name, None)
        monkeypatch.undo()


def test_progress_and_lifecycle_reach_the_stream_in_order_once(server, actors):
    namespace = vars(actors.module).copy()
    exec(code_block("generate_report.send(3)"), namespace)
    received = read_run(server, namespace["message_id"], ["status", "run"], actors.worker)
    assert as_pairs(received) == [
        ("run", {"status": "running"}),
        ("status", {"percent": 33}), ("status", {"percent": 66}), ("status", {"percent": 100}),
        ("run", {"status": "completed", "output": {"pages": 3}}),
    ]


def test_a_retried_failure_says_running_again_and_failed_once(server, actors):
    message_id = actors.module.broken.send().message_id
    assert as_pairs(read_run(server, message_id, ["status", "run"], actors.worker)) == [
        ("run", {"status": "running"}), ("status", {"percent": 50}),
        ("run", {"status": "running"}), ("status", {"percent": 50}),
        ("run", {"status": "failed", "error": "UniqueViolation"}),  # no DETAIL, no alice@example.com
    ]


def test_a_public_error_shows_its_message(server, actors):
    message_id = actors.module.out_of_paper.send().message_id
    assert as_pairs(read_run(server, message_id, ["run"], actors.worker)) == [
        ("run", {"status": "running"}),
        ("run", {"status": "failed", "error": "PublicError: the printer is out of paper"}),
    ]


def test_a_message_past_its_age_limit_is_skipped_and_says_cancelled(server, actors):
    """Dramatiq's AgeLimit skips a message older than its max_age (ms) before it runs."""
    message_id = actors.module.generate_report.send_with_options(args=(3,), max_age=1).message_id
    assert as_pairs(read_run(server, message_id, ["status", "run"], actors.worker)) == [
        ("run", {"status": "cancelled"}),
    ]


def test_publish_outside_an_actor_is_a_clear_error():
    from realtime.integrations.dramatiq import publish

    with pytest.raises(RuntimeError, match="needs a running task"):
        publish("status", {})
