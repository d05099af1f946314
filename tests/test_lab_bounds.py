"""The spec lab's log keeps a bounded amount of what visitors send (issue 18, demo/lab_log.py).

Before: each request's Last-Event-ID kept whole (gunicorn joins a repeated header into one
value), for ever; 1,000 requests grew a worker by about 300 MiB for good, one lab's
requests made an 18 MB answer, and 256 new lab ids evicted a visitor's lab mid-run.
"""
from __future__ import annotations

import httpx
import pytest

from demo.lab_log import SHOWN_BYTES, LabLog, LabRequest, TooManyLabs, shown
from json_errors import assert_json_error
from test_slow_clients import memory_kib


class Clock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run(log: LabLog, lab: str, last_event_id: str | None = None) -> int:
    """One request of lab `lab` (case `lf`), as the view makes it: its attempt."""
    attempt, _started = log.next_attempt(lab, "lf")
    log.record(lab, "lf", LabRequest(attempt, 0, last_event_id, 200))
    return attempt


def test_a_header_is_shown_up_to_a_few_hundred_bytes_then_its_size():
    assert shown(None) is None
    assert shown("42") == "42"
    assert shown("a" * SHOWN_BYTES) == "a" * SHOWN_BYTES
    assert shown("a" * 720_000) == "a" * SHOWN_BYTES + "… (720000 bytes)"


def test_the_log_keeps_a_header_only_as_shown():
    log = LabLog()
    for _ in range(100):
        run(log, "big", "x" * 720_000)
    kept = log.requests("big", "lf")
    assert len(kept) == log.max_requests < 100
    assert {r.last_event_id for r in kept} == {"x" * SHOWN_BYTES + "… (720000 bytes)"}


def test_an_idle_lab_expires():
    clock = Clock()
    log = LabLog(idle_s=600, clock=clock)
    run(log, "read")
    run(log, "left")
    clock.advance(599)
    assert log.requests("read", "lf") != []  # a read is a use
    clock.advance(2)  # "left" idle for 601 s, "read" for 2
    assert log.requests("left", "lf") == []
    assert log.requests("read", "lf") != []
    assert run(log, "left") == 1, "a new lab under the old id: the old one is gone"


def test_a_busy_lab_survives_a_flood_of_new_ids_and_an_idle_one_makes_room():
    clock = Clock()
    log = LabLog(max_labs=256, busy_s=30, clock=clock)
    assert run(log, "visitor", None) == 1
    clock.advance(1)
    refused = 0
    for n in range(300):
        try:
            run(log, f"flood{n}")
        except TooManyLabs as exc:
            refused += 1
            assert exc.headers == {"Retry-After": "29"}  # when the visitor's lab will be idle long enough
    assert refused == 300 - 255
    assert run(log, "visitor", "1") == 2, "the visitor's lab went on"
    clock.advance(30)  # every lab idle for 30 s: the least recently used makes room
    run(log, "newcomer")
    assert log.requests("flood0", "lf") == []
    assert [r.attempt for r in log.requests("visitor", "lf")] == [1, 2]


def test_a_visitors_lab_survives_more_new_lab_ids_than_the_lab_keeps(client):
    """The app's lab log, through the routes: a flood gets 429s, the visitor's run goes on."""
    first = client.get("/workshop/cases/dropped?lab=visitor")
    assert first.status_code == 200
    flood = [client.get(f"/workshop/cases/lf?lab=flood{n}") for n in range(1100)]
    assert {r.status_code for r in flood[:1023]} == {200}
    assert_json_error(flood[-1], 429, "too_many_labs")
    assert int(flood[-1].headers["Retry-After"]) >= 1
    second = client.get("/workshop/cases/dropped?lab=visitor", headers={"Last-Event-ID": "2"})
    assert second.data == b"data: you sent Last-Event-ID: 2\n\n", "its second answer: the lab went on"
    found = client.get("/workshop/cases/dropped/requests?lab=visitor").get_json()["requests"]
    assert [(r["attempt"], r["last_event_id"]) for r in found] == [(1, None), (2, "2")]


OVERSIZED = [("Last-Event-ID", "x" * 8000)] * 10
JOINED_BYTES = 80_009  # gunicorn joins the ten into one value, with commas


@pytest.mark.integration
def test_oversized_requests_cost_a_worker_a_bounded_amount_of_memory(start_server, tmp_path):
    """1,000 requests of 20 labs, each with 80 KB of Last-Event-ID: before, the worker kept
    all 80 MB and one lab's requests answered 4 MB."""
    server = start_server(f"sqlite:///{tmp_path / 'lab.sqlite3'}", workers=1, DEMO_ENABLED=True)
    [pid] = server.worker_pids()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for n in range(20):  # every code path taken once before measuring
            http.get(f"/workshop/cases/dropped?lab=warm{n}", headers=OVERSIZED)
        before = memory_kib(pid, "VmRSS")
        for n in range(1000):
            response = http.get(f"/workshop/cases/dropped?lab=big{n % 20}", headers=OVERSIZED)
            assert response.status_code in (200, 204)
        after = memory_kib(pid, "VmRSS")
        answer = http.get("/workshop/cases/dropped/requests?lab=big0")
    grown = (after - before) / 1024
    print(f"worker RSS {before / 1024:.0f} MiB, {after / 1024:.0f} MiB after 1,000 oversized requests")
    assert grown < 32, f"the worker grew by {grown:.0f} MiB"
    assert answer.status_code == 200 and len(answer.content) < 16_384, len(answer.content)
    kept = answer.json()["requests"]
    assert len(kept) == 20
    assert all(r["last_event_id"].endswith(f"… ({JOINED_BYTES} bytes)") for r in kept)
