"""The demo page's Ask card in a real browser (issue 20, item 6).

Debian's chromium via Playwright against a live gunicorn running the real
answer job (demo/ask.py's local generator, its pace set per server): the
answer grows, a reload mid-answer shows the text so far at once and goes on,
Stop ends it `stopped` keeping the text. The browser, page and console
fixtures are tests/test_browser.py's; screenshots go to test-artifacts/.
"""
from __future__ import annotations

import re

import httpx
import pytest
from playwright.sync_api import expect

from browser_support import screenshot
from demo.ask import local_answer
from test_browser import browser, console, page  # noqa: F401 - fixtures

pytestmark = [pytest.mark.integration, pytest.mark.browser]

PROMPT = "How does this page pick an answer up again after the connection drops?"  # the page's default


def answer_text(page) -> str:
    return page.locator("#answer").evaluate("el => el.textContent")


def answer_length(page) -> int:
    return page.locator("#answer").evaluate("el => el.textContent.length")


def stored_answer(server, run_id: str) -> dict:
    """The answer as the server keeps it: the folded text stream (what a reload gets)."""
    token = httpx.post(server.url + "/api/realtime/token",
                       json={"channel": f"run.{run_id}", "topics": ["answer"]}, timeout=10).json()["token"]
    [message] = httpx.get(server.url + "/api/realtime/messages", params={"token": token}, timeout=10).json()["messages"]
    return message["data"]


def test_an_answer_streams_comes_back_whole_after_a_reload_and_stops_keeping_its_text(
    start_server, tmp_path, page, console,  # noqa: F811
):
    # A long, slow answer: it is still being written whatever the test takes.
    server = start_server(f"sqlite:///{tmp_path / 'ask.sqlite3'}", DEMO_ENABLED=True,
                          DEMO_ASK_TOKENS_PER_S=25, DEMO_ASK_TOKENS=5000)
    page.goto(server.url + "/")
    card = page.locator("#ask-card")
    expect(page.get_by_label("Your question")).to_have_value(PROMPT)
    page.get_by_role("button", name="Ask", exact=True).click()

    expect(card).to_have_attribute("data-answer", "streaming")
    expect(page.locator("#ask-status")).to_have_text("Streaming…")
    page.wait_for_function("document.querySelector('#answer').textContent.length >= 60")
    grown_from = answer_length(page)
    page.wait_for_function(f"document.querySelector('#answer').textContent.length > {grown_from}")
    run_id = card.locator("#ask-run-id").get_attribute("title")
    assert page.url.endswith(f"?run={run_id}")
    assert local_answer(PROMPT, 5000).startswith(answer_text(page))
    before_reload = answer_length(page)

    page.reload()
    card = page.locator("#ask-card")
    expect(card).to_have_attribute("data-answer", "streaming")
    page.wait_for_function("document.querySelector('#answer').textContent.length > 0")
    # The text so far came in one piece (renderText writes a replaced text as one node, then
    # appends a node per delta): the whole of what the page showed before the reload, at once.
    first_piece = page.locator("#answer").evaluate("el => el.firstChild.textContent.length")
    assert first_piece >= before_reload
    page.wait_for_function(f"document.querySelector('#answer').textContent.length > {first_piece}")
    assert page.locator("#answer").evaluate("el => el.childNodes.length") > 1, "then it grows by pieces"
    screenshot(page, "ask-streaming", full_page=True)

    # Stop, with the run's cancel token. The first try meets a stale token (401): the page
    # fetches a fresh grant and tries once more.
    cancels: list[str | None] = []

    def stale_once(route) -> None:
        cancels.append(route.request.headers.get("authorization"))
        if len(cancels) == 1:
            route.fulfill(status=401, content_type="application/json",
                          body='{"error": {"code": "invalid_cancel_token", "message": "stale"}}')
        else:
            route.continue_()

    page.route(f"**/api/runs/{run_id}/cancel", stale_once)
    stop = page.get_by_role("button", name="Stop")
    expect(stop).to_be_enabled()
    stop.click()
    expect(card).to_have_attribute("data-answer", "stopped")
    expect(page.locator("#ask-status")).to_have_text("Stopped")
    expect(stop).to_be_disabled()
    expect(card.locator(".connection-label")).to_have_text("Finished")
    assert len(cancels) == 2 and all(c and c.startswith("Bearer ") for c in cancels)

    stored = stored_answer(server, run_id)
    assert stored["status"] == "cancelled"
    assert answer_text(page) == stored["text"] and len(stored["text"]) > first_piece
    assert httpx.get(f"{server.url}/api/runs/{run_id}", timeout=10).json()["status"] == "cancelled"
    screenshot(page, "ask-stopped", full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    screenshot(page, "ask-stopped-phone", full_page=True)
    console.assert_clean(allowed=re.compile(r"status of 401"))  # the stale token, as Chromium logs it


def test_an_answer_runs_to_completion_beside_a_report(start_server, tmp_path, page, console):  # noqa: F811
    server = start_server(f"sqlite:///{tmp_path / 'ask.sqlite3'}", DEMO_ENABLED=True,
                          DEMO_ASK_TOKENS_PER_S=150, DEMO_REPORT_STEP_S=0.2)
    page.goto(server.url + "/")
    prompt = "Why keep every message in a table?"
    page.get_by_label("Your question").fill(prompt)
    page.get_by_role("button", name="Ask", exact=True).click()
    page.get_by_role("button", name="Generate report").click()

    card = page.locator("#ask-card")
    expect(card).to_have_attribute("data-answer", "completed", timeout=60_000)
    expect(page.locator("#ask-status")).to_have_text("Completed")
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    assert answer_text(page) == local_answer(prompt)
    expect(page.locator(".report")).to_have_attribute("data-run-status", "completed", timeout=60_000)

    # Both runs are in the URL: a reload brings the answer back whole, completed.
    assert page.url.count("run=") == 2
    page.reload()
    expect(card).to_have_attribute("data-answer", "completed")
    expect(page.locator("#answer-question")).to_have_text(prompt)  # what it answers, whatever the box says
    assert answer_text(page) == local_answer(prompt)
    assert page.locator("#answer").evaluate("el => el.childNodes.length") == 1, "one folded message"
    expect(page.locator(".report")).to_have_attribute("data-run-status", "completed")

    screenshot(page, "ask-completed", full_page=True)
    page.emulate_media(color_scheme="dark")
    screenshot(page, "ask-completed-dark", full_page=True)
    page.emulate_media(color_scheme="light")
    page.set_viewport_size({"width": 390, "height": 844})
    screenshot(page, "ask-completed-phone", full_page=True)
    # The phone layout: nothing wider than the screen.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    console.assert_clean()
