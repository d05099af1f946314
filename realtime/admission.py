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
returned its response; the frames are then written by the server as usual,
and its replay reads take turns of their own (replay.py). Every other path
passes straight through.

The bound holds at every moment: a request goes into the app only with a
turn. One that waited `max_wait_s` without getting one is refused at once,
`503 server_busy` with `Retry-After` (the project's clients wait that long
and try again), and counted in `realtime_stream_admission_refused_total`.
Waiting longer would break docs/protocol.md §7: while the database stalls, the
setups inside hold their turns for up to a database call's time limit (8 s,
common/database.py), so a request let in after 2 s still answers within
10 s, one let in later might not. Letting it in without a turn instead, as
the gate did before issue 17, sent a storm's waiters into the app together
after their first second: no bound at all. So the part of a storm that a
worker cannot set up within 2 s is turned away and comes back after
`Retry-After`: shed, never let in all at once.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Iterable

from . import metrics

WSGIApp = Callable[[dict, Callable[..., Any]], Iterable[bytes]]

STREAM_PATH = "/api/realtime/subscribe"

RETRY_AFTER_S = 2
BUSY_BODY = json.dumps({"error": {
    "code": "server_busy",
    "message": f"too many streams are opening on this server at once; try again in {RETRY_AFTER_S} s",
}}).encode()


class StreamAdmission:
    #: The turns: gevent's semaphore under its monkey-patching. A test may bring one whose
    #: timed waits run out when it says so, not when a clock does.
    semaphore_class: Callable[[int], Any] = threading.BoundedSemaphore

    def __init__(self, app: WSGIApp, limit: int, *, max_wait_s: float = 2.0, path: str = STREAM_PATH) -> None:
        self.app = app
        self.path = path
        self.max_wait_s = max_wait_s
        self._slots = self.semaphore_class(limit)

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != self.path:
            return self.app(environ, start_response)
        if not self._slots.acquire(timeout=self.max_wait_s):
            metrics.STREAM_ADMISSION_REFUSED.inc()
            start_response("503 Service Unavailable", [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(BUSY_BODY))),
                ("Retry-After", str(RETRY_AFTER_S)),
            ])
            return [BUSY_BODY]
        try:
            # Under gevent, the release that woke us is still handing out
            # slots in the same turn of the loop: run the setup on our own
            # turn, not chained inside that one with every stream after us.
            time.sleep(0)
            return self.app(environ, start_response)
        finally:
            self._slots.release()
