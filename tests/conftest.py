"""Shared fixtures: a Flask app and client, a fresh PostgreSQL database, a live gunicorn.

`LiveServer` follows Werkzeug's test `DevServerClient`: start the real
server on a free port, wait until it answers, stop it by its pid.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from flask import Flask

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
PUBLISH_KEY = "test-publish-key"
IN_CI = bool(os.environ.get("CI"))


def wait_until(condition: Callable[[], object], timeout: float = 15.0, interval: float = 0.02, what: str = "") -> object:
    """Poll `condition` until it returns something truthy; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def skip_or_fail(reason: str) -> None:
    """Missing infrastructure skips locally, but fails in CI where it must exist."""
    if IN_CI:
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


# -- in-process app ---------------------------------------------------------------


def app_on(database_url: str, **config: object) -> Iterator["Flask"]:
    """A TESTING app on `database_url`, stopped and disposed after: what every app fixture yields from."""
    from app import create_app

    # No embedded job pool unless a test starts one: the first request would, racing its drain() calls.
    config = {"JOBS_EMBEDDED": False, **config}
    app = create_app({"TESTING": True, "SECRET_KEY": "test-secret", "DATABASE_URL": database_url, **config})
    app.extensions["database"].ensure_schema()  # tests look at the tables before any call made them
    yield app
    app.extensions["jobs"].shutdown(wait=True)
    app.extensions["realtime"].shutdown(wait_s=15)
    app.extensions["database"].dispose()


@pytest.fixture
def app(tmp_path):
    """The demo app: its allow-all token policy, its report job, its page (off unless asked for)."""
    yield from app_on(f"sqlite:///{tmp_path / 'test.sqlite3'}", REALTIME_PUBLISH_KEY=PUBLISH_KEY, DEMO_ENABLED=True)


class FakeClock:
    """An aware UTC clock that moves only when a test says so (the job stores' `now`)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 28, 6, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def realtime(app):
    return app.extensions["realtime"]


# -- databases ----------------------------------------------------------------------


def create_pg_database() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            name = "rt_test_" + secrets.token_hex(4)
            conn.execute(f"CREATE DATABASE {name}")
            return name
    except Exception:
        return None


def drop_pg_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    name = create_pg_database()
    if name is None:
        skip_or_fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}")
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    drop_pg_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """Run the test once on SQLite and once on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'live.sqlite3'}"
    return request.getfixturevalue("postgres_url")


# -- live gunicorn --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """`gunicorn -c gunicorn.conf.py "app:create_app()"` with gevent workers on a free port."""

    def __init__(self, log_path: Path, database_url: str, workers: int = 2,
                 gunicorn_args: list[str] | None = None, env: dict[str, str] | None = None,
                 **config: object) -> None:
        self.port = free_port()
        self.gunicorn_args = gunicorn_args or []
        self.url = f"http://127.0.0.1:{self.port}"
        self.database_url = database_url
        self.log_path = log_path
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "SECRET_KEY": "live-test-secret",
            "WEB_CONCURRENCY": str(workers),
            "FLASK_REALTIME_PUBLISH_KEY": PUBLISH_KEY,
            "FLASK_REALTIME_HEARTBEAT_S": "1",
            "FLASK_REALTIME_RETRY_MS": "200",
            "FLASK_REALTIME_POLL_S": "0.05",
        }
        self.env.update({f"FLASK_{key}": str(value) for key, value in config.items()})
        self.env.update(env or {})
        self.process: subprocess.Popen | None = None

    def start(self) -> "LiveServer":
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:create_app()",
             "--bind", f"127.0.0.1:{self.port}", *self.gunicorn_args],
            cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self._answers, timeout=30, what=f"gunicorn on port {self.port} (log: {self.log_path})")
        wait_until(lambda: len(self.worker_pids()) == int(self.env["WEB_CONCURRENCY"]), what="workers")
        return self

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"gunicorn exited: {self.log_path.read_text()[-3000:]}")
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            return [int(pid) for pid in children.read_text().split()]
        except FileNotFoundError:
            return []

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()

    # conveniences for tests

    def metrics(self) -> dict[str, float]:
        """GET /metrics, summed over the workers: `{'name{label="value"}': value}` (no label: just the name)."""
        response = httpx.get(self.url + "/metrics", timeout=30)
        assert response.status_code == 200, response.text
        samples = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def metric(self, name: str) -> float:
        """One sample (`'name{kind="replay"}'`), or a name's samples summed over their labels."""
        samples = self.metrics()
        if "{" in name or name in samples:
            return samples.get(name, 0.0)
        return sum(value for key, value in samples.items() if key.startswith(name + "{"))

    def publish(self, channel: str, topic: str, data: object, **extra: object) -> dict:
        response = httpx.post(
            self.url + "/api/realtime/publish",
            json={"channel": channel, "topic": topic, "data": data, **extra},
            headers={"Authorization": f"Bearer {PUBLISH_KEY}"},
            timeout=10,
        )
        assert response.status_code == 201, response.text
        return response.json()

    def token(self, channel: str, topics: list[str]) -> str:
        """A token from the demo's allow-all policy: the server needs DEMO_ENABLED=True (else 403)."""
        response = httpx.post(self.url + "/api/realtime/token", json={"channel": channel, "topics": topics}, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()["token"]


@pytest.fixture
def start_server(tmp_path) -> Iterator[Callable[..., LiveServer]]:
    """Start as many live servers as a test needs; all are stopped after it."""
    servers: list[LiveServer] = []

    def start(database_url: str, **kwargs: object) -> LiveServer:
        server = LiveServer(tmp_path / f"gunicorn-{len(servers)}.log", database_url, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def live_server(start_server, database_url) -> LiveServer:
    """A 2-worker gevent gunicorn on SQLite, then on PostgreSQL, with the demo's token policy."""
    return start_server(database_url, DEMO_ENABLED=True)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def shared_server(request, tmp_path_factory) -> Iterator[LiveServer]:
    """One 2-worker gunicorn per backend and test module, for the tests that neither kill nor reconfigure it."""
    tmp = tmp_path_factory.mktemp(f"shared-{request.param}")
    pg_name = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'shared.sqlite3'}"
    else:
        pg_name = create_pg_database()
        if pg_name is None:
            skip_or_fail("PostgreSQL is not reachable on 127.0.0.1:5432")
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{pg_name}"
    server = LiveServer(tmp / "gunicorn.log", url, DEMO_ENABLED=True)  # its token policy lets tests subscribe
    try:
        yield server.start()
    finally:
        server.stop()
        if pg_name:
            drop_pg_database(pg_name)
