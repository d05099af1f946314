"""A real EventSource no one here wrote (npm `eventsource`) survives a gunicorn reload (issue 2).

The node script (tests/node/subscribe.mjs) only subscribes and prints what it
gets; reconnecting after the server ends the stream, and sending
`Last-Event-ID` when it does, is the package's own spec-following behaviour.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading

import pytest

from conftest import ROOT, skip_or_fail, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.node]

NODE_DIR = ROOT / "tests" / "node"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path) -> str:
    """conftest's `database_url`, with the PostgreSQL run marked `postgres`."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'live.sqlite3'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def node() -> str:
    executable = shutil.which("node")
    if executable is None:
        skip_or_fail("node is not installed")
    if not (NODE_DIR / "node_modules" / "eventsource").is_dir():
        skip_or_fail("tests/node/node_modules is missing: run `npm ci --prefix tests/node` (make test does)")
    return executable


class NodeSubscriber:
    """`node subscribe.mjs ...` with its JSON lines collected by a reader thread."""

    def __init__(self, node: str, url: str, topic: str, count: int, timeout_s: float) -> None:
        self.lines: list[dict] = []
        self.process = subprocess.Popen(
            [node, "subscribe.mjs", url, topic, str(count), str(int(timeout_s * 1000))],
            cwd=NODE_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(json.loads(line))

    def of_type(self, kind: str) -> list[dict]:
        return [line for line in self.lines if line["type"] == kind]

    def finish(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._reader.join(timeout=5)
            self.process.stdout.close()
            self.process.stderr.close()


def test_eventsource_package_resumes_across_sighup_reload(node, start_server, database_url):
    server = start_server(database_url, DEMO_ENABLED=True)
    token = server.token("node.1", ["t"])
    published = [server.publish("node.1", "t", {"n": n})["id"] for n in range(5)]  # replayed
    client = NodeSubscriber(node, f"{server.url}/api/realtime/subscribe?token={token}", "t", count=25, timeout_s=40)
    try:
        wait_until(lambda: len(client.of_type("event")) == 5, what="the replay to reach node")
        published += [server.publish("node.1", "t", {"n": n})["id"] for n in range(5, 10)]
        wait_until(lambda: len(client.of_type("event")) == 10, what="live messages to reach node")

        old_workers = set(server.worker_pids())
        server.signal(signal.SIGHUP)
        published += [server.publish("node.1", "t", {"n": n})["id"] for n in range(10, 20)]  # mid-reload
        wait_until(lambda: not old_workers & set(server.worker_pids()) and len(server.worker_pids()) == 2,
                   timeout=20, what="the reload to replace both workers")
        published += [server.publish("node.1", "t", {"n": n})["id"] for n in range(20, 25)]
        exit_code = client.finish(timeout=45)
    finally:
        client.finish(timeout=5)

    events = client.of_type("event")
    assert exit_code == 0, f"node received {len(events)} of 25 messages: {client.lines}"
    assert [e["id"] for e in events] == published, "every message exactly once, in order"
    requests = client.of_type("request")
    assert len(requests) >= 2, f"the client never reconnected: {client.lines}"
    assert requests[0]["lastEventId"] is None
    # Each reconnect carries the id of the last event received before it.
    last_id = None
    for line in client.lines:
        if line["type"] == "event":
            last_id = line["lastEventId"]
        elif line["type"] == "request" and line is not requests[0]:
            assert line["lastEventId"] == last_id, client.lines
