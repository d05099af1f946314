"""The subscriber processes of `make bench`: a pool of load.py processes driven by JSON lines.

Each process holds many streams in one epoll loop; run.py sends every process one
command per line and reads one JSON answer per line (see load.py).
"""
from __future__ import annotations

import json
import os
import pickle
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from server import ROOT, BenchServer

HERE = Path(__file__).resolve().parent


class BenchTimeout(Exception):
    pass


# -- the subscriber processes ------------------------------------------------------


class Processes:
    """`count` processes of one bench script, each answering one JSON line per command (load.py's
    protocol): the pools of run.py (load.py), channels.py (channels_load.py) and texts.py (text_load.py)."""

    script = "load.py"

    def __init__(self, count: int) -> None:
        self.procs = [
            subprocess.Popen([sys.executable, str(HERE / self.script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             cwd=ROOT)
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
                    raise BenchTimeout(f"{self.script} {proc.pid} did not answer {command['cmd']!r} in {timeout:.0f}s")
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"{self.script} {proc.pid} exited")
                self._buffers[i] += chunk
            line, _, self._buffers[i] = self._buffers[i].partition(b"\n")
            replies.append(json.loads(line))
        return replies

    def dumped(self, cmd: str, timeout: float) -> list:
        """What `cmd` (a dump command) pickles, process after process: one record per stream."""
        records = []
        with tempfile.TemporaryDirectory(prefix="rt_bench_") as tmp:
            paths = [f"{tmp}/{i}.pickle" for i in range(len(self.procs))]
            self.call([{"cmd": cmd, "path": p} for p in paths], timeout=timeout)
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

    def opened(self, replies: list[dict]) -> dict:
        """The answers of an `open`, summed: ready, failed and pending streams, the first errors."""
        total = {key: sum(r[key] for r in replies if r) for key in ("ready", "failed", "pending")}
        total["errors"] = sorted({e for r in replies if r for e in r["errors"]})[:5]
        return total


class ClientPool(Processes):
    """`count` load.py processes, each holding many streams in one epoll loop."""

    def broadcast(self, command: dict, timeout: float) -> list[dict]:
        return self.call([command] * len(self.procs), timeout)

    def open(self, server: BenchServer, token: str, count: int, timeout: float, *,
             last_event_id: str | None = None, concurrency: int = 100) -> dict:
        """Open `count` streams spread over the processes (`concurrency` connecting at once per
        process); wait until each got `retry:`. With `last_event_id`, they resume after it."""
        path = f"/api/realtime/subscribe?token={token}"
        if last_event_id is not None:
            path += f"&last_event_id={last_event_id}"
        return self.open_path(server.host, server.port, path, count, timeout, concurrency=concurrency)

    def open_path(self, host: str, port: int, path: str, count: int, timeout: float, *,
                  concurrency: int = 100) -> dict:
        """`open` on any server's stream path (the peers' too)."""
        shares = [count // len(self.procs) + (i < count % len(self.procs)) for i in range(len(self.procs))]
        commands = [
            {"cmd": "open", "host": host, "port": port, "path": path,
             "count": share, "concurrency": concurrency, "timeout": timeout} if share else None
            for share in shares
        ]
        return self.opened(self.call(commands, timeout + 15))

    def records(self) -> list[tuple]:
        """Every stream's (ids, receive times, heartbeats, other frames, closed, error)."""
        return self.dumped("dump", timeout=60)



class TextClientPool(Processes):
    """`count` text_load.py processes (texts.py); stream i of an `open` goes to process i % count."""

    script = "text_load.py"

    def open(self, host: str, port: int, paths: list[str], timeout: float, concurrency: int = 100) -> dict:
        """Stream i on paths[i]; the streams in the order of `records()` are those of `paths`,
        process by process: see `order`."""
        count = len(self.procs)
        commands = [{"cmd": "open", "host": host, "port": port, "paths": paths[i::count],
                     "concurrency": concurrency, "timeout": timeout} if paths[i::count] else None
                    for i in range(count)]
        return self.opened(self.call(commands, timeout + 15))

    def order(self, n: int) -> list[int]:
        """The index in `paths` of each stream of `records()`, for an `open` of n paths."""
        count = len(self.procs)
        return [i for p in range(count) for i in range(p, n, count)]

    def wait_ended(self, timeout: float) -> list[dict]:
        return self.call([{"cmd": "wait_ended", "timeout": timeout}] * len(self.procs), timeout + 15)

    def records(self) -> list[dict]:
        return self.dumped("dump_texts", timeout=120)

    def close_streams(self) -> None:
        self.call([{"cmd": "close"}] * len(self.procs), timeout=60)
