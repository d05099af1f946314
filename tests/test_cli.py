"""`flask realtime tail` and `flask realtime prune`, as a user runs them."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading

from conftest import ROOT, wait_until


def _env(database_url: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": database_url, "SECRET_KEY": "cli-test", "FLASK_REALTIME_POLL_S": "0.05"}


def test_tail_prints_raw_frames_from_a_cursor_then_live_ones(app, tmp_path):
    realtime = app.extensions["realtime"]
    first = realtime.publish("run.7", "status", {"percent": 10})
    second = realtime.publish("run.7", "log", {"message": "hello"})
    realtime.publish("run.7", "other", {"skip": True})
    cursor = f"{realtime.store.epoch}-{first.id}"

    tail = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "app", "realtime", "tail", "run.7",
         "--topic", "status", "--topic", "log", "--last-event-id", cursor],
        cwd=ROOT, env=_env(app.config["DATABASE_URL"]), stdout=subprocess.PIPE, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in tail.stdout], daemon=True)
    reader.start()
    seen: list[str] = []

    def saw(text: str) -> bool:
        while not lines.empty():
            seen.append(lines.get())
        return any(text in line for line in seen)

    try:
        wait_until(lambda: saw(f"id: {realtime.store.epoch}-{second.id}"), what="the replayed frame")
        assert seen[:2] == ["retry: 2000\n", "\n"]
        assert f"id: {realtime.store.epoch}-{first.id}\n" not in seen  # the cursor itself is not repeated
        live = realtime.publish("run.7", "status", {"percent": 20})
        wait_until(lambda: saw(f"id: {realtime.store.epoch}-{live.id}"), what="the live frame")
        data_lines = [json.loads(line[len("data: "):]) for line in seen if line.startswith("data: ")]
        assert [d["id"] for d in data_lines] == [second.id, live.id]
        assert "event: status\n" in seen and "event: log\n" in seen
    finally:
        tail.send_signal(signal.SIGINT)
        assert tail.wait(timeout=10) == 0
        reader.join(timeout=10)  # EOF once the process is gone
        tail.stdout.close()


def test_tail_refuses_a_bad_channel_or_cursor(app):
    for args in (["bad channel"], ["run.1", "--last-event-id", "nope"]):
        result = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "app", "realtime", "tail", *args],
            cwd=ROOT, env=_env(app.config["DATABASE_URL"]), capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 2
        assert "Traceback" not in result.stderr


def test_prune_command_deletes_only_expired_messages(app, runner):
    realtime = app.extensions["realtime"]
    realtime.publish("run.1", "status", {"n": 1})
    assert runner.invoke(args=["realtime", "prune"]).output == "pruned 0 messages\n"
    realtime.retention = realtime.retention * 0  # everything is now older than the retention
    assert runner.invoke(args=["realtime", "prune"]).output == "pruned 1 messages\n"
    assert realtime.store.read_after("run.1", None, 0, 10) == []
