"""This project against its peers: the same load client, the same workload, in one run.

    .venv/bin/python bench/peers.py                    # 1,000 subscribers, 20 msg/s for 20 s, then a burst
    .venv/bin/python bench/peers.py --quick            # a smoke run of a few seconds per server
    .venv/bin/python bench/peers.py --subscribers 2000 --rate 50 --targets realtime,sse-starlette

One server at a time, each with ONE worker process, in this order:

  realtime       this project: `gunicorn -c gunicorn.conf.py "app:create_app()"`, one gevent
                 worker, a fresh PostgreSQL database (server.py's BenchServer and Database);
                 every message is stored before it is sent.
  flask-sse      the Flask extension that publishes through Redis pub/sub: gunicorn, one gevent
                 worker (peer_apps/flask_sse_app.py); Redis on 127.0.0.1:6379, a channel name
                 of this run's own. No store: a subscriber gets what is published while it is
                 subscribed.
  sse-starlette  in memory, an asyncio queue per subscriber: uvicorn, one process
                 (peer_apps/starlette_app.py). No store, no Redis.

For each: `--subscribers` streams on one channel from `--client-procs` load.py processes
(clients.py's ClientPool, the same client as bench/run.py), warm-up messages until every
stream has one, the worker's RSS per open stream, then

  fanout   `--rate` messages/s for `--seconds`, open loop over 4 keep-alive connections,
           through the server's own HTTP publish endpoint;
  burst    `--burst-publishers` connections publishing back to back for `--burst-seconds`
           or until `--burst-messages` are published (a cap, so no server's backlog, nor
           Redis's output buffers on a shared Redis, grows without bound).

Measured for each phase: publish-to-receive latency of every (subscriber, message),
deliveries/s, whether every subscriber got every message exactly once and in order, the
CPU of the server's worker per delivery, and the CPU of each load client process and of
this process (the publisher) as a share of one core: a client near 100 % would mean the
figures measure the client. For flask-sse the Redis server's CPU over the window is shown
too (it may include other users of the shared Redis); PostgreSQL's is not counted.

Prints a markdown table, a column per server and the ratios of this project to each peer,
and writes the JSON to bench/results/ (gitignored). bench/run.py can call `run_peers(args)`
and `peers_table(result)`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from analysis import measure_window
from clients import BenchTimeout, ClientPool
from publishing import TOPIC, Publisher, burst, paced
from server import ROOT, BenchServer, Database, ServerProcess, cpu_seconds, raise_open_files_limit, rss_kib

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PEER_APPS = HERE / "peer_apps"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
TARGETS = ("realtime", "flask-sse", "sse-starlette")
CHANNEL = "bench.peers"

FULL = {"subscribers": 1000, "seconds": 20.0, "burst_seconds": 5.0, "burst_messages": 1000, "drain_timeout": 300.0}
QUICK = {"subscribers": 100, "seconds": 3.0, "burst_seconds": 2.0, "burst_messages": 300, "drain_timeout": 30.0}
DEFAULTS = {"rate": 20.0, "burst_publishers": 4, "client_procs": 2, "targets": ",".join(TARGETS), "quick": False}


# -- the servers ----------------------------------------------------------------------


class Target:
    """One server under test: started, measured through its worker pid, stopped by its pid."""

    name = ""
    host = "127.0.0.1"
    port = 0

    def start(self) -> "Target":
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    @property
    def worker_pid(self) -> int:
        raise NotImplementedError

    def stream_path(self) -> str:
        raise NotImplementedError

    def publisher(self) -> Publisher:
        raise NotImplementedError

    def extra_cpu_pids(self) -> dict[str, int]:
        """Other processes whose CPU the server's work costs (Redis for flask-sse)."""
        return {}


class Realtime(Target):
    """This project, as bench/run.py serves it: one gevent worker on a fresh PostgreSQL database."""

    name = "realtime"

    def __init__(self, log_path: Path, open_files: int) -> None:
        self.log_path, self.open_files = log_path, open_files
        self.database: Database | None = None
        self.server: BenchServer | None = None

    def start(self) -> "Realtime":
        self.database = Database("postgresql")
        self.server = BenchServer(self.database.url, self.log_path, open_files=self.open_files)
        self.server.start()
        self.host, self.port = self.server.host, self.server.port
        self.token = self.server.token(CHANNEL, [TOPIC])
        return self

    def stop(self) -> None:
        try:
            if self.server is not None:
                self.server.stop()
        finally:
            self.server = None
            if self.database is not None:
                self.database.drop()
                self.database = None

    @property
    def worker_pid(self) -> int:
        return self.server.worker_pid

    def stream_path(self) -> str:
        return f"/api/realtime/subscribe?token={self.token}"

    def publisher(self) -> Publisher:
        return Publisher(self.server, CHANNEL)


class PeerServer(ServerProcess, Target):
    """A peer app from peer_apps/, one worker process, started in its own session."""

    cwd = PEER_APPS

    def __init__(self, name: str, log_path: Path, open_files: int) -> None:
        super().__init__(log_path, open_files)
        self.name = name
        if name == "flask-sse":
            # A gevent worker as flask-sse documents; gunicorn's default of 1,000
            # connections per worker would cap the streams, so as many as ours.
            self.workers = 1
            self._command = [
                sys.executable, "-m", "gunicorn", "flask_sse_app:app", "--worker-class", "gevent",
                "--workers", "1", "--worker-connections", "10000", "--bind", f"{self.host}:{self.port}",
                "--graceful-timeout", "3", "--access-logfile", "-", "--no-control-socket",
            ]
            self.env["SSE_REDIS_URL"] = REDIS_URL
            self.env["BENCH_CHANNEL_PREFIX"] = f"rt-bench-{secrets.token_hex(6)}-"
        elif name == "sse-starlette":
            # uvicorn without --workers: the app runs in the one process it starts.
            self._command = [
                sys.executable, "-m", "uvicorn", "starlette_app:app", "--host", self.host,
                "--port", str(self.port), "--timeout-graceful-shutdown", "3", "--log-level", "warning",
                "--access-log",
            ]
        else:
            raise ValueError(f"unknown peer {name!r}")

    def command(self) -> list[str]:
        return self._command

    def answers(self) -> None:
        with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
            if response.status != 200:
                raise OSError(f"/health answered {response.status}")

    def stream_path(self) -> str:
        return f"/stream?channel={CHANNEL}"

    def publisher(self) -> Publisher:
        return Publisher(self, CHANNEL, path="/publish", topic=None)  # type: ignore[arg-type]

    def extra_cpu_pids(self) -> dict[str, int]:
        if self.name != "flask-sse":
            return {}
        pid = redis_pid()
        return {"redis": pid} if pid else {}


def redis_pid() -> int | None:
    """The Redis server's pid (INFO server), if it runs on this machine and /proc shows it."""
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
        try:
            pid = int(client.info("server")["process_id"])
        finally:
            client.close()
        cpu_seconds(pid)
        return pid
    except (OSError, redis.RedisError, KeyError, ValueError):
        return None


def check_redis() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise RuntimeError(f"flask-sse needs Redis at {REDIS_URL} (BENCH_REDIS_URL): {exc}") from exc
    finally:
        client.close()



# -- one server -----------------------------------------------------------------------


def open_streams(clients: ClientPool, target: Target, count: int, timeout: float, concurrency: int = 100) -> dict:
    return clients.open_path(target.host, target.port, target.stream_path(), count, timeout, concurrency=concurrency)


def warm_up(clients: ClientPool, target: Target, streams: int, timeout: float = 60.0) -> int:
    """Publish until every stream has received a message; the peers subscribe just after `retry:`."""
    publisher = target.publisher()
    try:
        first = publisher.publish()[0]
        deadline = time.monotonic() + timeout
        published = 1
        while True:
            waited = clients.broadcast({"cmd": "wait", "last_id": first, "timeout": 1.0}, 20)
            if sum(w["caught_up"] for w in waited) >= streams:
                return published
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target.name}: only {sum(w['caught_up'] for w in waited)}/{streams} streams "
                                   f"received a warm-up message within {timeout:.0f}s")
            publisher.publish()
            published += 1
    finally:
        publisher.close()


def measure(name: str, target: Target, clients: ClientPool, streams: int, publish: Callable[[], list[tuple]],
            drain_timeout: float) -> dict:
    return measure_window(name, target.worker_pid, clients, streams, publish, drain_timeout, target.extra_cpu_pids())


def run_target(target: Target, clients: ClientPool, args: argparse.Namespace) -> dict:
    result: dict = {"server": target.name}
    try:
        target.start()  # inside the try: a server that started but never answered is stopped too
        pid = target.worker_pid
        print(f"  {target.name}: http://{target.host}:{target.port}, worker pid {pid}", flush=True)
        # Warm what all streams share (imports, connections) before the RSS reading.
        publisher = target.publisher()
        publisher.publish()
        publisher.close()
        time.sleep(0.5)
        rss_before = rss_kib(pid)
        started = time.monotonic()
        opened = open_streams(clients, target, args.subscribers, timeout=120)
        result["open_s"] = round(time.monotonic() - started, 2)
        print(f"  opened {opened['ready']}/{args.subscribers} streams in {result['open_s']} s", flush=True)
        if opened["ready"] != args.subscribers:
            raise RuntimeError(f"{target.name}: could not open every stream: {opened}")
        result["warmup_messages"] = warm_up(clients, target, args.subscribers)
        time.sleep(1.0)
        rss_after = rss_kib(pid)
        result["rss"] = {
            "before_kib": rss_before,
            "with_streams_kib": rss_after,
            "kib_per_stream": round((rss_after - rss_before) / args.subscribers, 2),
        }
        result["fanout"] = measure(
            "fanout", target, clients, args.subscribers,
            lambda: paced(target.publisher, args.rate, args.seconds), args.drain_timeout,
        )
        if args.burst_seconds > 0 and args.burst_messages > 0:
            print("  burst ...", flush=True)
            result["burst"] = measure(
                "burst", target, clients, args.subscribers,
                lambda: burst(target.publisher, args.burst_publishers, args.burst_seconds, args.burst_messages),
                args.drain_timeout,
            )
        clients.broadcast({"cmd": "close"}, timeout=60)
    finally:
        target.stop()
    return result


# -- the run --------------------------------------------------------------------------


def complete_args(args: argparse.Namespace | None) -> argparse.Namespace:
    """Fill what is not given (None or absent): from --quick's sizes or the full run's."""
    args = argparse.Namespace(**vars(args)) if args is not None else argparse.Namespace()
    sizes = QUICK if getattr(args, "quick", False) else FULL
    for key, value in {**DEFAULTS, **sizes}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def run_peers(args: argparse.Namespace | None = None) -> dict:
    """Run every target in turn on the same workload; return the report (also written to bench/results/)."""
    args = complete_args(args)
    names = [n.strip() for n in str(args.targets).split(",") if n.strip()]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    if "flask-sse" in names:
        check_redis()
    # Each stream: a socket in the client, one in the server, and for flask-sse one to Redis.
    open_files = 2 * args.subscribers + 1024
    raise_open_files_limit(open_files)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    report: dict = {
        "started_at": stamp,
        "loadavg_start": loadavg(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "args": {k: v for k, v in sorted(vars(args).items())},
        "servers": {},
    }
    print(f"peers: {', '.join(names)}; {args.subscribers} subscribers, {args.rate:g} msg/s for {args.seconds:g} s, "
          f"then a burst (load average {report['loadavg_start']})", flush=True)
    clients = ClientPool(args.client_procs)
    try:
        for name in names:
            log_path = RESULTS / f"peer-{name}-{stamp}.log"
            target = Realtime(log_path, open_files) if name == "realtime" else PeerServer(name, log_path, open_files)
            report["servers"][name] = run_target(target, clients, args)
            report["servers"][name]["log"] = str(log_path.relative_to(ROOT))
            report["servers"][name]["loadavg_after"] = loadavg()
    finally:
        clients.stop()
    report["loadavg_end"] = loadavg()
    out = RESULTS / f"peers-{stamp}.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    report["json"] = str(out.relative_to(ROOT))
    return report


# -- the table ------------------------------------------------------------------------


def _get(result: dict, path: str):
    value = result
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _num(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _exactly_once(phase: dict | None) -> str:
    if not phase:
        return "-"
    check = phase["exactly_once_in_order"]
    ok = "yes" if check["complete"] == check["subscribers"] else "NO"
    extra = "" if ok == "yes" else (f" (missing {check['missing']}, dup {check['duplicates']}, "
                                    f"out of order {check['out_of_order']})")
    return f"{ok}: {check['complete']}/{check['subscribers']}{extra}"


def _clients(phase: dict | None) -> str:
    if not phase:
        return "-"
    return " + ".join(f"{p}%" for p in phase["cpu"]["client_procs_pct"])


# (label, path in a server's result or a function of it, which way is better: "low", "high" or None)
ROWS: list[tuple[str, object, str | None]] = [
    ("fanout: messages/s accepted (offered: --rate)", "fanout.publish_rate_per_s", "high"),
    ("fanout: publish answered p99 ms", "fanout.publish_ack_ms.p99", "low"),
    ("fanout: latency p50 ms", "fanout.latency_ms.p50", "low"),
    ("fanout: latency p95 ms", "fanout.latency_ms.p95", "low"),
    ("fanout: latency p99 ms", "fanout.latency_ms.p99", "low"),
    ("fanout: latency max ms", "fanout.latency_ms.max", "low"),
    ("fanout: deliveries/s", "fanout.deliveries_per_s", "high"),
    ("fanout: every subscriber got every message once, in order", lambda r: _exactly_once(r.get("fanout")), None),
    ("fanout: server CPU, % of a core", "fanout.cpu.server_worker_pct", "low"),
    ("fanout: server CPU µs/delivery", "fanout.cpu.server_us_per_delivery", "low"),
    ("fanout: Redis CPU µs/delivery", "fanout.cpu.redis_us_per_delivery", None),
    ("fanout: load client CPU, % of a core per process", lambda r: _clients(r.get("fanout")), None),
    ("fanout: publisher CPU %", "fanout.cpu.publisher_pct", None),
    ("fanout: machine busy % (all cores)", "fanout.cpu.machine_busy_pct", None),
    ("burst: messages published", "burst.published", None),
    ("burst: messages/s accepted", "burst.publish_rate_per_s", "high"),
    ("burst: deliveries/s", "burst.deliveries_per_s", "high"),
    ("burst: latency p50 ms", "burst.latency_ms.p50", "low"),
    ("burst: latency p99 ms", "burst.latency_ms.p99", "low"),
    ("burst: every subscriber got every message once, in order", lambda r: _exactly_once(r.get("burst")), None),
    ("burst: server CPU µs/delivery", "burst.cpu.server_us_per_delivery", "low"),
    ("burst: Redis CPU µs/delivery", "burst.cpu.redis_us_per_delivery", None),
    ("burst: load client CPU, % of a core per process", lambda r: _clients(r.get("burst")), None),
    ("burst: machine busy % (all cores)", "burst.cpu.machine_busy_pct", None),
    ("worker RSS per open stream, KiB", "rss.kib_per_stream", "low"),
    ("time to open the streams, s", "open_s", "low"),
]


def peers_table(result: dict) -> str:
    """The markdown table: a column per server, then this project's figure divided by each peer's."""
    servers = result["servers"]
    names = list(servers)
    peers = [n for n in names if n != "realtime"] if "realtime" in servers else []
    args = result["args"]
    lines = [
        f"peers, {result['started_at']}: {args['subscribers']} subscribers on one channel, {args['rate']:g} msg/s "
        f"for {args['seconds']:g} s, then {args['burst_publishers']} publishers back to back for "
        f"{args['burst_seconds']:g} s or {args['burst_messages']} messages; one worker process each; "
        f"{args['client_procs']} load client processes; {result['cpus']} CPUs, load average at start "
        f"{result['loadavg_start']}, at end {result.get('loadavg_end', '-')} (a shared machine)",
        "",
        "| | " + " | ".join(names) + "".join(f" | realtime / {p}" for p in peers) + " |",
        "|---" * (1 + len(names) + len(peers)) + "|",
    ]
    for label, how, better in ROWS:
        values = [how(servers[n]) if callable(how) else _get(servers[n], how) for n in names]
        if all(v in (None, "-") for v in values):
            continue
        cells = [_num(v) for v in values]
        for peer in peers:
            ours, theirs = values[names.index("realtime")], values[names.index(peer)]
            if better and isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs:
                cells.append(f"{ours / theirs:.2f}")
            else:
                cells.append("")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ratios are this project's figure divided by the peer's: below 1 is better for latency, CPU and memory, "
        "above 1 for messages/s and deliveries/s. Latency counts from the moment a publish request was sent: a "
        "server that accepts fewer messages/s than offered shows it in the first row, not in its latency. "
        "Server CPU is the worker process only; flask-sse also spends Redis's (its own row, which may include "
        "other users of a shared Redis), this project PostgreSQL's (not counted).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int)
    parser.add_argument("--seconds", type=float, help="publishing time of the fanout phase")
    parser.add_argument("--rate", type=float, help="messages per second (fanout); default 20")
    parser.add_argument("--burst-seconds", type=float, help="0 skips the burst")
    parser.add_argument("--burst-messages", type=int, help="at most this many messages in the burst")
    parser.add_argument("--burst-publishers", type=int)
    parser.add_argument("--client-procs", type=int, help="load.py processes; default 2")
    parser.add_argument("--drain-timeout", type=float, help="max seconds to wait for the last message")
    parser.add_argument("--targets", help=f"comma-separated, in this order; default {','.join(TARGETS)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    args = complete_args(parser.parse_args(argv))

    budget = len(TARGETS) * (args.seconds + args.burst_seconds + 2 * args.drain_timeout + 300)

    def out_of_time(*_: object) -> None:
        raise BenchTimeout(f"the run exceeded its {budget:.0f} s budget; everything it started is being stopped")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(int(budget))
    try:
        result = run_peers(args)
    finally:
        signal.alarm(0)
    print()
    print(peers_table(result))
    print(f"\nJSON: {result['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
