"""The real thing: gunicorn with gevent workers, standalone `flask jobs worker` processes,
kill -9, a job that kills its workers, a reload mid-step, reconnecting subscribers; each
test on SQLite and on PostgreSQL.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, LiveServer, app_on, free_port, wait_until
from crashing_app import crash_worker

pytestmark = pytest.mark.integration

FINISHED = {"completed", "failed", "cancelled"}


def expected_for(server: LiveServer, run_id: str) -> list[tuple[str, dict]]:
    """Everything a subscriber of run.<id> sees for a successful 5-day report, in order."""
    url = f"/reports/{run_id}"
    size = get_run(server, run_id)["output"]["bytes"]
    return [
        ("run", {"status": "queued"}),
        ("run", {"status": "running"}),
        ("status", {"stage": "fetching", "percent": 10}),
        ("log", {"level": "info", "message": "Fetching 5 days of orders"}),
        ("status", {"stage": "processing", "percent": 40}),
        ("log", {"level": "info", "message": "Summarizing 20 order rows"}),
        ("status", {"stage": "generating", "percent": 70}),
        ("log", {"level": "info", "message": "Rendering the PDF"}),
        ("log", {"level": "info", "message": f"Report ready: 1 page(s), {size} bytes"}),
        ("status", {"stage": "done", "percent": 100, "url": url}),
        ("run", {"status": "completed", "output": {"url": url, "pages": 1, "bytes": size}}),
    ]


def send_report(server: LiveServer, count: int = 1) -> list[str]:
    response = httpx.post(
        server.url + "/api/events",
        json=[{"name": "report.requested", "data": {"days": 5}}] * count,
        timeout=10,
    )
    assert response.status_code == 202, response.text
    return [run["id"] for run in response.json()["runs"]]


def get_run(server: LiveServer, run_id: str) -> dict:
    response = httpx.get(f"{server.url}/api/runs/{run_id}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def subscribe(server: LiveServer, run_id: str, until, last_event_id: str | None = None) -> tuple[list[dict], str]:
    """Read run.<id>'s events until `until(envelope)`; return the envelopes and the last cursor."""
    token = server.token(f"run.{run_id}", ["run", "status", "log"])
    params = {"token": token}
    if last_event_id:
        params["last_event_id"] = last_event_id
    seen, cursor = [], last_event_id
    with httpx.Client(timeout=httpx.Timeout(10, read=20)) as client:
        with connect_sse(client, "GET", server.url + "/api/realtime/subscribe", params=params) as source:
            for sse in source.iter_sse():
                if not sse.data:  # the `retry:` frame (httpx-sse yields it as an empty event)
                    continue
                envelope = json.loads(sse.data)
                seen.append(envelope)
                cursor = sse.id
                if until(envelope):
                    break
    return seen, cursor


def run_finished(envelope: dict) -> bool:
    return envelope["topic"] == "run" and envelope["data"]["status"] in FINISHED


class Worker:
    """`flask --app <app> jobs worker`, stopped by its pid."""

    def __init__(self, log_path: Path, database_url: str, app: str = "app", args: tuple[str, ...] = (),
                 **config: object) -> None:
        env = {**os.environ, "DATABASE_URL": database_url, "SECRET_KEY": "live-test-secret"}
        env.update({f"FLASK_{key}": str(value) for key, value in config.items()})
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", app, "jobs", "worker", *args],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.kill(signal.SIGTERM)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def start_worker(tmp_path):
    workers: list[Worker] = []

    def start(database_url: str, app: str = "app", args: tuple[str, ...] = (), **config: object) -> Worker:
        worker = Worker(tmp_path / f"worker-{len(workers)}.log", database_url, app, args, **config)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


WORKER_CONFIG = {"DEMO_ENABLED": True, "JOBS_POLL_S": 0.05, "JOBS_LEASE_S": 2, "JOBS_THREADS": 2}


def test_embedded_pool_runs_a_report_and_streams_its_progress(database_url, start_server):
    server = start_server(database_url, DEMO_ENABLED=True, DEMO_REPORT_STEP_S=0.1, JOBS_POLL_S=0.05)
    [run_id] = send_report(server)
    seen, _ = subscribe(server, run_id, until=run_finished)
    assert [(e["topic"], e["data"]) for e in seen] == expected_for(server, run_id)
    assert all(e["run_id"] == run_id for e in seen)

    pdf = httpx.get(f"{server.url}/reports/{run_id}", timeout=10)
    assert pdf.status_code == 200
    assert pdf.headers["content-type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF-")


def test_bad_requests_get_json_errors(database_url, start_server):
    server = start_server(database_url, DEMO_ENABLED=True, JOBS_EMBEDDED="false")
    for method, path, body, status, code in [
        ("post", "/api/events", {"name": "no spaces", "data": {}}, 400, "invalid_event_name"),
        ("post", "/api/events", {"name": "a.b", "data": 3}, 400, "invalid_event_data"),
        ("get", "/api/runs/missing", None, 404, "run_not_found"),
        ("get", "/api/runs/%00", None, 404, "run_not_found"),  # PostgreSQL refuses NUL in text
        ("post", "/api/events", b'{"name": "a.b", "data": {"x": "\\udc80"}}', 400, "invalid_event_data"),
        ("post", "/api/runs/missing/cancel", None, 404, "run_not_found"),
        ("get", "/reports/missing", None, 404, "report_not_found"),
        ("post", "/api/events", b"name=a.b", 415, "unsupported_media_type"),  # a form, not JSON
    ]:
        content = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        json_type = {"Content-Type": "application/json"} if body is not None and code != "unsupported_media_type" else {}
        response = httpx.request(method, server.url + path, content=content, headers=json_type, timeout=10)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code)


def test_kill_9_of_a_worker_mid_run_loses_nothing_and_repeats_nothing(database_url, start_server, start_worker):
    server = start_server(database_url, DEMO_ENABLED=True, JOBS_EMBEDDED="false")
    first = start_worker(database_url, DEMO_REPORT_STEP_S=1.5, **WORKER_CONFIG)
    [run_id] = send_report(server)

    # A subscriber reads until the first step is done, then drops its connection.
    before, cursor = subscribe(
        server, run_id, until=lambda e: e["data"] == {"stage": "processing", "percent": 40}
    )
    wait_until(lambda: {"id": "process", "status": "running", "attempts": 1} in get_run(server, run_id)["steps"],
               what="the second step to start")
    first.kill(signal.SIGKILL)

    second = start_worker(database_url, DEMO_REPORT_STEP_S=0.1, **WORKER_CONFIG)
    after, _ = subscribe(server, run_id, until=run_finished, last_event_id=cursor)

    ids = [e["id"] for e in before + after]
    assert ids == sorted(set(ids)), "every message exactly once, in order"
    assert [(e["topic"], e["data"]) for e in before + after] == expected_for(server, run_id)
    steps = {s["id"]: (s["status"], s["attempts"]) for s in get_run(server, run_id)["steps"]}
    assert steps["fetch"] == ("completed", 1), "completed before the kill: not run again"
    assert steps["process"] == ("completed", 2), "interrupted by the kill: run again"
    assert steps["generate"] == ("completed", 1)
    second.stop()
    assert second.process.returncode == 0


def test_two_workers_never_run_the_same_run(database_url, start_server, start_worker):
    """Two workers of one thread each share 12 runs: each run executes once, and both
    workers take part (one alone would need 12 x 0.3 s while the other polls every 0.05 s)."""
    server = start_server(database_url, DEMO_ENABLED=True, JOBS_EMBEDDED="false")
    workers = [start_worker(database_url, DEMO_REPORT_STEP_S=0.1, **{**WORKER_CONFIG, "JOBS_THREADS": 1})
               for _ in range(2)]
    run_ids = send_report(server, count=12)
    for run_id in run_ids:
        wait_until(lambda: get_run(server, run_id)["status"] in FINISHED, timeout=60, what=f"run {run_id}")
    for run_id in run_ids:
        run = get_run(server, run_id)
        assert run["status"] == "completed"
        assert all(step["attempts"] == 1 for step in run["steps"]), run["steps"]
        token = server.token(f"run.{run_id}", ["run", "status", "log"])
        history = httpx.get(server.url + "/api/realtime/messages", params={"token": token}, timeout=10).json()
        assert [(m["topic"], m["data"]) for m in history["messages"]] == expected_for(server, run_id)
    completed_by = [set(re.findall(r"run ([0-9a-f]{16}) \(generate-report, attempt 1\): completed", w.log()))
                    for w in workers]
    assert all(completed_by), f"each worker completed some runs: {[len(c) for c in completed_by]}"
    assert not completed_by[0] & completed_by[1]
    assert completed_by[0] | completed_by[1] == set(run_ids)


@pytest.fixture
def sender(database_url):
    """The app in this process, to send events and read runs; it executes none."""
    yield from app_on(database_url, DEMO_ENABLED=True, JOBS_EAGER=False, JOBS_EMBEDDED=False)


def test_a_run_that_kills_its_worker_fails_after_max_crashes(database_url, sender, start_worker):
    """CONTRACT §5: each worker that takes the run dies in its step, until JOBS_MAX_CRASHES (3)
    deaths; then the next worker ends the run `failed` instead of dying too."""
    jobs = sender.extensions["jobs"]
    jobs.register(crash_worker)
    [run_id] = [run["id"] for run in jobs.send("test.crash", {})["runs"]]
    for deaths in range(4):
        worker = start_worker(database_url, app="tests.crashing_app", JOBS_LEASE_S=1, JOBS_POLL_S=0.05)
        wait_until(lambda: worker.process.poll() is not None or jobs.run(run_id).status == "failed",
                   timeout=30, what=f"worker {deaths} to die or the run to fail")
        if worker.process.poll() is None:
            break
        assert worker.process.returncode == 1, worker.log()
    assert deaths == 3, "three workers died; the fourth failed the run"
    run = jobs.run(run_id)
    assert run.status == "failed"
    assert run.error == "WorkerCrashed: the run's worker died 3 times mid-run (JOBS_MAX_CRASHES=3)"
    assert [(s.id, s.status, s.attempts) for s in run.steps] == [("exit", "running", 3)]
    announced = sender.extensions["realtime"].store.read_after(f"run.{run_id}", None, 0, 100)
    assert [m.data for m in announced if m.topic == "run"] == [
        {"status": "queued"}, {"status": "running"}, {"status": "failed", "error": run.error},
    ]
    worker.stop()
    assert worker.process.returncode == 0


def test_a_reload_mid_step_finishes_the_step_and_hands_the_run_back(database_url, start_server):
    """SIGHUP makes gunicorn SIGTERM its old workers: each finishes the step in progress and
    releases its run, which a new worker resumes at once. With a 600 s lease, a run that was
    not handed back would time this test out; a step run again would show 2 attempts."""
    server = start_server(database_url, DEMO_ENABLED=True, DEMO_REPORT_STEP_S=3, JOBS_LEASE_S=600, JOBS_POLL_S=0.05)
    old_workers = set(server.worker_pids())
    [run_id] = send_report(server)
    wait_until(lambda: {"id": "process", "status": "running", "attempts": 1} in get_run(server, run_id)["steps"],
               what="the second step to start")
    server.signal(signal.SIGHUP)

    wait_until(lambda: get_run(server, run_id)["status"] in FINISHED, timeout=60, what="the run to finish")
    run = get_run(server, run_id)
    assert run["status"] == "completed"
    assert all(step["attempts"] == 1 for step in run["steps"]), run["steps"]
    wait_until(lambda: not old_workers & set(server.worker_pids()), what="the old workers to exit")
    token = server.token(f"run.{run_id}", ["run", "status", "log"])
    history = httpx.get(server.url + "/api/realtime/messages", params={"token": token}, timeout=10).json()
    assert [(m["topic"], m["data"]) for m in history["messages"]] == expected_for(server, run_id)


def worker_metrics(port: int) -> dict[str, float]:
    """A worker's /metrics: `{'name{label="value",...}': value}`, parsed by prometheus_client."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}  # not listening yet
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_a_worker_serves_its_metrics_with_metrics_port(database_url, sender, start_worker):
    """CONTRACT §6: the runs a standalone worker ends are counted there, and scraped there."""
    port = free_port()
    worker = start_worker(database_url, args=("--metrics-port", str(port)), DEMO_REPORT_STEP_S=0.05, **WORKER_CONFIG)
    wait_until(lambda: "jobs_runs_due" in worker_metrics(port), what=f"the worker's metrics on port {port}")
    jobs = sender.extensions["jobs"]
    [run_id] = [run["id"] for run in jobs.send("report.requested", {"days": 2})["runs"]]
    wait_until(lambda: jobs.run(run_id).status in FINISHED, timeout=30, what="the run to end")
    assert jobs.run(run_id).status == "completed", worker.log()

    finished = 'jobs_runs_finished_total{function="generate-report",status="completed"}'
    metrics = wait_until(lambda: (m := worker_metrics(port)).get(finished) == 1 and m, what="the run counted")
    assert metrics['jobs_run_duration_seconds_count{function="generate-report"}'] == 1
    assert 0 < metrics['jobs_run_duration_seconds_sum{function="generate-report"}'] < 30
    assert metrics["jobs_runs_due"] == 0
    jobs.send_many([("report.requested", {"days": 400})] * 2)  # bad parameters: they fail at once
    wait_until(lambda: worker_metrics(port).get('jobs_runs_finished_total{function="generate-report",status="failed"}') == 2,
               timeout=30, what="the bad reports counted as failed")
    worker.stop()
    assert worker.process.returncode == 0
