"""realtime.client against a hostile server (issue 18 item 5): bounded memory, paced requests, only its own errors.

Each test starts a real HTTP server on a free port that answers request n with a scripted
status, headers and body, and records the requests. The subscription gets a `sleep` that
records each wait the client chose instead of sleeping through it, so the pacing tests assert
the waits themselves, and read the request count off the server.
"""
from __future__ import annotations

import gzip
import json
import threading
import tracemalloc
from contextlib import contextmanager
from itertools import chain
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Iterator

import pytest

from realtime.client import (
    MAX_BODY_BYTES, MAX_FRAME_BYTES, Backoff, ProtocolError, subscribe, token_from,
)

Answer = tuple[int, dict[str, str], Iterable[bytes]]
SSE = {"Content-Type": "text/event-stream"}
POLICY = Backoff()
REFUSED = (400, {"Content-Type": "application/json"}, [b'{"error": {"code": "enough", "message": "the script ended"}}'])


class Hostile(ThreadingHTTPServer):
    """Answers the n-th request (from 1) with `answer(n)`, its body streamed until the connection closes."""

    daemon_threads = True

    def __init__(self, answer: Callable[[int], Answer]) -> None:
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append(dict(self.headers))
                status, headers, body = answer(len(server.requests))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    for chunk in body:
                        self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up, as it should

            do_POST = do_GET

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def last_event_ids(self) -> list[str | None]:
        return [headers.get("Last-Event-ID") for headers in self.requests]


@contextmanager
def hostile(answer: Callable[[int], Answer]) -> Iterator[Hostile]:
    server = Hostile(answer)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)  # shutdown() within 20 ms
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def until_waits(url: str, count: int, **options: Any) -> tuple[list[int], list[float]]:
    """The ids of the messages a subscription delivers until it has chosen `count` waits, and those waits."""
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == count:
            messages.close()

    messages = subscribe(url, token="t", sleep=sleep, **options)
    with messages:
        return [m.id for m in messages], waits


def envelope(n: int, **fields: Any) -> dict[str, Any]:
    return {"id": n, "channel": "c", "topic": "t", "data": n, "run_id": None,
            "created_at": "2026-11-28T06:00:00.000000+00:00", **fields}


def frame(n: int, data: Any = None) -> bytes:
    body = json.dumps(envelope(n, data=n if data is None else data), ensure_ascii=False)
    return f"id: e-{n}\nevent: t\ndata: {body}\n\n".encode()


def backoff_floor(failures: int) -> float:
    """The least `POLICY.delay(failures)` can be: half its cap."""
    return max(POLICY.min_s, min(POLICY.max_s, POLICY.initial_s * 2 ** (failures - 1)) / 2)


# -- pacing --------------------------------------------------------------------------------


@pytest.mark.parametrize("retry", ["0", "-1", "99999999999999999", "1e3", "²", "9" * 5000])
def test_a_stream_that_brings_nothing_backs_off_whatever_its_retry(retry):
    with hostile(lambda n: (200, SSE, [f"retry: {retry}\n\n".encode()])) as server:
        received, waits = until_waits(server.url, 12)
    assert received == []
    assert len(server.requests) == 12
    for failures, wait in enumerate(waits, start=1):
        assert backoff_floor(failures) <= wait <= POLICY.max_asked_s, (failures, waits)
    assert waits[-1] >= POLICY.max_s / 2  # grown to the cap: a request every 15 s or more


def test_a_stream_that_brings_a_message_each_time_still_waits_min_s():
    with hostile(lambda n: (200, SSE, [b"retry: 0\n\n", frame(n)])) as server:
        received, waits = until_waits(server.url, 10)
    assert received == list(range(1, 11))
    assert waits == [POLICY.min_s] * 10  # at most 4 requests a second
    assert server.last_event_ids() == [None] + [f"e-{n}" for n in range(1, 10)]


def test_a_keep_alive_is_a_live_stream_not_a_failure():
    # A proxy that cuts quiet streams every minute must not push the reconnects of a quiet
    # channel out to max_s: the messages published meanwhile would come that late.
    with hostile(lambda n: (200, SSE, [b"retry: 0\n\n: keep-alive\n\n"])) as server:
        _, waits = until_waits(server.url, 8)
    assert waits == [POLICY.min_s] * 8


def test_retry_after_is_read_strictly_and_clamped():
    asked = ["0", "2", "99999999999999999", "²", "-1", "1.5", "Wed, 21 Oct 2015 07:28:00 GMT", ""]
    body = [b'{"error": {"code": "database_unavailable", "message": "later"}}']

    def answer(n: int) -> Answer:
        return (503, {"Content-Type": "application/json", "Retry-After": asked[n - 1]}, body) if n <= 8 else REFUSED

    with hostile(answer) as server:
        _, waits = until_waits(server.url, 8)
    assert len(server.requests) == 8
    assert waits[:3] == [POLICY.min_s, 2.0, POLICY.max_asked_s]
    for failures, wait in enumerate(waits[3:], start=4):  # the rest ignored: the backoff of 5xx
        assert backoff_floor(failures) <= wait <= 2 * backoff_floor(failures), (failures, waits)


# -- the cursor, and what a frame must be --------------------------------------------------------------------------


def test_a_server_that_ignores_the_cursor_delivers_each_message_once():
    # Every connection replays from the start; frames without an id of their own come between.
    def answer(n: int) -> Answer:
        frames = [b"retry: 0\n\n", frame(1), b"id:\n\n", frame(2), b"event: t\n\n", frame(3)]
        return 200, SSE, frames + ([frame(4)] if n >= 3 else [])

    with hostile(answer) as server:
        received, waits = until_waits(server.url, 6)
    assert received == [1, 2, 3, 4]
    assert server.last_event_ids() == [None, "e-3", "e-3", "e-4", "e-4", "e-4"]
    assert waits[0] == waits[2] == POLICY.min_s  # after the streams that brought a new message
    # after those that brought nothing: 1, then 1, 2 and 3 failures in a row
    assert all(wait >= backoff_floor(failures) for failures, wait in zip([1, 1, 2, 3], [waits[1], *waits[3:]]))


MALFORMED = {
    "bad JSON": b'id: e-2\nevent: t\ndata: {"id": 2,\n\n',
    "not an object": b"id: e-2\nevent: t\ndata: [2]\n\n",
    "nested past the parser": b"id: e-2\nevent: t\ndata: " + b"[" * 100_000 + b"\n\n",
    "a number of 5,000 digits": f'id: e-2\nevent: t\ndata: {{"id": 1{"0" * 5000}}}\n\n'.encode(),
    "no topic": f"id: e-2\nevent: t\ndata: {json.dumps({**envelope(2), 'topic': None})}\n\n".encode(),
    "no data": f"id: e-2\nevent: t\ndata: {json.dumps({k: v for k, v in envelope(2).items() if k != 'data'})}\n\n".encode(),
    "id a string": f"id: e-2\nevent: t\ndata: {json.dumps(envelope('2'))}\n\n".encode(),
    "id a boolean": f"id: e-2\nevent: t\ndata: {json.dumps(envelope(True))}\n\n".encode(),
    "channel a number": f"id: e-2\nevent: t\ndata: {json.dumps(envelope(2, channel=7))}\n\n".encode(),
    "run_id a list": f"id: e-2\nevent: t\ndata: {json.dumps(envelope(2, run_id=[]))}\n\n".encode(),
    "created_at no time": f"id: e-2\nevent: t\ndata: {json.dumps(envelope(2, created_at='yesterday'))}\n\n".encode(),
    "no id": f"event: t\ndata: {json.dumps(envelope(2))}\n\n".encode(),
    "an empty id": f"id:\nevent: t\ndata: {json.dumps(envelope(2))}\n\n".encode(),
    "an id with NUL": f"id: e-\0002\nevent: t\ndata: {json.dumps(envelope(2))}\n\n".encode(),
    "an id no header can carry": f"id: é-2\nevent: t\ndata: {json.dumps(envelope(2))}\n\n".encode(),
    "a reset without reason": b'id: e-9\nevent: reset\ndata: {"cursor": "e-9"}\n\n',
    "a reset of bad JSON": b"id: e-9\nevent: reset\ndata: {\n\n",
    "a reset without a usable cursor": b'event: reset\ndata: {"reason": "unknown_cursor", "cursor": 9}\n\n',
}


@pytest.mark.parametrize("bad", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_frame_is_a_protocol_error_and_the_cursor_stays(bad):
    with hostile(lambda n: (200, SSE, [frame(1), bad, frame(3)]) if n == 1 else REFUSED) as server:
        with subscribe(server.url, token="t") as messages:
            assert next(messages).id == 1
            with pytest.raises(ProtocolError):
                next(messages)
            assert messages.cursor == "e-1"
    assert len(server.requests) == 1


def test_a_compressed_stream_is_refused_not_inflated():
    with hostile(lambda n: (200, {**SSE, "Content-Encoding": "gzip"}, [gzip.compress(frame(1))])) as server:
        with pytest.raises(ProtocolError, match="gzip"):
            next(subscribe(server.url, token="t"))
    assert server.requests[0]["Accept-Encoding"] == "identity"


@pytest.mark.parametrize("grant", [b"not json", b'{"token": 5}', b'{"token": "a\\nb"}', b"[]"])
def test_a_token_endpoint_answering_nonsense_is_a_protocol_error(grant):
    with hostile(lambda n: (200, {"Content-Type": "application/json"}, [grant])) as server:
        with pytest.raises(ProtocolError):
            token_from(server.url, "c", ["t"])()


# -- memory ------------------------------------------------------------------------------

CHUNK = b"x" * 65536


def endless(head: bytes, chunk: bytes = CHUNK, total: int = 48 * 1024 * 1024) -> Iterator[bytes]:
    """`head`, then `chunk` again and again: 48 MiB the client must not hold (one object, sent many times)."""
    yield head
    for _ in range(total // len(chunk)):
        yield chunk


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    peak: list[int] = []
    tracemalloc.start()
    try:
        yield peak
        peak.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()


LINES = b"data: " + b"x" * 1000 + b"\n"


#: The largest message a server sends by default: REALTIME_MAX_MESSAGE_BYTES (512 KiB) of data, not ASCII.
LARGEST = "é" * (512 * 1024 // 2)
LARGEST_FRAME = frame(1, LARGEST)


@pytest.mark.parametrize("after", [
    pytest.param(lambda: endless(b"data: "), id="a data line that never ends"),
    pytest.param(lambda: endless(b"", LINES * 64), id="data lines and never a blank one"),
    pytest.param(lambda: endless(b": "), id="a comment that never ends"),
])
def test_a_frame_that_never_ends_is_cut_at_max_frame_bytes(after):
    with hostile(lambda n: (200, SSE, chain([LARGEST_FRAME], after())) if n == 1 else REFUSED) as server:
        with peak_memory() as peak, subscribe(server.url, token="t") as messages:
            assert next(messages).data == LARGEST  # well inside the bound
            with pytest.raises(ProtocolError, match="max_frame_bytes"):
                next(messages)
    assert peak[0] < 3 * MAX_FRAME_BYTES
    assert len(server.requests) == 1


def test_an_endless_error_body_is_read_only_in_part():
    with hostile(lambda n: (503, {"Content-Type": "text/html"}, endless(b"<html>"))) as server:
        with peak_memory() as peak:
            until_waits(server.url, 1)
    assert peak[0] < 3 * MAX_BODY_BYTES
