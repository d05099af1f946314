"""Caps on open streams (realtime/stream_limits.py, issue 18 item 1): per token, and per process.

The attack: one token opened 5,000 streams in 3.4 s, and once two workers x `worker_connections`
were streams, `/healthz` timed out for everyone. The live tests send it to a real gunicorn on raw
sockets, every request in flight at once, as an attacker does.
"""
from __future__ import annotations

import http.client
import json
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Iterator

import httpx
import pytest
from prometheus_client import REGISTRY

import sseclient
from conftest import LiveServer, app_on, wait_until
from json_errors import SUBSCRIBE, assert_json_error
from realtime.stream_limits import StreamLimits, TooManyStreams
from realtime.tokens import TokenIssuer


def _refused(reason: str) -> float:
    return REGISTRY.get_sample_value("realtime_stream_limit_refused_total", {"reason": reason}) or 0.0


# -- the counts ----------------------------------------------------------------------------------


def test_a_token_holds_at_most_its_streams_and_each_one_closed_frees_its_place():
    tokens = TokenIssuer("secret")
    grant, other = tokens.issue("run.1", ["status"]), tokens.issue("run.2", ["status"])
    limits = StreamLimits(max_per_token=2, retry_after_s=15)
    refused_before = _refused("per_token")
    first, second = limits.claim(grant), limits.claim(grant)
    with pytest.raises(TooManyStreams) as refused:
        limits.claim(grant)
    assert (refused.value.status, refused.value.code) == (429, "too_many_streams")
    assert refused.value.headers == {"Retry-After": "15"}
    assert _refused("per_token") - refused_before == 1
    limits.claim(other)  # another token has its own count
    first()
    first()  # a response closed twice gives its place back once
    limits.claim(grant)
    with pytest.raises(TooManyStreams):
        limits.claim(grant)
    second()
    limits.claim(grant)


def test_every_spelling_of_a_token_is_the_same_token():
    """The signature's last character carries two bits the check ignores: four spellings verify,
    and all four count as the one token they are."""
    tokens = TokenIssuer("secret")
    token = tokens.issue("run.1", ["status"]).token
    signed, _, signature = token.rpartition(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    first = alphabet.index(signature[-1]) & ~3
    spellings = [f"{signed}.{signature[:-1]}{alphabet[first + bits]}" for bits in range(4)]
    grants = [tokens.verify(spelling) for spelling in spellings]  # each one verifies
    assert len({grant.token for grant in grants}) == 4
    limits = StreamLimits(max_per_token=4)
    for grant in grants:
        limits.claim(grant)
    with pytest.raises(TooManyStreams):
        limits.claim(tokens.verify(token))


def test_a_full_process_refuses_until_a_request_leaves():
    limits = StreamLimits(max_streams=2)
    refused_before = _refused("process_full")
    leave, _ = limits.enter(), limits.enter()
    assert limits.enter() is None
    assert _refused("process_full") - refused_before == 1
    leave()
    leave()
    assert limits.enter() is not None and limits.enter() is None


@pytest.mark.parametrize(("configured", "worker_connections", "cap"), [
    (None, 10000, 9500),  # gunicorn.conf.py's 10,000: 500 kept for the rest
    (None, 1000, 950),  # gunicorn's own default
    (None, 40, 38),  # what the flood test below runs with
    (None, 10, 9),  # always one at least
    (120, 10000, 120),  # set explicitly: kept
    (0, 10000, 0),  # no cap
])
def test_the_process_cap_leaves_a_share_of_the_connections(configured, worker_connections, cap):
    limits = StreamLimits(max_streams=configured)
    limits.fit_connections(worker_connections)
    assert limits.max_streams == cap


# -- in the app ------------------------------------------------------------------------------------


def test_the_subscribe_view_counts_a_tokens_streams_until_they_close(app, client):
    """Four streams of a token open; the fifth is 429 with Retry-After; a forged token is refused
    without taking the real one's place; a stream closed gives its place back."""
    app.extensions["realtime"].stream_limits.max_per_token = 4  # REALTIME_MAX_STREAMS_PER_TOKEN
    token = client.post("/api/realtime/token", json={"channel": "run.limits", "topics": ["status"]}).json["token"]
    url = f"{SUBSCRIBE}?token={token}"
    forged = f"{SUBSCRIBE}?token={token.rpartition('.')[0]}.{'A' * 27}"  # its payload, another signature
    for _ in range(4):
        assert_json_error(client.get(forged), 401, "invalid_token")
    streams = [client.get(url) for _ in range(4)]
    try:
        assert [s.status_code for s in streams] == [200] * 4, "the forged requests took no place"
        refused_before = _refused("per_token")
        fifth = client.get(url)
        streams.append(fifth)
        assert fifth.status_code == 429  # before its body: a stream's never ends
        assert_json_error(fifth, 429, "too_many_streams")
        assert fifth.headers["Retry-After"] == "15"  # REALTIME_HEARTBEAT_S
        assert _refused("per_token") - refused_before == 1
        streams.pop(0).close()
        reopened = client.get(url)
        streams.append(reopened)
        assert reopened.status_code == 200
    finally:
        for stream in streams:
            stream.close()


@pytest.fixture
def full_app(tmp_path):
    """The demo app whose process holds at most two stream requests."""
    yield from app_on(f"sqlite:///{tmp_path / 'full.sqlite3'}", DEMO_ENABLED=True, REALTIME_MAX_STREAMS=2)


def test_a_full_process_refuses_streams_before_flask_and_serves_everything_else(full_app):
    client = full_app.test_client()
    tokens = [client.post("/api/realtime/token", json={"channel": f"run.{n}", "topics": ["s"]}).json["token"]
              for n in range(3)]
    streams = [client.get(f"{SUBSCRIBE}?token={token}") for token in tokens[:2]]
    try:
        assert [s.status_code for s in streams] == [200, 200]
        refused_before = _refused("process_full")
        refused = client.get(f"{SUBSCRIBE}?token={tokens[2]}")
        streams.append(refused)
        assert refused.status_code == 503  # before its body: a stream's never ends
        assert_json_error(refused, 503, "server_full")
        assert refused.headers["Retry-After"] == "5"
        assert "X-Request-ID" not in refused.headers, "answered before Flask, which echoes every request's id"
        assert _refused("process_full") - refused_before == 1
        assert client.get("/healthz").status_code == 200
        streams.pop(0).close()
        streams.append(client.get(f"{SUBSCRIBE}?token={tokens[2]}"))
        assert streams[-1].status_code == 200
    finally:
        for stream in streams:
            stream.close()


# -- the attack, against gunicorn ---------------------------------------------------------------


@dataclass
class Answer:
    """The head of one answer to a stream request; a refusal's body; the socket of a stream."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    sock: socket.socket | None = field(default=None, repr=False)

    @property
    def code(self) -> str:
        return json.loads(self.body)["error"]["code"]


def flood(server: LiveServer, tokens: list[str], within: float = 15.0) -> list[Answer]:
    """A stream request for each token on its own connection, all sent before any answer is read;
    the answers in the order the requests were sent. A refusal's connection is closed as soon as
    it is read (as a client does, so the server's keep-alive holds no slot); a stream's is kept
    open, unread, in `Answer.sock`."""
    socks = []
    for token in tokens:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(f"GET {SUBSCRIBE}?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        socks.append(sock)
    received = {sock: b"" for sock in socks}
    answers: dict[socket.socket, Answer] = {}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + within  # a guard against a hang, not a bound under test
        while len(answers) < len(socks):
            assert time.monotonic() < deadline, f"{len(socks) - len(answers)} of {len(socks)} requests got no answer"
            for key, _ in selector.select(timeout=0.1):
                sock = key.fileobj
                chunk = sock.recv(65536)
                assert chunk, "the server closed a connection without an answer"
                received[sock] += chunk
                answer = _answer(received[sock])
                if answer is None:
                    continue
                selector.unregister(sock)
                if answer.status == 200:
                    answer.sock = sock
                else:
                    sock.close()
                answers[sock] = answer
    return [answers[sock] for sock in socks]


def _answer(data: bytes) -> Answer | None:
    """The answer `data` holds: a stream's head, or a refusal's head and whole body; None if not yet."""
    head, found, rest = data.partition(b"\r\n\r\n")
    if not found:
        return None
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    status = int(status_line.split()[1])
    if status == 200:
        return Answer(status, headers)
    length = int(headers["content-length"])
    return Answer(status, headers, rest[:length]) if len(rest) >= length else None


def close_streams(answers: list[Answer]) -> None:
    for answer in answers:
        if answer.sock is not None:
            answer.sock.close()


def opens(server: LiveServer, token: str, kept: list[Answer]) -> bool:
    """Whether a stream of `token` opens now; one that does is kept in `kept`."""
    (answer,) = flood(server, [token])
    kept.append(answer)
    return answer.status == 200


@pytest.fixture
def streams() -> Iterator[list[Answer]]:
    """The answers a test floods the server with: their streams are closed after it."""
    kept: list[Answer] = []
    yield kept
    close_streams(kept)


@pytest.mark.integration
def test_one_token_gets_its_cap_of_streams_on_each_worker_and_429_for_the_rest(start_server, tmp_path, streams):
    server = start_server(f"sqlite:///{tmp_path / 'token.sqlite3'}", DEMO_ENABLED=True,  # 2 workers
                          REALTIME_MAX_STREAMS_PER_TOKEN=4)
    token = server.token("run.attack", ["status"])
    streams += flood(server, [token] * 30)
    opened = [a for a in streams if a.status == 200]
    refused = [a for a in streams if a.status != 200]
    per_worker: dict[int | None, int] = {}
    for answer in opened:
        worker = sseclient.serving_worker(server, answer.sock)
        per_worker[worker] = per_worker.get(worker, 0) + 1
    # Counted per process: 4 on each worker at most (the kernel picks the worker of a connection).
    assert set(per_worker) <= set(server.worker_pids()) and max(per_worker.values()) == 4, per_worker
    assert 4 <= len(opened) <= 8
    assert {(a.status, a.code) for a in refused} == {(429, "too_many_streams")}
    assert all(a.headers["retry-after"] == "1" for a in refused)  # the test server's 1 s heartbeat
    assert all(a.headers["content-type"] == "application/json" for a in refused)
    assert server.metric('realtime_stream_limit_refused_total{reason="per_token"}') == len(refused)


@pytest.mark.integration
def test_a_flood_of_streams_leaves_each_worker_room_for_everything_else(start_server, tmp_path, streams):
    """60 streams of 60 tokens at a worker of 40 connections: 38 open, 22 get 503 at once, and
    /healthz (within the issue's 1 s), a publish and a token request still get through; a stream
    that closes gives its place back."""
    server = start_server(f"sqlite:///{tmp_path / 'flood.sqlite3'}", workers=1, DEMO_ENABLED=True,
                          gunicorn_args=["--worker-connections", "40"])  # streams: 40 less 5%, 38
    tokens = [server.token(f"flood.{n}", ["status"]) for n in range(60)]
    streams += flood(server, tokens)
    assert [a.status for a in streams].count(200) == 38
    refused = [a for a in streams if a.status != 200]
    assert {(a.status, a.code, a.headers["retry-after"]) for a in refused} == {(503, "server_full", "5")}

    assert httpx.get(server.url + "/healthz", timeout=1).status_code == 200
    server.publish("flood.0", "status", {"percent": 50})
    late = server.token("flood.late", ["status"])
    assert server.metric('realtime_stream_limit_refused_total{reason="process_full"}') == len(refused)

    opened = [a for a in streams if a.status == 200]
    opened[0].sock.close()
    opened[0].sock = None
    wait_until(lambda: opens(server, late, streams), what="a stream opening once another closed")
