"""No page of another site changes anything here (issue 17, item 11; common/request_input.py).

A page on evil.example can make the visitor's browser POST to this server
without a CORS preflight when the request has no body, or a form's:
`fetch(url, {method: "POST", mode: "no-cors"})`. The tests send what a
browser sends then, in process and from a real Chromium.
"""
from __future__ import annotations

import httpx
import pytest
from sqlalchemy import func, select

from conftest import LiveServer
from jobs.tables import events
from json_errors import TOKEN, assert_json_error
from test_browser import browser  # noqa: F401 - the Chromium fixture

#: The headers Chromium sends with `fetch(url, {method: "POST", mode: "no-cors"})` from a page of
#: https://evil.example: no Content-Type, an empty body.
NO_CORS_FROM_EVIL = {
    "Origin": "https://evil.example",
    "Sec-Fetch-Site": "cross-site",
    "Sec-Fetch-Mode": "no-cors",
    "Sec-Fetch-Dest": "empty",
}
FROM_A_SIBLING = {**NO_CORS_FROM_EVIL, "Origin": "https://blog.localhost", "Sec-Fetch-Site": "same-site"}
#: A browser too old for Fetch Metadata still sends Origin with a POST.
FROM_AN_OLD_BROWSER = {"Origin": "https://evil.example"}
#: The demo page's own fetch (the test client's host is `localhost`).
FROM_OUR_PAGE = {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}


@pytest.fixture
def jobs(app):
    jobs = app.extensions["jobs"]
    jobs.eager = False  # runs stay queued, so a cancel would show
    return jobs


@pytest.fixture
def run_id(jobs) -> str:
    return jobs.send("report.requested", {})["runs"][0]["id"]


def event_count(app) -> int:
    with app.extensions["database"].engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(events)).scalar()


@pytest.mark.parametrize("headers", [NO_CORS_FROM_EVIL, FROM_A_SIBLING, FROM_AN_OLD_BROWSER],
                         ids=["cross-site", "same-site", "origin-only"])
def test_a_bodyless_post_from_another_site_changes_nothing(app, client, jobs, run_id, headers):
    events_before = event_count(app)
    for url in (f"/api/runs/{run_id}/cancel", "/api/events", TOKEN, "/demo/reports"):
        error = assert_json_error(client.post(url, headers=headers), 403, "cross_site_request")
        assert headers["Origin"] in error["message"] or headers.get("Sec-Fetch-Site") in error["message"]
    # A no-cors fetch may also send a text/plain body: refused the same way, before anything is read.
    assert_json_error(client.post("/api/events", data='{"name": "report.requested"}', content_type="text/plain",
                                  headers=headers), 403, "cross_site_request")
    assert jobs.run(run_id).status == "queued"
    assert event_count(app) == events_before


def test_every_state_changing_method_is_refused_and_reads_are_not(client, run_id):
    for method in ("put", "patch", "delete"):
        assert_json_error(getattr(client, method)(f"/api/runs/{run_id}", headers=NO_CORS_FROM_EVIL),
                          403, "cross_site_request")
    assert client.get(f"/api/runs/{run_id}", headers=NO_CORS_FROM_EVIL).status_code == 200
    assert client.get("/healthz", headers=NO_CORS_FROM_EVIL).status_code == 200


@pytest.mark.parametrize("headers", [
    FROM_OUR_PAGE,
    {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"},  # typed by the user
    {"Origin": "http://localhost"},  # our page, in a browser without Fetch Metadata
    {},  # curl, a server, a task queue
], ids=["same-origin", "user", "same-origin-old-browser", "no-browser"])
def test_requests_from_our_pages_and_from_servers_pass(client, jobs, run_id, headers):
    assert client.post(TOKEN, json={"channel": f"run.{run_id}", "topics": ["status"]}, headers=headers).status_code == 200
    started = client.post("/api/events", json={"name": "report.requested", "data": {}}, headers=headers)
    assert started.status_code == 202 and len(started.get_json()["runs"]) == 1
    assert client.post(f"/api/runs/{run_id}/cancel", headers=headers).status_code == 202
    assert jobs.run(run_id).status == "cancelled"


# -- from a real browser ------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.browser
def test_chromium_cannot_cancel_a_run_from_another_site(start_server, tmp_path, browser):
    """A page of http://localhost:<port> is another site than http://127.0.0.1:<port> (another host)."""
    server: LiveServer = start_server(f"sqlite:///{tmp_path / 'cross.sqlite3'}", workers=1,
                                      DEMO_ENABLED=True, JOBS_EMBEDDED="false")
    started = httpx.post(server.url + "/api/events", json={"name": "report.requested", "data": {}}, timeout=10)
    run_id = started.json()["runs"][0]["id"]
    cancel_url = f"{server.url}/api/runs/{run_id}/cancel"
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"http://localhost:{server.port}/healthz")
        with page.expect_response(cancel_url) as refused:
            page.evaluate("url => fetch(url, {method: 'POST', mode: 'no-cors'})", cancel_url)
        assert refused.value.status == 403  # the page cannot read it (opaque), but it did nothing
        assert httpx.get(f"{server.url}/api/runs/{run_id}", timeout=10).json()["status"] == "queued"

        page.goto(f"{server.url}/healthz")  # the same request from this server's own page
        with page.expect_response(cancel_url) as accepted:
            page.evaluate("url => fetch(url, {method: 'POST'})", cancel_url)
        assert accepted.value.status == 202
        assert httpx.get(f"{server.url}/api/runs/{run_id}", timeout=10).json()["status"] == "cancelled"
    finally:
        context.close()

