"""20,000 streams on this 2-core machine (issue 10): phase of bench/run.py.

A fresh server with `--scale-workers` gevent workers (2). `--scale-streams`
streams (20,000) are opened on `--scale-channels` channels (20, so 1,000
streams each), then every channel gets one message per second for
`--scale-seconds`, spread evenly over each second (message k goes to
channel k mod 20 at k/20 s): every stream receives one message a second, and
the workers deliver 20,000 frames a second between them.

Measured: the memory of the idle streams (the workers' RSS before and after
they were opened, per stream), then the publish-to-receive latency of every
(stream, message), and whether each stream got every message of its channel
once, in order. gunicorn's `worker_connections` (10,000 in gunicorn.conf.py)
is raised for this run with GUNICORN_CMD_ARGS: an uneven share of 20,000
streams between two workers would otherwise hit it.
"""
from __future__ import annotations

import time

from analysis import CpuWindow, analyse
from clients import ClientPool
from publishing import TOPIC, Publisher, publish_paced
from server import BenchServer, rss_kib, wait_for


def run_scale_phase(args, database, log_path, clients: ClientPool) -> dict:  # noqa: ANN001
    streams, channels = args.scale_streams, [f"bench.scale.{c}" for c in range(args.scale_channels)]
    server = BenchServer(
        database.url, log_path, open_files=args.open_files, app_dir=args.app_dir, workers=args.scale_workers,
        env={"GUNICORN_CMD_ARGS": f"--worker-connections {streams + 1000}"},
    ).start()
    try:
        pids = server.worker_pids()
        # What every stream shares (imports, the dispatcher, the pool), warmed in both workers.
        warm = Publisher(server, "bench.warmup")
        for _ in range(8):
            warm.publish()
        warm.close()
        time.sleep(1.0)
        rss_before = sum(rss_kib(pid) for pid in pids)
        started = time.monotonic()
        opened = {"ready": 0, "failed": 0}
        per_channel = streams // len(channels)
        for channel in channels:
            reply = clients.open(server, server.token(channel, [TOPIC]), per_channel, timeout=300, concurrency=200)
            opened["ready"] += reply["ready"]
            opened["failed"] += reply["failed"]
        open_s = time.monotonic() - started
        total = per_channel * len(channels)
        wait_for(lambda: server.stats()["streams"] == total, 120, interval=0.5, what=f"{total} streams")
        time.sleep(2.0)  # idle
        rss_after = sum(rss_kib(pid) for pid in pids)
        print(f"  opened {opened['ready']}/{total} streams in {open_s:.1f}s; "
              f"{(rss_after - rss_before) / total:.1f} KiB per idle stream", flush=True)

        clients.broadcast({"cmd": "mark"}, timeout=60)
        windows = [CpuWindow(pid, clients.pids) for pid in pids]
        channel_of: dict[int, str] = {}
        rate = len(channels) * args.scale_rate
        sends = publish_paced(server, channels[0], rate, args.scale_seconds, connections=8,
                              channels=channels, channel_of=channel_of)
        # One last message per channel: a stream holding its channel's has everything before it.
        last = publish_paced(server, channels[0], rate, len(channels) / rate, channels=channels, channel_of=channel_of)
        waited = clients.broadcast({"cmd": "wait", "last_id": min(s[0] for s in last), "timeout": args.drain_timeout},
                                   args.drain_timeout + 15)
        cpus = [w.close() for w in windows]
        result = analyse(clients.records(), sends + last, channel_of)
        clients.broadcast({"cmd": "close"}, timeout=120)
        return {
            "phase": "scale",
            "workers": args.scale_workers,
            "streams": total,
            "channels": len(channels),
            "opened": opened,
            "open_s": round(open_s, 1),
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "kib_per_stream": round((rss_after - rss_before) / total, 2),
            "published": len(sends) + len(last),
            "caught_up": sum(w["caught_up"] for w in waited),
            "server_workers_pct": [c["server_worker_pct"] for c in cpus],
            "client_procs_pct": cpus[0]["client_procs_pct"],
            "machine_busy_pct": cpus[0]["machine_busy_pct"],
            **result,
        }
    finally:
        server.stop()
