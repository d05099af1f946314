"""README.md: its code blocks run as printed, and it documents every configuration key the code reads.

Each `python` and `sh` block runs here or in the test named in `ELSEWHERE`; a block
that cannot run as printed says why there.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from conftest import ROOT, FakeClock, app_on, wait_until
from jobs.extension import DEFAULTS as JOBS_DEFAULTS
from readme import code_block
from realtime.extension import DEFAULTS as REALTIME_DEFAULTS
from sseclient import Frame, parse_sse
from test_demo import make_run  # noqa: F401 - the fixture: the Makefile's `run` command on a free port

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize("key", sorted({**REALTIME_DEFAULTS, **JOBS_DEFAULTS}))
def test_every_configuration_key_is_in_the_readme(key):
    assert f"`{key}`" in README, f"README.md does not document {key}"


# -- "The Python API": scripts in the project's folder ----------------------------------------------


def run_script(code: str, database_url: str) -> None:
    """`code` as a script run from the project's folder, with the server's two settings."""
    env = {**os.environ, "DATABASE_URL": database_url, "SECRET_KEY": "readme-secret"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def rows(database_url: str, query: str) -> list[tuple]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(query))]
    finally:
        engine.dispose()


# Run in the snippet's process, after it: the grant reads what was published, and the policy
# answers by the Flask session's user.
API_CHECKS = """
client = app.test_client()
history = client.get("/api/realtime/messages", query_string={"token": grant.token}).get_json()
assert [(m["topic"], m["data"]) for m in history["messages"]] == [("status", {"stage": "fetching", "percent": 10})]
assert client.post("/api/realtime/token", json={"channel": "user.7", "topics": ["status"]}).status_code == 403
with client.session_transaction() as signed_in:
    signed_in["user_id"] = 7
assert client.post("/api/realtime/token", json={"channel": "user.7", "topics": ["status"]}).status_code == 200
assert client.post("/api/realtime/token", json={"channel": "user.8", "topics": ["status"]}).status_code == 403
"""


def test_the_python_api_block_publishes_grants_and_authorizes(database_url):
    run_script(code_block("realtime.create_token(") + API_CHECKS, database_url)
    assert rows(database_url, "SELECT channel, topic, data FROM realtime_messages") == [
        ("run.42", "status", '{"stage": "fetching", "percent": 10}')
    ]


def test_the_outbox_block_stores_the_order_and_its_message_with_its_id(database_url):
    run_script(code_block("session=session)"), database_url)
    [(order_id, item)] = rows(database_url, "SELECT id, item FROM orders")
    assert item == "a book"
    assert rows(database_url, "SELECT channel, topic, data FROM realtime_messages") == [
        ("orders", "created", f'{{"id": {order_id}}}')
    ]



@pytest.fixture
def jobs_app(database_url):
    """A TESTING app: runs execute when sent (eager), and a step.sleep passes when the clock moves."""
    yield from app_on(database_url)


def test_the_jobs_block_as_create_app_registers_it(jobs_app):
    jobs = jobs_app.extensions["jobs"]
    clock = jobs.runs.now = FakeClock()
    exec(code_block("@jobs.function("), {"jobs": jobs})  # in create_app(), where `jobs` is the extension
    [run] = jobs.send("rows.requested", {"days": 30})["runs"]
    assert run["function"] == "count-rows"
    assert jobs.run(run["id"]).status == "running", "asleep: the cool-down handed the run back"
    clock.advance(5)
    jobs.drain()
    finished = jobs.run(run["id"])
    assert (finished.status, finished.output, finished.attempt) == ("completed", {"rows": 30}, 1)
    published = jobs_app.extensions["realtime"].store.read_after(f"run.{run['id']}", ["status"], 0, 100)
    assert [m.data for m in published] == [{"stage": "fetching", "percent": 10}], "once, though the run resumed"


# -- the `sh` blocks, against `make run`'s server ----------------------------------------------------


def make_run_exports() -> dict[str, str]:
    """What the Makefile's `run` target exports to the server (`run: export KEY ?= value`)."""
    return dict(re.findall(r"^run: export (\w+) \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M))


@pytest.fixture
def demo(monkeypatch, request) -> str:
    """`make run`'s server, on a free port and its own SQLite file: its URL."""
    for key, value in make_run_exports().items():  # as make does, the environment not having them
        monkeypatch.setenv(key, value)
    return request.getfixturevalue("make_run")


def commands(block: str) -> list[str]:
    """A block's commands, each with its continuation lines; comment and blank lines dropped."""
    found: list[str] = []
    for line in block.splitlines():
        if found and found[-1].endswith("\\"):
            found[-1] += "\n" + line
        elif line.strip() and not line.lstrip().startswith("#"):
            found.append(line)
    return found


class Terminal:
    """One command of a block in a fresh bash, as in a terminal of its own, in the project's folder,
    with `localhost:5000` moved to the test server's address."""

    def __init__(self, url: str, command: str, env: dict[str, str]) -> None:
        command = command.replace("localhost:5000", url.removeprefix("http://"))
        self.process = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env={**os.environ, **env},
                                        stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with self.process.stdout:
            for line in self.process.stdout:
                self.lines.append(line.removesuffix("\n"))

    def frames(self) -> list[Frame]:
        """The SSE frames printed so far that carry a message."""
        return [item for item in parse_sse(list(self.lines)) if isinstance(item, Frame) and item.data]

    def wait_for_frames(self, count: int) -> list[Frame]:
        return wait_until(lambda: len(self.frames()) >= count and self.frames(), what=f"{count} frames: {self.lines}")

    def interrupt(self) -> None:
        """Ctrl-C."""
        os.killpg(self.process.pid, signal.SIGINT)
        self._ended()

    def output(self) -> str:
        """All it printed, once it has ended by itself."""
        assert self._ended() == 0
        return "\n".join(self.lines)

    def _ended(self) -> int:
        returncode = self.process.wait(timeout=30)
        self._reader.join(timeout=10)
        return returncode


@pytest.mark.integration
def test_the_curl_tour_runs_start_to_finish_against_make_run(demo, tmp_path):
    start, get_token, watch, publish, resume, tail = commands(code_block("# 1. A token", "sh"))
    assert start.startswith("make run ")  # the `demo` fixture: the Makefile's command and exports
    token = Terminal(demo, get_token + '\nprintf %s "$TOKEN"', {}).output()

    stream = Terminal(demo, watch, {"TOKEN": token})
    wait_until(lambda: "retry: 2000" in stream.lines, what="the stream's first frame")
    first = json.loads(Terminal(demo, publish, {}).output())
    assert (first["channel"], first["topic"], first["data"]) == ("run.42", "status", {"stage": "fetching", "percent": 10})
    [printed] = stream.wait_for_frames(1)
    assert printed.envelope == first and printed.event == "status"

    stream.interrupt()
    second = json.loads(Terminal(demo, publish, {}).output())
    placeholder = "<the last id step 2 printed>"
    assert placeholder in resume
    resumed = Terminal(demo, resume.replace(placeholder, printed.id), {"TOKEN": token})
    try:
        assert [frame.envelope for frame in resumed.wait_for_frames(1)] == [second], "only what came after"
    finally:
        resumed.interrupt()

    words = shlex.split(tail, comments=True)
    assert words[:2] == [".venv/bin/flask", "--app"]
    raw = Terminal(demo, shlex.join([sys.executable, "-m", "flask", *words[1:]]),
                   {"DATABASE_URL": f"sqlite:///{tmp_path / 'run.sqlite3'}", "SECRET_KEY": "make-run-secret"})
    try:
        assert [frame.envelope for frame in raw.wait_for_frames(2)] == [first, second]
    finally:
        raw.interrupt()
