"""The demo's report job and routes, in eager mode: progress, the PDF, bad parameters, 404s."""
from __future__ import annotations

import pytest
from sqlalchemy import func, select

from conftest import app_on
from jobs.tables import runs
from json_errors import assert_json_error
from test_jobs import clock, jobs, messages, send  # noqa: F401 - fixtures and helpers


def run_count(app) -> int:
    with app.extensions["database"].engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(runs)).scalar()


def test_report_publishes_its_progress_and_serves_a_pdf(app, client, jobs):  # noqa: F811
    run_id = send(jobs, "report.requested", {"title": "Q3 sales – Zürich", "days": 7})
    url = f"/reports/{run_id}"
    assert messages(app, run_id, "status") == [
        ("status", {"stage": "fetching", "percent": 10}),
        ("status", {"stage": "processing", "percent": 40}),
        ("status", {"stage": "generating", "percent": 70}),
        ("status", {"stage": "done", "percent": 100, "url": url}),
    ]
    logs = messages(app, run_id, "log")
    assert len(logs) == 4 and all(data["level"] == "info" and data["message"] for _, data in logs)
    lifecycle = messages(app, run_id, "run")
    assert [data["status"] for _, data in lifecycle] == ["queued", "running", "completed"]
    assert lifecycle[-1][1]["output"]["url"] == url

    response = client.get(url)
    assert response.status_code == 200
    assert response.mimetype == "application/pdf"
    assert response.data.startswith(b"%PDF-") and response.data.rstrip().endswith(b"%%EOF")
    assert len(response.data) == jobs.run(run_id).output["bytes"]


def test_report_with_bad_parameters_fails_without_retrying(app, client, jobs):  # noqa: F811
    run_id = send(jobs, "report.requested", {"days": "many"})
    run = jobs.run(run_id)
    assert (run.status, run.attempt) == ("failed", 1)
    assert run.error == "NonRetriableError: 'days' must be an integer from 1 to 366"
    assert messages(app, run_id, "run")[-1] == ("run", {"status": "failed", "error": run.error})
    assert client.get(f"/reports/{run_id}").status_code == 404


def test_unknown_reports_are_404(client, jobs):  # noqa: F811
    for url in ("/reports/nope", "/reports/0123456789abcdef", "/reports/%00"):
        response = client.get(url)
        assert response.status_code == 404
        assert response.get_json()["error"]["code"] == "report_not_found"


def test_the_page_renders_without_secrets(app, client):
    response = client.get("/")
    assert response.status_code == 200
    assert b"Generate report" in response.data
    assert app.config["SECRET_KEY"].encode() not in response.data


# -- starting reports, and JOBS_EVENT_KEY ----------------------------------------------------


def test_the_page_starts_a_report_when_no_event_key_is_set(app, client, jobs):  # noqa: F811
    response = client.post("/demo/reports", json={})  # what static/app.js sends
    assert response.status_code == 201
    grant = response.get_json()
    assert grant["channel"] == f"run.{grant['run_id']}" and grant["token"]
    assert jobs.run(grant["run_id"]).status == "completed"


def test_with_an_event_key_starting_a_report_needs_it_too(app, client, jobs):  # noqa: F811
    jobs.event_key = "sekrit"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        error = assert_json_error(client.post("/demo/reports", json={}, headers=headers), 401, "invalid_event_key")
        # The page shows this message: it says what to change.
        assert "JOBS_EVENT_KEY unset" in error["message"] and "DEMO_ENABLED off" in error["message"]
    assert run_count(app) == 0
    assert client.get("/").status_code == 200, "the page itself still renders"
    response = client.post("/demo/reports", json={}, headers={"Authorization": "Bearer sekrit"})
    assert response.status_code == 201 and run_count(app) == 1


# -- DEMO_ENABLED -------------------------------------------------------------------------------

DEMO_ROUTES = [
    ("get", "/"),
    ("get", "/?run=0123456789abcdef"),
    ("post", "/demo/reports"),
    ("post", "/demo/token"),
    ("get", "/reports/0123456789abcdef"),
]


@pytest.fixture
def demo_env_app(tmp_path, monkeypatch, request):
    """An app with FLASK_DEMO_ENABLED set in the environment, as an operator sets it."""
    monkeypatch.setenv("FLASK_DEMO_ENABLED", request.param)
    yield from app_on(f"sqlite:///{tmp_path / 'nodemo.sqlite3'}")


@pytest.mark.parametrize("demo_env_app", ["false", "False", "0", "off"], indirect=True)
def test_demo_enabled_off_removes_the_page_its_routes_and_its_job(demo_env_app):
    app = demo_env_app
    client = app.test_client()
    for method, url in DEMO_ROUTES:
        assert_json_error(getattr(client, method)(url, json={}) if method == "post" else client.get(url), 404, "not_found")
    assert "demo" not in app.extensions
    assert "generate-report" not in app.extensions["jobs"].registry.ids
    response = client.post("/api/events", json={"name": "report.requested", "data": {}})
    assert response.status_code == 202 and response.get_json()["runs"] == [], "no function listens any more"
    assert client.get("/healthz").status_code == 200
    # Its allow-all token policy went with it: no policy registered, so no channel is open.
    assert_json_error(client.post("/api/realtime/token", json={"channel": "run.1", "topics": ["status"]}), 403, "forbidden")


@pytest.mark.parametrize("demo_env_app", ["true", "1", "on"], indirect=True)
def test_demo_enabled_on_from_the_environment(demo_env_app):
    assert demo_env_app.test_client().get("/").status_code == 200
    assert "generate-report" in demo_env_app.extensions["jobs"].registry.ids


def test_demo_enabled_is_on_by_default(app):
    assert app.config["DEMO_ENABLED"] is True
    assert "demo" in app.extensions
