"""Channel B while channel A holds a transaction open (issue 17, item 4): phase of bench/run.py.

A transaction that publishes inside the caller's own transaction (`append(...,
session=...)`, the transactional outbox) leaves a hole in the ids until it
commits; live delivery must hold back the channel it writes, and only that one
(realtime/visibility.py). Measured on a fresh server, one worker, PostgreSQL:

- `--stall-streams` streams on channel B get `--rate` messages/s through the
  HTTP publish path for LEAD_S + `--stall-hold-s` + TAIL_S seconds;
- LEAD_S in, another process opens a transaction, appends one message on channel
  A through the store, holds the transaction `--stall-hold-s`, then commits.
  That process runs the code of the checkout being measured (`--app-dir`), so an
  older checkout is measured with its own store;
- halfway through the hold, one message is published on A through HTTP: it
  commits first, yet its id comes after the held one's, so A's streams must get
  it after the commit, second.

Reported: B's publish-to-receive latency over the whole window and over the
messages sent while A's transaction was open, whether every B stream got every
B message once, in order; for A_STREAMS streams on A (in a load process of their
own, so that waiting for B's last message does not wait for them), how long
after the commit A's two messages arrived, once each, in order, and whether the
held message is stored.

The transaction's process (run by the phase, not by hand):
    python bench/stall.py DATABASE_URL HOLD_S     # cwd and PYTHONPATH: the checkout measured
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from array import array
from pathlib import Path

from analysis import analyse, percentile
from clients import ClientPool
from publishing import TOPIC, Publisher, paced
from server import BenchServer

HERE = Path(__file__).resolve().parent
CHANNEL_A, CHANNEL_B = "bench.A", "bench.B"
A_STREAMS = 5
LEAD_S = 3.0  # B's publishing before A's transaction begins ...
TAIL_S = 4.0  # ... and after it commits


def run_stall_phase(args, database, log_path, clients: ClientPool) -> dict:  # noqa: ANN001
    hold_s = args.stall_hold_s
    server = BenchServer(database.url, log_path, open_files=args.open_files, app_dir=args.app_dir).start()
    a_clients = ClientPool(1)
    holder = TransactionHolder(database.url, hold_s, args.app_dir)
    try:
        token_a = server.token(CHANNEL_A, [TOPIC])
        opened = clients.open(server, server.token(CHANNEL_B, [TOPIC]), args.stall_streams, timeout=120)
        opened_a = a_clients.open(server, token_a, A_STREAMS, timeout=60)
        if opened["ready"] != args.stall_streams or opened_a["ready"] != A_STREAMS:
            raise RuntimeError(f"could not open every stream: B {opened}, A {opened_a}")
        # One message each stream receives ends the connection storm (as in run.py's fanout).
        for pool, channel in ((clients, CHANNEL_B), (a_clients, CHANNEL_A)):
            warmup = Publisher(server, channel)
            last_id = warmup.publish()[0]
            warmup.close()
            pool.broadcast({"cmd": "wait", "last_id": last_id, "timeout": args.drain_timeout}, args.drain_timeout + 15)
            pool.broadcast({"cmd": "mark"}, timeout=30)
        holder.wait_ready()

        seconds = LEAD_S + hold_s + TAIL_S
        sends_a: list[tuple] = []

        def publish_on_a_meanwhile() -> None:
            # Due halfway through the hold: committed long before the held message, numbered after it.
            time.sleep(max(0.0, holder.wait_appended() + hold_s / 2 - time.monotonic()))
            publisher = Publisher(server, CHANNEL_A)
            sends_a.append(publisher.publish())
            publisher.close()

        on_a = threading.Thread(target=publish_on_a_meanwhile)
        on_a.start()
        holder.begin_at(time.monotonic() + 0.05 + LEAD_S)  # paced() starts 0.05 s after it is called
        sends_b = paced(lambda: Publisher(server, CHANNEL_B), args.rate, seconds)
        on_a.join(timeout=30)
        committed = holder.wait_committed()
        if len(sends_a) != 1:
            raise RuntimeError("the message on A during the hold was not published (see the error above)")
        last_b = max(s[0] for s in sends_b)
        waited = clients.broadcast({"cmd": "wait", "last_id": last_b, "timeout": args.drain_timeout},
                                   args.drain_timeout + 15)
        ids_a = sorted([holder.appended_id] + [s[0] for s in sends_a])
        a_clients.broadcast({"cmd": "wait", "last_id": ids_a[-1], "timeout": args.drain_timeout},
                            args.drain_timeout + 15)

        records = clients.records()
        whole = analyse(records, sends_b)
        while_open = [s for s in sends_b if holder.appended_at <= s[1] <= committed]
        # Latency of A's messages counted from the commit: how long the held channel waited after it.
        records_a = a_clients.records()
        on_a_check = analyse(records_a, [(message_id, committed, committed) for message_id in ids_a])
        stored = {m["id"] for m in server.history(token_a)["messages"]}
        clients.broadcast({"cmd": "close"}, timeout=60)
        acks = sorted(s[2] - s[1] for s in sends_b)
        return {
            "phase": "stall",
            "streams": args.stall_streams,
            "hold_s": hold_s,
            "open_s": round(committed - holder.appended_at, 2),
            "rate": args.rate,
            "published": len(sends_b),
            "caught_up": sum(w["caught_up"] for w in waited),
            "publish_ack_ms": {"p50": round(1000 * percentile(acks, 0.5), 1),
                               "p99": round(1000 * percentile(acks, 0.99), 1)},
            "b_latency_ms": whole["latency_ms"],
            "b_while_open": {"messages": len(while_open),
                             "latency_ms": analyse(records, while_open)["latency_ms"] if while_open else None},
            "b_exactly_once_in_order": whole["exactly_once_in_order"],
            "a_streams": A_STREAMS,
            "a_ids": ids_a,
            "a_first_after_commit_ms": round(1000 * (earliest_receive(records_a) - committed), 1),
            "a_after_commit_ms": on_a_check["latency_ms"],
            "a_exactly_once_in_order": on_a_check["exactly_once_in_order"],
            "a_stored": holder.appended_id in stored,
        }
    finally:
        holder.stop()
        a_clients.stop()
        server.stop()


def earliest_receive(records: list[tuple]) -> float:
    """The first receive time of any message by any stream (load.py's records)."""
    times = array("d")
    for _, times_bytes, *_ in records:
        times.frombytes(times_bytes)
    return min(times, default=float("nan"))


class TransactionHolder:
    """This file run as a script in the checkout measured: it holds A's transaction when told to.

    It says, one JSON line each: ready (imported, connected), appended (the id,
    when), committed (when). Times are CLOCK_MONOTONIC, system-wide, so they
    compare with the publisher's and the load clients'.
    """

    def __init__(self, database_url: str, hold_s: float, app_dir: Path) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(app_dir), os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "stall.py"), database_url, str(hold_s)],
            cwd=app_dir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self._lines: dict[str, dict] = {}
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            said = json.loads(line)
            with self._arrived:
                self._lines[said["said"]] = said
                self._arrived.notify_all()

    def _wait(self, what: str, timeout: float) -> dict:
        with self._arrived:
            if not self._arrived.wait_for(lambda: what in self._lines or self.process.poll() is not None, timeout):
                raise TimeoutError(f"the transaction's process did not say {what!r} within {timeout:.0f} s")
            if what not in self._lines:
                raise RuntimeError(f"the transaction's process exited ({self.process.returncode}) before {what!r}")
            return self._lines[what]

    def wait_ready(self) -> None:
        self._wait("ready", 60)

    def begin_at(self, monotonic: float) -> None:
        self.process.stdin.write(json.dumps({"begin_at": monotonic}) + "\n")
        self.process.stdin.flush()

    def wait_appended(self) -> float:
        return self._wait("appended", 60)["at"]

    @property
    def appended_at(self) -> float:
        return self._lines["appended"]["at"]

    @property
    def appended_id(self) -> int:
        return self._lines["appended"]["id"]

    def wait_committed(self) -> float:
        return self._wait("committed", 60)["at"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def hold_transaction(database_url: str, hold_s: float) -> None:
    """The holder's side: on the `begin_at` it reads, append on A in a transaction, hold it, commit."""
    # Imported here, from the checkout measured (cwd, PYTHONPATH), never from this one.
    from sqlalchemy.orm import Session

    from common.database import Database
    from realtime.store import MessageStore

    def say(what: str, **values: object) -> None:
        print(json.dumps({"said": what, **values}), flush=True)

    db = Database(database_url)
    store = MessageStore(db)
    store.epoch  # noqa: B018 - connect and find the schema now, not inside the window
    say("ready")
    begin_at = json.loads(sys.stdin.readline())["begin_at"]
    time.sleep(max(0.0, begin_at - time.monotonic()))
    with Session(db.engine) as session, session.begin():
        message = store.append(CHANNEL_A, TOPIC, "1", session=session)
        say("appended", id=message.id, at=time.monotonic())
        time.sleep(hold_s)
    say("committed", at=time.monotonic())


if __name__ == "__main__":
    hold_transaction(sys.argv[1], float(sys.argv[2]))
