"""The spec lab's log: the requests each lab made, in this process's memory, bounded (issue 18).

A lab is one run of one case (the page picks a new id for each). Anyone may start one, so
what the log keeps of them is bounded whatever visitors send:

- bytes: a `Last-Event-ID` is kept (and shown) up to SHOWN_BYTES, then cut, with its size:
  `abc… (720000 bytes)`. gunicorn joins a repeated header into one value, so without this one
  request could leave 720 KB here.
- count: `max_requests` (20) per lab, `max_labs` (1024) per process. With the cut, a lab
  holds at most 20 x 256 bytes of header text, the log 5 MiB.
- time: a lab unused for `idle_s` (10 minutes) is dropped, at the next call to the log.

Which lab makes room for a new one: the least recently used (a request or a read of its
requests is a use), and only once it has been idle for `busy_s`: the lab at /workshop
passes 30 s, which covers a run (the longest, `retry`, takes about 2 s) and the page's read
of its requests. When every lab is busier than that, the new one is refused
(`429 too_many_labs`, with `Retry-After`) rather than another visitor's lab evicted. So a
flood of new ids can keep new labs out while it lasts, but never takes a lab in use.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable

from common.errors import AppError

#: The most of a header value the lab keeps and shows.
SHOWN_BYTES = 256


class TooManyLabs(AppError):
    status = 429
    code = "too_many_labs"

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("the spec lab is running as many labs as it keeps: try again in a moment")
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}


def shown(value: str | None) -> str | None:
    """A header value as the lab keeps and shows it: whole up to SHOWN_BYTES, else cut, with its size."""
    # WSGI hands header values over as their bytes decoded as latin-1: one character a byte.
    if value is None or len(value) <= SHOWN_BYTES:
        return value
    return f"{value[:SHOWN_BYTES]}… ({len(value)} bytes)"


@dataclass(frozen=True)
class LabRequest:
    attempt: int
    ms: int  # since the lab's first request of this case
    last_event_id: str | None
    status: int


@dataclass
class _Lab:
    started: float
    used: float
    requests: list[LabRequest] = field(default_factory=list)


class LabLog:
    """The requests of each (lab, case): see the module docstring for the bounds."""

    def __init__(self, max_labs: int = 1024, max_requests: int = 20, *, idle_s: float = 600.0,
                 busy_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        """`busy_s`: how long after its last use a lab may not be evicted for a new one (0: plain LRU)."""
        self.max_labs = max_labs
        self.max_requests = max_requests
        self.idle_s = idle_s
        self.busy_s = busy_s
        self.clock = clock
        self._labs: OrderedDict[tuple[str, str], _Lab] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def next_attempt(self, lab: str, case: str) -> tuple[int, float]:
        """The number of this request (from 1) and when the lab's first one came (`clock` time).

        Raises TooManyLabs for a new lab when every lab is busy.
        """
        with self._lock:
            found = self._use((lab, case))
            if found is None:
                self._make_room()
                now = self.clock()
                found = self._labs[(lab, case)] = _Lab(started=now, used=now)
            return len(found.requests) + 1, found.started

    def record(self, lab: str, case: str, entry: LabRequest) -> None:
        with self._lock:
            found = self._labs.get((lab, case))
            if found is not None and len(found.requests) < self.max_requests:
                found.requests.append(replace(entry, last_event_id=shown(entry.last_event_id)))

    def requests(self, lab: str, case: str) -> list[LabRequest]:
        with self._lock:
            found = self._use((lab, case))
            return [] if found is None else list(found.requests)

    def _use(self, key: tuple[str, str]) -> _Lab | None:
        """The lab, now the most recently used; None if there is none (any more)."""
        now = self.clock()
        while self._labs:  # the idle ones are first
            oldest = next(iter(self._labs.values()))
            if now - oldest.used < self.idle_s:
                break
            self._labs.popitem(last=False)
        found = self._labs.get(key)
        if found is not None:
            found.used = now
            self._labs.move_to_end(key)
        return found

    def _make_room(self) -> None:
        """Evict the least recently used lab if the log is full and that lab is not busy."""
        if len(self._labs) < self.max_labs:
            return
        key, oldest = next(iter(self._labs.items()))
        idle = self.clock() - oldest.used
        if idle < self.busy_s:
            raise TooManyLabs(retry_after_s=self.busy_s - idle)
        del self._labs[key]
