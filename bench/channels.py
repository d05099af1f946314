"""Several channels on one stream (issue 21): one connection per client against one per channel.

    .venv/bin/python bench/channels.py                         # 1,000 clients x 10 channels, 2 rounds
    .venv/bin/python bench/channels.py --clients 100 --seconds 5 --rounds 1    # a smoke run

PostgreSQL on 127.0.0.1:5432 (BENCH_PG_ADMIN), a database of its own, created and dropped. Each
mode of each round gets a fresh `gunicorn -c gunicorn.conf.py "app:create_app()"` with one gevent
worker (server.py's BenchServer) and `--clients` clients, each watching `--channels-per-client`
channels of its own (10,000 channels in all):

- **A**: each client on ONE connection, with a token of its ten channels (docs/protocol.md §12);
- **B**: each client on one connection per channel, a one-channel token each (10,000 streams).

The same publishing load in both: `--rate` messages a second in all (2,000), for `--seconds`,
`realtime.publisher.Publisher.publish_many` batches every `--batch-ms` from this process, as a task
queue's worker would publish. Message k goes to channel k mod 10,000, taken so that consecutive
messages reach different clients: every channel gets rate / 10,000 messages a second and each
message reaches exactly one stream, in A as in B. The rounds alternate the order (A then B, B
then A) so the machine's noise falls on both.

Measured per mode: the worker's RSS before the streams are opened and once they are all open and
idle (its growth per connection, per client, per channel watched); the sockets the worker holds;
over the publishing window (from the first publish until every stream got its last message) the
worker's CPU per delivery, user and system apart (analysis.py's CpuWindow), and the load clients';
publish-to-client latency of every delivery (from the `publish_many` call, CLOCK_MONOTONIC, to the
client's recv()); the store's reads per message; and whether every stream got every message of
its channels once, in id order (missing, duplicates, out of order, unexpected: all must be 0).

The clients are channels_load.py: load.py's epoll loop, each stream on a path of its own. Prints
the tables, writes everything to bench/results/channels-<time>.json. Every process it starts is
stopped by its pid.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time
from array import array
from datetime import datetime, timezone
from pathlib import Path

from analysis import CpuWindow, Tally, percentile
from clients import ClientPool
from server import ROOT, BenchServer, Database, raise_open_files_limit, rss_kib, wait_for

sys.path.insert(0, str(ROOT))

from realtime.publisher import Publisher  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TOPIC = "tick"
WARM_STREAMS = 10


class ChannelsClientPool(ClientPool):
    """`count` channels_load.py processes; stream i of an `open_paths` goes to process i % count."""

    script = "channels_load.py"

    def open_paths(self, server: BenchServer, paths: list[str], concurrency: int, timeout: float) -> dict:
        count = len(self.procs)
        commands = [{"cmd": "open_paths", "host": server.host, "port": server.port, "paths": paths[p::count],
                     "concurrency": concurrency, "timeout": timeout} for p in range(count)]
        return self.opened(self.call(commands, timeout + 15))

    def order(self, n: int) -> list[int]:
        """The index in `paths` of each stream of `records()`, for an `open_paths` of n paths."""
        count = len(self.procs)
        return [i for p in range(count) for i in range(p, n, count)]

    def wait_targets(self, targets: list[int], timeout: float) -> list[dict]:
        count = len(self.procs)
        return self.call([{"cmd": "wait_targets", "targets": targets[p::count], "timeout": timeout}
                          for p in range(count)], timeout + 15)


# -- the server side ---------------------------------------------------------------------------


def grant_tokens(server: BenchServer, bodies: list[dict], threads: int = 4) -> list[str]:
    """POST /api/realtime/token for each body, over `threads` keep-alive connections."""
    tokens: list[str | None] = [None] * len(bodies)

    def work(share: range) -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        try:
            for i in share:
                conn.request("POST", "/api/realtime/token", json.dumps(bodies[i]), {"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
                if response.status != 200:
                    raise RuntimeError(f"token answered {response.status}: {payload[:300]!r}")
                tokens[i] = json.loads(payload)["token"]
        finally:
            conn.close()

    workers = [threading.Thread(target=work, args=(range(t, len(bodies), threads),)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if None in tokens:
        raise RuntimeError("a token request failed (see above)")
    return tokens


def sockets_of(pid: int) -> int:
    """The sockets a process holds: its streams, plus its listener and database connections."""
    fd_dir = f"/proc/{pid}/fd"
    count = 0
    for fd in os.listdir(fd_dir):
        try:
            count += os.readlink(f"{fd_dir}/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass
    return count


# -- publishing and checking -------------------------------------------------------------------


def channel_names(prefix: str, clients: int, per_client: int) -> list[list[str]]:
    return [[f"{prefix}.{i}.{j}" for j in range(per_client)] for i in range(clients)]


def publish_load(publisher: Publisher, names: list[list[str]], rate: float, seconds: float,
                 batch_s: float) -> tuple[list[tuple[int, float, float]], dict[int, str], float]:
    """`rate` messages a second for `seconds`, a `publish_many` batch due every `batch_s` (open loop:
    a late batch goes out at once, never skipped). Message k goes to client k mod C, that client's
    channel (k // C) mod per_client. Returns (id, call, return) per message, each id's channel, and
    how late the latest batch started (s)."""
    clients, per_client = len(names), len(names[0])
    total, per_batch = round(rate * seconds), max(1, round(rate * batch_s))
    sends: list[tuple[int, float, float]] = []
    channel_of: dict[int, str] = {}
    start = time.monotonic() + 0.05
    latest = 0.0
    for b, first in enumerate(range(0, total, per_batch)):
        due = start + b * batch_s
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        batch = [{"channel": names[k % clients][(k // clients) % per_client], "topic": TOPIC, "data": {"k": k}}
                 for k in range(first, min(total, first + per_batch))]
        sent = time.monotonic()
        latest = max(latest, sent - due)
        stored = publisher.publish_many(batch)
        acknowledged = time.monotonic()
        for message in stored:
            sends.append((message.id, sent, acknowledged))
            channel_of[message.id] = message.channel
    return sends, channel_of, latest


def check(records: list[tuple], order: list[int], watched: list[list[str]],
          sends: list[tuple[int, float, float]], channel_of: dict[int, str]) -> dict:
    """Latency of every delivery; each stream must get every message of its channels once, in id order."""
    by_channel: dict[str, list[int]] = {}
    for message_id, _, _ in sends:
        by_channel.setdefault(channel_of[message_id], []).append(message_id)
    sent_at = {message_id: t0 for message_id, t0, _ in sends}
    latencies: list[float] = []
    first_send = min((t0 for _, t0, _ in sends), default=0.0)
    by_bucket: dict[int, list[float]] = {}  # latencies by when the message was published, 5 s apart
    tally = Tally()
    closed = others = 0
    errors: set[str] = set()
    for (ids_bytes, times_bytes, _beats, other, was_closed, error), index in zip(records, order):
        ids, times = array("q"), array("d")
        ids.frombytes(ids_bytes)
        times.frombytes(times_bytes)
        got = ids.tolist()
        want = sorted(m for channel in watched[index] for m in by_channel.get(channel, []))
        others += other
        closed += bool(was_closed)
        if error:
            errors.add(error)
        tally.check(got, want)
        for m, t in zip(got, times):
            if m in sent_at:
                latencies.append(t - sent_at[m])
                by_bucket.setdefault(int((sent_at[m] - first_send) // 5), []).append(t - sent_at[m])
    latencies.sort()
    ms = lambda v: round(1000 * v, 1)  # noqa: E731
    return {
        "deliveries": len(latencies),
        "latency_ms": {"p50": ms(percentile(latencies, 0.5)), "p95": ms(percentile(latencies, 0.95)),
                       "p99": ms(percentile(latencies, 0.99)), "max": ms(latencies[-1]) if latencies else None},
        "p99_ms_by_publish_time": {f"{5 * b}-{5 * b + 5} s": ms(percentile(sorted(v), 0.99))
                                   for b, v in sorted(by_bucket.items())},
        "exactly_once_in_order": {"streams": len(records), **tally.counts(),
                                  "closed_streams": closed, "other_frames": others, "errors": sorted(errors)[:5]},
    }


# -- one mode ----------------------------------------------------------------------------------


def run_mode(mode: str, round_no: int, args: argparse.Namespace, database: Database, log_path: Path) -> dict:
    """A (one connection per client, a token of its channels) or B (one connection per channel)."""
    names = channel_names(f"mc{round_no}{mode.lower()}", args.clients, args.channels_per_client)
    if mode == "A":
        bodies = [{"channels": {channel: [TOPIC] for channel in mine}} for mine in names]
        watched = names
    else:
        bodies = [{"channel": channel, "topics": [TOPIC]} for mine in names for channel in mine]
        watched = [[channel] for mine in names for channel in mine]
    streams = len(watched)
    server = BenchServer(
        database.url, log_path, open_files=args.open_files, app_dir=args.app_dir,
        env={"GUNICORN_CMD_ARGS": f"--worker-connections {streams + 2000}"},
    ).start()
    clients = ChannelsClientPool(args.client_procs)
    publisher = Publisher(database.url)
    try:
        worker = server.worker_pid
        warm_up(server, clients, publisher, f"mc{round_no}{mode.lower()}.warm")
        print(f"  {mode}: {len(bodies)} tokens ...", flush=True)
        tokens = grant_tokens(server, bodies)
        time.sleep(1.0)
        rss_before, sockets_before = rss_kib(worker), sockets_of(worker)
        started = time.monotonic()
        opened = clients.open_paths(server, [f"/api/realtime/subscribe?token={t}" for t in tokens],
                                    concurrency=args.concurrency, timeout=300)
        open_s = time.monotonic() - started
        print(f"  {mode}: opened {opened['ready']}/{streams} in {open_s:.1f}s {opened['errors']}", flush=True)
        settled_s = settle(server, opened["ready"])
        print(f"  {mode}: replay reads done {settled_s:.1f} s after the last stream got `retry:`", flush=True)
        time.sleep(2.0)  # idle
        rss_after, sockets_after = rss_kib(worker), sockets_of(worker)
        open_streams = server.stats()["streams"]

        clients.broadcast({"cmd": "mark"}, timeout=60)
        stats_before = server.stats()
        window = CpuWindow(worker, clients.pids)
        sends, channel_of, late_s = publish_load(publisher, names, args.rate, args.seconds, args.batch_ms / 1000)
        last_of: dict[str, int] = {}
        for message_id, _, _ in sends:
            last_of[channel_of[message_id]] = message_id
        order = clients.order(streams)
        targets_by_stream = [max(last_of.get(c, 0) for c in channels) for channels in watched]
        waited = clients.wait_targets(targets_by_stream, args.drain_timeout)
        cpu = window.close()
        stats_after = server.stats()
        result = check(clients.records(), order, watched, sends, channel_of)
        clients.broadcast({"cmd": "close"}, timeout=120)
    finally:
        publisher.close()
        clients.stop()
        server.stop()

    deliveries = max(1, result["deliveries"])
    counts = cpu["server_counts"]
    client_cpu_s = sum(cpu["client_procs_pct"]) * cpu["wall_s"] / 100
    grown = rss_after - rss_before
    return {
        "mode": mode,
        "round": round_no,
        "clients": args.clients,
        "channels": args.clients * args.channels_per_client,
        "streams": streams,
        "opened": opened,
        "open_s": round(open_s, 1),
        "settle_s": round(settled_s, 1),
        "open_streams_on_server": open_streams,
        "worker_sockets": {"before": sockets_before, "after": sockets_after},
        "rss_kib": {"before": rss_before, "after": rss_after},
        "kib_per_connection": round(grown / streams, 2),
        "kib_per_client": round(grown / args.clients, 2),
        "kib_per_channel": round(grown / (args.clients * args.channels_per_client), 2),
        "published": len(sends),
        "publish_rate_per_s": round(len(sends) / max(1e-9, sends[-1][1] - sends[0][1]), 1),
        "publisher_latest_batch_s": round(late_s, 4),
        "caught_up": sum(w["caught_up"] for w in waited),
        "store_reads_per_message": round((stats_after["store_reads"] - stats_before["store_reads"]) / len(sends), 3),
        "frames_sent": stats_after["delivered"] - stats_before["delivered"],
        "cpu": {
            **cpu,
            "server_us_per_delivery": round(1e6 * (counts["user_s"] + counts["system_s"]) / deliveries, 1),
            "server_user_us_per_delivery": round(1e6 * counts["user_s"] / deliveries, 1),
            "server_system_us_per_delivery": round(1e6 * counts["system_s"] / deliveries, 1),
            "clients_us_per_delivery": round(1e6 * client_cpu_s / deliveries, 1),
        },
        **result,
    }


def settle(server: BenchServer, ready: int, timeout: float = 300.0) -> float:
    """Wait until the server holds the streams and their replay reads are done; how long it took.

    A client counts a stream open at its `retry:` frame, which the server sends before the
    stream's first history read: those reads may go on long after (analysis.py's `settle`, which
    this follows; up to WARM_STREAMS streams closed by the warm-up may still be counted).
    """
    started, previous = time.monotonic(), None

    def steady() -> bool:
        nonlocal previous
        stats = server.stats()
        done = (ready <= stats["streams"] <= ready + WARM_STREAMS and previous is not None
                and stats["store_reads"] - previous <= 2)  # the change feed's safety poll
        previous = stats["store_reads"]
        return done

    wait_for(steady, timeout, interval=0.5, what=f"{ready} settled streams")
    return time.monotonic() - started


def warm_up(server: BenchServer, clients: ChannelsClientPool, publisher: Publisher, channel: str) -> None:
    """What every stream shares (imports, the change feed, the pools), warmed before the RSS is read."""
    token = grant_tokens(server, [{"channel": channel, "topics": [TOPIC]}], threads=1)[0]
    clients.open_paths(server, [f"/api/realtime/subscribe?token={token}"] * WARM_STREAMS, concurrency=10, timeout=30)
    stored = publisher.publish_many([{"channel": channel, "topic": TOPIC, "data": {"k": k}} for k in range(20)])
    clients.wait_targets([stored[-1].id] * WARM_STREAMS, timeout=30)
    clients.broadcast({"cmd": "close"}, timeout=30)
    # The server sees them gone at their next write (a keep-alive, up to 15 s): not waited for.


# -- the report --------------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    rows = [
        "| round | mode | clients x channels | connections (worker sockets) | opened in | worker RSS before -> after "
        "| per connection / per client | worker CPU | µs/delivery (user + sys) | p50 / p95 / p99 / max ms "
        "| deliveries | reads/msg | every message once, in order | clients CPU | machine busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lat, once, cpu = r["latency_ms"], r["exactly_once_in_order"], r["cpu"]
        rows.append(
            f"| {r['round']} | {r['mode']} | {r['clients']} x {r['channels'] // r['clients']} "
            f"| {r['open_streams_on_server']} ({r['worker_sockets']['after']}) | {r['open_s']} s + {r['settle_s']} s "
            f"| {r['rss_kib']['before'] / 1024:.1f} -> {r['rss_kib']['after'] / 1024:.1f} MiB "
            f"| {r['kib_per_connection']} / {r['kib_per_client']} KiB "
            f"| {cpu['server_worker_pct']} % | {cpu['server_us_per_delivery']} ({cpu['server_user_us_per_delivery']} "
            f"+ {cpu['server_system_us_per_delivery']}) | {lat['p50']} / {lat['p95']} / {lat['p99']} / {lat['max']} "
            f"| {r['deliveries']} of {r['published']} | {r['store_reads_per_message']} "
            f"| {once['complete']}/{once['streams']} (missing {once['missing']}, dup {once['duplicates']}, "
            f"out of order {once['out_of_order']}, unexpected {once['unexpected']}) "
            f"| {' + '.join(f'{p} %' for p in cpu['client_procs_pct'])} | {cpu['machine_busy_pct']} % |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--channels-per-client", type=int, default=10)
    parser.add_argument("--rate", type=float, default=2000.0, help="messages a second, all channels together")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--batch-ms", type=float, default=10.0, help="a publish_many batch every ... ms")
    parser.add_argument("--rounds", type=int, default=2, help="round r runs A then B, or B then A for odd r")
    parser.add_argument("--modes", default="A,B")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=100, help="streams connecting at once, per client process")
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    parser.add_argument("--open-files", type=int, default=20000)
    parser.add_argument("--app-dir", type=Path, default=ROOT, help="serve another checkout")
    args = parser.parse_args()

    # The client processes inherit it: 10,000 sockets between them.
    open_files = raise_open_files_limit(args.open_files)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    log_path = RESULTS / f"channels-{stamp}.log"
    database = Database("postgresql")
    modes = args.modes.split(",")
    results = []
    try:
        for round_no in range(1, args.rounds + 1):
            for mode in (modes if round_no % 2 else modes[::-1]):
                print(f"round {round_no}, {mode} ...", flush=True)
                results.append(run_mode(mode, round_no, args, database, log_path))
                print(table(results[-1:]), flush=True)
                print("  p99 by publish time:", results[-1]["p99_ms_by_publish_time"], flush=True)
    finally:
        database.drop()
    out = RESULTS / f"channels-{stamp}.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "open_files": open_files,
                               "load_average": os.getloadavg(), "results": results}, indent=1))
    print()
    print(table(results))
    print(f"\n(written to {out})")


if __name__ == "__main__":
    main()
