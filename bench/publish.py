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
3. batch: `realtime.publish_many()` with `--batch` messages per transaction
   (skipped when the app has no publish_many).

Prints messages/s of each and the ratio publish/raw, writes bench/results/publish.json.
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


def raw_worker(url: str, seconds: float, start_at: float, out: "multiprocessing.Queue[int]", n: int) -> None:
    import psycopg

    data = json.dumps(DATA)
    count = 0
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"),
                         prepare_threshold=None if os.environ.get("BENCH_RAW_UNPREPARED") else 5) as conn:
        while time.time() < start_at:
            time.sleep(0.001)
        deadline = start_at + seconds
        while time.time() < deadline:
            conn.execute(
                "INSERT INTO raw_messages (channel, topic, data, run_id, created_at) VALUES (%s, %s, %s, %s, now())",
                (f"bench.{n}", "status", data, None),
            )
            conn.commit()
            count += 1
    out.put(count)


def app_worker(url: str, seconds: float, start_at: float, out: "multiprocessing.Queue[int]", n: int, batch: int) -> None:
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("SECRET_KEY", "bench")
    from app import create_app

    app = create_app({"JOBS_EMBEDDED": False})
    realtime = app.extensions["realtime"]
    if os.environ.get("BENCH_NO_NOTIFY"):
        realtime.dispatcher.notify_appended = lambda: None
    realtime.store.epoch  # the schema exists before the clock starts
    count = 0
    with app.app_context():
        while time.time() < start_at:
            time.sleep(0.001)
        deadline = start_at + seconds
        while time.time() < deadline:
            if batch:
                realtime.publish_many([{"channel": f"bench.{n}", "topic": "status", "data": DATA}] * batch)
                count += batch
            else:
                realtime.publish(f"bench.{n}", "status", DATA)
                count += 1
    app.extensions["database"].dispose()
    out.put(count)


def phase(name: str, target, url: str, processes: int, seconds: float, *extra: object) -> dict:
    out: multiprocessing.Queue[int] = multiprocessing.Queue()
    start_at = time.time() + 3.0  # every process connected and imported before the clock starts
    procs = [multiprocessing.Process(target=target, args=(url, seconds, start_at, out, n, *extra)) for n in range(processes)]
    for proc in procs:
        proc.start()
    time.sleep(max(0.0, start_at - time.time()))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    multiprocessing.set_start_method("spawn")
    report: dict = {"processes": args.processes, "seconds": args.seconds, "batch": args.batch}
    print(f"publish throughput, {args.processes} processes x {args.seconds:g} s, PostgreSQL", flush=True)

    database = Database("postgresql")
    try:
        import psycopg

        with psycopg.connect(database.url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
            conn.execute(CREATE_RAW)
        report["raw"] = phase("raw INSERT+COMMIT", raw_worker, database.url, args.processes, args.seconds)
    finally:
        database.drop()
    database = Database("postgresql")
    try:
        report["publish"] = phase("realtime.publish()", app_worker, database.url, args.processes, args.seconds, 0)
    finally:
        database.drop()
    from realtime import Realtime

    if hasattr(Realtime, "publish_many"):
        database = Database("postgresql")
        try:
            report["batch"] = phase(f"publish_many() x {args.batch}", app_worker, database.url,
                                    args.processes, args.seconds, args.batch)
        finally:
            database.drop()
    report["ratio_publish_to_raw"] = round(report["publish"]["per_s"] / max(1, report["raw"]["per_s"]), 3)
    print(f"  publish / raw = {report['ratio_publish_to_raw']}", flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "publish.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
