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
5. storm        `--storm-streams` reconnect at once with one cursor, on 1 then 2 workers (storm.py).
6. scale        20,000 streams on 2 workers, each receiving 1 message/s (scale.py).
7. stall        PostgreSQL: `--stall-streams` on channel B at `--rate` while another process
                holds a transaction that published on channel A open for `--stall-hold-s`:
                B's latency meanwhile, A's messages after the commit (stall.py).
Before them, on PostgreSQL: publish   realtime.publish() against raw INSERT+COMMIT,
                4 processes, and publish_many() in batches of 1,000 (publish.py).
After them: peers  the same load client against this project, flask-sse (Redis) and
                sse-starlette (in memory), one worker each (peers.py).

`--phases` runs some of them only, e.g. to compare two checkouts side by side:
    .venv/bin/python bench/run.py --phases publish,fanout,stall --app-dir <checkout>

Subscribers live in `--client-procs` epoll processes (load.py). For every phase the
CPU time of the server worker, of each client process and of this process (the
publisher) is read and reported as a share of one core: a client near 100 % would
mean the figures measure the client, not the server. The machine's total CPU use is
reported too, since anything else running skews the figures.

Prints a markdown table and writes the JSON to bench/results/ (gitignored).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from analysis import CpuWindow, measure_window, settle
from clients import BenchTimeout, ClientPool
from publishing import TOPIC, Publisher, publish_burst, publish_paced
from report import table, targets
from peers import peers_table, run_peers
from publish import run_publish
from scale import run_scale_phase
from stall import run_stall_phase
from storm import run_storm_phase
from server import (
    ROOT,
    BenchServer,
    Database,
    raise_open_files_limit,
    rss_kib,
    wait_for,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


# Sizes of the full run (the issue's) and of --quick; any of them can be given as an option.
FULL = {"subscribers": 1000, "idle_streams": 5000, "seconds": 30.0, "burst_seconds": 10.0, "drain_timeout": 60.0,
        "storm_streams": 2000, "publish_seconds": 10.0, "scale_streams": 20000, "scale_seconds": 30.0,
        "stall_streams": 200, "stall_hold_s": 5.0}
QUICK = {"subscribers": 100, "idle_streams": 500, "seconds": 3.0, "burst_seconds": 2.0, "drain_timeout": 20.0,
         "storm_streams": 200, "publish_seconds": 2.0, "scale_streams": 1000, "scale_seconds": 5.0,
         "stall_streams": 50, "stall_hold_s": 2.0}
# Every phase, in the order they run; `--phases` picks some.
PHASES = ("publish", "reads1", "fanout", "burst", "memory", "storm", "scale", "stall", "peers")


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
    """Measure one window (`measure_window`), with the store reads it cost."""
    before = settle(server, streams)
    profiler = start_profiler(server.worker_pid, name) if profile else None
    result = measure_window(name, server.worker_pid, clients, streams, publish, drain_timeout)
    if profiler is not None:
        stop_profiler(*profiler)
    time.sleep(0.5)  # let a trailing dispatcher read land in the count
    after = server.stats()
    reads = after["store_reads"] - before["store_reads"]
    result.update({
        "store_reads": reads,
        "reads_per_message": round(reads / result["published"], 3),
        "server_delivered": after["delivered"] - before["delivered"],
    })
    return result


def run_publishing_phases(args, database: Database, log_path: Path, clients: ClientPool) -> list[dict]:
    server = BenchServer(database.url, log_path, open_files=args.open_files, app_dir=args.app_dir).start()
    print(f"  server {server.url}, worker pid {server.worker_pid}", flush=True)
    results = []
    try:
        # 1. reads per message with one subscriber
        if "reads1" in args.phases:
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
        burst = "burst" in args.phases and args.burst_seconds > 0
        if "fanout" not in args.phases and not burst:
            return results
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
        if "fanout" in args.phases:
            results.append(publishing_phase(
                "fanout", server, clients, args.subscribers,
                lambda: publish_paced(server, "bench.fanout", args.rate, args.seconds), args.drain_timeout,
                profile=args.profile,
            ))
        if burst:
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


def phases(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """`--phases`, less those a `--no-...` flag skips."""
    chosen = [name.strip() for name in args.phases.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(PHASES))
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(unknown)}; choose from {','.join(PHASES)}")
    skipped = {"reads1": not args.reads_one, "peers": not args.peers}
    return [name for name in chosen if not skipped.get(name)]


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--subscribers", type=int)
    parser.add_argument("--idle-streams", type=int, help="0 skips the memory phase")
    parser.add_argument("--storm-streams", type=int, help="streams of the reconnect storm; 0 skips it")
    parser.add_argument("--storm-behind", type=int, default=50, help="messages each storm stream missed")
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
    parser.add_argument("--publish-seconds", type=float,
                        help="each round of publish vs raw INSERT+COMMIT (PostgreSQL only); 0 skips it")
    parser.add_argument("--publish-processes", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1000, help="messages per publish_many() in the batch phase")
    parser.add_argument("--scale-streams", type=int, help="streams of the scale phase; 0 skips it")
    parser.add_argument("--scale-channels", type=int, default=20)
    parser.add_argument("--scale-workers", type=int, default=2)
    parser.add_argument("--scale-rate", type=float, default=1.0, help="messages per second each scale stream receives")
    parser.add_argument("--scale-seconds", type=float)
    parser.add_argument("--no-peers", dest="peers", action="store_false",
                        help="skip the comparison with flask-sse and sse-starlette (peers.py)")
    parser.add_argument("--stall-streams", type=int, help="streams on channel B in the stall phase; 0 skips it")
    parser.add_argument("--stall-hold-s", type=float, help="how long channel A's transaction stays open")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"the phases to run, comma-separated, from {','.join(PHASES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    args = parser.parse_args(argv)
    args.phases = phases(parser, args)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:  # what is given on the command line wins
            setattr(args, key, value)

    # Each stream is a socket in the client and one in the server, plus slack.
    args.open_files = max(args.subscribers, args.idle_streams, args.storm_streams, args.scale_streams,
                          args.stall_streams) + 1024
    raise_open_files_limit(args.open_files)

    budget = 2 * args.seconds + args.burst_seconds + 5 * args.drain_timeout + 5 * args.publish_seconds \
        + args.scale_seconds + 2 * args.stall_hold_s + 900
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
        if "publish" in args.phases and args.database == "postgresql" and args.publish_seconds > 0:
            report["publish"] = run_publish(args.publish_processes, args.publish_seconds, args.batch,
                                            app_dir=args.app_dir)
        if {"reads1", "fanout", "burst"} & set(args.phases):
            report["phases"] = run_publishing_phases(args, database, log_path, clients)
        if "memory" in args.phases and args.idle_streams > 0:
            print("  idle memory ...", flush=True)
            report["memory"] = run_memory_phase(args, database, log_path, clients)
        if "storm" in args.phases and args.storm_streams > 0:
            print("  reconnect storm ...", flush=True)
            report["storm"] = run_storm_phase(args, database, log_path, clients)
            report["storm_2_workers"] = run_storm_phase(args, database, log_path, clients, workers=2)
        if "scale" in args.phases and args.scale_streams > 0:
            print(f"  {args.scale_streams} streams on {args.scale_workers} workers ...", flush=True)
            report["scale"] = run_scale_phase(args, database, log_path, clients)
        if "stall" in args.phases and args.database == "postgresql" and args.stall_streams > 0:
            print(f"  {args.stall_streams} streams on B while A's transaction is open {args.stall_hold_s:g} s ...",
                  flush=True)
            report["stall"] = run_stall_phase(args, database, log_path, clients)
    finally:
        signal.alarm(0)
        clients.stop()
        database.drop()
    if "peers" in args.phases:
        # After the alarm: its own budget, since flask-sse needs minutes to drain a backlog.
        print("  against the peers (peers.py) ...", flush=True)
        report["peers"] = run_peers(argparse.Namespace(quick=args.quick))
    report["loadavg_end"] = loadavg()
    report["targets"] = targets(report)
    out = RESULTS / f"bench-{args.database}-{stamp}.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    print(table(report))
    if "peers" in report:
        print()
        print(peers_table(report["peers"]))
    print(f"\nJSON: {out.relative_to(ROOT)}   server log: {log_path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
