"""Reading request bodies (common/request_input.py): bad JSON, a client that leaves, one that trickles.

In-process, with the body a stream that misbehaves the way gunicorn's does;
the same against a real gunicorn is in test_http_faults.py.
"""
from __future__ import annotations

import gevent
import pytest
from gevent.event import Event
from gunicorn.http.errors import InvalidChunkSize, NoMoreData

from common import request_input
from json_errors import AUTH, PUBLISH, assert_json_error

EVENTS = "/api/events"
JSON = {"Content-Type": "application/json"}


class FailingBody:
    """A `wsgi.input` that raises `error` on the first read, as gunicorn's Body does."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def read(self, size: int = -1) -> bytes:
        raise self.error


class InstantBody:
    """A `wsgi.input` whose client sent everything at once, so no read ever waits (as on a fast
    link). `turns()` at each read: how often another greenlet has had a turn so far."""

    def __init__(self, data: bytes, turns) -> None:
        self.data, self.turns, self.seen = data, turns, []

    def read(self, size: int = -1) -> bytes:
        self.seen.append(self.turns())
        piece, self.data = (self.data, b"") if size < 0 else (self.data[:size], self.data[size:])
        return piece


class StalledBody:
    """A `wsgi.input` whose client sends nothing more: the read waits (cooperatively) for bytes.

    The wait's own timeout only keeps a broken deadline from hanging the
    suite: the body then ends empty, which is not what the test expects.
    """

    def read(self, size: int = -1) -> bytes:
        Event().wait(timeout=10)
        return b""


def post_stream(client, path: str, body: object):
    """POST a chunked body read from `body`, which the server (like gunicorn) says it ends itself."""
    return client.post(path, headers={**AUTH, **JSON, "Transfer-Encoding": "chunked"},
                       environ_overrides={"wsgi.input": body, "wsgi.input_terminated": True})


@pytest.mark.parametrize("path", [PUBLISH, EVENTS])
def test_body_nested_a_hundred_thousand_deep_is_invalid_json(client, realtime, path):
    response = client.post(path, data=b"[" * 100_000 + b"]" * 100_000, headers={**AUTH, **JSON})
    assert_json_error(response, 400, "invalid_json")
    response = client.post(path, data=b'{"":' * 100_000 + b"1" + b"}" * 100_000, headers={**AUTH, **JSON})
    assert_json_error(response, 400, "invalid_json")
    assert realtime.store.last_id() == 0


@pytest.mark.parametrize("error", [NoMoreData(b"partial"), ConnectionResetError(104, "reset by peer")],
                         ids=["NoMoreData", "reset"])
@pytest.mark.parametrize("path", [PUBLISH, EVENTS])
def test_client_gone_mid_body_is_400_malformed_request(client, realtime, path, error):
    assert_json_error(post_stream(client, path, FailingBody(error)), 400, "malformed_request")
    assert realtime.store.last_id() == 0


def test_malformed_chunk_is_400_malformed_request(client):
    assert_json_error(post_stream(client, PUBLISH, FailingBody(InvalidChunkSize(b"ZZ"))), 400, "malformed_request")


@pytest.fixture
def short_deadline(monkeypatch):
    """What gunicorn's gevent worker runs under, with a deadline the test need not wait 10 s for."""
    monkeypatch.setattr(request_input, "gevent_is_patched", lambda: True)
    monkeypatch.setattr(request_input, "BODY_TIMEOUT_S", 0.05)


@pytest.mark.parametrize("path", [PUBLISH, EVENTS])
def test_body_that_stops_arriving_is_408_under_gevent(client, realtime, short_deadline, path):
    assert_json_error(post_stream(client, path, StalledBody()), 408, "request_timeout")
    assert realtime.store.last_id() == 0


def test_a_body_that_arrives_at_once_lets_other_greenlets_run_while_it_is_read(client, short_deadline):
    """Without a read that waits, a greenlet reading megabytes kept every stream of its worker waiting (issue 18)."""
    turns = 0

    def other() -> None:  # a stream of the same worker, say
        nonlocal turns
        while True:
            turns += 1
            gevent.sleep(0)

    greenlet = gevent.spawn(other)
    body = InstantBody(b" " * (3 * 1024 * 1024) + b"[]", lambda: turns)
    try:
        assert_json_error(post_stream(client, PUBLISH, body), 400, "invalid_json")  # read, parsed: not an object
    finally:
        greenlet.kill()
    reads = body.seen
    assert len(reads) > 4 and all(later > earlier for earlier, later in zip(reads, reads[1:])), reads


def test_a_body_in_time_is_read_as_usual_under_gevent(client, short_deadline):
    response = client.post(PUBLISH, json={"channel": "c", "topic": "t", "data": 1}, headers=AUTH)
    assert response.status_code == 201, response.get_data(as_text=True)


def test_someone_elses_timeout_is_not_taken_for_ours(client, short_deadline):
    """An outer `gevent.Timeout` (a caller's deadline) must reach its owner, not become a 408."""
    theirs = gevent.Timeout(60)
    with pytest.raises(gevent.Timeout) as caught:
        post_stream(client, PUBLISH, FailingBody(theirs))
    assert caught.value is theirs
