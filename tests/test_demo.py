"""The demo's report job and routes, in eager mode: progress, the PDF, bad parameters, 404s."""
from __future__ import annotations

from test_jobs import clock, jobs, messages, send  # noqa: F401 - fixtures and helpers


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
