"""What the benchmark runs against: a fresh database and one gunicorn gevent worker.

Follows the tests' LiveServer (itself modelled on Werkzeug's DevServerClient):
start the real `gunicorn -c gunicorn.conf.py "app:create_app()"` on a free
port, wait until it answers, stop it by its pid. Plus what only a benchmark
needs: a high open-files limit for the server, and /proc readings of the
worker's CPU time and resident memory.
"""
from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
PUBLISH_KEY = "bench-publish-key"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def raise_open_files_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (capped by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- /proc readings ---------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces; the fields after ")" are fixed.
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15)


def worker_counters(pid: int) -> dict[str, float]:
    """A process's user and system CPU seconds so far: Python's work against the kernel's (sockets),
    the split of its CPU per delivery (bench/README.md)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return {"user_s": int(fields[11]) / CLOCK_TICKS, "system_s": int(fields[12]) / CLOCK_TICKS}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, to show what else ran meanwhile."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


# -- databases --------------------------------------------------------------------


class Database:
    """A fresh database for one run: a new PostgreSQL database or a SQLite file, removed by `drop`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._pg_name: str | None = None
        self._tmpdir: str | None = None
        if kind == "postgresql":
            import psycopg

            self._pg_name = "rt_bench_" + secrets.token_hex(4)
            with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f"CREATE DATABASE {self._pg_name}")
            self.url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{self._pg_name}"
        elif kind == "sqlite":
            self._tmpdir = tempfile.mkdtemp(prefix="rt_bench_")
            self.url = f"sqlite:///{self._tmpdir}/bench.sqlite3"
        else:
            raise ValueError(f"unknown database {kind!r}")

    def drop(self) -> None:
        if self._pg_name is not None:
            import psycopg

            with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {self._pg_name} WITH (FORCE)")
            self._pg_name = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


# -- the server -------------------------------------------------------------------


class ServerProcess:
    """A server started in its own session on a free localhost port, with a high open-files
    limit, waited for until it answers and its `workers` child processes exist, stopped by
    its pid. Subclasses say how: `command`, `cwd`, `answers` (and `env`, `log_path`)."""

    name = "server"
    host = "127.0.0.1"
    cwd: Path = ROOT
    workers = 0  # child worker processes to wait for (gunicorn's); 0: the process serves itself

    def __init__(self, log_path: Path, open_files: int) -> None:
        self.port = free_port()
        self.url = f"http://{self.host}:{self.port}"
        self.log_path, self.open_files = log_path, open_files
        self.env: dict[str, str] = dict(os.environ)
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def answers(self) -> None:
        """Raise OSError until the server answers."""
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        self._log = open(self.log_path, "ab")
        open_files = self.open_files

        def in_child() -> None:  # runs in the forked child, before exec
            raise_open_files_limit(open_files)

        self.process = subprocess.Popen(
            self.command(), cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=in_child,
        )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not answer within {timeout}s (log: {self.log_path})")
            time.sleep(0.1)
        while len(self.worker_pids()) != self.workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}'s workers did not appear")
            time.sleep(0.1)
        return self

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-3000:]}")
        try:
            self.answers()
            return True
        except OSError:
            return False

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            return [int(pid) for pid in children.read_text().split()]
        except FileNotFoundError:
            return []

    @property
    def worker_pid(self) -> int:
        if not self.workers:
            return self.process.pid
        (pid,) = self.worker_pids()
        return pid

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                os.kill(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
        finally:
            self._log.close()
            self.process = None


class BenchServer(ServerProcess):
    """One gunicorn master with `workers` gevent workers (one unless said) on a free localhost port."""

    name = "gunicorn"

    def __init__(
        self,
        database_url: str,
        log_path: Path,
        *,
        open_files: int,
        app_dir: Path = ROOT,
        app: str = "app:create_app()",
        env: dict[str, str] | None = None,
        workers: int = 1,
        **config: object,
    ) -> None:
        super().__init__(log_path, open_files)
        self.workers = workers
        self.cwd = app_dir
        self.app = app
        self.is_postgres = database_url.startswith("postgresql")
        self.env.update({
            "DATABASE_URL": database_url,
            "SECRET_KEY": "bench-secret-" + secrets.token_hex(8),
            "WEB_CONCURRENCY": str(workers),
            "FLASK_REALTIME_PUBLISH_KEY": PUBLISH_KEY,
            # Production defaults, written out so the run's JSON records them.
            "FLASK_REALTIME_HEARTBEAT_S": "15",
            "FLASK_REALTIME_RETRY_MS": "2000",
            "FLASK_REALTIME_POLL_S": "0.25",  # SQLite only
            # Only so a token survives the seconds it takes to open 5,000 streams.
            "FLASK_REALTIME_TOKEN_TTL_S": "600",
            # The bench's streams ask POST /api/realtime/token for any channel: the demo's
            # allow-all policy, which gunicorn has only when asked for. Older checkouts ignore it.
            "FLASK_DEMO_ENABLED": "true",
            # Its load clients open thousands of streams with one token, and the scale phase
            # 10,000 per worker: the per-token and per-process stream caps are for the Internet.
            "FLASK_REALTIME_MAX_STREAMS_PER_TOKEN": "0",
            "FLASK_REALTIME_MAX_STREAMS": "0",
        })
        self.env.update(env or {})
        self.env.update({f"FLASK_{key}": str(value) for key, value in config.items()})

    def command(self) -> list[str]:
        return [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", self.app, "--bind", f"{self.host}:{self.port}"]

    def answers(self) -> None:
        self.stats()

    # -- HTTP helpers (stdlib only: cheap, and no extra client in the numbers) --

    def _request(self, method: str, path: str, body: object = None, headers: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stats(self) -> dict:
        """Open streams, frames handed to streams and message reads, from /metrics (summed over workers)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        values = {s.name: s.value for s in samples if not s.labels}
        reads = {s.labels.get("kind", ""): s.value for s in samples if s.name == "realtime_store_reads_total"}
        return {
            "streams": int(values.get("realtime_streams_open", 0)),
            "delivered": int(values.get("realtime_frames_sent_total", 0)),
            "store_reads": int(sum(reads.values())),
            "replay_reads": int(reads.get("replay", 0)),
        }

    def history(self, token: str) -> dict:
        return self._request("GET", f"/api/realtime/messages?token={token}")

    def token(self, channel: str, topics: list[str]) -> str:
        return self._request("POST", "/api/realtime/token", {"channel": channel, "topics": topics})["token"]


def wait_for(condition: Callable[[], object], timeout: float, interval: float = 0.1, what: str = "") -> object:
    """Poll until `condition()` is truthy; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what or condition}")
        time.sleep(interval)
