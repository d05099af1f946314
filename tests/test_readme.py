"""README.md: its code blocks run as printed, and it documents every configuration key the code reads."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from conftest import ROOT, FakeClock, app_on, wait_until
from jobs.extension import DEFAULTS as JOBS_DEFAULTS
from readme import code_block, code_blocks
from realtime.extension import DEFAULTS as REALTIME_DEFAULTS
from sseclient import Frame, parse_sse
from test_demo import make_run  # noqa: F401 - the fixture: the Makefile's `run` command on a free port

README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("key", sorted({**REALTIME_DEFAULTS, **JOBS_DEFAULTS}))
def test_every_configuration_key_is_in_the_readme(key):
    assert f"`{key}`" in README, f"README.md does not document {key}"


# Each python and sh block of README.md, by a string only it has: the test module that runs it as
# printed, or why nothing does.
RUN_BY = {
    ("sh", "make test"): "not run: `make run` is test_demo.py's make_run fixture; `make test` is the suite itself",
    ("sh", "# 1. A token"): "test_readme.py",
    ("python", "realtime.create_token("): "test_readme.py",
    ("python", "session=session)"): "test_readme.py",
    ("python", "@jobs.function(id=\"count-rows\""): "test_readme.py",
    ("python", "ctx.text_stream(ctx.channel"): "test_readme.py",
    ("python", "from openai import OpenAI"): "test_readme.py",
    ("sh", "api/events"): "test_readme.py",
    ("sh", "jobs worker"): "test_readme.py",
    ("python", "token_from(BASE"): "test_client.py",
    ("sh", "realtime tail --url"): "test_cli.py",
    ("python", "Publisher.from_env()"): "test_publisher.py",
    ("python", "base=RealtimeTask"): "test_celery.py",
    ("python", "generate_report.delay(3)"): "test_celery.py",
    ("python", "@realtime_job"): "test_rq.py",
    ("python", 'Queue("reports"'): "test_rq.py",
    ("python", "RealtimeMiddleware()"): "test_dramatiq.py",
    ("python", "generate_report.send(3)"): "test_dramatiq.py",
}


def test_every_python_and_sh_block_is_run_by_a_test():
    blocks = [(language, body) for language, body in code_blocks() if language in ("python", "sh")]
    for language, body in blocks:
        named = [text for lang, text in RUN_BY if lang == language and text in body]
        assert len(named) == 1, f"a {language} block of README.md run by no test, or named twice in RUN_BY:\n{body}"
    for (language, text), module in RUN_BY.items():
        code_block(text, language)  # one block each
        if module.endswith(".py"):
            assert "code_block(" in (ROOT / "tests" / module).read_text()


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


# -- "Jobs": a fragment of create_app() ------------------------------------------------------------


@pytest.fixture
def jobs_app(database_url):
    """A TESTING app: runs execute when sent (eager), and a step.sleep passes when the clock moves."""
    yield from app_on(database_url)


def test_the_jobs_block_as_create_app_registers_it(jobs_app):
    jobs = jobs_app.extensions["jobs"]
    clock = jobs.runs.now = FakeClock()
    exec(code_block('@jobs.function(id="count-rows"'), {"jobs": jobs})  # in create_app(), where `jobs` is the extension
    [run] = jobs.send("rows.requested", {"days": 30})["runs"]
    assert run["function"] == "count-rows"
    assert jobs.run(run["id"]).status == "running", "asleep: the cool-down handed the run back"
    clock.advance(5)
    jobs.drain()
    finished = jobs.run(run["id"])
    assert (finished.status, finished.output, finished.attempt) == ("completed", {"rows": 30}, 1)
    published = jobs_app.extensions["realtime"].store.read_after(f"run.{run['id']}", ["status"], 0, 100)
    assert [m.data for m in published] == [{"stage": "fetching", "percent": 10}], "once, though the run resumed"


def test_the_llm_block_streams_an_answer_that_a_reload_gets_whole(jobs_app):
    jobs, realtime = jobs_app.extensions["jobs"], jobs_app.extensions["realtime"]
    exec(code_block("ctx.text_stream(ctx.channel"), {"jobs": jobs})
    [run] = jobs.send("question.asked", {"prompt": "why is the sky blue?"})["runs"]
    assert jobs.run(run["id"]).status == "completed"
    [answer] = realtime.store.read_after(f"run.{run['id']}", ["answer"], 0, 100)  # a reload's replay
    assert answer.data == {
        "text_stream": f"{run['id']}:generate/text:1", "seq": answer.data["seq"], "status": "completed",
        "text": "You asked: why is the sky blue?. Here is a long answer, word by word. ",
    }


def test_the_openai_block_yields_the_servers_pieces(monkeypatch):
    pytest.importorskip("openai", reason="requirements-openai.txt is not installed (make test installs it)")
    from openai_server import FakeOpenAI

    with FakeOpenAI(["Blue ", "light ", "scatters."]) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        namespace: dict = {}
        exec(code_block("from openai import OpenAI"), namespace)
        assert "".join(namespace["llm_answer"]("why?")) == "Blue light scatters."


# -- the `sh` blocks, against `make run`'s server ----------------------------------------------------


def make_run_exports() -> dict[str, str]:
    """What the Makefile's `run` target exports to the server (`run: export KEY ?= value`)."""
    return dict(re.findall(r"^run: export (\w+) \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M))


@dataclass(frozen=True)
class Demo:
    url: str
    flask_env: dict[str, str]  # what the `flask` commands beside it need: its database, its SECRET_KEY


@pytest.fixture
def demo(monkeypatch, request, tmp_path) -> Demo:
    """`make run`'s server on a free port, with its own SQLite file."""
    for key, value in make_run_exports().items():  # as make does, the environment not having them
        monkeypatch.setenv(key, value)
    url = request.getfixturevalue("make_run")
    database = tmp_path / "run.sqlite3"  # where the make_run fixture puts it
    assert database.exists()
    return Demo(url, {"DATABASE_URL": f"sqlite:///{database}", "SECRET_KEY": "make-run-secret"})


def commands(block: str) -> list[str]:
    """A block's commands, each with its continuation lines; comment and blank lines dropped."""
    found: list[str] = []
    for line in block.splitlines():
        if found and found[-1].endswith("\\"):
            found[-1] += "\n" + line
        elif line.strip() and not line.lstrip().startswith("#"):
            found.append(line)
    return found


def flask(command: str) -> str:
    """`.venv/bin/flask ...` with this test's interpreter (as tests/test_cli.py runs it)."""
    words = shlex.split(command, comments=True)
    assert words[0] == ".venv/bin/flask", command
    return shlex.join([sys.executable, "-m", "flask", *words[1:]])


class Terminal:
    """One command of a block in a fresh bash, as in a terminal of its own, in the project's folder,
    with `localhost:5000` moved to the test server's address."""

    def __init__(self, demo: Demo, command: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        command = command.replace("localhost:5000", demo.url.removeprefix("http://"))
        self.process = subprocess.Popen(["bash", "-c", command], cwd=cwd, env={**os.environ, **(env or {})},
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

    def json(self) -> dict:
        return json.loads(self.output())

    def _ended(self) -> int:
        returncode = self.process.wait(timeout=30)
        self._reader.join(timeout=10)
        return returncode


@pytest.mark.integration
def test_the_curl_tour_runs_start_to_finish_against_make_run(demo):
    start, get_token, watch, publish, resume, tail = commands(code_block("# 1. A token", "sh"))
    assert start.startswith("make run ")  # the `demo` fixture: the Makefile's command and exports
    token = Terminal(demo, get_token + '\nprintf %s "$TOKEN"').output()

    stream = Terminal(demo, watch, {"TOKEN": token})
    wait_until(lambda: "retry: 2000" in stream.lines, what="the stream's first frame")
    first = Terminal(demo, publish).json()
    assert (first["channel"], first["topic"], first["data"]) == ("run.42", "status", {"stage": "fetching", "percent": 10})
    [printed] = stream.wait_for_frames(1)
    assert printed.envelope == first and printed.event == "status"

    stream.interrupt()
    second = Terminal(demo, publish).json()
    placeholder = "<the last id step 2 printed>"
    assert placeholder in resume
    resumed = Terminal(demo, resume.replace(placeholder, printed.id), {"TOKEN": token})
    try:
        assert [frame.envelope for frame in resumed.wait_for_frames(1)] == [second], "only what came after"
    finally:
        resumed.interrupt()

    raw = Terminal(demo, flask(tail), demo.flask_env)
    try:
        assert [frame.envelope for frame in raw.wait_for_frames(2)] == [first, second]
    finally:
        raw.interrupt()


@pytest.mark.integration
def test_the_report_job_from_the_command_line(demo, tmp_path):
    start, send, tail, status, cancel, download = commands(code_block("api/events", "sh"))
    assert start.startswith("make run ")
    [run] = Terminal(demo, send).json()["runs"]
    assert run["function"] == "generate-report"

    def with_run_id(command: str, run_id: str = run["id"]) -> str:
        assert "<run id>" in command
        return command.replace("<run id>", run_id)

    progress = Terminal(demo, flask(with_run_id(tail)), demo.flask_env)
    try:
        wait_until(lambda: any(frame.event == "run" and frame.envelope["data"]["status"] == "completed"
                               for frame in progress.frames()), what=f"the run's end: {progress.lines}")
    finally:
        progress.interrupt()
    last_status = [frame.envelope["data"] for frame in progress.frames() if frame.event == "status"][-1]
    assert last_status["stage"] == "done"
    detail = Terminal(demo, with_run_id(status)).json()
    assert detail["status"] == "completed" and [step["id"] for step in detail["steps"] if ":" not in step["id"]] == [
        "fetch", "process", "generate"]
    Terminal(demo, with_run_id(download), cwd=tmp_path).output()
    assert (tmp_path / "report.pdf").read_bytes().startswith(b"%PDF-")

    [other] = Terminal(demo, send).json()["runs"]
    assert Terminal(demo, with_run_id(cancel, other["id"])).json()["id"] == other["id"]
    wait_until(lambda: Terminal(demo, with_run_id(status, other["id"])).json()["status"] == "cancelled",
               interval=0.2, what="the second run cancelled")


def test_the_jobs_worker_command_starts_and_stops_on_sigterm(tmp_path):
    [worker] = commands(code_block("jobs worker", "sh"))
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'worker.sqlite3'}", "SECRET_KEY": "worker-secret"}
    # "A worker runs the demo's report only with the demo on": the banner lists its functions.
    for demo_enabled, functions in (("false", ""), ("true", "generate-report, answer-question")):
        process = subprocess.Popen(shlex.split(flask(worker)), cwd=ROOT, env={**env, "FLASK_DEMO_ENABLED": demo_enabled},
                                   stderr=subprocess.PIPE, text=True)
        with process.stderr:
            banner = next((line for line in process.stderr if line.startswith("jobs worker ")), "no banner")
            assert re.fullmatch(rf"jobs worker \S+: 4 threads, functions: {functions}\n", banner), banner
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
            assert "SIGTERM, finishing current steps" in process.stderr.read()
