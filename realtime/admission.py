"""Stream admission: a reconnect storm takes turns instead of starving the worker.

After a deploy every client reconnects at once. Under gevent each new stream
is a greenlet, and the hub runs ready greenlets in the order they became
ready: with thousands of stream setups queued, the database reply a publish
was waiting for came after all of them (bench/storm.py; its figures are in
bench/README.md). Centrifugo bounds new connections per node for the same
reason.

`StreamAdmission` wraps the WSGI app and lets at most `limit` requests for
the stream path into it at once per process. The others wait before Flask
has done anything for them, parked on a semaphore in arrival order, costing
nothing until their turn. A stream leaves the gate as soon as the app has
returned its response; the frames are then written by the server as usual,
and its replay reads take turns of their own (replay.py). Every other path
passes straight through.

The bound holds at every moment: a request goes into the app only with a
turn. A waiter keeps its place while turns come free (a storm being set up:
2,000 setups take about a second), and is refused, `503 server_busy` with
`Retry-After` (the project's clients wait that long and try again), counted
in `realtime_stream_admission_refused_total`, when no turn at all came free
for `max_wait_s` (the setups inside are stuck: on a stalled database each
holds its turn for up to a database call's time limit, 8 s) or when it waited
`max_queue_s` in all. Either way it is answered within docs/protocol.md §7's
10 s. Letting a waiter in without a turn instead, as the gate did before
issue 17, sent a storm's waiters into the app together after their first
second: no bound at all.

Before any of that, the gate holds one of the process's `StreamLimits`
slots for the request, from its arrival until the server closes its
response, waiting for a turn included: a process that already holds
REALTIME_MAX_STREAMS refuses the next at once, `503 server_full`, so the
worker's last connections stay free for health checks, publishes and token
requests (stream_limits.py, issue 18). The slot is given back by the close() that WSGI servers
call on the response (`ClosingBody`), which adds nothing to the frames' way out: each of them
is handed to the server by the stream's own generator, as if the gate were not there.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from . import metrics
from .stream_limits import StreamLimits

WSGIApp = Callable[[dict, Callable[..., Any]], Iterable[bytes]]

STREAM_PATH = "/api/realtime/subscribe"

RETRY_AFTER_S = 2
BUSY_BODY = json.dumps({"error": {
    "code": "server_busy",
    "message": f"too many streams are opening on this server at once; try again in {RETRY_AFTER_S} s",
}}).encode()
# Streams last: a slot of a full process comes free when one ends, not within a second. Long enough
# that a full worker's refused clients cost it little, short for a client sent to another worker.
FULL_RETRY_AFTER_S = 5
FULL_BODY = json.dumps({"error": {
    "code": "server_full",
    "message": f"this server holds all the streams it may; try again in {FULL_RETRY_AFTER_S} s",
}}).encode()


class StreamAdmission:
    #: The turns: gevent's semaphore under its monkey-patching. A test may bring one whose
    #: timed waits run out when it says so, not when a clock does.
    semaphore_class: Callable[[int], Any] = threading.BoundedSemaphore

    def __init__(
        self, app: WSGIApp, limit: int, *, limits: StreamLimits | None = None, max_wait_s: float = 2.0,
        max_queue_s: float = 8.0, path: str = STREAM_PATH, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.path = path
        self.limits = limits
        self.max_wait_s = max_wait_s  # with no turn coming free meanwhile
        self.max_queue_s = max_queue_s  # in all
        self._clock = clock
        self._slots = self.semaphore_class(limit) if limit > 0 else None  # 0: no turns to take
        self._last_turn = float("-inf")  # when a turn was last handed out

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != self.path:
            return self.app(environ, start_response)
        if self.limits is None:
            return self._set_up(environ, start_response)
        leave = self.limits.enter()
        if leave is None:
            return _refuse(start_response, FULL_BODY, FULL_RETRY_AFTER_S)
        try:
            return ClosingBody(self._set_up(environ, start_response), leave)
        except BaseException:
            leave()
            raise

    def _set_up(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        """The app's response, called on a turn of its own, or 503 server_busy."""
        if self._slots is None:
            return self.app(environ, start_response)
        if not self._turn():
            metrics.STREAM_ADMISSION_REFUSED.inc()
            return _refuse(start_response, BUSY_BODY, RETRY_AFTER_S)
        try:
            # Under gevent, the release that woke us is still handing out
            # slots in the same turn of the loop: run the setup on our own
            # turn, not chained inside that one with every stream after us.
            time.sleep(0)
            return self.app(environ, start_response)
        finally:
            self._slots.release()

    def _turn(self) -> bool:
        """Wait for a turn while turns come free; False once none did for max_wait_s, or after max_queue_s."""
        started = self._clock()

        def left() -> float:
            now = self._clock()
            return min(self.max_wait_s - (now - max(started, self._last_turn)), self.max_queue_s - (now - started))

        while True:
            if self._slots.acquire(timeout=max(0.0, left())):
                self._last_turn = self._clock()
                return True
            if left() <= 0:
                return False


class ClosingBody:
    """A response body, with one more thing to do when the server closes it, at no cost per chunk.

    werkzeug's `ClosingIterator` is the iterator itself: every chunk goes through its `__next__`,
    a Python call per frame per stream, for the whole life of the stream (bench/README.md, issue
    17's fan-out). A WSGI server iterates over `iter(body)` and calls `close()` on the body the
    app returned (PEP 3333), so this one hands out the wrapped body's own iterator and only adds
    `close()`: the body's, then `callback`, even when the body's raises.
    """

    __slots__ = ("_body", "_callback")  # one per open stream: kept small

    def __init__(self, body: Iterable[bytes], callback: Callable[[], None]) -> None:
        self._body = body
        self._callback = callback

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._callback()


def _refuse(start_response: Callable[..., Any], body: bytes, retry_after_s: int) -> list[bytes]:
    start_response("503 Service Unavailable", [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Retry-After", str(retry_after_s)),
    ])
    return [body]
