"""Text streams (issue 20): live generations, the naive way beside them, reload and cancel.

    .venv/bin/python bench/texts.py                                   # everything (about 10 minutes)
    .venv/bin/python bench/texts.py --generations 100,300 --naive-generations 10,30 --seconds 10
    .venv/bin/python bench/texts.py --phases reload,cancel --rounds 1

PostgreSQL on 127.0.0.1:5432 (BENCH_PG_ADMIN), a database of its own, created and dropped.
One real `gunicorn -c gunicorn.conf.py "app:create_app()"` (server.py's BenchServer: gevent,
the bench's environment, `--workers` workers), and:

1. **live** (`--generations`): N generations, each writing `--rate` tokens a second (about 4
   characters each, text_writers.py) for `--seconds`, from `--writers` standalone processes
   through `Publisher.text_stream` (`--writer-threads` threads each, running their share of the
   generations on one schedule), each generation watched by one SSE stream of the
   text_load.py clients. Token-to-client latency (from the `write()` call to the receipt of the
   message that brought the token; matched by the text's length), every final text against what
   was written, rows stored per generation-second, CPU per token of the gunicorn workers, the
   writers, the clients and the PostgreSQL backends of the database.
2. **naive** (`--naive-generations`): the same, one `Publisher.publish` per token.
3. **reload**: a 20,000-token answer stored by a text stream (2-3 tokens per flush, as a
   generation at 50 tokens/s flushed every 50 ms stores it: about 8,000 rows), and the same
   answer stored the naive way (20,000 messages); a new stream (no cursor) reads each until it
   has the whole text: time, frames, bytes.
4. **cancel**: a job that writes to `ctx.text_stream` every 20 ms, run by `flask jobs worker`
   (text_jobs_app.py); time from sending `POST /api/runs/<id>/cancel` to `write` raising.

Prints the tables, writes everything to bench/results/texts-<time>.json. Every process it starts
is stopped by its pid. Each live configuration runs `--rounds` times, text and naive interleaved.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import pickle
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from datetime import datetime, timezone
from pathlib import Path

from server import ROOT, BenchServer, Database, cpu_seconds, machine_cpu, raise_open_files_limit, wait_for
from clients import TextClientPool
from text_load import TextStream
from text_writers import channel_of, expected_text, token

sys.path.insert(0, str(ROOT))

HERE = Path(__file__).resolve().parent
TOPIC = "answer"


# -- measuring ---------------------------------------------------------------------------------


def percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def pg_backends(db: Database) -> list[int]:
    """The PostgreSQL backends connected to this run's database (their CPU is the database's work)."""
    import psycopg

    with psycopg.connect(db.url.replace("+psycopg", ""), autocommit=True) as conn:
        return [row[0] for row in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")]


def cpu_of(pids: list[int]) -> dict[int, float]:
    seconds = {}
    for pid in pids:
        try:
            seconds[pid] = cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return seconds


class CpuWindow:
    """CPU seconds of groups of processes between `start` and `stop`; PostgreSQL backends that
    appear meanwhile count from 0 (a pool grows), those that exit are lost (pools keep theirs)."""

    def __init__(self, db: Database, groups: dict[str, list[int]]) -> None:
        self.db, self.groups = db, groups

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.machine0 = machine_cpu()
        self.before = {name: cpu_of(pids) for name, pids in self.groups.items()}
        self.before["postgres"] = cpu_of(pg_backends(self.db))

    def stop(self) -> dict:
        after = {name: cpu_of(pids) for name, pids in self.groups.items()}
        after["postgres"] = cpu_of(pg_backends(self.db))
        busy1, total1 = machine_cpu()
        busy0, total0 = self.machine0
        seconds = time.monotonic() - self.t0
        used = {name: sum(s - self.before[name].get(pid, 0.0) for pid, s in values.items())
                for name, values in after.items()}
        return {"seconds": seconds, "cpu_s": used, "machine_busy": (busy1 - busy0) / (total1 - total0)}


# -- the processes -----------------------------------------------------------------------------


class Writers:
    """`count` text_writers.py processes sharing the generations g % count."""

    def __init__(self, count: int, env: dict[str, str], config: dict, tmp: str) -> None:
        total = config["total"]
        self.outs = [f"{tmp}/writer-{i}.pickle" for i in range(count)]
        self.procs = []
        for i in range(count):
            share = list(range(i, total, count))
            if not share:
                continue
            proc = subprocess.Popen([sys.executable, str(HERE / "text_writers.py")], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, cwd=ROOT, env=env, text=True)
            proc.stdin.write(json.dumps({**config, "generations": share, "out": self.outs[i]}) + "\n")
            proc.stdin.flush()
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def ready(self) -> None:
        for proc in self.procs:
            line = proc.stdout.readline()
            if not line or not json.loads(line).get("ready"):
                raise RuntimeError(f"writer {proc.pid} did not start: {line!r}")

    def go(self, start: float) -> None:
        for proc in self.procs:
            proc.stdin.write(f"{start!r}\n")
            proc.stdin.flush()

    def done(self) -> list[dict]:
        reports = []
        for proc in self.procs:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"writer {proc.pid} exited without a report")
            reports.append(json.loads(line))
        return reports

    def close(self) -> None:
        """Let them close their connections and exit."""
        for proc in self.procs:
            proc.stdin.write("close\n")
            proc.stdin.flush()
        for proc in self.procs:
            proc.wait(timeout=60)

    def records(self) -> dict[int, tuple[array, array]]:
        records = {}
        for path in self.outs[:len(self.procs)]:
            with open(path, "rb") as f:
                for g, (times, lengths) in pickle.load(f).items():
                    records[g] = (array("d", times), array("q", lengths))
        return records

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()


# -- 1, 2: live generations --------------------------------------------------------------------


def live(server: BenchServer, db: Database, pool: TextClientPool, args: argparse.Namespace, mode: str,
         n: int, prefix: str, tmp: str) -> dict:
    """N generations written the `mode` way ("text" or "naive"), each watched by one stream."""
    tokens = round(args.rate * args.seconds)
    channels = [channel_of(prefix, g) for g in range(n)]
    paths = [f"/api/realtime/subscribe?token={server.token(c, [TOPIC])}" for c in channels]
    opened = pool.open(server.host, server.port, paths, timeout=120)
    if opened["ready"] != n:
        raise RuntimeError(f"opened {opened}")
    env = {**server.env, "FLASK_REALTIME_TEXT_FLUSH_MS": str(args.flush_ms)}
    threads = args.writer_threads if mode == "text" else args.naive_threads
    writers = Writers(args.writers, env, {"mode": mode, "prefix": prefix, "total": n, "rate": args.rate,
                                          "tokens": tokens, "threads": threads}, tmp)
    try:
        writers.ready()
        window = CpuWindow(db, {"server": server.worker_pids(), "writers": writers.pids, "clients": pool.pids})
        start = time.monotonic() + 0.5
        writers.go(start)
        time.sleep(max(0.0, start - time.monotonic()))
        window.start()
        reports = writers.done()
        ended = pool.wait_ended(timeout=120)
        cpu = window.stop()
        # Their own count, from the start line to their report (the pickling after it left out).
        cpu["cpu_s"]["writers"] = sum(r["cpu"] - r["cpu_at_start"] for r in reports)
        writers.close()
        written = writers.records()
    finally:
        writers.stop()
    records = pool.records()
    pool.close_streams()

    latencies: list[float] = []
    from_due: list[float] = []  # from when the token was due (the LLM produced it): a late writer shows here
    by_second: dict[int, list[float]] = {}  # latencies by the second of the run they were written in
    mismatches, gaps, frames, received_bytes = [], 0, 0, 0
    for index, record in zip(pool.order(n), records):
        times, lengths = written[index]
        if record["text"] != expected_text(index, len(lengths)) or record["status"] != "completed" or len(lengths) != tokens:
            mismatches.append(index)
        gaps += record["gaps"]
        frames += record["frames"]
        received_bytes += record["bytes"]
        got_lengths, stamps = array("q"), array("d")
        got_lengths.frombytes(record["lengths"])
        stamps.frombytes(record["stamps"])
        phase = index / n / args.rate
        for k, (called, offset) in enumerate(zip(times, lengths)):
            j = bisect.bisect_left(got_lengths, offset)
            if j < len(stamps):
                latencies.append(stamps[j] - called)
                by_second.setdefault(int(called - start), []).append(stamps[j] - called)
                from_due.append(stamps[j] - (start + phase + k / args.rate))
    latencies.sort()
    from_due.sort()
    import psycopg

    with psycopg.connect(db.url.replace("+psycopg", ""), autocommit=True) as conn:
        rows = conn.execute("SELECT count(*) FROM realtime_messages WHERE channel LIKE %s",
                            (prefix + ".%",)).fetchone()[0]
    written_tokens = sum(len(lengths) for _, lengths in written.values())
    per_token = {name: seconds / written_tokens * 1e6 for name, seconds in cpu["cpu_s"].items()}
    return {
        "mode": mode, "generations": n, "seconds": args.seconds, "rate": args.rate, "tokens": written_tokens,
        "p50_ms": percentile(latencies, 0.5) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": latencies[-1] * 1000, "matched": len(latencies),
        "p99_ms_by_second": [round(percentile(sorted(v), 0.99) * 1000, 1) for _, v in sorted(by_second.items())],
        "from_due_p50_ms": percentile(from_due, 0.5) * 1000, "from_due_p99_ms": percentile(from_due, 0.99) * 1000,
        "mismatches": len(mismatches), "mismatched": mismatches[:10], "gaps": gaps,
        "ended": sum(r["ended"] for r in ended),
        "rows": rows, "rows_per_gen_s": rows / (n * args.seconds),
        "frames": frames, "bytes": received_bytes,
        "window_s": cpu["seconds"], "cpu_s": cpu["cpu_s"], "cpu_us_per_token": per_token,
        "cpu_pct": {name: seconds / cpu["seconds"] * 100 for name, seconds in cpu["cpu_s"].items()},
        "machine_busy": cpu["machine_busy"],
        "writer_late_p99_ms": max(r["late_p99_ms"] for r in reports),
        "writer_late_max_ms": max(r["late_max_ms"] for r in reports),
        "writing_s": max(r["writing_done"] for r in reports) - start,
        "writer_failures": [f for r in reports for f in r["failures"]],
    }


# -- 3: reload ---------------------------------------------------------------------------------


def store_answers(db: Database, tokens: int, text_channel: str, naive_channel: str) -> dict:
    """The answer stored once by a text stream, flushed every 2-3 tokens (as at 50 tokens/s and a
    flush every 50 ms), and once the naive way, one message per token."""
    from realtime.publisher import Publisher
    from realtime.text_streams import TextFlusher, TextStream as Writer

    publisher = Publisher(db.url)
    try:
        # Flushed by hand below; with the NOTIFY after each commit, so the server's dispatcher is
        # at the end of the answer when the streams open (else they replay up to its position
        # and get the rest as live deltas).
        flusher = TextFlusher(lambda items: publisher.store.append_many(items, on_commit=publisher._committed),
                              interval_s=None)
        with Writer(flusher, text_channel, TOPIC, "answer", max_bytes=10 * 1024 * 1024) as out:
            for k in range(tokens):
                out.write(token(0, k))
                if k % 5 in (2, 4):  # 2.5 tokens per flush
                    flusher.flush()
        for first in range(0, tokens, 1000):
            publisher.publish_many([{"channel": naive_channel, "topic": TOPIC, "data": {"k": k, "t": token(0, k)}}
                                    for k in range(first, min(tokens, first + 1000))])
        publisher.publish(naive_channel, TOPIC, {"k": tokens, "t": "", "status": "completed"})
    finally:
        publisher.close()
    import psycopg

    with psycopg.connect(db.url.replace("+psycopg", ""), autocommit=True) as conn:
        count = dict(conn.execute("SELECT channel, count(*) FROM realtime_messages WHERE channel IN (%s, %s) "
                                  "GROUP BY channel", (text_channel, naive_channel)).fetchall())
    return {"text_rows": count[text_channel], "naive_rows": count[naive_channel]}


def read_whole(server: BenchServer, channel: str, want: str, timeout: float = 60.0) -> dict:
    """Open a new stream (no cursor) and read until the text is whole and ended: time, frames, bytes."""
    path = f"/api/realtime/subscribe?token={server.token(channel, [TOPIC])}"
    stream = TextStream()
    started = time.monotonic()
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {server.host}\r\nAccept: text/event-stream\r\n\r\n".encode())
        first_byte = None
        while stream.status is None:
            data = sock.recv(65536)
            now = time.monotonic()
            if not data:
                raise ConnectionError("the stream ended before the text")
            first_byte = first_byte or now
            if stream.head:
                stream.headers(data, now)
            else:
                stream.feed(data, now)
        whole = time.monotonic()
    return {"ms": (whole - started) * 1000, "first_byte_ms": (first_byte - started) * 1000, "frames": stream.frames,
            "bytes": stream.bytes, "ok": stream.whole_text() == want and stream.gaps == 0}


def reload(server: BenchServer, db: Database, args: argparse.Namespace) -> dict:
    stored = store_answers(db, args.reload_tokens, "reload.text", "reload.naive")
    want = expected_text(0, args.reload_tokens)
    time.sleep(1.0)
    runs = {"text": [], "naive": []}
    for _ in range(args.reload_repeats):
        for kind in ("text", "naive"):
            runs[kind].append(read_whole(server, f"reload.{kind}", want))
    summary = {}
    for kind, results in runs.items():
        summary[kind] = {
            "rows": stored[f"{kind}_rows"],
            "ms_median": statistics.median(r["ms"] for r in results),
            "ms_all": [round(r["ms"], 1) for r in results],
            "first_byte_ms_median": statistics.median(r["first_byte_ms"] for r in results),
            "frames": results[0]["frames"], "bytes": results[0]["bytes"],
            "all_whole": all(r["ok"] for r in results),
        }
    return {"tokens": args.reload_tokens, "chars": len(want), "bytes_utf8": len(want.encode()), **summary}


# -- 4: cancel ---------------------------------------------------------------------------------


def cancel(db: Database, args: argparse.Namespace, tmp: str, open_files: int) -> dict:
    """Runs streaming in `flask jobs worker`, cancelled one by one over HTTP."""
    log = f"{tmp}/cancels.log"
    server = BenchServer(db.url, Path(tmp) / "gunicorn-cancel.log", open_files=open_files,
                         app="bench.text_jobs_app:create_app()", workers=1,
                         env={"BENCH_CANCEL_LOG": log}, JOBS_EMBEDDED="false")
    worker = None
    try:
        server.start()
        with open(Path(tmp) / "jobs-worker.log", "ab") as worker_log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "flask", "--app", "bench.text_jobs_app:create_app()", "jobs", "worker",
                 "--threads", str(args.cancels)],
                cwd=ROOT, env=server.env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
        runs = server._request("POST", "/api/events", [{"name": "bench.stream", "data": {}}] * args.cancels)["runs"]
        ids = [r["id"] for r in runs]
        wait_for(lambda: all(server._request("GET", f"/api/runs/{i}")["status"] == "running" for i in ids),
                 timeout=60, interval=0.2, what="the runs to start")
        time.sleep(1.0)  # every run is writing
        sent = {}
        rng = random.Random(20)
        for run_id in ids:
            time.sleep(rng.uniform(0.05, 0.5))  # spread over the worker's 0.25 s looks
            sent[run_id] = time.monotonic()
            server._request("POST", f"/api/runs/{run_id}/cancel")

        def raised() -> dict[str, float]:
            try:
                lines = Path(log).read_text().split()
            except FileNotFoundError:
                return {}
            return dict(zip(lines[0::2], map(float, lines[1::2])))

        wait_for(lambda: len(raised()) == len(ids), timeout=30, interval=0.1, what="every write to raise")
        latencies = sorted((raised()[i] - sent[i]) * 1000 for i in ids)
        wait_for(lambda: all(server._request("GET", f"/api/runs/{i}")["status"] == "cancelled" for i in ids),
                 timeout=30, interval=0.2, what="the runs to end cancelled")
        import psycopg

        with psycopg.connect(db.url.replace("+psycopg", ""), autocommit=True) as conn:
            ends = [row[0] for row in conn.execute(
                "SELECT data FROM realtime_messages m WHERE run_id = ANY(%s) AND text_stream IS NOT NULL "
                "AND id = (SELECT max(id) FROM realtime_messages l WHERE l.run_id = m.run_id "
                "AND l.text_stream IS NOT NULL)", (ids,))]
        statuses = [json.loads(data).get("status") for data in ends]
        return {"cancels": len(ids), "p50_ms": statistics.median(latencies), "p99_ms": percentile(latencies, 0.99),
                "max_ms": latencies[-1], "min_ms": latencies[0], "all_ms": [round(v, 1) for v in latencies],
                "streams_ended_cancelled": statuses.count("cancelled")}
    finally:
        if worker is not None and worker.poll() is None:
            os.kill(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(worker.pid, signal.SIGKILL)
                worker.wait()
        server.stop()


# -- the report --------------------------------------------------------------------------------


def live_table(results: list[dict]) -> str:
    lines = ["| way | generations | tokens/s | p50 / p99 / max ms | p99 from due ms | texts equal | rows per generation-second "
             "| µs CPU per token: gunicorn / writers / clients / postgres | CPU %: gunicorn / writers / clients / postgres "
             "| machine busy | writers late p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        us, pct = r["cpu_us_per_token"], r["cpu_pct"]
        lines.append(
            f"| {r['mode']} | {r['generations']} | {r['generations'] * r['rate']:,.0f} "
            f"| {r['p50_ms']:.1f} / {r['p99_ms']:.1f} / {r['max_ms']:.1f} | {r['from_due_p99_ms']:.1f} "
            f"| {r['generations'] - r['mismatches']}/{r['generations']} (gaps {r['gaps']}) "
            f"| {r['rows_per_gen_s']:.1f} "
            f"| {us['server']:.1f} / {us['writers']:.1f} / {us['clients']:.1f} / {us['postgres']:.1f} "
            f"| {pct['server']:.0f} / {pct['writers']:.0f} / {pct['clients']:.0f} / {pct['postgres']:.0f} "
            f"| {r['machine_busy'] * 100:.0f}% | {r['writer_late_p99_ms']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phases", default="live,naive,reload,cancel")
    parser.add_argument("--generations", default="100,300,1000", help="comma-separated N for the text streams")
    parser.add_argument("--naive-generations", default="10,30,100", help="comma-separated N for one publish per token")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long each generation writes")
    parser.add_argument("--rate", type=float, default=50.0, help="tokens per second per generation")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each live configuration")
    parser.add_argument("--writers", type=int, default=2, help="writer processes")
    parser.add_argument("--writer-threads", type=int, default=4, help="threads per writer process (text streams)")
    parser.add_argument("--naive-threads", type=int, default=25, help="threads per writer process (naive)")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn gevent workers")
    parser.add_argument("--flush-ms", type=float, default=50, help="FLASK_REALTIME_TEXT_FLUSH_MS of the writers")
    parser.add_argument("--reload-tokens", type=int, default=20000)
    parser.add_argument("--reload-repeats", type=int, default=10)
    parser.add_argument("--cancels", type=int, default=20)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))  # `finally` stops and drops all
    phases = set(args.phases.split(","))

    open_files = raise_open_files_limit(65536)
    db = Database("postgresql")
    tmp = tempfile.mkdtemp(prefix="rt_bench_texts_")
    results: dict = {"args": vars(args), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "load_average": Path("/proc/loadavg").read_text().strip(), "live": [], "reload": None, "cancel": None}
    server = pool = None
    try:
        server = BenchServer(db.url, Path(tmp) / "gunicorn.log", open_files=open_files, workers=args.workers,
                             env={"FLASK_REALTIME_TEXT_FLUSH_MS": str(args.flush_ms)}).start()
        pool = TextClientPool(args.clients)
        configs = []
        text_ns = [int(n) for n in args.generations.split(",") if n] if "live" in phases else []
        naive_ns = [int(n) for n in args.naive_generations.split(",") if n] if "naive" in phases else []
        for _ in range(args.rounds):  # text and naive interleaved, so the machine's noise falls on both
            for i in range(max(len(text_ns), len(naive_ns))):
                configs += [("text", text_ns[i])] if i < len(text_ns) else []
                configs += [("naive", naive_ns[i])] if i < len(naive_ns) else []
        for number, (mode, n) in enumerate(configs):
            result = live(server, db, pool, args, mode, n, f"{mode[0]}{number}", tmp)
            results["live"].append(result)
            print(f"{mode} N={n}: p50 {result['p50_ms']:.1f} p99 {result['p99_ms']:.1f} max {result['max_ms']:.1f} ms, "
                  f"mismatches {result['mismatches']}, rows/gen-s {result['rows_per_gen_s']:.1f}, "
                  f"CPU µs/token {', '.join(f'{k} {v:.1f}' for k, v in result['cpu_us_per_token'].items())}, "
                  f"busy {result['machine_busy'] * 100:.0f}%, writers late p99 {result['writer_late_p99_ms']:.1f} ms, "
                  f"p99 by second {result['p99_ms_by_second']}", flush=True)
        pool.stop()
        pool = None
        if "reload" in phases:
            results["reload"] = reload(server, db, args)
            print("reload:", json.dumps(results["reload"]), flush=True)
        server.stop()
        server = None
        if "cancel" in phases:
            results["cancel"] = cancel(db, args, tmp, open_files)
            print("cancel:", json.dumps(results["cancel"]), flush=True)
    finally:
        if pool is not None:
            pool.stop()
        if server is not None:
            server.stop()
        db.drop()
        shutil.rmtree(tmp, ignore_errors=True)
    results["ended"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    path = out / f"texts-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(results, indent=2))
    if results["live"]:
        print(live_table(results["live"]))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
