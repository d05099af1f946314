"""What the task-queue tests share (not a test module): a live server on a fresh PostgreSQL
database, a real worker process stopped by its pid, and a subscriber reading a run to its end."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import httpx

from conftest import ROOT, LiveServer, create_pg_database, drop_pg_database, skip_or_fail, wait_until
from realtime.client import ClientMessage, subscribe, token_from

TERMINAL = ("completed", "failed", "cancelled")

#: For a test's task module, beside its tasks: what its failing tasks raise. A driver's error,
#: whose DETAIL names someone else's data, and an app's PublicError, whose message is for the user.
FAILURES = '''
import psycopg.errors

from common.errors import PublicError


def insert_alice():
    raise psycopg.errors.UniqueViolation(
        'duplicate key value violates unique constraint "users_email_key"\\n'
        "DETAIL:  Key (email)=(alice@example.com) already exists."
    )


def print_the_report():
    raise PublicError("the printer is out of paper")
'''


def require_broker(name: str, port: int) -> None:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        skip_or_fail(f"{name} is not reachable on 127.0.0.1:{port}")


def live_server_on_postgres(tmp: Path) -> Iterator[LiveServer]:
    """A 1-worker gunicorn on a fresh PostgreSQL database, for a module's tests."""
    name = create_pg_database()
    if name is None:
        skip_or_fail("PostgreSQL is not reachable on 127.0.0.1:5432")
    server = LiveServer(tmp / "gunicorn.log", f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", workers=1, DEMO_ENABLED=True)
    try:
        yield server.start()
    finally:
        server.stop()
        drop_pg_database(name)


class Worker:
    """A queue's worker process, started in `cwd` (where the test's task module lies), with the
    server's DATABASE_URL; stopped by its pid (SIGTERM, then SIGKILL to its process group)."""

    def __init__(self, argv: list[str], cwd: Path, database_url: str, log: Path) -> None:
        self._log = open(log, "ab")
        self.log_path = log
        env = {**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": f"{cwd}{os.pathsep}{ROOT}"}
        self.process = subprocess.Popen([sys.executable, "-m", *argv], cwd=cwd, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        else:  # a worker must not die by itself: show why
            self._log.flush()
        self._log.close()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]


def read_run(server: LiveServer, task_id: str, topics: list[str], worker: Worker, guard_s: float = 60) -> list[ClientMessage]:
    """Every message of `run.<task_id>` on `topics` until topic `run` says the task ended.

    A guard closes the stream after `guard_s`, so a worker that never finishes fails the test
    with its log instead of hanging it."""
    channel = f"run.{task_id}"
    received = []
    messages = subscribe(server.url, token=token_from(server.url, channel, topics))
    guard = threading.Timer(guard_s, messages.close)
    guard.start()
    try:
        for message in messages:
            received.append(message)
            if message.topic == "run" and message.data["status"] in TERMINAL:
                return received
    finally:
        guard.cancel()
        guard.join()
        messages.close()
    raise AssertionError(f"{channel} did not end within {guard_s}s: {received}\nworker log: {worker.log()}")


def wait_for_progress(server: LiveServer, task_id: str) -> None:
    """Until the task has published on topic `status`: it is running its own code, not starting."""
    token = server.token(f"run.{task_id}", ["status"])

    def progressed() -> bool:
        page = httpx.get(f"{server.url}/api/realtime/messages", params={"token": token}, timeout=10).json()
        return bool(page["messages"])

    wait_until(progressed, timeout=60, interval=0.1, what=f"progress of task {task_id}")


def as_pairs(messages: list[ClientMessage]) -> list[tuple[str, object]]:
    """(topic, data) in order, after checking each message came once, in id order, for its run."""
    ids = [m.id for m in messages]
    assert ids == sorted(set(ids)), f"not once and in order: {ids}"
    return [(m.topic, m.data) for m in messages]
