"""The demo page watches all its runs on one connection (issue 21, items 4-5), in a real browser.

`make run`'s server (Flask's own, Werkzeug, HTTP/1.1), where Chromium keeps at most six
connections per host: with one EventSource per card, the seventh report's stream (and every
request after it) waited for another stream to close. Now each card adds its run's channel to
the page's one stream. The browser, page and console fixtures are tests/test_browser.py's.
"""
from __future__ import annotations

from typing import Iterator

import pytest
from playwright.sync_api import expect

from browser_support import SUBSCRIBE_URL, screenshot
from test_browser import browser, console, page  # noqa: F401 - fixtures
from test_demo import serve_make_run

pytestmark = [pytest.mark.integration, pytest.mark.browser]

REPORTS = 10

# Records, in the order the page showed them, each card's first progress and its completion:
# an order of events, not times, so the assertion holds on a slow machine as on a fast one.
RECORD_ORDER = """() => {
    window.order = { progress: {}, completed: {} };
    let n = 0;
    const look = () => {
        for (const card of document.querySelectorAll(".report")) {
            const id = card.dataset.runId;
            if (!(id in window.order.progress) && card.querySelector(".percent").textContent !== "0%") {
                window.order.progress[id] = n++;
            }
            if (!(id in window.order.completed) && card.dataset.runStatus === "completed") {
                window.order.completed[id] = n++;
            }
        }
    };
    new MutationObserver(look).observe(document.querySelector("#reports"),
        { subtree: true, childList: true, characterData: true, attributes: true });
}"""


@pytest.fixture
def dev_server(tmp_path, monkeypatch) -> Iterator[str]:
    """`make run`'s command on a free port, with reports that last a few seconds and a job
    thread for each, so all ten run at once: what the page shows is then the page's doing."""
    monkeypatch.delenv("FLASK_DEMO_ENABLED", raising=False)  # `flask run` turns the demo on by itself
    yield from serve_make_run(
        tmp_path, SECRET_KEY="hub-secret", FLASK_DEMO_REPORT_STEP_S="2.5", FLASK_JOBS_THREADS=str(REPORTS),
    )


def test_ten_reports_progress_together_and_a_reload_replays_them_over_one_connection(
    dev_server, page, console,  # noqa: F811
):
    page.goto(dev_server + "/")
    page.evaluate(RECORD_ORDER)
    generate = page.get_by_role("button", name="Generate report")
    for n in range(1, REPORTS + 1):
        generate.click()
        expect(page.locator(".report")).to_have_count(n)

    cards = page.locator(".report")
    for card in cards.all():
        expect(card).to_have_attribute("data-run-status", "completed", timeout=120_000)
        expect(card.locator("progress")).to_have_js_property("value", 100)
        expect(card.locator(".connection-label")).to_have_text("Finished")
    order = page.evaluate("window.order")
    assert len(order["progress"]) == len(order["completed"]) == REPORTS
    # With a stream per card the seventh card showed nothing until a report had finished.
    assert max(order["progress"].values()) < min(order["completed"].values()), order
    logs = dict(cards.evaluate_all("cards => cards.map(c => [c.dataset.runId, c.querySelectorAll('.log li').length])"))
    screenshot(page, "hub-ten-reports", full_page=True)

    streams: list[str] = []
    page.on("request", lambda request: SUBSCRIBE_URL.search(request.url) and streams.append(request.url))
    page.reload()
    expect(page.locator(".report")).to_have_count(REPORTS)
    for run_id, lines in logs.items():
        card = page.locator(f'.report[data-run-id="{run_id}"]')
        expect(card).to_have_attribute("data-run-status", "completed")
        expect(card.locator("progress")).to_have_js_property("value", 100)
        expect(card.locator(".log li")).to_have_count(lines)
        expect(card.locator(".connection-label")).to_have_text("Finished")
    assert len(streams) == 1, streams
    console.assert_clean()
