"""`flask realtime tail` and `flask realtime prune`, as a user runs them."""
from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
from typing import Callable

from conftest import ROOT, wait_until
from readme import code_block


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
    assert list(realtime.store.read_after("run.1", None, 0, 10)) == []


def _lines_of(process: subprocess.Popen) -> Callable[[str], bool]:
    """A `saw(text)` that collects the process's stdout lines in the background."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen: list[str] = []

    def saw(text: str) -> bool:
        while not lines.empty():
            seen.append(lines.get())
        return any(text in line for line in seen)

    saw.seen = seen  # type: ignore[attr-defined]
    return saw


def test_tail_with_url_watches_a_remote_server_through_the_python_client(start_server, tmp_path):
    server = start_server(f"sqlite:///{tmp_path / 'remote.sqlite3'}", workers=1, DEMO_ENABLED=True)
    first = server.publish("run.42", "status", {"percent": 10})
    server.publish("run.42", "log", {"skip": True})
    command = shlex.split(code_block("realtime tail --url", "sh").replace("http://127.0.0.1:5000", server.url))
    assert command[0] == ".venv/bin/flask"
    tail = subprocess.Popen(
        [sys.executable, "-m", "flask", *command[1:]],
        cwd=ROOT, env=_env(f"sqlite:///{tmp_path / 'unused.sqlite3'}"), stdout=subprocess.PIPE, text=True,
    )
    saw = _lines_of(tail)
    try:
        wait_until(lambda: saw(f"-{first['id']}\n"), what="the replayed frame")
        live = server.publish("run.42", "run", {"status": "completed"})
        wait_until(lambda: saw(f"-{live['id']}\n"), what="the live frame")
        envelopes = [json.loads(line[len("data: "):]) for line in saw.seen if line.startswith("data: ")]
        assert envelopes == [first, live]
        assert [line for line in saw.seen if line.startswith("event: ")] == ["event: status\n", "event: run\n"]
    finally:
        tail.send_signal(signal.SIGINT)
        assert tail.wait(timeout=10) == 0
        tail.stdout.close()
    refused = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "realtime", "tail", "run.42", "--url", server.url,
         "--token", "forged"],
        cwd=ROOT, env=_env(f"sqlite:///{tmp_path / 'unused.sqlite3'}"), capture_output=True, text=True, timeout=30,
    )
    assert refused.returncode == 1 and "401 invalid_token" in refused.stderr, refused.stderr


def test_tail_with_url_prints_retry_and_keep_alives_as_the_local_tail_does(start_server, tmp_path):
    """Issue 19, item 7: the server's own frames, `retry:` and `: keep-alive` included, not only messages."""
    server = start_server(f"sqlite:///{tmp_path / 'remote.sqlite3'}", workers=1, DEMO_ENABLED=True)
    first = server.publish("run.43", "status", {"percent": 10})
    tail = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "app", "realtime", "tail", "run.43", "--url", server.url,
         "--topic", "status"],
        cwd=ROOT, env=_env(f"sqlite:///{tmp_path / 'unused.sqlite3'}"), stdout=subprocess.PIPE, text=True,
    )
    saw = _lines_of(tail)
    try:
        wait_until(lambda: saw(": keep-alive"), what="a keep-alive after a second of silence")  # the server's heartbeat: 1 s
    finally:
        tail.send_signal(signal.SIGINT)
        assert tail.wait(timeout=10) == 0
        tail.stdout.close()
    frames = "".join(saw.seen).split("\n\n")
    assert frames[0] == "retry: 200"  # the server's REALTIME_RETRY_MS, as it sent it
    cursor, event, data = frames[1].split("\n")
    assert cursor.startswith("id: ") and cursor.endswith(f"-{first['id']}") and event == "event: status"
    assert json.loads(data.removeprefix("data: ")) == first
    assert frames[2] == ": keep-alive"


def test_tail_help_says_what_topics_url_needs(tmp_path):
    """A server's token names its topics; there is none for all of them (issue 19, item 7)."""
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "realtime", "tail", "--help"],
        cwd=ROOT, env=_env(f"sqlite:///{tmp_path / 'unused.sqlite3'}"), capture_output=True, text=True, timeout=30,
    )
    option = " ".join(result.stdout.split("--topic TEXT", 1)[1].split("--last-event-id", 1)[0].split())
    assert "With --url: the topics of --token; without --token, name them" in option, option


def test_tail_with_url_says_what_is_wrong(tmp_path):
    env = _env(f"sqlite:///{tmp_path / 'unused.sqlite3'}")
    for args, code, said in (
        (["--url", "http://127.0.0.1:9"], 2, "name the topics"),
        (["--token", "t"], 2, "--token is for --url"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "app", "realtime", "tail", "run.1", *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == code and said in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_tail_with_url_needs_no_local_secret_key(start_server, tmp_path):
    """It only reads another server, whose own key signs the token it asks for (issue 19, item 7)."""
    server = start_server(f"sqlite:///{tmp_path / 'remote.sqlite3'}", workers=1, DEMO_ENABLED=True)
    first = server.publish("run.44", "status", {"percent": 10})
    env = _env(f"sqlite:///{tmp_path / 'unused.sqlite3'}")
    del env["SECRET_KEY"]
    tail = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "app", "realtime", "tail", "run.44", "--url", server.url,
         "--topic", "status"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
    )
    saw = _lines_of(tail)
    try:
        wait_until(lambda: saw(f"-{first['id']}\n"), what="the replayed frame")
    finally:
        tail.send_signal(signal.SIGINT)
        assert tail.wait(timeout=10) == 0
        tail.stdout.close()
