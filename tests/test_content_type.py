"""Every POST with a body must say `Content-Type: application/json` (415 otherwise), before anything
is read or written: a page on another site can make a browser POST a form (`text/plain`,
urlencoded, multipart) anywhere without asking, but not JSON (common/request_input.py).
"""
from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from conftest import PUBLISH_KEY
from jobs.tables import events, runs
from json_errors import PUBLISH, TOKEN, assert_json_error
from test_request_input import FailingBody

KEY = {"Authorization": f"Bearer {PUBLISH_KEY}"}

# What a cross-site <form> can send, and what a client that forgot the header sends.
FOREIGN_TYPES = {
    "text/plain": "text/plain",
    "text/plain;charset=UTF-8": "text/plain;charset=UTF-8",  # what fetch() sends for a string body
    "urlencoded": "application/x-www-form-urlencoded",
    "multipart": "multipart/form-data; boundary=x",
    "none": None,
    "json-ish": "application/jsonx",
}

# Each endpoint that reads a JSON body, with a body it would accept as JSON.
JSON_ENDPOINTS = {
    "events": ("/api/events", {"name": "report.requested", "data": {}}),
    "publish": (PUBLISH, {"channel": "c", "topic": "t", "data": 1}),
    "token": (TOKEN, {"channel": "c", "topics": ["t"]}),
    "demo token": ("/demo/token", {"run_id": "0123456789abcdef"}),
}


@pytest.fixture
def jobs(app):
    app.config["DEMO_REPORT_STEP_S"] = 0
    jobs = app.extensions["jobs"]
    jobs.eager = False  # runs stay queued: what a request did is plain to see
    return jobs


def count(app, table) -> int:
    with app.extensions["database"].engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar()


def nothing_written(app) -> bool:
    return (count(app, events), count(app, runs), app.extensions["realtime"].store.last_id()) == (0, 0, 0)


def post(client, path: str, body: bytes, content_type: str | None, **headers: str):
    if content_type is not None:
        headers["Content-Type"] = content_type
    # The publish key goes where it is asked for: on the cancel endpoint a bearer token that is
    # not the run's cancel token is refused (docs/protocol.md section 4).
    key = {} if path.endswith("/cancel") else KEY
    return client.post(path, data=body, headers={**key, **headers})


@pytest.mark.parametrize("content_type", FOREIGN_TYPES.values(), ids=FOREIGN_TYPES.keys())
@pytest.mark.parametrize("path, body", JSON_ENDPOINTS.values(), ids=JSON_ENDPOINTS.keys())
def test_a_json_body_of_another_declared_type_is_415_and_writes_nothing(app, client, jobs, path, body, content_type):
    error = assert_json_error(post(client, path, json.dumps(body).encode(), content_type), 415, "unsupported_media_type")
    assert "application/json" in error["message"]
    assert nothing_written(app)


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
@pytest.mark.parametrize("path, body", JSON_ENDPOINTS.values(), ids=JSON_ENDPOINTS.keys())
def test_json_with_or_without_parameters_is_accepted(client, jobs, path, body, content_type):
    response = post(client, path, json.dumps(body).encode(), content_type)
    assert response.status_code in (200, 201, 202), response.get_data(as_text=True)


def test_the_415_answers_before_the_body_is_read(client, jobs):
    """A body that would fail if read (a client gone mid-body: 400) is never touched."""
    for path in ("/api/events", PUBLISH, TOKEN):
        response = client.post(path, headers={**KEY, "Content-Type": "text/plain", "Content-Length": "10"},
                               environ_overrides={"wsgi.input": FailingBody(ConnectionResetError())})
        assert_json_error(response, 415, "unsupported_media_type")


def test_the_415_names_the_type_that_would_do(client, jobs):
    response = post(client, "/api/events", b"{}", "text/plain")
    assert response.headers["Accept-Post"] == "application/json"


# -- POSTs that read no body but change state ---------------------------------------------


def queued_run(jobs) -> str:
    return jobs.send("report.requested", {})["runs"][0]["id"]


@pytest.mark.parametrize("content_type, body", [
    ("text/plain", b"x"),
    ("application/x-www-form-urlencoded", b"a=b"),
    ("multipart/form-data; boundary=x", b"--x--\r\n"),
    (None, b"{}"),
    # What a cross-site form with no fields sends: a type, and no body.
    ("text/plain", b""),
    ("application/x-www-form-urlencoded", b""),
], ids=["text", "urlencoded", "multipart", "body without a type", "empty text", "empty urlencoded"])
def test_cancel_and_start_report_refuse_other_types(app, client, jobs, content_type, body):
    run_id = queued_run(jobs)
    assert_json_error(post(client, f"/api/runs/{run_id}/cancel", body, content_type), 415, "unsupported_media_type")
    assert jobs.run(run_id).status == "queued"
    assert_json_error(post(client, "/demo/reports", body, content_type), 415, "unsupported_media_type")
    assert count(app, runs) == 1, "no report started"


@pytest.mark.parametrize("content_type, body", [
    (None, b""),  # curl -X POST, fetch() without a body
    ("application/json", b"{}"),  # what the demo page sends
    ("application/json", b""),
], ids=["no body", "json", "empty json"])
def test_cancel_and_start_report_accept_no_body_or_json(app, client, jobs, content_type, body):
    run_id = queued_run(jobs)
    response = post(client, f"/api/runs/{run_id}/cancel", body, content_type)
    assert response.status_code == 202 and response.get_json()["status"] == "cancelled"
    response = post(client, "/demo/reports", body, content_type)
    assert response.status_code == 201, response.get_data(as_text=True)
    assert count(app, runs) == 2


def test_the_demo_page_sends_json_on_its_posts():
    """static/app.js declares JSON on each of its POSTs (the browser tests run them): the helper
    that posts to the demo's routes, and the Stop button's cancel with the run's cancel token."""
    import re

    from conftest import ROOT

    source = (ROOT / "static" / "app.js").read_text()
    posts = re.findall(r'method: "POST",\n\s*headers: \{ "Content-Type": "application/json"', source)
    assert len(posts) == source.count('method: "POST"') == 2