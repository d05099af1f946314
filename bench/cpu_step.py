"""Does a CPU-bound job step freeze the streams of its gevent worker?

    .venv/bin/python bench/cpu_step.py                       # SQLite, the default pool
    .venv/bin/python bench/cpu_step.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/DB
    .venv/bin/python bench/cpu_step.py --pool greenlets      # the pool jobs/worker.py avoids

ONE gunicorn gevent worker (bench/jobs_cpu_app.py) serves two streams and runs,
embedded, a job whose single step computes in pure Python for `--seconds`:

- `ticks`: this script publishes a message every `--interval` s over HTTP and
  measures, per message, publish-call-to-receipt delay at the subscriber;
- `idle`: a stream with no messages, `REALTIME_HEARTBEAT_S=0.5`; we measure the
  gaps between its keep-alive comments.

Both are measured before the step (baseline) and while it runs. The issue's
bar: the step may add at most 100 ms to either. Prints the figures and writes
them to bench/results/jobs_cpu_step.json (gitignored).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from server import PUBLISH_KEY, ROOT, BenchServer

HEARTBEAT_S = 0.5


def start_server(database_url: str, pool: str, switch_interval_s: float | None, log_path: Path) -> BenchServer:
    """One gevent worker: the job and both streams share it."""
    env = {"BENCH_JOBS_POOL": pool}
    if switch_interval_s is not None:
        env["GIL_SWITCH_INTERVAL_S"] = str(switch_interval_s)  # read by gunicorn.conf.py
    return BenchServer(
        database_url, log_path, open_files=1024, app="bench.jobs_cpu_app:create_app()",
        env=env, REALTIME_HEARTBEAT_S=HEARTBEAT_S, JOBS_POLL_S=0.05,
    ).start()


class Stream(threading.Thread):
    """One subscriber: stamps each data line and each keep-alive with the monotonic clock."""

    def __init__(self, url: str, channel: str) -> None:
        super().__init__(daemon=True)
        token = httpx.post(url + "/api/realtime/token", json={"channel": channel, "topics": ["tick"]}).json()["token"]
        self.url = f"{url}/api/realtime/subscribe?token={token}"
        self.messages: list[tuple[float, float]] = []  # (sent, received)
        self.heartbeats: list[float] = []
        self.ready = threading.Event()

    def run(self) -> None:
        with httpx.stream("GET", self.url, timeout=httpx.Timeout(10, read=None)) as response:
            for line in response.iter_lines():
                now = time.monotonic()
                if line.startswith("retry:"):
                    self.ready.set()
                elif line.startswith(": keep-alive"):
                    self.heartbeats.append(now)
                elif line.startswith("data:"):
                    self.messages.append((json.loads(line[5:])["data"]["sent"], now))


def publish_ticks(url: str, interval: float, stop: threading.Event) -> None:
    with httpx.Client(headers={"Authorization": f"Bearer {PUBLISH_KEY}"}, timeout=10) as client:
        while not stop.is_set():
            body = {"channel": "bench.ticks", "topic": "tick", "data": {"sent": time.monotonic()}}
            client.post(url + "/api/realtime/publish", json=body).raise_for_status()
            stop.wait(interval)


def summary(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {"n": 0}
    ordered = sorted(values_ms)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered), 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1),
        "max_ms": round(ordered[-1], 1),
    }


def measure(url: str, seconds: float, interval: float) -> dict:
    ticks, idle = Stream(url, "bench.ticks"), Stream(url, "bench.idle")
    for stream in (ticks, idle):
        stream.start()
        stream.ready.wait(10)
    stop = threading.Event()
    publisher = threading.Thread(target=publish_ticks, args=(url, interval, stop), daemon=True)
    publisher.start()

    time.sleep(2.0)  # baseline
    step_start = time.monotonic()
    run_id = httpx.post(url + "/api/events", json={"name": "bench.cpu", "data": {"seconds": seconds}}).json()["runs"][0]["id"]
    while (run := httpx.get(f"{url}/api/runs/{run_id}").json())["status"] not in ("completed", "failed"):
        time.sleep(0.05)
    step_end = time.monotonic()
    time.sleep(0.5)
    stop.set()
    publisher.join()

    def delays(start: float, end: float) -> list[float]:
        return [(received - sent) * 1000 for sent, received in ticks.messages if start <= sent <= end]

    def heartbeat_lateness(start: float, end: float) -> list[float]:
        beats = [t for t in idle.heartbeats if start <= t <= end + HEARTBEAT_S]
        return [max(0.0, (b - a - HEARTBEAT_S) * 1000) for a, b in zip(beats, beats[1:])]

    return {
        "run": {"status": run["status"], "seconds": round(step_end - step_start, 2), "loops": run["output"]},
        "baseline": {"message_delay": summary(delays(0, step_start)),
                     "heartbeat_lateness": summary(heartbeat_lateness(0, step_start))},
        "during_step": {"message_delay": summary(delays(step_start, step_end)),
                        "heartbeat_lateness": summary(heartbeat_lateness(step_start, step_end))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="CPU time of the step")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between published ticks")
    parser.add_argument("--pool", choices=["native", "greenlets"], default="native")
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="the worker's GIL switch interval in seconds (default: gunicorn.conf.py's, 0.001)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        database_url = args.database_url or f"sqlite:///{tmp}/bench.sqlite3"
        server = start_server(database_url, args.pool, args.switch_interval, Path(tmp) / "gunicorn.log")
        try:
            result = measure(server.url, args.seconds, args.interval)
        finally:
            server.stop()

    result = {"pool": args.pool, "switch_interval_s": args.switch_interval or "gunicorn.conf.py",
              "cpu_step_s": args.seconds, "database": database_url.split(":")[0], **result}
    during = result["during_step"]
    worst = max(during["message_delay"].get("max_ms", 0), during["heartbeat_lateness"].get("max_ms", 0))
    result["verdict"] = f"worst added delay {worst:.0f} ms: " + ("PASS (<= 100 ms)" if worst <= 100 else "FAIL (> 100 ms)")
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"jobs_cpu_step_{args.pool}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
