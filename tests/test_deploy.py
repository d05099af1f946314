"""deploy/nginx.conf in front of a real gunicorn (docs/deploy.md).

Debian's nginx runs as this test's own process, with the repository's own
server block: the test reads deploy/nginx.conf and changes only what cannot
work here (the upstream's port, plain HTTP on free ports instead of TLS on
443 and 80, the log directory), so every proxy setting a deployment uses is
the one under test. What a subscriber behind nginx depends on: the stream's
headers, frames passed on one by one (no buffering), keep-alives on an idle
stream, resuming with Last-Event-ID, the probes, nginx's request id reaching
the app and coming back, and no token in nginx's access log.

The slow-client test is the one that shows what `X-Accel-Buffering: no`
changes: to a client that reads, nginx 1.22 passes small chunks on promptly
even while buffering (unless a compressor or a cache holds them); to one that
stops reading, a buffering nginx would go on reading the stream into a
temporary file, and the app would never see the client fall behind.
"""
from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from conftest import PUBLISH_KEY, ROOT, LiveServer, free_port, skip_or_fail, wait_until
from sseclient import Comment, Frame, events_of, read_frames

pytestmark = pytest.mark.integration

NGINX = "/usr/sbin/nginx"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
RETRY_MS = 200  # what LiveServer sets
HANG_GUARD_S = 5.0  # read timeout only: a stream held back by nginx is silent (heartbeats every 1 s)
REQUEST_ID = re.compile(r"[0-9a-f]{32}")  # nginx's $request_id


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"deploy/nginx.conf should contain {old!r} once: update tests/test_deploy.py with it"
    return text.replace(old, new)


def server_block(upstream_port: int, port: int, redirect_port: int, log_dir: Path) -> str:
    """deploy/nginx.conf, with its upstream, listen lines and log paths made to work here."""
    text = NGINX_CONF.read_text()
    text = _replace_once(text, "server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};")
    text = _replace_once(text, "listen 443 ssl http2;", f"listen 127.0.0.1:{port};")
    text = _replace_once(text, "listen 80;", f"listen 127.0.0.1:{redirect_port};")
    # No certificate here: without the `ssl` listener nginx would still load these files.
    text, removed = re.subn(r"(?m)^\s*ssl_certificate(_key)?\s+[^;]+;\n", "", text)
    assert removed == 2, "deploy/nginx.conf should name ssl_certificate and ssl_certificate_key"
    return text.replace("/var/log/nginx/", f"{log_dir}/")


class Nginx:
    """One nginx master in front of `upstream_port`; `start()`, then `stop()` (by its pid)."""

    def __init__(self, directory: Path, upstream_port: int) -> None:
        self.dir = directory
        self.upstream_port = upstream_port
        self.port = free_port()
        self.redirect_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @property
    def access_log(self) -> Path:
        return self.dir / "realtime.access.log"

    def read(self, name: str) -> str:
        try:
            return (self.dir / name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> Nginx:
        self.dir.mkdir()
        (self.dir / "realtime.conf").write_text(
            server_block(self.upstream_port, self.port, self.redirect_port, self.dir)
        )
        # Workers drop to `user` (default: nobody) only when the master runs as root;
        # they must write to this test's temporary directories.
        user = "user root;\n" if os.geteuid() == 0 else ""
        temp_paths = "".join(f"    {kind}_temp_path {self.dir / kind};\n"
                             for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.dir / "nginx.conf").write_text(
            f"{user}worker_processes 1;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            f"{temp_paths}"
            f"    access_log {self.dir / 'access.log'};\n"
            f"    include {self.dir / 'realtime.conf'};\n"
            "}\n"
        )
        error_log = self.dir / "error.log"
        with open(self.dir / "nginx.out", "wb") as out:
            self.process = subprocess.Popen(
                [NGINX, "-p", f"{self.dir}/", "-c", str(self.dir / "nginx.conf"), "-e", str(error_log),
                 "-g", f"daemon off; pid {self.dir / 'nginx.pid'}; error_log {error_log};"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            wait_until(self._answers, timeout=15, what=f"nginx on port {self.port} (log: {error_log})")
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(
                f"nginx exited with {self.process.returncode}: {self.read('nginx.out')}{self.read('error.log')[-3000:]}"
            )
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown: it does not wait for open streams), SIGKILL if need be."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # the master and its workers
            self.process.wait()


@pytest.fixture
def proxied(start_server, tmp_path) -> Iterator[tuple[LiveServer, Nginx]]:
    """A 2-worker gunicorn on SQLite, and nginx with deploy/nginx.conf in front of it."""
    if not os.access(NGINX, os.X_OK):
        skip_or_fail("Debian's nginx is not installed (apt-get install nginx)")
    server = start_server(f"sqlite:///{tmp_path / 'deploy.sqlite3'}", DEMO_ENABLED=True)
    nginx = Nginx(tmp_path / "nginx", server.port)
    try:
        yield server, nginx.start()
    finally:
        nginx.stop()


def token_via(nginx: Nginx, channel: str, topics: list[str]) -> str:
    response = httpx.post(nginx.url + "/api/realtime/token", json={"channel": channel, "topics": topics}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["token"]


def publish_via(nginx: Nginx, channel: str, topic: str, data: object) -> dict:
    response = httpx.post(nginx.url + "/api/realtime/publish", json={"channel": channel, "topic": topic, "data": data},
                          headers={"Authorization": f"Bearer {PUBLISH_KEY}"}, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()


def subscribe_via(nginx: Nginx, token: str, last_event_id: str | None = None):  # noqa: ANN201
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    timeout = httpx.Timeout(10.0, read=HANG_GUARD_S)
    return httpx.stream("GET", nginx.url + "/api/realtime/subscribe", params={"token": token},
                        headers=headers, timeout=timeout)


def next_item(items: Iterator[Frame | Comment], what: str) -> Frame | Comment:
    try:
        return next(items)
    except httpx.ReadTimeout:
        pytest.fail(f"nothing came through nginx within {HANG_GUARD_S} s while waiting for {what}: "
                    "did nginx hold the stream back?")


def test_stream_headers_and_keep_alives_through_nginx(proxied):
    """The largest token a browser sends in the URL, gzip offered: headers, `retry:`, then keep-alives."""
    _, nginx = proxied
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-"
    rng = random.Random(1)
    channel = "".join(rng.choice(alphabet) for _ in range(200))
    token = token_via(nginx, channel, ["".join(rng.choice(alphabet) for _ in range(100)) for _ in range(50)])

    with subscribe_via(nginx, token) as response:
        assert response.status_code == 200, response.read()[:300]
        assert response.request.headers["accept-encoding"].startswith("gzip")
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-cache"
        assert "content-encoding" not in response.headers  # gzip leaves the stream alone
        assert "x-accel-buffering" not in response.headers  # nginx acted on it and kept it to itself
        assert REQUEST_ID.fullmatch(response.headers["x-request-id"])
        items = events_of(response)
        first = next_item(items, "the retry: frame")
        assert isinstance(first, Frame) and first.retry == RETRY_MS, first
        # An idle channel: only heartbeats (REALTIME_HEARTBEAT_S=1) keep it going.
        for n in range(2):
            item = next_item(items, f"keep-alive {n + 1}")
            assert item == Comment("keep-alive"), item

    # nginx logs the stream once it notices the client left (at the next heartbeat).
    wait_until(lambda: "/api/realtime/subscribe" in nginx.read("realtime.access.log"), what="the stream's log line")
    assert token not in nginx.read("realtime.access.log")
    assert "token=" not in nginx.read("realtime.access.log")


def test_frames_pass_one_by_one_and_resume_through_nginx(proxied):
    """Each frame is read through nginx before the next is published: a proxy that held frames back
    (gzip on a buffered stream, a cache) would hang here."""
    _, nginx = proxied
    token = token_via(nginx, "deploy.unbuffered", ["status"])
    published: list[dict] = []
    cursors: list[str] = []

    with subscribe_via(nginx, token) as response:
        assert response.status_code == 200, response.read()[:300]
        items = events_of(response)
        assert next_item(items, "the retry: frame").retry == RETRY_MS
        for n in range(5):
            published.append(publish_via(nginx, "deploy.unbuffered", "status", {"n": n}))
            try:
                frame = read_frames(items, 1)[0]
            except httpx.ReadTimeout:
                pytest.fail(f"message {n} did not come through nginx: did nginx hold the stream back?")
            assert frame.envelope == published[-1]
            cursors.append(frame.id)

    # Resume on a new connection, as EventSource does: only what came after the cursor.
    with subscribe_via(nginx, token, last_event_id=cursors[1]) as response:
        assert response.status_code == 200, response.read()[:300]
        frames = read_frames(events_of(response), 3)
    assert [frame.envelope for frame in frames] == published[2:]
    assert [frame.id for frame in frames] == cursors[2:]


def test_a_client_that_stops_reading_is_cut_by_the_app_not_absorbed_by_nginx(start_server, tmp_path):
    """Unbuffered, nginx keeps a few KB for a client that stopped reading: once the socket buffers on
    the way are full, gunicorn's write waits and the app cuts the stream (REALTIME_SEND_TIMEOUT_S, or
    its bounded queue); the client resumes with its cursor. A buffering nginx would go on reading the
    stream into a temporary file (up to 1 GB per stream), and the stream would never end."""
    if not os.access(NGINX, os.X_OK):
        skip_or_fail("Debian's nginx is not installed (apt-get install nginx)")
    server = start_server(f"sqlite:///{tmp_path / 'slow.sqlite3'}", DEMO_ENABLED=True, REALTIME_SEND_TIMEOUT_S=1)
    nginx = Nginx(tmp_path / "nginx", server.port).start()

    def cut_by_the_app() -> float:
        found = server.metrics()
        return sum(found.get(f'realtime_streams_closed_total{{reason="{reason}"}}', 0.0)
                   for reason in ("send_timeout", "overflow"))

    token = token_via(nginx, "deploy.stalled", ["bulk"])
    client = socket.socket()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # before connect: a small window
        client.connect(("127.0.0.1", nginx.port))
        client.sendall(f"GET /api/realtime/subscribe?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        wait_until(lambda: server.metric("realtime_streams_open") == 1, what="the stream to open")
        # The kernel's buffers on loopback (gunicorn -> nginx -> client) hold several MB: publish
        # until the app notices, at most 40 MB, never read by the client.
        published = 0
        while published < 200 and not cut_by_the_app():
            publish_via(nginx, "deploy.stalled", "bulk", {"n": published, "fill": "x" * 200_000})
            published += 1
        wait_until(cut_by_the_app, timeout=15,
                   what=f"the app to cut the stalled stream after {published} x 200 KB (did nginx buffer it?)")
        wait_until(lambda: server.metric("realtime_streams_open") == 0, what="the stream to end")
    finally:
        client.close()
        nginx.stop()


def test_probes_request_ids_and_private_metrics_through_nginx(proxied):
    _, nginx = proxied

    response = httpx.get(nginx.url + "/readyz", headers={"X-Request-ID": "chosen-by-the-client"}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ready", "checks": {"database": "ok", "change_feed": "ok"}}
    # nginx replaced the client's id with its own $request_id; the app echoed that one.
    request_id = response.headers["x-request-id"]
    assert REQUEST_ID.fullmatch(request_id), request_id
    wait_until(lambda: request_id in nginx.read("realtime.access.log"), what="the request id in nginx's log")

    assert httpx.get(nginx.url + "/healthz", timeout=10).json() == {"status": "ok"}
    # Only the scraper's network may read /metrics: this test is not in it.
    assert httpx.get(nginx.url + "/metrics", timeout=10).status_code == 403

    plain = httpx.get(f"http://127.0.0.1:{nginx.redirect_port}/readyz", timeout=10)
    assert plain.status_code == 301
    assert plain.headers["location"] == "https://127.0.0.1/readyz"
