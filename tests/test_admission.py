"""Stream admission (realtime/admission.py): at most `limit` stream requests inside the app at once.

The gates here keep their turns in `Turns`, whose timed waits run out when a test says so (and
one gate waits 0 s): no test depends on how long anything takes.
"""
from __future__ import annotations

import json
import threading

import pytest
from prometheus_client import REGISTRY

from conftest import wait_until
from realtime.admission import STREAM_PATH, StreamAdmission
from realtime.stream_limits import StreamLimits


class Turns:
    """A BoundedSemaphore whose timed waits run out when the test calls `run_out()`, not by a clock."""

    def __init__(self, value: int) -> None:
        self.limit = self.free = value
        self.waiting = 0
        self.waits = 0  # waits begun
        self._round = 0  # a wait that began in an earlier round has run out
        self._changed = threading.Condition()

    def acquire(self, timeout: float | None = None) -> bool:
        with self._changed:
            began = self._round
            self.waiting += 1
            self.waits += 1
            try:
                while not self.free:
                    if timeout is not None and self._round != began:
                        return False
                    self._changed.wait()
                self.free -= 1
                return True
            finally:
                self.waiting -= 1

    def release(self) -> None:
        with self._changed:
            assert self.free < self.limit, "a turn given back that was never taken"
            self.free += 1
            self._changed.notify_all()

    def run_out(self) -> None:
        """Every wait under way has now lasted the longest it may."""
        with self._changed:
            self._round += 1
            self._changed.notify_all()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _gate(app, limit: int, clock: Clock | None = None) -> tuple[StreamAdmission, Turns]:
    """A gate on `app` whose turns are kept in a `Turns`, and those turns."""
    turns = Turns(limit)

    class Gate(StreamAdmission):
        semaphore_class = staticmethod(lambda value: turns)

    return Gate(app, limit, clock=clock or Clock()), turns


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


class Call(threading.Thread):
    """One request through `app` in a thread of its own: its status, headers and body once it ends."""

    def __init__(self, app, path: str, **environ) -> None:
        super().__init__(daemon=True)
        self.app, self.environ = app, {"PATH_INFO": path, **environ}
        self.status: str | None = None
        self.headers: dict[str, str] = {}
        self.body = b""
        self.start()

    def run(self) -> None:
        self.body = b"".join(self.app(self.environ, self.start_response))

    def start_response(self, status: str, headers: list[tuple[str, str]]) -> None:
        self.status, self.headers = status, dict(headers)


def _refused() -> float:
    return REGISTRY.get_sample_value("realtime_stream_admission_refused_total") or 0.0


def test_at_most_limit_streams_are_inside_the_app_and_the_rest_wait_their_turn():
    held = HeldApp()
    gate, turns = _gate(held, limit=2)
    streams = [Call(gate, STREAM_PATH) for _ in range(6)]
    wait_until(lambda: held.inside == 2 and turns.waiting == 4, what="two streams inside, four waiting")
    assert held.served == [], "the others wait, before the app saw them"
    held.release.set()
    for thread in streams:
        thread.join(30)
    assert held.served == [STREAM_PATH] * 6, "every stream got its turn"
    assert held.most_inside == 2


def test_streams_that_waited_their_longest_are_refused_and_the_bound_still_holds():
    """No herd after the longest wait (issue 17): each waiter gets a turn or a 503, never a way in
    without one, so a setup stuck on a stalled database still leaves its waiters an answer in time
    (docs/protocol.md §7)."""
    held, clock = HeldApp(), Clock()
    gate, turns = _gate(held, limit=2, clock=clock)
    refused_before = _refused()
    inside = [Call(gate, STREAM_PATH) for _ in range(2)]
    wait_until(lambda: held.inside == 2, what="two streams inside")
    waiters = [Call(gate, STREAM_PATH) for _ in range(6)]
    wait_until(lambda: turns.waiting == 6, what="six streams waiting")
    clock.now += gate.max_wait_s  # and no turn came free meanwhile
    turns.run_out()
    for call in waiters:
        call.join(30)
        assert call.status == "503 Service Unavailable"
        assert call.headers["Retry-After"].isdigit() and call.headers["Content-Type"] == "application/json"
        assert json.loads(call.body)["error"]["code"] == "server_busy"
    assert _refused() - refused_before == 6, "each refusal is counted in /metrics"
    later = [Call(gate, STREAM_PATH) for _ in range(3)]  # a wait that begins now has its own longest
    wait_until(lambda: turns.waiting == 3, what="three later streams waiting")
    held.release.set()
    for call in inside + later:
        call.join(30)
        assert call.status is None and call.body == b"ok"  # HeldApp answers without start_response
    assert held.most_inside == 2
    assert held.served == [STREAM_PATH] * 5


def test_a_stream_finding_no_turn_within_its_wait_is_answered_503():
    """The same with the process's own semaphore: no turn within 0 s while one stream is inside."""
    held = HeldApp()
    gate = StreamAdmission(held, limit=1, max_wait_s=0)
    stuck = Call(gate, STREAM_PATH)
    wait_until(lambda: held.inside == 1, what="the first stream inside")
    refused = Call(gate, STREAM_PATH, quick=True)
    refused.join(30)
    assert refused.status.startswith("503") and held.most_inside == 1
    held.release.set()
    stuck.join(30)
    assert held.served == [STREAM_PATH]


def test_other_requests_pass_while_the_gate_is_full():
    held = HeldApp()
    gate, _ = _gate(held, limit=1)
    stream = Call(gate, STREAM_PATH)
    wait_until(lambda: held.inside == 1, what="the stream inside")
    assert gate({"PATH_INFO": "/api/realtime/publish"}, None) == [b"ok"]
    held.release.set()
    stream.join(30)


def test_a_stream_request_that_fails_gives_its_turn_back():
    held = HeldApp()
    held.release.set()
    gate, _ = _gate(held, limit=1)
    with pytest.raises(RuntimeError):
        gate({"PATH_INFO": STREAM_PATH, "fail": True}, None)
    assert gate({"PATH_INFO": STREAM_PATH}, None) == [b"ok"], "the one slot is free again"


def test_the_app_gates_its_own_stream_route(app):
    """The path the gate watches is the one the subscribe view is served at."""
    adapter = app.url_map.bind("localhost")
    assert adapter.match(STREAM_PATH, method="GET")[0] == "realtime.subscribe"
    assert isinstance(app.wsgi_app, StreamAdmission)


class OneByOne:
    """A WSGI app whose stream calls each wait for their own release, in arrival order."""

    def __init__(self) -> None:
        self.calls: list[threading.Event] = []
        self.entered: list[str] = []
        self.served = 0

    def __call__(self, environ, start_response):
        done = threading.Event()
        self.entered.append(environ["who"])
        self.calls.append(done)
        done.wait(30)
        self.served += 1
        return [b"ok"]


def test_a_waiter_keeps_its_place_while_turns_come_free_and_is_refused_once_they_stop():
    """A storm being set up is not shed: only a gate whose turns stopped moving turns waiters away."""
    app, clock = OneByOne(), Clock()
    gate, turns = _gate(app, limit=1, clock=clock)
    first = Call(gate, STREAM_PATH, who="first")
    wait_until(lambda: len(app.calls) == 1, what="the first stream inside")
    waiters = {who: Call(gate, STREAM_PATH, who=who) for who in ("a", "b")}
    wait_until(lambda: turns.waiting == 2, what="two waiting")
    clock.now += 1.5
    app.calls[0].set()  # a turn comes free: one waiter goes in, 1.5 s after the other began to wait
    wait_until(lambda: len(app.calls) == 2 and turns.waiting == 1, what="one waiter inside")
    second = waiters[app.entered[1]]
    third = waiters["b" if app.entered[1] == "a" else "a"]
    clock.now += 1.0  # the other has waited 2.5 s, but a turn came free 1 s ago
    waits = turns.waits
    turns.run_out()
    wait_until(lambda: turns.waits == waits + 1, what="the third waiting again")
    assert third.status is None
    clock.now += gate.max_wait_s  # no turn for max_wait_s now
    turns.run_out()
    third.join(30)
    assert third.status.startswith("503")
    app.calls[1].set()
    for call in (first, second):
        call.join(30)
        assert call.body == b"ok"


# -- the process's stream slots (stream_limits.py) ------------------------------------------------


def test_a_stream_holds_its_slot_until_the_server_closes_it_and_its_frames_pass_no_wrapper():
    """The server iterates the stream's own generator: no Python call per frame in between (issue
    17's fan-out, bench/README.md); closing the response closes the generator, then frees the slot."""
    frames_closed = []

    def frames():
        try:
            yield b"retry: 2000\n\n"
            yield b": keep-alive\n\n"
        finally:
            frames_closed.append(True)

    body = frames()
    limits = StreamLimits(max_streams=1)
    gate = StreamAdmission(lambda environ, start_response: body, 0, limits=limits)
    response = gate({"PATH_INFO": STREAM_PATH}, None)
    assert iter(response) is body
    assert next(iter(response)) == b"retry: 2000\n\n"
    assert limits.enter() is None, "the one slot is held while the stream is open"
    response.close()
    assert frames_closed == [True]
    response.close()  # closed twice (by the server and a wrapper): the slot is given back once
    assert limits.open == 0
    assert limits.enter() is not None


def test_a_body_whose_close_fails_still_frees_its_slot():
    class Failing:
        def __iter__(self):
            return iter([b"x"])

        def close(self):
            raise OSError("the body's close failed")

    limits = StreamLimits(max_streams=1)
    gate = StreamAdmission(lambda environ, start_response: Failing(), 0, limits=limits)
    response = gate({"PATH_INFO": STREAM_PATH}, None)
    with pytest.raises(OSError):
        response.close()
    assert limits.open == 0
