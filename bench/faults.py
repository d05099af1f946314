"""What clients and operators see when the database fails: the figures of the README's "Failure modes".

    .venv/bin/python bench/faults.py          # about a minute; PostgreSQL on 127.0.0.1:5432

One gunicorn gevent worker (server.py), `REALTIME_HEARTBEAT_S=1`, behind the
tests' TCP proxy (tests/faultproxy.py) for PostgreSQL, or beside a process
holding SQLite's write lock. For each fault it times what a client gets: the
first 503 of a publish, /readyz turning 503, the gaps between keep-alives on
an open stream, and how soon a message published after the database returns
reaches that stream. Prints JSON, writes bench/results/faults.json.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from server import PUBLISH_KEY, ROOT, BenchServer, Database

sys.path.insert(0, str(ROOT / "tests"))
from faultproxy import FaultProxy  # noqa: E402

HEARTBEAT_S = 1.0


class Watcher(threading.Thread):
    """An open stream: stamps each keep-alive and each message with the monotonic clock."""

    def __init__(self, server: BenchServer, channel: str) -> None:
        super().__init__(daemon=True)
        token = server.token(channel, ["t"])
        self.url = f"{server.url}/api/realtime/subscribe?token={token}"
        self.beats: list[float] = []
        self.messages: list[tuple[float, object]] = []
        self.ready = threading.Event()

    def run(self) -> None:
        with httpx.stream("GET", self.url, timeout=httpx.Timeout(10, read=None)) as response:
            for line in response.iter_lines():
                now = time.monotonic()
                if line.startswith("retry:"):
                    self.ready.set()
                elif line.startswith(":"):
                    self.beats.append(now)
                elif line.startswith("data:"):
                    self.messages.append((now, json.loads(line[5:])["data"]))

    def largest_gap(self, start: float, end: float) -> float:
        stamps = [start] + [t for t in self.beats + [m[0] for m in self.messages] if start <= t <= end] + [end]
        stamps.sort()
        return max(b - a for a, b in zip(stamps, stamps[1:]))


def publish(server: BenchServer, channel: str, data: object) -> tuple[int, float]:
    started = time.monotonic()
    response = httpx.post(server.url + "/api/realtime/publish", json={"channel": channel, "topic": "t", "data": data},
                          headers={"Authorization": f"Bearer {PUBLISH_KEY}"}, timeout=60)
    return response.status_code, time.monotonic() - started


def until(condition, timeout: float = 60.0) -> float:
    """Seconds until `condition()` holds, polling every 50 ms."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - started


def readyz(server: BenchServer) -> int:
    return httpx.get(server.url + "/readyz", timeout=30).status_code


def outage(server: BenchServer, begin, end, hold_s: float = 10.0) -> dict:
    """Start a fault, measure for `hold_s`, end it, measure the recovery."""
    watcher = Watcher(server, "faults.watch")
    watcher.start()
    watcher.ready.wait(10)
    until(lambda: readyz(server) == 200)
    started = time.monotonic()
    begin()
    status, publish_s = publish(server, "faults.other", "during")
    unready_s = until(lambda: readyz(server) == 503)
    held = max(0.0, hold_s - (time.monotonic() - started))
    time.sleep(held)  # the fault lasts this long: a benchmark, not a test
    gap = watcher.largest_gap(started, time.monotonic())
    end()
    restored = time.monotonic()
    marker = f"after-{restored}"
    while publish(server, "faults.watch", marker)[0] != 201:
        time.sleep(0.05)
    until(lambda: any(data == marker for _, data in watcher.messages))
    return {
        "publish_during": {"status": status, "answered_in_s": round(publish_s, 2)},
        "readyz_503_after_s": round(unready_s, 2),
        "largest_keepalive_gap_s": round(gap, 2),
        "stream_gets_a_new_message_after_s": round(time.monotonic() - restored, 2),
    }


def postgres_faults() -> dict:
    database = Database("postgresql")
    results = {}
    try:
        with FaultProxy("127.0.0.1", 5432) as proxy, tempfile.TemporaryDirectory() as tmp:
            server = BenchServer(proxy.url_for(database.url), Path(tmp) / "gunicorn.log", open_files=1024,
                                 REALTIME_HEARTBEAT_S=HEARTBEAT_S).start()
            try:
                results["cut"] = outage(server, proxy.cut, proxy.restore)
                results["stall"] = outage(server, proxy.stall, proxy.restore)
            finally:
                server.stop()
    finally:
        database.drop()
    return results


def sqlite_lock() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.sqlite3"
        server = BenchServer(f"sqlite:///{path}", Path(tmp) / "gunicorn.log", open_files=1024,
                             REALTIME_HEARTBEAT_S=HEARTBEAT_S).start()
        holder = None
        try:
            publish(server, "faults.warm", 1)
            watcher = Watcher(server, "faults.watch")
            watcher.start()
            watcher.ready.wait(10)
            holder = subprocess.Popen(
                [sys.executable, "-c", "import sqlite3, time\n"
                 f"db = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
                 "db.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(12)\n"],
                stdout=subprocess.PIPE, text=True,
            )
            holder.stdout.readline()
            started = time.monotonic()
            result: dict = {}
            waiting = threading.Thread(target=lambda: result.update(publish=publish(server, "faults.other", "x")))
            waiting.start()
            healthz = []
            while waiting.is_alive():
                t0 = time.monotonic()
                httpx.get(server.url + "/healthz", timeout=30)
                healthz.append(time.monotonic() - t0)
                time.sleep(0.1)
            holder.wait()
            gap = watcher.largest_gap(started, time.monotonic())
            status, seconds = result["publish"]
            return {
                "lock_held_s": 12,
                "publish_during": {"status": status, "answered_in_s": round(seconds, 2)},
                "healthz_slowest_ms": round(1000 * max(healthz), 1),
                "largest_keepalive_gap_s": round(gap, 2),
            }
        finally:
            if holder is not None and holder.poll() is None:
                holder.kill()
                holder.wait()
            if holder is not None:
                holder.stdout.close()
            server.stop()


def main() -> None:
    report = {"heartbeat_s": HEARTBEAT_S, "postgresql": postgres_faults(), "sqlite_locked": sqlite_lock()}
    print(json.dumps(report, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
