"""Publish throughput against what the disk allows, side by side in one run (issue 10).

    .venv/bin/python bench/publish.py                # 4 processes, 10 s each phase, PostgreSQL
    .venv/bin/python bench/publish.py --seconds 5 --processes 8

Phases, each on a fresh PostgreSQL database, `--processes` processes publishing
as fast as they can for `--seconds`:

1. raw: plain psycopg `INSERT` + `COMMIT` of rows shaped like a message into a
   table like `realtime_messages` (same columns, same indexes): the physical
   limit of this server with fsync on, which group commit raises when several
   transactions commit together.
2. publish: `realtime.publish()` through the app's Python API, one message per
   transaction, as a job or a web process publishes.
   (1 and 2 alternate for `--rounds` rounds, so the machine's noise falls on both.)
3. batch: `realtime.publish_many()` with `--batch` messages per transaction.

Prints messages/s of each and the ratio publish/raw, writes bench/results/publish.json;
bench/run.py runs it as its first phase.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from server import ROOT, Database, machine_cpu  # noqa: E402

DATA = {"stage": "fetching", "percent": 10, "message": "x" * 64}
CREATE_RAW = """
CREATE TABLE raw_messages (
    id BIGSERIAL PRIMARY KEY, channel VARCHAR(200) NOT NULL, topic VARCHAR(100) NOT NULL,
    data TEXT NOT NULL, run_id VARCHAR(64), created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX ix_raw_channel_id ON raw_messages (channel, id);
CREATE INDEX ix_raw_created_at ON raw_messages (created_at);
"""


def raw_worker(url: str, seconds: float, start: "Start", out: "multiprocessing.Queue[int]", n: int,
               batch: int = 0) -> None:
    """Plain psycopg: one row per INSERT + COMMIT, or with `batch`, that many rows in one
    INSERT from arrays + COMMIT (the statement publish_many uses, without any checks)."""
    import psycopg

    data = json.dumps(DATA)
    count = 0
    columns = ([f"bench.{n}"] * batch, ["status"] * batch, [data] * batch, [None] * batch)
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as conn:
        deadline = start.wait() + seconds
        while time.time() < deadline:
            if batch:
                conn.execute(
                    "INSERT INTO raw_messages (channel, topic, data, run_id, created_at)"
                    " SELECT c, t, d, r, now() FROM unnest(%b::varchar[], %b::varchar[], %b::text[], %b::varchar[])"
                    " AS m(c, t, d, r)", columns,
                )
            else:
                conn.execute(
                    "INSERT INTO raw_messages (channel, topic, data, run_id, created_at) VALUES (%s, %s, %s, %s, now())",
                    (f"bench.{n}", "status", data, None),
                )
            conn.commit()
            count += batch or 1
    out.put(count)


def app_worker(url: str, seconds: float, start: "Start", out: "multiprocessing.Queue[int]", n: int, batch: int,
               app_dir: str) -> None:
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("SECRET_KEY", "bench")
    sys.path.insert(0, app_dir)  # the checkout measured (--app-dir), ahead of this one
    from app import create_app

    app = create_app({"JOBS_EMBEDDED": False})
    realtime = app.extensions["realtime"]
    realtime.store.epoch  # the schema exists before the clock starts
    count = 0
    with app.app_context():
        deadline = start.wait() + seconds
        while time.time() < deadline:
            if batch:
                realtime.publish_many([{"channel": f"bench.{n}", "topic": "status", "data": DATA}] * batch)
                count += batch
            else:
                realtime.publish(f"bench.{n}", "status", DATA)
                count += 1
    app.extensions["database"].dispose()
    out.put(count)


class Start:
    """The starting gun: each process says it is ready (imported, connected), then all start together."""

    def __init__(self, spawn, processes: int) -> None:  # noqa: ANN001 - a multiprocessing context
        self._ready = spawn.Semaphore(0)
        self._go = spawn.Event()
        self._at = spawn.Value("d", 0.0)
        self.processes = processes

    def wait(self) -> float:
        """In a publishing process: ready; returns the start time once every process is."""
        self._ready.release()
        self._go.wait()
        return self._at.value

    def fire(self, timeout: float = 300.0) -> None:
        for _ in range(self.processes):
            if not self._ready.acquire(timeout=timeout):
                raise TimeoutError("a publishing process did not get ready")
        self._at.value = time.time()
        self._go.set()


def phase(name: str, target, url: str, processes: int, seconds: float, *extra: object) -> dict:
    spawn = multiprocessing.get_context("spawn")  # fresh interpreters: no fork of this one's connections
    out: multiprocessing.Queue[int] = spawn.Queue()
    start = Start(spawn, processes)
    procs = [spawn.Process(target=target, args=(url, seconds, start, out, n, *extra)) for n in range(processes)]
    for proc in procs:
        proc.start()
    start.fire()
    busy0, total0 = machine_cpu()
    counts = [out.get(timeout=seconds + 120) for _ in procs]
    busy1, total1 = machine_cpu()
    for proc in procs:
        proc.join()
    rate = sum(counts) / seconds
    busy = (busy1 - busy0) / max(1.0, total1 - total0)
    cpu_us = 1e6 * busy * (os.cpu_count() or 1) * seconds / max(1, sum(counts))
    print(f"  {name}: {sum(counts)} messages in {seconds:g} s = {rate:,.0f}/s ({counts}); "
          f"machine {100 * busy:.0f}% busy, {cpu_us:.0f} us of CPU per message", flush=True)
    return {"messages": sum(counts), "per_s": round(rate), "per_process": counts,
            "machine_busy_pct": round(100 * busy, 1), "cpu_us_per_message": round(cpu_us)}


def run_publish(processes: int, seconds: float, batch: int, rounds: int = 2, app_dir: Path = ROOT) -> dict:
    """Raw INSERT+COMMIT and realtime.publish() in alternating rounds (the machine's noise
    falls on both alike), then publish_many() in batches of `batch`."""
    report: dict = {"processes": processes, "seconds": seconds, "batch_size": batch, "rounds": []}
    print(f"publish throughput, {processes} processes x {seconds:g} s, PostgreSQL", flush=True)
    for _ in range(rounds):
        database = Database("postgresql")
        try:
            import psycopg

            with psycopg.connect(database.url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
                conn.execute(CREATE_RAW)
            raw = phase("raw INSERT+COMMIT", raw_worker, database.url, processes, seconds)
        finally:
            database.drop()
        database = Database("postgresql")
        try:
            publish = phase("realtime.publish()", app_worker, database.url, processes, seconds, 0, str(app_dir))
        finally:
            database.drop()
        report["rounds"].append({"raw": raw, "publish": publish,
                                 "ratio": round(publish["per_s"] / max(1, raw["per_s"]), 3)})
    database = Database("postgresql")
    try:
        import psycopg

        with psycopg.connect(database.url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
            conn.execute(CREATE_RAW)
        report["raw_batch"] = phase(f"raw INSERT of {batch} rows + COMMIT", raw_worker, database.url, processes,
                                    seconds, batch)
    finally:
        database.drop()
    database = Database("postgresql")
    try:
        report["batch"] = phase(f"publish_many() x {batch}", app_worker, database.url, processes, seconds, batch,
                                str(app_dir))
    finally:
        database.drop()
    report["ratio_batch_to_raw_batch"] = round(report["batch"]["per_s"] / max(1, report["raw_batch"]["per_s"]), 3)
    report["raw_per_s"] = round(sum(r["raw"]["per_s"] for r in report["rounds"]) / rounds)
    report["publish_per_s"] = round(sum(r["publish"]["per_s"] for r in report["rounds"]) / rounds)
    report["ratio_publish_to_raw"] = round(report["publish_per_s"] / max(1, report["raw_per_s"]), 3)
    print(f"  publish / raw = {report['ratio_publish_to_raw']} (rounds: "
          f"{', '.join(str(r['ratio']) for r in report['rounds'])})", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--app-dir", type=Path, default=ROOT, help="the checkout whose publish() is measured")
    args = parser.parse_args()
    report = run_publish(args.processes, args.seconds, args.batch, args.rounds, args.app_dir.resolve())
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "publish.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
