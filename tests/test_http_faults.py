"""Misbehaving HTTP clients against a real gunicorn with gevent workers (CONTRACT §5 "Bounds").

Raw sockets, because a well-behaved client library cannot send a bad chunk
or stop halfway through a body. The socket's read timeout only keeps a
regression from hanging the suite; no test asserts how long anything took.
"""
from __future__ import annotations

import http.client
import json
import socket

import httpx
import pytest

from conftest import PUBLISH_KEY, LiveServer
from json_errors import MAX_BODY, MESSAGES, PUBLISH, assert_json_error

pytestmark = pytest.mark.integration

HANG_GUARD_S = 30  # well past the 10 s body deadline and gunicorn's 5 s keepalive
HEAD = (
    "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + PUBLISH_KEY + "\r\n"
    "Content-Type: application/json\r\n{framing}\r\n\r\n"
)


@pytest.fixture
def server(start_server, tmp_path) -> LiveServer:
    return start_server(f"sqlite:///{tmp_path / 'x.sqlite3'}", DEMO_ENABLED=True)


def connect(server: LiveServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=HANG_GUARD_S)


def read_response(sock: socket.socket) -> httpx.Response:
    """The next response on `sock`, as an httpx.Response for `assert_json_error`."""
    raw = http.client.HTTPResponse(sock)
    try:
        raw.begin()
        body = raw.read()
    finally:
        raw.close()
    return httpx.Response(raw.status, headers=raw.getheaders(), content=body)


def post(server: LiveServer, path: str, body: bytes) -> httpx.Response:
    with connect(server) as sock:
        sock.sendall(HEAD.format(path=path, framing=f"Content-Length: {len(body)}").encode() + body)
        return read_response(sock)


def nested(depth: int, leaf: object = 1) -> object:
    for _ in range(depth):
        leaf = {"k": leaf}
    return leaf


def test_malformed_chunk_is_400_malformed_request(server):
    with connect(server) as sock:
        sock.sendall(HEAD.format(path=PUBLISH, framing="Transfer-Encoding: chunked").encode() + b"ZZ\r\nabc")
        assert_json_error(read_response(sock), 400, "malformed_request")


def test_trickling_body_is_cut_with_408_and_the_connection_closed(server):
    """Content-Length promises 100 bytes, a few come, then nothing: the body deadline answers.

    The connection then closes too: after the 408 gunicorn would drain the
    rest of the body before the next request, and gives up on that after its
    keepalive timeout.
    """
    with connect(server) as sock:
        sock.sendall(HEAD.format(path=PUBLISH, framing="Content-Length: 100").encode() + b'{"chan')
        assert_json_error(read_response(sock), 408, "request_timeout")
        assert sock.recv(1) == b""


def test_client_gone_mid_body_is_400_malformed_request(server):
    """The client stops sending halfway through a chunk (it still reads): gunicorn raises NoMoreData."""
    with connect(server) as sock:
        sock.sendall(HEAD.format(path=PUBLISH, framing="Transfer-Encoding: chunked").encode() + b"20\r\n{")
        sock.shutdown(socket.SHUT_WR)
        assert_json_error(read_response(sock), 400, "malformed_request")


def test_publish_deeper_than_64_levels_is_400_and_stores_nothing(server):
    body = json.dumps({"channel": "deep", "topic": "t", "data": nested(65)}).encode()
    error = assert_json_error(post(server, PUBLISH, body), 400, "invalid_data")
    assert "64" in error["message"]
    # Far deeper than the parser goes: refused as JSON, and the worker lives on.
    assert_json_error(post(server, PUBLISH, b"[" * 100_000 + b"]" * 100_000), 400, "invalid_json")

    history = httpx.get(server.url + MESSAGES, params={"token": server.token("deep", ["t"])}, timeout=10)
    assert history.status_code == 200 and history.json()["messages"] == []


def test_event_deeper_than_64_levels_is_400_invalid_event_data(server):
    body = json.dumps({"name": "nothing.listens", "data": nested(65)}).encode()
    assert_json_error(post(server, "/api/events", body), 400, "invalid_event_data")


def test_a_chunked_body_past_its_endpoints_limit_is_413_with_that_endpoints_code(server):
    """No Content-Length to refuse up front: the body is read up to the publish limit, then refused."""
    body = b'{"channel": "big", "topic": "t", "data": "' + b"x" * MAX_BODY + b'"}'
    with connect(server) as sock:
        sock.sendall(HEAD.format(path=PUBLISH, framing="Transfer-Encoding: chunked").encode()
                     + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
        assert_json_error(read_response(sock), 413, "message_too_large")


def test_a_hundred_events_of_ten_kilobytes_fit_the_events_limit(server):
    """1 MB of valid events, over the publish limit: POST /api/events has its own (CONTRACT §6)."""
    batch = [{"name": "nothing.listens", "data": {"note": "x" * 10_000}}] * 100
    response = post(server, "/api/events", json.dumps(batch).encode())
    assert response.status_code == 202, response.text
    assert len(response.json()["ids"]) == 100
