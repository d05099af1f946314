"""The workshop (issue 11): docs/workshop.md's commands and the spec lab at /workshop, checked.

The guide is machine-readable: each checked command block follows
`<!-- check: NAME -->` and is followed by `<!-- output -->` and the output it
shows; `<!-- dispatch: CASE -->` precedes the events a spec-lab case dispatches.
Every command runs here against one live gunicorn (one worker: the lab keeps its
state in memory, as under `make run`) started with docs/workshop/env.sh's
settings, on SQLite, in the guide's order, and its output must equal the
guide's once ids, cursors, tokens and times are masked. `browser` checks are
devtools snippets, run in Chromium. Every spec-lab case runs in Chromium too:
what the real EventSource dispatched must equal what demo/spec_cases.py states,
which is what the guide shows.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from playwright.sync_api import expect

from browser_support import ARTIFACTS, Console, pump_until
from conftest import ROOT, LiveServer, app_on, free_port
from demo.spec_cases import CASES, describe
from demo.workshop import LabLog, LabRequest
from json_errors import assert_json_error
from test_browser import browser  # noqa: F401 - the Chromium fixture

GUIDE = ROOT / "docs" / "workshop.md"
ENV_SH = ROOT / "docs" / "workshop" / "env.sh"
MAIN_PORT, SECOND_PORT = "5000", "5001"


# -- reading the guide -------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    language: str  # "sh": a shell script; "js": a devtools console snippet
    code: str
    expected: str
    options: frozenset[str]


_CHECK = re.compile(
    r"<!-- check: (?P<name>[\w.-]+)(?P<options>(?: [\w-]+)*) -->\s*```(?P<lang>\w+)\n(?P<code>.*?)```\s*"
    r"<!-- output -->\s*```\w*\n(?P<expected>.*?)```",
    re.S,
)
_DISPATCH = re.compile(r"<!-- dispatch: (?P<case>[\w-]+) -->\s*```\w*\n(?P<text>.*?)```", re.S)
_EXERCISE = re.compile(r"^## Exercise (\d+)\b.*?(?=^## |\Z)", re.S | re.M)


def guide_text() -> str:
    return GUIDE.read_text()


def guide_checks() -> list[Check]:
    return [
        Check(m["name"], m["lang"], m["code"], m["expected"], frozenset(m["options"].split()))
        for m in _CHECK.finditer(guide_text())
    ]


def guide_env() -> dict[str, str]:
    """The server settings of docs/workshop/env.sh: its `export FLASK_...=value` lines."""
    return dict(re.findall(r"^export (FLASK_\w+)=(\S+)", ENV_SH.read_text(), re.M))


_KEEP_ALIVES = re.compile(r"(?:: keep-alive\n\n)+")
_MASKS = [
    (re.compile(r"\b[0-9a-f]{8,32}-(\d+)\b"), r"<epoch>-\1"),  # a cursor: the message id stays
    (re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"), "<token>"),
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:[+-]\d\d:\d\d|Z)?"), "<time>"),
    (re.compile(r"\b[0-9a-f]{16}\b"), "<id>"),  # run and event ids
    (re.compile(r"\b(lab[0-9a-f]{4,})\b"), "<lab>"),
    (re.compile(r'("ms": ?)\d+'), r"\1<ms>"),
]


def normalized(output: str, options: frozenset[str]) -> str:
    """Output with what changes from run to run masked.

    Keep-alive comments come with time: a check about them (option `keep-alives`)
    sees at least one where the guide shows one; other checks ignore them.
    """
    output = _KEEP_ALIVES.sub(": keep-alive\n\n" if "keep-alives" in options else "", output)
    for pattern, replacement in _MASKS:
        output = pattern.sub(replacement, output)
    return output.rstrip("\n")


# -- the server the guide talks to --------------------------------------------------------------


@pytest.fixture(scope="module")
def workshop(tmp_path_factory) -> Iterator["Workshop"]:
    tmp = tmp_path_factory.mktemp("workshop")
    server = LiveServer(tmp / "gunicorn.log", f"sqlite:///{tmp / 'workshop.sqlite3'}", workers=1, env=guide_env())
    # LiveServer's quick test settings would change what the guide shows: use the defaults.
    for key in ("FLASK_REALTIME_HEARTBEAT_S", "FLASK_REALTIME_RETRY_MS", "FLASK_REALTIME_POLL_S"):
        if key not in guide_env():
            server.env.pop(key, None)
    logs_before = set((ROOT / "instance").glob("*.log"))
    server.start()
    try:
        yield Workshop(server, tmp)
    finally:
        server.stop()
        for log in set((ROOT / "instance").glob("*.log")) - logs_before:  # the guide's worker logs
            log.unlink()


class Workshop:
    """Runs the guide's commands as a learner would, with the test server's ports."""

    def __init__(self, server: LiveServer, workdir: Path) -> None:
        self.server = server
        self.workdir = workdir
        self.second_port = str(free_port())

    def localize(self, text: str) -> str:
        text = text.replace(f"localhost:{MAIN_PORT}", f"127.0.0.1:{self.server.port}")
        text = text.replace(f"localhost:{SECOND_PORT}", f"127.0.0.1:{self.second_port}")
        return text.replace(f"--port {SECOND_PORT}", f"--port {self.second_port}")

    def delocalize(self, text: str) -> str:
        text = text.replace(f"127.0.0.1:{self.server.port}", f"localhost:{MAIN_PORT}")
        return text.replace(f"127.0.0.1:{self.second_port}", f"localhost:{SECOND_PORT}")

    def run_shell(self, code: str) -> str:
        """`source docs/workshop/env.sh`, then the block, in a fresh bash; its stdout."""
        script = self.localize(ENV_SH.read_text()) + "\n" + self.localize(code)
        env = {**os.environ, **self.server.env, "PYTHONUNBUFFERED": "1"}
        env.pop("WEB_CONCURRENCY", None)
        process = subprocess.Popen(
            ["bash", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=120)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # anything the block left in the background
            except ProcessLookupError:
                pass
        with (self.workdir / "stderr.log").open("ab") as log:  # for a failing check's post-mortem
            log.write(stderr)
        return self.delocalize(stdout.decode())


# -- the guide ------------------------------------------------------------------------------------


def test_the_guide_has_every_part_the_issue_asks_for():
    exercises = _EXERCISE.findall(guide_text())
    bodies = [m.group(0) for m in _EXERCISE.finditer(guide_text())]
    assert len(exercises) >= 12 and exercises == [str(n) for n in range(1, len(exercises) + 1)]
    for body in bodies:
        title = body.splitlines()[0]
        for part in ("**You will learn**", "**Notice**", "**Spec**", "**Break it**", "WHATWG HTML"):
            assert part in body, f"{title}: no {part}"
        assert "<!-- check: " in body or "<!-- dispatch: " in body, f"{title}: nothing checked"
    names = [check.name for check in guide_checks()]
    assert len(names) == len(set(names)), "check names are unique"


def test_every_spec_lab_case_is_in_the_guide_as_the_case_states_it():
    shown = {m["case"]: m["text"].rstrip("\n") for m in _DISPATCH.finditer(guide_text())}
    assert set(shown) == set(CASES), "each case once"
    for name, text in shown.items():
        assert text == describe(CASES[name].dispatches), f"the guide's {name} differs from demo/spec_cases.py"


@pytest.fixture
def page(browser, workshop):  # noqa: F811
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


@pytest.mark.integration
@pytest.mark.parametrize("check", guide_checks(), ids=[c.name for c in guide_checks()])
def test_guide_step(workshop, check, request):
    """Each check in the guide's order: later ones see what earlier ones published."""
    if check.language == "sh":
        output = workshop.run_shell(check.code)
    else:
        output = run_devtools_snippet(request.getfixturevalue("page"), workshop, check)
    assert normalized(output, check.options) == normalized(check.expected, check.options)


@pytest.mark.integration
def test_the_lab_steps_of_the_guide_show_the_same_when_run_again(workshop):
    """Issue 19, item 6: a learner who runs exercise 3's lab block twice sees what the guide shows, twice."""
    [check] = [check for check in guide_checks() if check.name == "resume-lab"]
    for _ in range(2):
        assert normalized(workshop.run_shell(check.code), check.options) == normalized(check.expected, check.options)


def test_the_guide_says_where_format_event_comes_from_and_its_command_runs():
    [exercise] = [m.group(0) for m in _EXERCISE.finditer(guide_text()) if m.group(1) == "6"]
    assert "`realtime/sse.py`" in exercise
    [command] = re.findall(r"^\.venv/bin/python -c .*format_event.*$", exercise, re.M)
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "ValueError: SSE field 'id' must not contain CR or LF" in result.stderr, result.stderr


def run_devtools_snippet(page, workshop: Workshop, check: Check) -> str:
    """Paste the snippet into the console of the lab page; what it logged, once it logged all the guide shows."""
    logged: list[str] = []
    page.on("console", lambda message: message.type == "log" and logged.append(message.text))
    page.goto(workshop.server.url + "/workshop")
    page.evaluate(f"async () => {{\n{check.code}\n}}")
    lines = len(check.expected.rstrip("\n").split("\n"))
    pump_until(page, lambda: len(logged) >= lines, what=f"{lines} console lines")
    return "\n".join(logged)


# -- the spec lab in Chromium ------------------------------------------------------------------------


# The console errors a failing EventSource makes Chromium print, on purpose.
EXPECTED_CONSOLE = re.compile(r"status of 503|MIME type \(\"text/plain\"\)")


@pytest.mark.integration
@pytest.mark.browser
def test_every_spec_lab_case_dispatches_in_chromium_what_it_states(workshop, page):
    console = Console(page)
    page.goto(workshop.server.url + "/workshop")
    run = page.get_by_role("button", name="Run in this browser")
    result = page.locator("#result")
    for name, case in CASES.items():
        page.locator(f'.lab-nav-link[data-case="{name}"]').click()
        expect(page.locator("#case-title")).to_have_text(case.title)
        # What the page states is the case's data, in the guide's words.
        assert page.locator("#expected-list").text_content() == describe(case.dispatches)
        run.click()
        expect(result).to_have_attribute("data-state", "done")
        last = page.evaluate("() => window.specLab.last")
        assert last["name"] == name
        assert describe(last["dispatched"]) == describe(case.dispatches), name
        assert [r["last_event_id"] for r in last["requests"]] == list(case.requests), name
        assert [r["status"] for r in last["requests"]] == [case.answer(n).status for n in range(1, len(case.requests) + 1)]
        expect(result).to_have_attribute("data-match", "true")
        expect(page.locator("#verdict")).to_contain_text("exactly what the spec says")
        expect(page.locator("#raw .raw-response")).to_have_count(len(case.answers) if case.reconnects else 1)
        if name == "retry":  # the browser waited at least each retry: before it reconnected
            gaps = [later["ms"] - earlier["ms"] for earlier, later in zip(last["requests"], last["requests"][1:])]
            assert gaps[0] >= 1500 and gaps[1] >= 200, gaps
    console.assert_clean(allowed=EXPECTED_CONSOLE)


@pytest.mark.integration
@pytest.mark.browser
def test_the_raw_bytes_show_every_invisible_character(workshop, page):
    page.goto(workshop.server.url + "/workshop#bom")
    page.get_by_role("button", name="Run in this browser").click()
    expect(page.locator("#result")).to_have_attribute("data-state", "done")
    expect(page.locator("#raw .ctl", has_text="BOM")).to_have_count(2)
    expect(page.locator("#raw .raw-head")).to_have_text("request 1 → 200 text/event-stream; charset=utf-8 · 33 bytes")

    page.goto(workshop.server.url + "/workshop#dropped")
    page.get_by_role("button", name="Run in this browser").click()
    expect(page.locator("#result")).to_have_attribute("data-state", "done")
    assert page.locator("#raw .bytes").nth(1).text_content() == "data: you sent Last-Event-ID: 42\\n\n\\n\n"
    expect(page.locator("#requests tr td:nth-child(3)")).to_have_text(["(none)", "42", "42"])


@pytest.mark.integration
@pytest.mark.browser
def test_the_lab_and_the_demo_link_to_each_other_and_look_right(workshop, page):
    page.goto(workshop.server.url + "/?workshop=1")
    page.get_by_role("link", name=re.compile("Spec lab")).click()
    expect(page).to_have_url(re.compile(r"/workshop$"))
    page.get_by_role("link", name="Demo & raw stream").click()
    expect(page.locator("#workshop")).to_be_visible()  # back on the demo, its Workshop panel open

    page.goto(workshop.server.url + "/workshop#dropped")
    page.get_by_role("button", name="Run in this browser").click()
    expect(page.locator("#result")).to_have_attribute("data-state", "done")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "spec-lab.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390, "nothing wider than a phone"
    page.screenshot(path=str(ARTIFACTS / "spec-lab-phone.png"), full_page=True)


# -- the routes, in process ---------------------------------------------------------------------------


def test_the_lab_routes_answer_json_errors(client):
    assert_json_error(client.get("/workshop/cases/nope"), 404, "unknown_case")
    assert_json_error(client.get("/workshop/cases/lf?lab=a%20b"), 400, "invalid_lab")
    assert_json_error(client.get("/workshop/cases/lf?attempt=0"), 400, "invalid_attempt")
    assert_json_error(client.get("/workshop/cases/lf/requests"), 400, "invalid_lab")
    assert_json_error(client.get("/workshop/cases/nope/requests?lab=a"), 404, "unknown_case")
    response = client.get("/workshop/cases")
    assert [c["name"] for c in response.get_json()["cases"]] == list(CASES)


def test_a_lab_answers_its_script_then_204_and_logs_each_request(client):
    for sent in (None, "42", "42", "42"):
        client.get("/workshop/cases/dropped?lab=one", headers={"Last-Event-ID": sent} if sent else {})
    found = client.get("/workshop/cases/dropped/requests?lab=one").get_json()["requests"]
    assert [(r["attempt"], r["last_event_id"], r["status"]) for r in found] == [
        (1, None, 200), (2, "42", 200), (3, "42", 204), (4, "42", 204),
    ]
    assert client.get("/workshop/cases/dropped/requests?lab=other").get_json() == {"requests": []}
    echo = client.get("/workshop/cases/dropped?attempt=2", headers={"Last-Event-ID": "7"})
    assert echo.data == b"data: you sent Last-Event-ID: 7\n\n"
    assert echo.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    stop = client.get("/workshop/cases/no-content")
    assert stop.status_code == 204 and "Content-Type" not in stop.headers


def test_the_lab_log_is_bounded():
    log = LabLog(max_labs=3, max_requests=2)
    for lab in ("a", "b", "c", "d"):
        for _ in range(3):
            attempt, _started = log.next_attempt(lab, "lf")
            log.record(lab, "lf", LabRequest(attempt, 0, None, 200))
    assert log.requests("a", "lf") == []  # the oldest lab went
    assert [r.attempt for r in log.requests("d", "lf")] == [1, 2]


def test_the_lab_goes_with_the_demo(tmp_path):
    for app in app_on(f"sqlite:///{tmp_path / 'off.sqlite3'}", DEMO_ENABLED=False):
        client = app.test_client()
        assert_json_error(client.get("/workshop"), 404, "not_found")
        assert_json_error(client.get("/workshop/cases/lf"), 404, "not_found")


def test_the_lab_lists_the_spec_sections_in_order_in_plain_words(client):
    page = client.get("/workshop").get_data(as_text=True)
    sections = re.findall(r'<h3 class="lab-nav-section">§(.*?)</h3>', page)
    assert [s.split()[0] for s in sections] == ["9.2.3", "9.2.4", "9.2.5", "9.2.6"]
    assert not any("`" in text for text in sections), "no Markdown on the page"


def test_a_case_shows_no_outcome_above_the_prediction():
    """The rule is shown above "Your prediction"; what happens only in the collapsed section (`notice`)."""
    assert "ignored" not in CASES["bom"].rule and "ignored" in CASES["bom"].notice
    assert "stop" not in CASES["dropped"].rule and "stopped" in CASES["dropped"].notice


def test_the_page_carries_the_cases_and_no_secret(app, client):
    response = client.get("/workshop")
    assert response.status_code == 200
    assert app.config["SECRET_KEY"].encode() not in response.data
    embedded = re.search(rb'<script type="application/json" id="spec-cases">(.*?)</script>', response.data, re.S)
    assert json.loads(embedded.group(1)) == [case.to_json() for case in CASES.values()]
    assert b'href="/workshop"' in client.get("/").data


def test_workshop_scripts_need_nothing_but_the_standard_library():
    for script in (ROOT / "docs" / "workshop").glob("*.py"):
        imports = set(re.findall(r"^(?:from|import) ([\w.]+)", script.read_text(), re.M))
        assert all(name.split(".")[0] in STDLIB for name in imports), (script.name, imports)


STDLIB = {"__future__", "argparse", "http", "json", "os", "random", "sys", "threading", "time", "typing",
          "urllib", "uuid"}


def test_guide_server_settings_are_real_config_keys(app):
    for name in guide_env():
        assert name.startswith("FLASK_") and name.removeprefix("FLASK_") in app.config, name
