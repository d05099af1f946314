"""The demo's report job and routes, in eager mode: progress, the PDF, bad parameters, 404s;
which commands turn it on."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from typing import Iterator

import httpx
import pytest
from sqlalchemy import func, select

from conftest import ROOT, app_on, free_port, wait_until
from jobs.tables import runs
from json_errors import TOKEN, assert_json_error
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
    assert run.error == "InvalidReportRequest: 'days' must be an integer from 1 to 366"  # a PublicError
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


def test_demo_is_off_unless_asked_for(tmp_path, monkeypatch):
    """An app made by create_app (gunicorn's way, a test's) has no demo without DEMO_ENABLED."""
    monkeypatch.delenv("FLASK_DEMO_ENABLED", raising=False)
    for app in app_on(f"sqlite:///{tmp_path / 'default.sqlite3'}"):
        assert app.config["DEMO_ENABLED"] is False
        assert "demo" not in app.extensions
        assert_json_error(app.test_client().post(TOKEN, json={"channel": "run.1", "topics": ["status"]}), 403, "forbidden")


# -- the commands of CONTRACT §1 ---------------------------------------------------------------


@pytest.mark.integration
def test_the_production_command_hands_out_no_token_and_serves_no_demo(start_server, tmp_path, monkeypatch):
    """`gunicorn -c gunicorn.conf.py "app:create_app()"` with no DEMO flag (issue 17, item 10)."""
    monkeypatch.delenv("FLASK_DEMO_ENABLED", raising=False)
    server = start_server(f"sqlite:///{tmp_path / 'production.sqlite3'}", workers=1)
    assert_json_error(httpx.post(server.url + TOKEN, json={"channel": "run.1", "topics": ["status"]}), 403, "forbidden")
    for path in ("/", "/workshop"):
        assert_json_error(httpx.get(server.url + path), 404, "not_found")
    assert_json_error(httpx.post(server.url + "/demo/reports", json={}), 404, "not_found")
    started = httpx.post(server.url + "/api/events", json={"name": "report.requested", "data": {}})
    assert started.status_code == 202 and started.json()["runs"] == [], "no report job to run"


def make_run_command(port: int) -> list[str]:
    """The command of the Makefile's `run` target, on `port`: what `make run` starts."""
    recipe = re.search(r"^run:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert recipe.startswith("$(BIN)/flask ") and "--port 5000" in recipe, recipe
    words = shlex.split(recipe.replace("--port 5000", f"--port {port}"))
    return [sys.executable, "-m", "flask", *words[1:]]


def serve_make_run(tmp_path, **env: str) -> Iterator[str]:
    """`make run`'s command on a free port, with `env` beside the process's: its URL, until closed."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'run.sqlite3'}", **env}
    with open(tmp_path / "flask.log", "wb") as log:
        process = subprocess.Popen(make_run_command(port), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"flask run exited: {(tmp_path / 'flask.log').read_text()[-3000:]}")
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(answers, timeout=30, what=f"flask run on port {port}")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def make_run(tmp_path, monkeypatch) -> Iterator[str]:
    """`make run`'s server (Flask's, with its SECRET_KEY from the environment), its URL."""
    monkeypatch.delenv("FLASK_DEMO_ENABLED", raising=False)
    yield from serve_make_run(tmp_path, SECRET_KEY="make-run-secret")


@pytest.mark.integration
def test_make_run_serves_the_demo(make_run):
    token = httpx.post(make_run + TOKEN, json={"channel": "run.1", "topics": ["status"]}, timeout=10)
    assert token.status_code == 200, token.text
    assert b"Generate report" in httpx.get(make_run + "/", timeout=10).content
    assert httpx.get(make_run + "/workshop", timeout=10).status_code == 200
