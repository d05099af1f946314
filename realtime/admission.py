"""Stream admission: a reconnect storm takes turns instead of starving the worker.

After a deploy every client reconnects at once. Under gevent each new stream
is a greenlet, and the hub runs ready greenlets in the order they became
ready: a request's parse, Flask, the token check and the first replay page
cost about 0.4 ms of CPU, and with 2,000 of them queued, the database reply a
publish was waiting for came after all of them (p99 0.6 s on one worker,
bench/storm.py). Centrifugo bounds new connections per node for the same
reason.

`StreamAdmission` wraps the WSGI app and lets at most `limit` requests for
the stream path into it at once per process. The others wait before Flask
has done anything for them, parked on a semaphore in arrival order, costing
nothing until their turn. A stream leaves the gate as soon as the app has
returned its response; the frames are then written by the server as usual.
Every other path passes straight through.

The gate orders a storm; it never refuses a stream, nor holds one for long:
after `max_wait_s` a request goes in without a turn. Otherwise setups stuck
on a stalled database (each up to its call timeout) would hold the streams
behind them past the 10 s in which every request must be answered
(CONTRACT §5), even those that need no database at all.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable

WSGIApp = Callable[[dict, Callable[..., Any]], Iterable[bytes]]

STREAM_PATH = "/api/realtime/subscribe"


class StreamAdmission:
    def __init__(self, app: WSGIApp, limit: int, *, max_wait_s: float = 1.0, path: str = STREAM_PATH) -> None:
        self.app = app
        self.path = path
        self.max_wait_s = max_wait_s
        self._slots = threading.BoundedSemaphore(limit)  # gevent's own under its monkey-patching

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != self.path:
            return self.app(environ, start_response)
        admitted = self._slots.acquire(timeout=self.max_wait_s)
        try:
            # Under gevent, the release that woke us is still handing out
            # slots in the same turn of the loop: run the setup on our own
            # turn, not chained inside that one with every stream after us.
            time.sleep(0)
            return self.app(environ, start_response)
        finally:
            if admitted:
                self._slots.release()
