"""`useRealtime` (static/react.js) in React from npm, and the TypeScript declarations (issue 12).

The README's component is rendered by real React into a DOM (happy-dom) in node, against a
live gunicorn (tests/node/render-react.mjs); the declarations are compiled by tsc in strict
mode against a usage file, and compared with what the modules really export.
"""
from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import ROOT, skip_or_fail, wait_until
from readme import code_block

pytestmark = [pytest.mark.integration, pytest.mark.node]

NODE_DIR = ROOT / "tests" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    executable = shutil.which("node")
    if executable is None:
        skip_or_fail("node is not installed")
    for package in ("react", "react-dom", "happy-dom", "typescript", "eventsource"):
        if not (NODE_DIR / "node_modules" / package).is_dir():
            skip_or_fail(f"tests/node/node_modules/{package} is missing: run `npm ci --prefix tests/node` (make test does)")
    return executable


class ReactPage:
    """`node render-react.mjs`: commands go to its stdin, its JSON lines are collected by a thread."""

    def __init__(self, node: str, base_url: str, component: Path, export: str) -> None:
        self.lines: list[dict] = []
        self.process = subprocess.Popen(
            [node, "render-react.mjs", base_url, str(component), export],
            cwd=NODE_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(json.loads(line))

    def send(self, **command: object) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def of_type(self, kind: str) -> list[dict]:
        return [line for line in self.lines if line["type"] == kind]

    def shows(self, **expected: object) -> bool:
        """Whether the DOM, as last rendered, shows `expected` (e.g. `run="running"`)."""
        doms = self.of_type("dom")
        return bool(doms) and all(doms[-1][key] == value for key, value in expected.items())

    def wait_to_show(self, what: str, **expected: object) -> None:
        try:
            wait_until(lambda: self.shows(**expected), what=what)
        except AssertionError as error:
            exited = "" if self.process.poll() is None else f", then exited: {self.process.stderr.read()[-3000:]}"
            raise AssertionError(f"{error}; the script printed {self.lines[-10:]}{exited}") from None

    def close(self) -> tuple[int, str]:
        """End stdin (the script exits), then stop it by its pid if it did not; (exit code, stderr)."""
        try:
            self.process.stdin.close()
            return self.process.wait(timeout=15), self.process.stderr.read()
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._reader.join(timeout=5)
            self.process.stdout.close()
            self.process.stderr.close()


def test_use_realtime_renders_messages_in_order_follows_the_run_and_closes_on_unmount(node, shared_server, tmp_path):
    component = tmp_path / "RunProgress.jsx"
    component.write_text(code_block("useRealtime({", language="jsx"))  # the README's snippet, as written
    first, second = f"react-{secrets.token_hex(4)}", f"react-{secrets.token_hex(4)}"

    def streams() -> float:
        return shared_server.metric("realtime_streams_open")

    before = streams()
    page = ReactPage(node, shared_server.url, component, "RunProgress")
    try:
        page.send(render={"runId": first})
        page.wait_to_show("the component to connect", connection="open", run="waiting", log=[])
        wait_until(lambda: streams() == before + 1, what="one stream (StrictMode's first one never opened)")

        shared_server.publish(f"run.{first}", "run", {"status": "running"})
        lines = [f"line {n}" for n in range(8)]
        for n, line in enumerate(lines):
            shared_server.publish(f"run.{first}", "log", {"message": line})
            shared_server.publish(f"run.{first}", "status", {"percent": 10 * (n + 1)})
        page.wait_to_show("every message rendered", run="running", log=lines, progress="80")
        for dom in page.of_type("dom"):
            assert dom["log"] == lines[: len(dom["log"])], "messages render in the order published, each once"

        # Another channel: a new subscription that shows only its messages; the first stream closes.
        page.send(render={"runId": second})
        page.wait_to_show("the new channel to connect", connection="open", run="waiting", log=[])
        shared_server.publish(f"run.{second}", "log", {"message": "second run"})
        page.wait_to_show("the new channel's message", log=["second run"])
        wait_until(lambda: streams() == before + 1, what="the first channel's stream to close")

        # runStatus follows topic `run`; closeOnRunEnd passes through to subscribe().
        shared_server.publish(f"run.{second}", "run", {"status": "completed", "output": {"pages": 3}})
        page.wait_to_show("the run's end", run="completed", connection="closed", log=["second run"])
        wait_until(lambda: streams() == before, what="closeOnRunEnd to close the stream")

        # Back to the first run: its history is replayed; then unmounting closes the stream.
        page.send(render={"runId": first})
        page.wait_to_show("the first run replayed", connection="open", run="running", log=lines, progress="80")
        wait_until(lambda: streams() == before + 1, what="the first run's stream")
        page.send(unmount=True)
        wait_until(lambda: page.of_type("unmounted"), what="the unmount")
        wait_until(lambda: streams() == before, what="unmounting to close the stream")
    finally:
        exit_code, stderr = page.close()

    assert exit_code == 0, stderr[-3000:]
    assert page.of_type("console") == [], "React reported a problem (e.g. an uncached getSnapshot)"


def test_type_declarations_compile_in_strict_mode_and_match_the_modules(node):
    tsc = subprocess.run(
        [node, "node_modules/typescript/bin/tsc", "-p", "tsconfig.json"],
        cwd=NODE_DIR, capture_output=True, text=True, timeout=120,
    )
    assert tsc.returncode == 0, f"tsc -p tests/node/tsconfig.json (strict):\n{tsc.stdout[-6000:]}{tsc.stderr[-2000:]}"

    checked = subprocess.run([node, "check-declarations.mjs"], cwd=NODE_DIR, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, f"the declarations and the modules differ: {checked.stdout}{checked.stderr[-2000:]}"
