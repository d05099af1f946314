"""`make bench`: latency, throughput, reads per message and memory of one gevent worker.

    .venv/bin/python bench/run.py                      # the full run, on PostgreSQL
    .venv/bin/python bench/run.py --database sqlite
    .venv/bin/python bench/run.py --quick              # a smoke run of a few seconds per phase

Phases, each against a fresh database and ONE gunicorn gevent worker (server.py):

1. reads/1      1 subscriber, `--rate` messages/s for `--seconds`: store reads per message.
2. fanout       `--subscribers` on one channel, same load: publish-to-receive latency of
                every (subscriber, message), deliveries/s, reads per message, and whether
                every subscriber got every message exactly once, in order.
3. burst        the same subscribers while `--burst-publishers` publish as fast as the
                server accepts, for `--burst-seconds`.
4. idle memory  a fresh server: worker RSS before and after `--idle-streams` streams are
                open and idle, per stream.

Subscribers live in `--client-procs` gevent processes (load.py). For every phase the
CPU time of the server worker, of each client process and of this process (the
publisher) is read and reported as a share of one core: a client near 100 % would
mean the figures measure the client, not the server. The machine's total CPU use is
reported too, since anything else running skews the figures.

Prints a markdown table and writes the JSON to bench/results/ (gitignored).
"""
from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import pickle
import platform
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from datetime import datetime, timezone
from pathlib import Path

from server import (
    PUBLISH_KEY,
    ROOT,
    BenchServer,
    Database,
    cpu_seconds,
    machine_cpu,
    raise_open_files_limit,
    rss_kib,
    wait_for,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TOPIC = "tick"


# Sizes of the full run (the issue's) and of --quick; any of them can be given as an option.
FULL = {"subscribers": 1000, "idle_streams": 5000, "seconds": 30.0, "burst_seconds": 10.0, "drain_timeout": 60.0}
QUICK = {"subscribers": 100, "idle_streams": 500, "seconds": 3.0, "burst_seconds": 2.0, "drain_timeout": 20.0}


class BenchTimeout(Exception):
    pass


# -- the subscriber processes ------------------------------------------------------


class ClientPool:
    """`count` load.py processes, each answering one JSON line per command."""

    def __init__(self, count: int) -> None:
        self.procs = [
            subprocess.Popen(
                [sys.executable, str(HERE / "load.py")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
            )
            for _ in range(count)
        ]
        self._buffers = [b""] * count

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def call(self, commands: list[dict | None], timeout: float) -> list[dict]:
        """Send commands[i] to process i (None: nothing), then read each one's answer."""
        for proc, command in zip(self.procs, commands):
            if command is not None:
                proc.stdin.write((json.dumps(command) + "\n").encode())
                proc.stdin.flush()
        deadline = time.monotonic() + timeout
        replies = []
        for i, (proc, command) in enumerate(zip(self.procs, commands)):
            if command is None:
                replies.append({})
                continue
            while b"\n" not in self._buffers[i]:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                    raise BenchTimeout(f"load client {proc.pid} did not answer {command['cmd']!r} in {timeout:.0f}s")
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"load client {proc.pid} exited")
                self._buffers[i] += chunk
            line, _, self._buffers[i] = self._buffers[i].partition(b"\n")
            replies.append(json.loads(line))
        return replies

    def broadcast(self, command: dict, timeout: float) -> list[dict]:
        return self.call([command] * len(self.procs), timeout)

    def open(self, server: BenchServer, token: str, count: int, timeout: float) -> dict:
        """Open `count` streams spread over the processes; wait until each got `retry:`."""
        shares = [count // len(self.procs) + (i < count % len(self.procs)) for i in range(len(self.procs))]
        path = f"/api/realtime/subscribe?token={token}"
        commands = [
            {"cmd": "open", "host": server.host, "port": server.port, "path": path,
             "count": share, "concurrency": 100, "timeout": timeout} if share else None
            for share in shares
        ]
        replies = [r for r in self.call(commands, timeout + 15) if r]
        total = {key: sum(r[key] for r in replies) for key in ("ready", "failed", "pending")}
        total["errors"] = sorted({e for r in replies for e in r["errors"]})[:5]
        return total

    def records(self) -> list[tuple]:
        """Every stream's (ids, receive times, heartbeats, other frames, closed, error)."""
        records = []
        with tempfile.TemporaryDirectory(prefix="rt_bench_") as tmp:
            paths = [f"{tmp}/{i}.pickle" for i in range(len(self.procs))]
            self.call([{"cmd": "dump", "path": p} for p in paths], timeout=60)
            for path in paths:
                with open(path, "rb") as f:
                    records.extend(pickle.load(f))
        return records

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.stdin.write(b'{"cmd": "exit"}\n')
                    proc.stdin.flush()
                except OSError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


# -- measuring --------------------------------------------------------------------


class CpuWindow:
    """CPU used by the server worker, each client process and this process over a window."""

    def __init__(self, server_pid: int, client_pids: list[int]) -> None:
        self.server_pid, self.client_pids = server_pid, client_pids
        self.wall = time.monotonic()
        self.server = cpu_seconds(server_pid)
        self.clients = [cpu_seconds(pid) for pid in client_pids]
        self.own = time.process_time()
        self.machine = machine_cpu()

    def close(self) -> dict:
        wall = time.monotonic() - self.wall
        busy0, total0 = self.machine
        busy1, total1 = machine_cpu()

        def share(seconds: float) -> float:
            return round(100 * seconds / wall, 1)

        return {
            "wall_s": round(wall, 2),
            "server_worker_pct": share(cpu_seconds(self.server_pid) - self.server),
            "client_procs_pct": [share(cpu_seconds(p) - c) for p, c in zip(self.client_pids, self.clients)],
            "publisher_pct": share(time.process_time() - self.own),
            # Share of ALL cores (os.cpu_count()) busy, whoever used them.
            "machine_busy_pct": round(100 * (busy1 - busy0) / max(1.0, total1 - total0), 1),
        }


def settle(server: BenchServer, streams: int, timeout: float = 60.0) -> dict:
    """Wait until the server holds `streams` streams and their replay reads are done.

    Done means no store reads within half a second, but for the reads the
    SQLite change feed makes on its own, one per REALTIME_POLL_S.
    """
    interval = 0.5
    allowance = 0 if server.is_postgres else math.ceil(interval / float(server.env["FLASK_REALTIME_POLL_S"])) + 1
    previous: dict = {}

    def steady() -> dict | None:
        nonlocal previous
        stats = server.stats()
        done = (
            stats["streams"] == streams
            and "store_reads" in previous
            and stats["store_reads"] - previous["store_reads"] <= allowance
        )
        previous = stats
        return stats if done else None

    return wait_for(steady, timeout, interval=interval, what=f"{streams} settled streams")


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def analyse(records: list[tuple], sends: list[tuple[int, float, float]]) -> dict:
    """Latency of every (subscriber, message) and the exactly-once-in-order check."""
    expected = sorted(message_id for message_id, _, _ in sends)
    sent_at = {message_id: t0 for message_id, t0, _ in sends}
    latencies: list[float] = []
    first_receive: dict[int, float] = {}  # per message: when its first and last subscriber got it
    last_receive_of: dict[int, float] = {}
    complete = missing = duplicates = out_of_order = unexpected = 0
    closed = heartbeats = others = 0
    errors: set[str] = set()
    last_receive = 0.0
    for ids_bytes, times_bytes, beats, other, was_closed, error in records:
        ids, times = array("q"), array("d")
        ids.frombytes(ids_bytes)
        times.frombytes(times_bytes)
        got = ids.tolist()
        heartbeats += beats
        others += other
        closed += bool(was_closed)
        if error:
            errors.add(error)
        if got == expected:
            complete += 1
        else:
            seen = set(got)
            missing += len(set(expected) - seen)
            duplicates += len(got) - len(seen)
            unexpected += len(seen - set(expected))
            out_of_order += sum(1 for a, b in zip(got, got[1:]) if b < a)
        for message_id, t in zip(got, times):
            t0 = sent_at.get(message_id)
            if t0 is not None:
                latencies.append(t - t0)
                if t < first_receive.get(message_id, math.inf):
                    first_receive[message_id] = t
                if t > last_receive_of.get(message_id, -math.inf):
                    last_receive_of[message_id] = t
        if times:
            last_receive = max(last_receive, max(times))
    latencies.sort()
    ms = lambda v: round(1000 * v, 2)  # noqa: E731
    first_send = min((t0 for _, t0, _ in sends), default=0.0)
    deliveries = len(latencies)
    # Where a message's latency comes from: until its first subscriber has it
    # (publish, store, wake-up) and from then until its last one has it (fan-out).
    firsts = sorted(first_receive[m] - sent_at[m] for m in first_receive)
    spreads = sorted(last_receive_of[m] - first_receive[m] for m in first_receive)
    return {
        "messages": len(expected),
        "deliveries": deliveries,
        "latency_ms": {
            "p50": ms(percentile(latencies, 0.50)),
            "p95": ms(percentile(latencies, 0.95)),
            "p99": ms(percentile(latencies, 0.99)),
            "max": ms(latencies[-1]) if latencies else None,
            "mean": ms(sum(latencies) / deliveries) if deliveries else None,
        },
        "per_message_ms": {
            "first_subscriber_p50": ms(percentile(firsts, 0.5)),
            "first_subscriber_p99": ms(percentile(firsts, 0.99)),
            "fan_out_spread_p50": ms(percentile(spreads, 0.5)),
            "fan_out_spread_p99": ms(percentile(spreads, 0.99)),
        },
        "delivery_window_s": round(last_receive - first_send, 3) if deliveries else None,
        "deliveries_per_s": round(deliveries / (last_receive - first_send)) if deliveries else 0,
        "exactly_once_in_order": {
            "subscribers": len(records),
            "complete": complete,
            "missing": missing,
            "duplicates": duplicates,
            "out_of_order": out_of_order,
            "unexpected": unexpected,
            "closed_streams": closed,
            "other_frames": others,
            "heartbeats": heartbeats,
            "errors": sorted(errors)[:5],
        },
    }


# -- publishing -----------------------------------------------------------------------


class Publisher:
    """POST /api/realtime/publish over one keep-alive connection; returns (id, sent, acknowledged)."""

    def __init__(self, server: BenchServer, channel: str) -> None:
        self._conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        self._headers = {"Authorization": f"Bearer {PUBLISH_KEY}", "Content-Type": "application/json"}
        self._channel = channel
        self._n = 0

    def publish(self) -> tuple[int, float, float]:
        self._n += 1
        body = json.dumps({"channel": self._channel, "topic": TOPIC, "data": {"n": self._n}})
        sent = time.monotonic()
        self._conn.request("POST", "/api/realtime/publish", body, self._headers)
        response = self._conn.getresponse()
        payload = response.read()
        acknowledged = time.monotonic()
        if response.status != 201:
            raise RuntimeError(f"publish answered {response.status}: {payload[:300]!r}")
        return json.loads(payload)["id"], sent, acknowledged

    def close(self) -> None:
        self._conn.close()


def publish_paced(server: BenchServer, channel: str, rate: float, seconds: float, connections: int = 4) -> list[tuple]:
    """`rate` messages per second on a fixed schedule, open loop.

    Message k is due at start + k/rate. Several connections take turns, so one
    slow answer does not delay the messages due after it (no coordinated
    omission); only when all of them are busy does a message go out late.
    """
    count = max(1, round(rate * seconds))
    start = time.monotonic() + 0.05
    due = iter(range(count))
    lock = threading.Lock()
    sends: list[tuple] = []
    failures: list[BaseException] = []

    def loop() -> None:
        publisher = Publisher(server, channel)
        try:
            while True:
                with lock:
                    k = next(due, None)
                if k is None:
                    return
                delay = start + k / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                sends.append(publisher.publish())
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            failures.append(exc)
        finally:
            publisher.close()

    threads = [threading.Thread(target=loop) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    if failures:
        raise failures[0]
    return sends


def publish_burst(server: BenchServer, channel: str, publishers: int, seconds: float) -> list[tuple]:
    """`publishers` connections publishing back to back for `seconds`."""
    deadline = time.monotonic() + seconds
    results: list[list[tuple]] = [[] for _ in range(publishers)]
    failures: list[BaseException] = []

    def loop(sends: list[tuple]) -> None:
        publisher = Publisher(server, channel)
        try:
            while time.monotonic() < deadline:
                sends.append(publisher.publish())
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            failures.append(exc)
        finally:
            publisher.close()

    threads = [threading.Thread(target=loop, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    if failures:
        raise failures[0]
    return [s for r in results for s in r]


# -- the phases -----------------------------------------------------------------------


def start_profiler(pid: int, name: str) -> tuple[subprocess.Popen, Path] | None:
    """`--profile`: sample the worker with py-spy (installed by hand: it is no requirement)."""
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        print("  --profile: py-spy is not installed in the venv; skipped", flush=True)
        return None
    out = RESULTS / f"profile-{name.replace('/', '')}-{pid}.txt"
    proc = subprocess.Popen(
        [str(py_spy), "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
         "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return proc, out


def stop_profiler(proc: subprocess.Popen, out: Path) -> None:
    proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    print(f"  profile: {out.relative_to(ROOT)}", flush=True)


def publishing_phase(
    name: str, server: BenchServer, clients: ClientPool, streams: int, publish, drain_timeout: float,
    profile: bool = False,
) -> dict:
    """Measure one window: from the first publish until every stream received the last message."""
    clients.broadcast({"cmd": "mark"}, timeout=30)
    before = settle(server, streams)
    window = CpuWindow(server.worker_pid, clients.pids)
    profiler = start_profiler(server.worker_pid, name) if profile else None
    sends = publish()
    last_id = max(message_id for message_id, _, _ in sends)
    waited = clients.broadcast({"cmd": "wait", "last_id": last_id, "timeout": drain_timeout}, drain_timeout + 15)
    cpu = window.close()
    if profiler is not None:
        stop_profiler(*profiler)
    time.sleep(0.5)  # let a trailing dispatcher read land in the count
    after = server.stats()
    published = len(sends)
    first, last = min(s[1] for s in sends), max(s[2] for s in sends)
    acks = sorted(s[2] - s[1] for s in sends)
    result = {
        "phase": name,
        "subscribers": streams,
        "published": published,
        "publish_rate_per_s": round(published / max(1e-9, last - first), 1),
        "publish_ack_ms": {"p50": round(1000 * percentile(acks, 0.5), 2), "p99": round(1000 * percentile(acks, 0.99), 2)},
        "caught_up": sum(w["caught_up"] for w in waited),
        "store_reads": after["store_reads"] - before["store_reads"],
        "reads_per_message": round((after["store_reads"] - before["store_reads"]) / published, 3),
        "server_delivered": after["delivered"] - before["delivered"],
        "cpu": cpu,
    }
    result.update(analyse(clients.records(), sends))
    # CPU per delivered frame: a figure that does not depend on how busy the machine was.
    deliveries = max(1, result["deliveries"])
    wall = cpu["wall_s"]
    cpu["server_us_per_delivery"] = round(1e4 * cpu["server_worker_pct"] * wall / deliveries, 1)
    cpu["clients_us_per_delivery"] = round(1e4 * sum(cpu["client_procs_pct"]) * wall / deliveries, 1)
    return result


def run_publishing_phases(args, database: Database, log_path: Path, clients: ClientPool) -> list[dict]:
    server = BenchServer(database.url, log_path, open_files=args.open_files, app_dir=args.app_dir).start()
    print(f"  server {server.url}, worker pid {server.worker_pid}", flush=True)
    results = []
    try:
        # 1. reads per message with one subscriber
        if args.reads_one:
            token = server.token("bench.reads1", [TOPIC])
            opened = clients.open(server, token, 1, timeout=30)
            assert opened["ready"] == 1, opened
            results.append(publishing_phase(
                "reads/1", server, clients, 1,
                lambda: publish_paced(server, "bench.reads1", args.rate, args.seconds), args.drain_timeout,
            ))
            clients.broadcast({"cmd": "close"}, timeout=30)
            # The server notices a closed stream when its next heartbeat fails to write.
            wait_for(lambda: server.stats()["streams"] == 0, float(server.env["FLASK_REALTIME_HEARTBEAT_S"]) + 15,
                     what="the 1-subscriber stream to be closed")

        # 2. latency and exactly-once at `--subscribers`, then 3. the burst on the same streams
        token = server.token("bench.fanout", [TOPIC])
        started = time.monotonic()
        opened = clients.open(server, token, args.subscribers, timeout=120)
        print(f"  opened {opened['ready']}/{args.subscribers} streams in {time.monotonic() - started:.1f}s", flush=True)
        if opened["ready"] != args.subscribers:
            raise RuntimeError(f"could not open every stream: {opened}")
        # Streams count as open when subscribed, before their (empty) replay
        # has finished: one message that every stream receives marks the end
        # of the connection storm, which is not the steady state measured here.
        publisher = Publisher(server, "bench.fanout")
        warmup_id = publisher.publish()[0]
        publisher.close()
        clients.broadcast({"cmd": "wait", "last_id": warmup_id, "timeout": args.drain_timeout}, args.drain_timeout + 15)
        results.append(publishing_phase(
            "fanout", server, clients, args.subscribers,
            lambda: publish_paced(server, "bench.fanout", args.rate, args.seconds), args.drain_timeout,
            profile=args.profile,
        ))
        if args.burst_seconds > 0:
            print("  burst ...", flush=True)
            results.append(publishing_phase(
                "burst", server, clients, args.subscribers,
                lambda: publish_burst(server, "bench.fanout", args.burst_publishers, args.burst_seconds),
                args.drain_timeout, profile=args.profile,
            ))
        clients.broadcast({"cmd": "close"}, timeout=60)
    finally:
        server.stop()
    return results


def run_memory_phase(args, database: Database, log_path: Path, clients: ClientPool) -> dict:
    """RSS of a fresh worker before and after `--idle-streams` idle streams."""
    server = BenchServer(database.url, log_path, open_files=args.open_files, app_dir=args.app_dir).start()
    try:
        pid = server.worker_pid
        # Warm up what all streams share (imports, the dispatcher, its LISTEN
        # connection, the pool) so it is not charged to the streams. Not with a
        # stream: a closed one is noticed only at its next heartbeat write.
        token = server.token("bench.idle", [TOPIC])
        Publisher(server, "bench.warmup").publish()
        server.history(token)
        time.sleep(1.0)
        rss_before = rss_kib(pid)
        window = CpuWindow(pid, clients.pids)
        started = time.monotonic()
        opened = clients.open(server, token, args.idle_streams, timeout=300)
        open_s = time.monotonic() - started
        cpu = window.close()
        print(f"  opened {opened['ready']}/{args.idle_streams} streams in {open_s:.1f}s", flush=True)
        stats = settle(server, args.idle_streams) if opened["ready"] == args.idle_streams else server.stats()
        time.sleep(2.0)  # idle
        rss_after = rss_kib(pid)
        stats = server.stats()
        clients.broadcast({"cmd": "close"}, timeout=60)
        return {
            "phase": "idle memory",
            "idle_streams": args.idle_streams,
            "opened": opened,
            "open_s": round(open_s, 2),
            "stats_streams": stats["streams"],
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "kib_per_stream": round((rss_after - rss_before) / args.idle_streams, 2),
            "cpu_while_opening": cpu,
        }
    finally:
        server.stop()


# -- report ---------------------------------------------------------------------------


def fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(report: dict) -> str:
    lines = [
        f"database: {report['database']}, load average at start {report['loadavg_start']}, at end {report['loadavg_end']}, "
        f"{report['cpus']} CPUs, {report['client_procs']} client processes",
        "",
        "| phase | subs | msgs | msg/s | p50 ms | p95 ms | p99 ms | max ms | deliveries/s | reads/msg "
        "| exactly once, in order | server CPU | client CPU (per proc) | publisher CPU | machine busy "
        "| server µs/delivery | first sub p50/p99 ms | fan-out spread p50/p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["phases"]:
        check = r["exactly_once_in_order"]
        latency = r["latency_ms"]
        cpu = r["cpu"]
        lines.append(
            f"| {r['phase']} | {r['subscribers']} | {r['published']} | {r['publish_rate_per_s']} "
            f"| {fmt(latency['p50'])} | {fmt(latency['p95'])} | {fmt(latency['p99'])} | {fmt(latency['max'])} "
            f"| {r['deliveries_per_s']} | {r['reads_per_message']} "
            f"| {check['complete']}/{check['subscribers']} (missing {check['missing']}, dup {check['duplicates']}, "
            f"closed {check['closed_streams']}) "
            f"| {cpu['server_worker_pct']}% | {' + '.join(f'{p}%' for p in cpu['client_procs_pct'])} "
            f"| {cpu['publisher_pct']}% | {cpu['machine_busy_pct']}% | {cpu['server_us_per_delivery']} "
            f"| {fmt(r['per_message_ms']['first_subscriber_p50'])}/{fmt(r['per_message_ms']['first_subscriber_p99'])} "
            f"| {fmt(r['per_message_ms']['fan_out_spread_p50'])}/{fmt(r['per_message_ms']['fan_out_spread_p99'])} |"
        )
    memory = report.get("memory")
    if memory:
        lines += [
            "",
            "| idle streams | opened | stats streams | RSS before | RSS after | per stream | open time | server CPU while opening |",
            "|---|---|---|---|---|---|---|---|",
            f"| {memory['idle_streams']} | {memory['opened']['ready']} | {memory['stats_streams']} "
            f"| {memory['rss_before_kib'] / 1024:.1f} MiB | {memory['rss_after_kib'] / 1024:.1f} MiB "
            f"| {memory['kib_per_stream']} KiB | {memory['open_s']} s | {memory['cpu_while_opening']['server_worker_pct']}% |",
        ]
    lines += ["", "targets:"] + [f"- {t}" for t in report["targets"]]
    return "\n".join(lines)


def targets(report: dict) -> list[str]:
    verdicts = []
    by_name = {r["phase"]: r for r in report["phases"]}
    fanout = by_name.get("fanout")
    if fanout:
        p99 = fanout["latency_ms"]["p99"]
        verdicts.append(f"p99 < 100 ms at {fanout['subscribers']} subscribers: {p99} ms -> {'MET' if p99 < 100 else 'MISSED'}")
        check = fanout["exactly_once_in_order"]
        ok = check["complete"] == check["subscribers"]
        verdicts.append(f"every subscriber got every message once, in order: {'YES' if ok else 'NO'}")
    if fanout and "reads/1" in by_name:
        # The target is that reads do not grow with subscribers. Fewer is possible:
        # when the worker lags, several NOTIFYs (or polls) are covered by one read.
        one, many = by_name["reads/1"]["reads_per_message"], fanout["reads_per_message"]
        ok = many <= one * 1.1 + 0.02
        note = " (fewer: one read covered several messages while the worker lagged)" if many < one * 0.9 else ""
        verdicts.append(
            f"reads/message do not grow from 1 to {fanout['subscribers']} subscribers: {one} vs {many}"
            f" -> {'MET' if ok else 'MISSED'}{note}"
        )
    memory = report.get("memory")
    if memory:
        per = memory["kib_per_stream"]
        ok = per * 1024 < 50_000 and memory["stats_streams"] == memory["idle_streams"]
        verdicts.append(f"< 50 KB per idle stream at {memory['idle_streams']}: {per} KiB ({per * 1.024:.1f} KB) -> {'MET' if ok else 'MISSED'}")
    for r in report["phases"]:
        busiest = max(r["cpu"]["client_procs_pct"], default=0)
        if busiest > 70:
            verdicts.append(f"WARNING {r['phase']}: a client process used {busiest}% of a core; add --client-procs")
    return verdicts


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--subscribers", type=int)
    parser.add_argument("--idle-streams", type=int, help="0 skips the memory phase")
    parser.add_argument("--seconds", type=float, help="publishing time of reads/1 and fanout")
    parser.add_argument("--rate", type=float, default=20.0, help="messages per second")
    parser.add_argument("--burst-seconds", type=float, help="0 skips the burst")
    parser.add_argument("--burst-publishers", type=int, default=4)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--no-reads-one", dest="reads_one", action="store_false", help="skip the 1-subscriber phase")
    parser.add_argument("--drain-timeout", type=float, help="max seconds to wait for the last message")
    parser.add_argument("--app-dir", type=Path, default=ROOT,
                        help="serve the app from another checkout (to compare a change); default: this one")
    parser.add_argument("--profile", action="store_true",
                        help="sample the worker with py-spy during fanout and burst (pip install py-spy first)")
    parser.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:  # what is given on the command line wins
            setattr(args, key, value)

    # Each stream is a socket in the client and one in the server, plus slack.
    args.open_files = max(args.subscribers, args.idle_streams) + 1024
    raise_open_files_limit(args.open_files)

    budget = 2 * args.seconds + args.burst_seconds + 4 * args.drain_timeout + 600
    def out_of_time(*_: object) -> None:
        raise BenchTimeout(f"the bench exceeded its {budget:.0f} s budget; everything it started is being stopped")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(int(budget))

    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    log_path = RESULTS / f"gunicorn-{args.database}-{stamp}.log"
    report = {
        "database": args.database,
        "started_at": stamp,
        "loadavg_start": loadavg(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "client_procs": args.client_procs,
        "args": {k: v for k, v in vars(args).items()},
        "phases": [],
    }
    database = Database(args.database)
    clients = ClientPool(args.client_procs)
    try:
        print(f"bench on {args.database} (load average {report['loadavg_start']})", flush=True)
        report["phases"] = run_publishing_phases(args, database, log_path, clients)
        if args.idle_streams > 0:
            print("  idle memory ...", flush=True)
            report["memory"] = run_memory_phase(args, database, log_path, clients)
    finally:
        signal.alarm(0)
        clients.stop()
        database.drop()
    report["loadavg_end"] = loadavg()
    report["targets"] = targets(report)
    out = RESULTS / f"bench-{args.database}-{stamp}.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    print(table(report))
    print(f"\nJSON: {out.relative_to(ROOT)}   server log: {log_path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
