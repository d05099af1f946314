"""requirements.txt alone runs the production command (docs/deploy.md; deploy/Dockerfile does the same).

A fresh virtualenv gets `pip install -r requirements.txt` and nothing else,
then its own gunicorn serves the app with gunicorn.conf.py: it must boot,
be ready, open an event stream, and exit 0 on SIGTERM. The rest of the suite
runs in `.venv`, which also holds requirements-dev.txt, so a runtime
dependency that only a dev tool brings in (gunicorn's gevent worker imports
`packaging`, which gunicorn does not declare) would pass everywhere else.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, free_port, wait_until
from sseclient import Frame, events_of

pytestmark = pytest.mark.integration

NETWORK_ERRORS = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
                  "Name or service not known", "Max retries exceeded", "No matching distribution found",
                  "Could not find a version")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without its virtualenv, Python path or app settings."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PROMETHEUS_MULTIPROC_DIR",
                          "REALTIME_METRICS_DIR_MADE", "DATABASE_URL", "SECRET_KEY", "METRICS_KEY", "LOG_FORMAT")
           and not key.startswith("FLASK_")}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def run(command: list[str], what: str, **kwargs: object) -> str:
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    if result.returncode != 0:
        hint = ""
        if any(marker in result.stdout for marker in NETWORK_ERRORS):
            hint = ("\npip could not get a package: the package index is unreachable (no network?) or a pin "
                    "does not exist. This test installs requirements.txt from scratch and must run in CI: "
                    "give it network access or a package mirror; it is never skipped.")
        pytest.fail(f"{what} failed with exit code {result.returncode}:\n{result.stdout[-4000:]}{hint}")
    return result.stdout


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """A fresh virtualenv holding requirements.txt and nothing else."""
    venv = tmp_path_factory.mktemp("install") / "venv"
    run([sys.executable, "-m", "venv", str(venv)], "python -m venv", env=clean_env(), timeout=120)
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-r", str(ROOT / "requirements.txt")],
        "pip install -r requirements.txt", env=clean_env(), timeout=600)
    return venv


def test_the_fresh_venv_holds_no_dev_dependency(runtime_venv):
    """It really is separate from .venv: pytest (requirements-dev.txt only) is not importable."""
    result = subprocess.run([str(runtime_venv / "bin" / "python"), "-c", "import pytest"],
                            capture_output=True, env=clean_env(), timeout=60)
    assert result.returncode != 0


def test_gunicorn_from_requirements_txt_alone_serves_and_stops_cleanly(runtime_venv, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "gunicorn.log"
    env = clean_env(
        DATABASE_URL=f"sqlite:///{tmp_path / 'install.sqlite3'}",
        SECRET_KEY="install-test-secret",
        WEB_CONCURRENCY="1",
        FLASK_DEMO_ENABLED="true",  # its allow-all token policy lets the check open a stream
        PATH=f"{runtime_venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    with open(log_path, "wb") as log:
        # The production command, from the repository (gunicorn.conf.py and app.py live there).
        process = subprocess.Popen(
            [str(runtime_venv / "bin" / "gunicorn"), "-c", "gunicorn.conf.py", "app:create_app()",
             "--bind", f"127.0.0.1:{port}"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"gunicorn exited with {process.returncode}: {log_path.read_text()[-4000:]}")
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(answers, timeout=30, what=f"gunicorn from the fresh venv on port {port} (log: {log_path})")

        ready = httpx.get(url + "/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "ready"

        token = httpx.post(url + "/api/realtime/token", json={"channel": "install.check", "topics": ["status"]},
                           timeout=10)
        assert token.status_code == 200, token.text
        timeout = httpx.Timeout(10.0, read=5.0)
        with httpx.stream("GET", url + "/api/realtime/subscribe", params={"token": token.json()["token"]},
                          timeout=timeout) as stream:
            assert stream.status_code == 200, stream.read()[:300]
            first = next(events_of(stream))
            assert isinstance(first, Frame) and first.retry is not None, first
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    assert process.returncode == 0, f"gunicorn exited with {process.returncode}: {log_path.read_text()[-4000:]}"
