"""What `make bench` measures: CPU over a window, settled streams, latency percentiles, exactly-once."""
from __future__ import annotations

import math
import time
from array import array

from typing import Any, Callable

from server import BenchServer, cpu_seconds, machine_cpu, wait_for, worker_counters


class CpuWindow:
    """CPU used by the server worker, each client process and this process over a window."""

    def __init__(self, server_pid: int, client_pids: list[int]) -> None:
        self.server_pid, self.client_pids = server_pid, client_pids
        self.wall = time.monotonic()
        self.server = cpu_seconds(server_pid)
        self.counters = worker_counters(server_pid)
        self.clients = [cpu_seconds(pid) for pid in client_pids]
        self.own = time.process_time()
        self.machine = machine_cpu()

    def close(self) -> dict:
        wall = time.monotonic() - self.wall
        counters = worker_counters(self.server_pid)
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
            # The worker's own counts over the window: per delivery below (measure_window).
            "server_counts": {key: round(counters[key] - self.counters[key], 3) for key in counters},
        }


def settle(server: BenchServer, streams: int, timeout: float = 60.0) -> dict:
    """Wait until the server holds `streams` streams and their replay reads are done.

    Done means no store reads within half a second, but for the reads the
    change feed makes on its own: SQLite's poll every REALTIME_POLL_S, the
    PostgreSQL feed's safety poll every REALTIME_SAFETY_POLL_S (1 s).
    """
    interval = 0.5
    poll_s = 1.0 if server.is_postgres else float(server.env["FLASK_REALTIME_POLL_S"])
    allowance = math.ceil(interval / poll_s) + 1
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


class Tally:
    """Streams' message ids against what each should have got: every one once, in id order."""

    def __init__(self) -> None:
        self.complete = self.missing = self.duplicates = self.out_of_order = self.unexpected = 0

    def check(self, got: list[int], want: list[int]) -> None:
        if got == want:
            self.complete += 1
            return
        seen = set(got)
        self.missing += len(set(want) - seen)
        self.duplicates += len(got) - len(seen)
        self.unexpected += len(seen - set(want))
        self.out_of_order += sum(1 for a, b in zip(got, got[1:]) if b < a)

    def counts(self) -> dict:
        return {"complete": self.complete, "missing": self.missing, "duplicates": self.duplicates,
                "out_of_order": self.out_of_order, "unexpected": self.unexpected}


def analyse(records: list[tuple], sends: list[tuple[int, float, float]],
            channel_of: dict[int, str] | None = None) -> dict:
    """Latency of every (subscriber, message) and the exactly-once-in-order check.

    With `channel_of` (message id -> channel), the streams watch several
    channels: each must get every message of the channel of its first one.
    """
    expected = sorted(message_id for message_id, _, _ in sends)
    by_channel: dict[str, list[int]] = {}
    for message_id in expected:
        if channel_of is not None:
            by_channel.setdefault(channel_of[message_id], []).append(message_id)
    sent_at = {message_id: t0 for message_id, t0, _ in sends}
    latencies: list[float] = []
    first_receive: dict[int, float] = {}  # per message: when its first and last subscriber got it
    last_receive_of: dict[int, float] = {}
    tally = Tally()
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
        if channel_of is None:
            want = expected
        else:  # a stream that got nothing fails: its channel is unknown, its want cannot be empty
            want = by_channel.get(channel_of.get(got[0]), []) if got else [-1]
        tally.check(got, want)
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
            **tally.counts(),
            "closed_streams": closed,
            "other_frames": others,
            "heartbeats": heartbeats,
            "errors": sorted(errors)[:5],
        },
    }


def measure_window(name: str, worker_pid: int, clients: Any, streams: int, publish: Callable[[], list[tuple]],
                   drain_timeout: float, extra_pids: dict[str, int] | None = None) -> dict:
    """One window on `clients` (a ClientPool): from the first publish until every stream got
    the last message (or the timeout). CPU of the worker, the clients, this process and any
    `extra_pids` (flask-sse's Redis), per delivery too; latency and exactly-once (`analyse`)."""
    clients.broadcast({"cmd": "mark"}, timeout=30)
    extra = extra_pids or {}
    extra_before = {key: cpu_seconds(pid) for key, pid in extra.items()}
    window = CpuWindow(worker_pid, clients.pids)
    sends = publish()
    last_id = max(message_id for message_id, _, _ in sends)
    waited = clients.broadcast({"cmd": "wait", "last_id": last_id, "timeout": drain_timeout}, drain_timeout + 15)
    cpu = window.close()
    for key, pid in extra.items():
        cpu[f"{key}_pct"] = round(100 * (cpu_seconds(pid) - extra_before[key]) / cpu["wall_s"], 1)
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
        "cpu": cpu,
    }
    result.update(analyse(clients.records(), sends))
    # CPU per delivered frame: a figure that does not depend on how busy the machine was.
    deliveries = max(1, result["deliveries"])
    wall = cpu["wall_s"]
    cpu["server_us_per_delivery"] = round(1e4 * cpu["server_worker_pct"] * wall / deliveries, 1)
    cpu["clients_us_per_delivery"] = round(1e4 * sum(cpu["client_procs_pct"]) * wall / deliveries, 1)
    # The worker's CPU per delivery, split: user time (Python) and system time (mostly socket writes).
    counts = cpu["server_counts"]
    cpu["server_user_us_per_delivery"] = round(1e6 * counts["user_s"] / deliveries, 1)
    cpu["server_system_us_per_delivery"] = round(1e6 * counts["system_s"] / deliveries, 1)
    for key in extra:
        cpu[f"{key}_us_per_delivery"] = round(1e4 * cpu[f"{key}_pct"] * wall / deliveries, 1)
    return result
