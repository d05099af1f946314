"""Stream admission (realtime/admission.py): at most `limit` stream requests inside the app at once."""
from __future__ import annotations

import threading

import pytest

from conftest import wait_until
from realtime.admission import STREAM_PATH, StreamAdmission


class HeldApp:
    """A WSGI app whose calls wait until released; counts how many are inside at once."""

    def __init__(self) -> None:
        self.inside = 0
        self.most_inside = 0
        self.served: list[str] = []
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            if environ["PATH_INFO"] == STREAM_PATH and not environ.get("quick"):
                self.release.wait(30)
            if environ.get("fail"):
                raise RuntimeError("the view failed")
            self.served.append(environ["PATH_INFO"])
            return [b"ok"]
        finally:
            with self._lock:
                self.inside -= 1


def _call(app, path: str, **environ) -> threading.Thread:
    thread = threading.Thread(target=app, args=({"PATH_INFO": path, **environ}, None), daemon=True)
    thread.start()
    return thread


def test_at_most_limit_streams_are_inside_the_app_and_the_rest_wait_their_turn():
    held = HeldApp()
    gate = StreamAdmission(held, limit=2)
    streams = [_call(gate, STREAM_PATH) for _ in range(6)]
    wait_until(lambda: held.inside == 2, what="two streams inside")
    assert held.served == [], "the others wait, before the app saw them"
    held.release.set()
    for thread in streams:
        thread.join(30)
    assert held.served == [STREAM_PATH] * 6, "every stream got its turn"
    assert held.most_inside == 2


def test_a_stream_that_waited_its_longest_goes_in_without_a_turn():
    """A setup stuck on a stalled database must not hold the streams behind it (CONTRACT §5)."""
    held = HeldApp()
    gate = StreamAdmission(held, limit=1, max_wait_s=0.05)
    stuck = _call(gate, STREAM_PATH)
    wait_until(lambda: held.inside == 1, what="the first stream inside")
    # Goes in beside the stuck one, and gives back no turn it never had (a BoundedSemaphore
    # released once too often raises).
    assert gate({"PATH_INFO": STREAM_PATH, "quick": True}, None) == [b"ok"]
    assert held.most_inside == 2
    held.release.set()
    stuck.join(30)
    assert held.served == [STREAM_PATH] * 2


def test_other_requests_pass_while_the_gate_is_full():
    held = HeldApp()
    gate = StreamAdmission(held, limit=1)
    stream = _call(gate, STREAM_PATH)
    wait_until(lambda: held.inside == 1, what="the stream inside")
    assert gate({"PATH_INFO": "/api/realtime/publish"}, None) == [b"ok"]
    held.release.set()
    stream.join(30)


def test_a_stream_request_that_fails_gives_its_turn_back():
    held = HeldApp()
    held.release.set()
    gate = StreamAdmission(held, limit=1)
    with pytest.raises(RuntimeError):
        gate({"PATH_INFO": STREAM_PATH, "fail": True}, None)
    assert gate({"PATH_INFO": STREAM_PATH}, None) == [b"ok"], "the one slot is free again"


def test_the_app_gates_its_own_stream_route(app):
    """The path the gate watches is the one the subscribe view is served at."""
    adapter = app.url_map.bind("localhost")
    assert adapter.match(STREAM_PATH, method="GET")[0] == "realtime.subscribe"
    assert isinstance(app.wsgi_app, StreamAdmission)
