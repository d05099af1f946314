"""The reconnect storm after a deploy: every client comes back at once with its cursor (issue 10).

Phase of bench/run.py (`--storm-streams`, 2,000 by default), run on one worker
(the issue's measure) and again on two (gunicorn.conf.py's default): on a fresh
server, `--storm-streams` streams reconnect together, all with the same
cursor, `--storm-behind` messages behind, while another client publishes on
another channel at `--rate` messages/s. Measured: the time from the first
connection until the last stream has caught up, the publish latency (p50,
p99) meanwhile, the database reads the storm cost, and whether every stream
got every message it missed once, in order.
"""
from __future__ import annotations

import threading
import time

from analysis import analyse, percentile
from clients import ClientPool
from publishing import TOPIC, Publisher, paced
from server import BenchServer


def run_storm_phase(args, database, log_path, clients: ClientPool, workers: int = 1) -> dict:  # noqa: ANN001
    server = BenchServer(database.url, log_path, open_files=args.open_files, app_dir=args.app_dir,
                         workers=workers).start()
    try:
        token = server.token("bench.storm", [TOPIC])
        publisher = Publisher(server, "bench.storm")
        first = publisher.publish()
        cursor = server.history(token)["cursor"]  # where every client stopped: right after `first`
        missed = [publisher.publish() for _ in range(args.storm_behind)]
        publisher.close()
        reads_before = server.stats()["replay_reads"]

        during: list[tuple] = []
        stop = threading.Event()
        # The publisher elsewhere is already connected, as a running service's would be: each of
        # its connections has had an answer before the storm begins.
        connections = [Publisher(server, "bench.other") for _ in range(4)]
        for connection in connections:
            connection.publish()

        def publish_elsewhere() -> None:
            during.extend(paced(connections.pop, args.rate, 0, len(connections), until=stop))

        background = threading.Thread(target=publish_elsewhere)
        clients.broadcast({"cmd": "mark"}, timeout=30)
        started = time.monotonic()
        background.start()
        opened = clients.open(server, token, args.storm_streams, timeout=120, last_event_id=cursor,
                              concurrency=args.storm_streams)
        last_id = missed[-1][0]
        waited = clients.broadcast({"cmd": "wait", "last_id": last_id, "timeout": args.drain_timeout},
                                   args.drain_timeout + 15)
        caught_up_s = time.monotonic() - started
        stop.set()
        background.join()
        reads = server.stats()["replay_reads"] - reads_before
        check = analyse(clients.records(), missed)["exactly_once_in_order"]
        clients.broadcast({"cmd": "close"}, timeout=60)
        acks = sorted(s[2] - s[1] for s in during)
        return {
            "phase": "storm",
            "workers": workers,
            "streams": args.storm_streams,
            "behind": args.storm_behind,
            "opened": opened["ready"],
            "caught_up": sum(w["caught_up"] for w in waited),
            "caught_up_s": round(caught_up_s, 2),
            "replay_reads": reads,
            "publish_during_ms": {"n": len(acks), "p50": round(1000 * percentile(acks, 0.5), 1),
                                  "p99": round(1000 * percentile(acks, 0.99), 1)},
            "exactly_once_in_order": check,
            "first_id": first[0],
        }
    finally:
        server.stop()
