"""Clients that stop reading: bounded memory, cut after the send timeout, never holding a reload.

Raw sockets with a tiny receive buffer that read nothing after the headers:
the server's writes to them block once the kernel buffers are full, which is
what a stalled phone or a frozen tab does (CONTRACT §5 "Bounds", issue 8).
"""
from __future__ import annotations

import signal
import socket
from contextlib import ExitStack, closing

import pytest

from conftest import PUBLISH_KEY, LiveServer, wait_until
from sseclient import streams_open

pytestmark = pytest.mark.integration

BIG = "x" * 450_000  # about the largest message allowed (512 KiB)


def stalled_stream(server: LiveServer, token: str) -> socket.socket:
    """A subscriber that reads the response headers, then nothing more."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"GET /api/realtime/subscribe?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def publish_many(server: LiveServer, channel: str, count: int, data: str) -> None:
    import httpx

    with httpx.Client(headers={"Authorization": f"Bearer {PUBLISH_KEY}"}, timeout=30) as client:
        for n in range(count):
            response = client.post(server.url + "/api/realtime/publish", json={"channel": channel, "topic": "t", "data": data})
            assert response.status_code == 201, response.text


def drain(sock: socket.socket) -> bytes:
    """Everything the server still sends, until it closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_a_client_that_stops_reading_is_cut_after_the_send_timeout(start_server, tmp_path):
    server = start_server(f"sqlite:///{tmp_path / 'slow.sqlite3'}", DEMO_ENABLED=True, REALTIME_SEND_TIMEOUT_S=1)
    token = server.token("slow.1", ["t"])
    with closing(stalled_stream(server, token)) as sock:
        wait_until(lambda: streams_open(server) == 1, what="the stream open")
        # 5.4 MB: more than the socket buffers hold, less than the 8 MiB queue
        # bound, so only the send timeout can end this stream.
        publish_many(server, "slow.1", 12, BIG)
        wait_until(lambda: streams_open(server) == 0, what="the stalled stream cut")
        received = drain(sock)
    assert 0 < received.count(b"\nevent: t\n") < 12, "cut in the middle, not after the last message"


def test_a_client_that_stops_reading_does_not_hold_a_reload(start_server, tmp_path):
    """The send timeout and the graceful timeout are far beyond the test's patience:
    the reload must cut the blocked write itself."""
    server = start_server(f"sqlite:///{tmp_path / 'reload.sqlite3'}", DEMO_ENABLED=True, gunicorn_args=["--graceful-timeout", "600"],
                          REALTIME_SEND_TIMEOUT_S=600)
    token = server.token("slow.2", ["t"])
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(stalled_stream(server, token))) for _ in range(4)]
        wait_until(lambda: streams_open(server) == 4, what="4 streams open")
        publish_many(server, "slow.2", 12, BIG)
        old = set(server.worker_pids())
        server.signal(signal.SIGHUP)
        wait_until(lambda: not old & set(server.worker_pids()) and len(server.worker_pids()) == 2,
                   timeout=60, what="the old workers to exit")
        for sock in socks:
            drain(sock)  # the connection was closed: EOF, not a hang


ZERO_WINDOW_PROBE = 4  # /proc/net/tcp's timer: the peer's window is closed and bytes wait to go out


def blocked_on_a_full_client(server: LiveServer, sock: socket.socket) -> bool:
    """Whether the server's end of `sock` holds bytes the client's full receive buffer refuses.

    The kernel then probes the closed window (timer 4 in /proc/net/tcp), and the
    server's send buffer fills behind it: the write blocks until the client reads
    or the stream is cut. Only message frames fill the client's buffer: `retry:`
    and a keep-alive are a few bytes.
    """
    client_port = sock.getsockname()[1]
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            ports = [int(address.rpartition(":")[2], 16) for address in fields[1:3]]
            if ports == [server.port, client_port]:
                return int(fields[5].partition(":")[0], 16) == ZERO_WINDOW_PROBE
    return False


def memory_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field}")


@pytest.mark.parametrize("phase", ["replay", "live"])
def test_stalled_clients_cost_a_bounded_amount_of_memory(start_server, tmp_path, phase):
    """20 stalled replays of 31 large messages, or 30 stalled live streams while 8 MB are
    published: before issue 8 each took the worker from about 100 MiB to over 400."""
    server = start_server(f"sqlite:///{tmp_path / 'memory.sqlite3'}", workers=1, DEMO_ENABLED=True, REALTIME_SEND_TIMEOUT_S=600,
                          REALTIME_MAX_STREAMS_PER_TOKEN=0)  # one token opens its 20-30 stalled streams
    token = server.token("memory.1", ["t"])
    (pid,) = server.worker_pids()
    with ExitStack() as stack:
        if phase == "replay":
            publish_many(server, "memory.1", 31, BIG)
            before = memory_kib(pid, "VmRSS")
            socks = [stack.enter_context(closing(stalled_stream(server, token))) for _ in range(20)]
            # Each replay wrote until its client's buffer filled, and blocks writing: it holds all
            # it ever will (14 MB of replay, far more than the kernel takes). Not a count of replay
            # reads: streams share their pages (replay.py), and the dispatcher's polls count too.
            wait_until(lambda: all(blocked_on_a_full_client(server, sock) for sock in socks),
                       what="20 replays blocked writing")
        else:
            publish_many(server, "warm.up", 2, BIG)
            before = memory_kib(pid, "VmRSS")
            for _ in range(30):
                stack.enter_context(closing(stalled_stream(server, token)))
            wait_until(lambda: streams_open(server) == 30, what="30 streams")
            delivered = server.metric("realtime_frames_sent_total")
            publish_many(server, "memory.1", 18, BIG)
            wait_until(lambda: server.metric("realtime_frames_sent_total") >= delivered + 30 * 18,
                       what="every frame queued")
        stalled = memory_kib(pid, "VmRSS")
    grown = (stalled - before) / 1024
    print(f"{phase}: worker RSS {before / 1024:.0f} MiB, {stalled / 1024:.0f} MiB with the stalled clients")
    assert grown < 100, f"{phase}: the worker grew by {grown:.0f} MiB"
