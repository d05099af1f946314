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
