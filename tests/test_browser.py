"""The demo page and static/realtime.js in a real browser (issue 4).

Debian's chromium, driven by Playwright for Python against a live gunicorn
(`start_server`). Most tests play the report job themselves: they publish what
it publishes on channel `run.<id>` through the publish API, so they control
exactly when each message exists relative to the browser's connection. One
test runs the real job end to end and downloads its PDF.

Screenshots land in test-artifacts/ (gitignored). The helpers the tests drive the
page with (FakeReport, Console, HeldReconnects) are in tests/browser_support.py.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from browser_support import (
    SUBSCRIBE_URL,
    Console,
    FakeReport,
    HeldReconnects,
    card_of,
    pump_until,
    screenshot,
    shown_log_ids,
    wait_for_token_expiry,
)
from conftest import ROOT, LiveServer, skip_or_fail

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        skip_or_fail(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    expect.set_options(timeout=15_000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


@pytest.fixture
def console(page) -> Console:
    return Console(page)


@pytest.fixture
def server(start_server, tmp_path) -> LiveServer:
    return start_server(f"sqlite:///{tmp_path / 'demo.sqlite3'}", DEMO_ENABLED=True)


# -- the real job ---------------------------------------------------------------------------------


def test_reports_run_to_completion_side_by_side_and_serve_their_pdf(start_server, tmp_path, page, console):
    # Needs the jobs package (issue 3). Short steps keep the test quick, long enough to watch.
    server = start_server(f"sqlite:///{tmp_path / 'demo.sqlite3'}", DEMO_ENABLED=True, DEMO_REPORT_STEP_S=0.5)
    page.goto(server.url + "/")
    generate = page.get_by_role("button", name="Generate report")
    generate.click()
    expect(page.locator(".report")).to_have_count(1)
    generate.click()
    expect(page.locator(".report")).to_have_count(2)

    for card in page.locator(".report").all():
        expect(card).to_have_attribute("data-run-status", "completed", timeout=60_000)
        expect(card.locator("progress")).to_have_js_property("value", 100)
        expect(card.locator(".stage")).to_contain_text("Done")
        expect(card.locator(".connection-label")).to_have_text("Finished")
        link = card.get_by_role("link", name="Download PDF")
        expect(link).to_be_visible()
        response = page.request.get(server.url + link.get_attribute("href"))
        assert response.status == 200
        assert response.headers["content-type"] == "application/pdf"
        assert response.body().startswith(b"%PDF")

    run_ids = page.locator(".report").evaluate_all("cards => cards.map(c => c.dataset.runId)")
    assert sorted(re.findall(r"run=([^&]+)", page.url)) == sorted(run_ids)
    screenshot(page, "report-completed", full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    screenshot(page, "report-completed-phone", full_page=True)
    console.assert_clean()


def test_a_report_queued_with_no_job_worker_says_how_to_start_one(start_server, tmp_path, page, console):
    """Issue 19, item 5: the workshop's settings (JOBS_EMBEDDED off) and no `flask jobs worker`."""
    server = start_server(f"sqlite:///{tmp_path / 'demo.sqlite3'}", DEMO_ENABLED=True, JOBS_EMBEDDED=False,
                          DEMO_REPORT_STEP_S=0)
    page.clock.install()  # the page asks after 3 s of "Queued": the test moves its clock instead
    page.goto(server.url + "/")
    page.get_by_role("button", name="Generate report").click()
    card = page.locator(".report")
    hint = card.locator(".no-worker")
    expect(card).to_have_attribute("data-run-status", "queued")
    expect(hint).to_be_hidden()
    page.clock.fast_forward(3000)
    expect(hint).to_have_text("No job worker is running: start one with flask --app app jobs worker.")
    screenshot(page, "report-no-worker")

    log = open(tmp_path / "worker.log", "ab")
    worker = subprocess.Popen([sys.executable, "-m", "flask", "--app", "app", "jobs", "worker"], cwd=ROOT,
                              env=server.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        expect(card).to_have_attribute("data-run-status", "completed", timeout=60_000)
        expect(hint).to_be_hidden()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=20)
        log.close()
    console.assert_clean()


# -- resuming -----------------------------------------------------------------------------------


def test_dropping_the_connection_in_the_workshop_loses_no_log_line(server, page, console):
    report = FakeReport(server)
    report.run("running")
    report.status("fetching", 10)
    for n in range(1, 6):
        report.log(f"line {n}")

    page.goto(f"{server.url}/?run={report.run_id}&workshop=1")
    card = card_of(page, report.run_id)
    expect(card.locator(".log li")).to_have_count(5)
    expect(card).to_have_attribute("data-connection", "open")
    frames = page.locator("#frames")
    expect(frames.locator(".line-retry")).to_have_count(1)
    # The page's one stream carries every card's channel: each data line is labelled with its run.
    expect(frames.locator(f'.line-data[data-channel="{report.run_id[:8]}"]')).to_have_count(5 + 2)
    cursor = card.locator(".cursor-value").inner_text()

    held = HeldReconnects(page)
    page.get_by_role("button", name="Drop connection").click()
    expect(card).to_have_attribute("data-connection", "connecting")
    held.wait("the page's reconnect request")
    for n in range(6, 16):  # published while the page is disconnected
        report.log(f"line {n}")
    held.release()
    for n in range(16, 21):
        report.log(f"line {n}")

    expect(card.locator(".log li")).to_have_count(20)
    assert shown_log_ids(card) == report.stored_log_ids()
    assert [t.strip() for t in card.locator(".log-message").all_inner_texts()] == [f"line {n}" for n in range(1, 21)]
    assert f"last_event_id={cursor}" in held.urls[0]
    expect(frames.locator(".line-retry")).to_have_count(2)  # a second stream, from the cursor
    expect(frames.locator(".chunk-note", has_text="resuming after")).to_have_count(1)
    expect(page.locator("#streams .last-event-id")).to_have_text(card.locator(".cursor-value").inner_text())
    screenshot(page, "workshop", full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    screenshot(page, "workshop-phone", full_page=True)
    console.assert_clean()


def test_eventsource_resumes_with_last_event_id_when_the_server_restarts(start_server, tmp_path, page, console):
    # A long `retry:` leaves time to publish while the browser waits to reconnect.
    server = start_server(f"sqlite:///{tmp_path / 'demo.sqlite3'}", DEMO_ENABLED=True, REALTIME_RETRY_MS=1500)
    report = FakeReport(server)
    report.run("running")
    for n in range(1, 4):
        report.log(f"line {n}")
    page.goto(f"{server.url}/?run={report.run_id}")
    card = card_of(page, report.run_id)
    expect(card.locator(".log li")).to_have_count(3)
    expect(card).to_have_attribute("data-connection", "open")
    sent_cursors: list[str | None] = []
    page.on(
        "request",
        lambda r: SUBSCRIBE_URL.search(r.url) and sent_cursors.append(r.all_headers().get("last-event-id")),
    )

    # A graceful reload (SIGHUP): gunicorn replaces its workers, which end their
    # streams; the browser's EventSource reconnects by itself with Last-Event-ID.
    server.signal(signal.SIGHUP)
    expect(card).to_have_attribute("data-connection", "connecting")
    for n in range(4, 10):
        report.log(f"line {n}")

    expect(card.locator(".log li")).to_have_count(9)
    assert shown_log_ids(card) == report.stored_log_ids()
    expect(card).to_have_attribute("data-connection", "open")
    assert sent_cursors and sent_cursors[0] and sent_cursors[0].endswith(f"-{shown_log_ids(card)[2]}")
    console.assert_clean()


def test_reloading_mid_run_replays_the_whole_history(server, page, console):
    report, other = FakeReport(server), FakeReport(server)
    report.run("running")
    report.status("fetching", 10)
    for n in range(1, 4):
        report.log(f"line {n}")
    other.run("queued")

    page.goto(f"{server.url}/?run={report.run_id}&run={other.run_id}")
    card = card_of(page, report.run_id)
    expect(card.locator(".log li")).to_have_count(3)
    expect(card_of(page, other.run_id).locator(".run-status")).to_have_text("Queued")

    report.status("processing", 45)
    for n in range(4, 7):
        report.log(f"line {n}")
    expect(card.locator(".log li")).to_have_count(6)
    page.reload()

    card = card_of(page, report.run_id)
    expect(card.locator(".log li")).to_have_count(6)
    assert shown_log_ids(card) == report.stored_log_ids()
    expect(card.locator("progress")).to_have_js_property("value", 45)
    expect(card.locator(".stage")).to_have_text("Processing · 45%")
    expect(card.locator(".run-status")).to_have_text("Running")
    expect(page.locator(".report")).to_have_count(2)
    # Newest on top, as when they were started.
    assert page.locator(".report").evaluate_all("cs => cs.map(c => c.dataset.runId)") == [other.run_id, report.run_id]

    report.status("generating", 70)
    report.log("Rendering the PDF")
    report.status("done", 100, url=f"/reports/{report.run_id}")
    report.run("completed", output={"url": f"/reports/{report.run_id}"})
    expect(card).to_have_attribute("data-run-status", "completed")
    expect(card.locator(".connection-label")).to_have_text("Finished")
    expect(card.get_by_role("link", name="Download PDF")).to_have_attribute("href", f"/reports/{report.run_id}")
    screenshot(page, "reports", full_page=True)
    page.emulate_media(color_scheme="dark")
    screenshot(page, "reports-dark", full_page=True)
    page.emulate_media(color_scheme="light")
    page.set_viewport_size({"width": 390, "height": 844})
    screenshot(page, "reports-phone", full_page=True)
    console.assert_clean()


# -- tokens -------------------------------------------------------------------------------------


def test_the_page_refreshes_an_expired_token_transparently(start_server, tmp_path, page, console):
    server = start_server(f"sqlite:///{tmp_path / 'demo.sqlite3'}", DEMO_ENABLED=True, REALTIME_TOKEN_TTL_S=2)
    report = FakeReport(server)
    report.run("running")
    report.log("line 1")
    token_requests: list[str] = []
    # The page's one stream asks for its tokens here (`/demo/token` only says what each run is).
    page.on("request", lambda r: "/api/realtime/token" in r.url and token_requests.append(r.url))

    page.goto(f"{server.url}/?run={report.run_id}")
    card = card_of(page, report.run_id)
    expect(card.locator(".log li")).to_have_count(1)
    expect(card).to_have_attribute("data-connection", "open")
    assert len(token_requests) == 1

    # The open stream outlives its token (checked only when a stream opens).
    # Once it has expired, end the streams: the reconnect needs a new token.
    wait_for_token_expiry(server, report)
    held = HeldReconnects(page)
    server.signal(signal.SIGHUP)
    held.wait("the reconnect with a fresh token")
    report.log("line 2")
    held.release()

    expect(card.locator(".log li")).to_have_count(2)
    expect(card).to_have_attribute("data-connection", "open")
    # At least one refresh (a worker that is replaced later may end the new stream too).
    assert len(token_requests) >= 2
    assert "last_event_id=" in held.urls[-1]
    report.log("line 3")
    expect(card.locator(".log li")).to_have_count(3)
    # The page knew when its token expired, so no request was refused: a clean console.
    console.assert_clean()


def test_the_client_probes_a_failed_eventsource_and_refreshes_a_refused_token(start_server, tmp_path, page, console):
    """Without a known expiry the EventSource meets a 401, which it cannot see: realtime.js asks with fetch."""
    server = start_server(f"sqlite:///{tmp_path / 'demo.sqlite3'}", DEMO_ENABLED=True, REALTIME_TOKEN_TTL_S=2)
    report = FakeReport(server)
    report.log("line 1")
    page.goto(server.url + "/")
    page.evaluate(
        """async (runId) => {
            const { subscribe } = await import("/static/realtime.js");
            window.tokens = 0;
            window.sub = subscribe({
                channel: `run.${runId}`,
                topics: ["log"],
                token: async () => {
                    window.tokens += 1;
                    const response = await fetch("/demo/token", {
                        method: "POST",
                        headers: { "Content-Type": "application/json" },
                        body: JSON.stringify({ run_id: runId }),
                    });
                    return (await response.json()).token;  // a bare token: no expiry known
                },
                backoff: { initialMs: 100, maxMs: 400 },
            });
            window.codes = [];
            window.sub.onChange((change, sub) => sub.error && window.codes.push(sub.error.code));
        }""",
        report.run_id,
    )
    page.wait_for_function("window.sub.state === 'open' && window.sub.messages.length === 1")

    wait_for_token_expiry(server, report)
    server.signal(signal.SIGHUP)
    page.wait_for_function("window.codes.includes('token_expired')")
    report.log("line 2")
    page.wait_for_function("window.sub.state === 'open' && window.sub.messages.length === 2")
    assert page.evaluate("window.tokens") >= 2
    messages = page.evaluate("window.sub.messages.map(m => m.data.message)")
    assert messages == ["line 1", "line 2"]
    # Chromium itself logs each refused request (the EventSource's and the probe's).
    console.assert_clean(allowed=re.compile(r"status of 401 \(UNAUTHORIZED\)"))


def test_a_refused_token_string_ends_in_the_error_state(server, page, console):
    page.goto(server.url + "/")
    state = page.evaluate(
        """async () => {
            const { subscribe } = await import("/static/realtime.js");
            const sub = subscribe({ channel: "run.x", topics: ["log"], token: "not-a-token" });
            await new Promise((resolve) => sub.onChange(() => sub.state === "error" && resolve()));
            return { state: sub.state, error: sub.error };
        }"""
    )
    assert state["state"] == "error"
    assert state["error"]["status"] == 401
    assert state["error"]["code"] == "invalid_token"
    console.assert_clean(allowed=re.compile(r"status of 401 \(UNAUTHORIZED\)"))


def test_the_page_explains_a_run_it_cannot_watch(server, page, console):
    page.goto(server.url + "/?run=" + "x" * 300)  # too long for a channel name
    expect(page.locator("#notice")).to_contain_text("Could not resume run")
    expect(page.locator(".report")).to_have_count(0)
    console.assert_clean(allowed=re.compile(r"status of 400 \(BAD REQUEST\)"))


# -- the console watch --------------------------------------------------------------------------


def test_console_watch_reports_uncaught_errors(page):
    """The clean-console assertions above would catch a page error."""
    console = Console(page)
    page.set_content("<script>window.setTimeout(() => { throw new Error('boom') }, 0)</script>")
    pump_until(page, lambda: console.problems, what="the page error")
    with pytest.raises(AssertionError, match="boom"):
        console.assert_clean()
