"""gunicorn's own error answers (issue 18): docs/protocol.md §3 JSON with a 4xx, like every other error.

gunicorn refuses these requests before the app sees them. They go out on raw sockets (an
HTTP client library refuses to send most of them) to a live gunicorn started from
gunicorn.conf.py, as production runs it.
"""
from __future__ import annotations

from typing import Iterator

import httpx
import pytest
from gunicorn.config import Config
from gunicorn.http.errors import ConfigurationProblem, InvalidResponseHeader

from common.server_errors import answer_for
from conftest import LiveServer
from json_errors import assert_json_error
from test_http_faults import connect, read_response

LIMIT_REQUEST_LINE = 8190  # gunicorn.conf.py


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("server-errors")
    server = LiveServer(tmp / "gunicorn.log", f"sqlite:///{tmp / 'errors.sqlite3'}", workers=1)
    try:
        yield server.start()
    finally:
        server.stop()


def exchange(server: LiveServer, request: bytes) -> httpx.Response:
    with connect(server) as sock:
        sock.sendall(request)
        response = read_response(sock)
        assert sock.recv(1) == b"", "the server closes the connection after its error"
    return response


def headers(*lines: bytes) -> bytes:
    return b"".join(line + b"\r\n" for line in lines)


REFUSED = {
    "request line too long": (
        b"GET /" + b"a" * LIMIT_REQUEST_LINE + b" HTTP/1.1\r\n" + headers(b"Host: x") + b"\r\n",
        414, "request_line_too_long",
    ),
    "too many headers": (
        b"GET /healthz HTTP/1.1\r\n" + headers(b"Host: x", *(b"X-%d: 1" % n for n in range(101))) + b"\r\n",
        431, "headers_too_large",
    ),
    "a header too large": (
        b"GET /healthz HTTP/1.1\r\n" + headers(b"Host: x", b"X-Big: " + b"a" * 9000) + b"\r\n",
        431, "headers_too_large",
    ),
    "malformed request line": (b"GARBAGE\r\n\r\n", 400, "malformed_request"),
    "invalid method": (b"G@T / HTTP/1.1\r\n" + headers(b"Host: x") + b"\r\n", 400, "malformed_request"),
    "invalid header name": (
        b"GET /healthz HTTP/1.1\r\n" + headers(b"Host: x", b"Bad Name: 1") + b"\r\n",
        400, "malformed_request",
    ),
    "a body length gunicorn cannot tell": (  # a request it has read, hence in the access log
        b"POST /api/events HTTP/1.1\r\n"
        + headers(b"Host: x", b"Content-Type: application/json", b"Transfer-Encoding: gzip") + b"\r\n",
        400, "malformed_request",
    ),
    # gunicorn answers 501 (RFC 9112 §6.1); RFC 9112 §6.3 asks 400 when the last coding is not chunked.
    "unknown transfer coding": (
        b"POST /api/events HTTP/1.1\r\n"
        + headers(b"Host: x", b"Content-Type: application/json", b"Transfer-Encoding: xchunked") + b"\r\n",
        400, "unsupported_transfer_coding",
    ),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", REFUSED)
def test_gunicorn_refuses_bad_requests_with_json(server, name):
    request, status, code = REFUSED[name]
    response = exchange(server, request)
    error = assert_json_error(response, status, code)
    assert response.headers["Connection"] == "close"
    assert len(error["message"]) < 400, "bounded: never the whole request line or header echoed"


def test_the_servers_own_failures_are_a_json_500_that_tells_nothing():
    cfg = Config()
    for exc in (InvalidResponseHeader("X-Bad"), ConfigurationProblem("forwarded_allow_ips"), RuntimeError("db at /x")):
        error = answer_for(exc, cfg)
        assert (error.status, error.code, error.message) == (500, "internal_error", "Something went wrong on the server.")
