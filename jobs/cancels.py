"""How a cancel reaches a step that runs for minutes: a text stream's next write (issue 20).

A run stops at its next step boundary when cancelled (steps.py). A step that
streams an LLM's answer is one long step, so its text stream's `write` is where
it stops: the next write after `POST /api/runs/<id>/cancel` raises `Cancelled`,
within a second. A write must not ask the database (it is called 50 times a
second per generation), so the worker's loop asks for all the runs of its
process at once: every `interval_s` while any of them has a text stream open,
one query for the ones cancelled (worker.py). A write only reads a set.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from common.greenlets import native_lock

from .steps import Cancelled


class CancelWatch:
    """The runs of this process whose cancels their text streams wait for, and those cancelled."""

    #: Seconds between two looks at the database, while any run is watched.
    interval_s = 0.25

    def __init__(self) -> None:
        self._watched: set[str] = set()
        self._cancelled: set[str] = set()
        self._lock = native_lock()  # held for no wait: shared by the loop's greenlet and jobs' native threads
        self._next_look = 0.0

    def watch(self, run_id: str) -> Callable[[], None]:
        """Watch `run_id`; return the check a text stream calls at each write (it raises `Cancelled`)."""
        with self._lock:
            self._watched.add(run_id)

        def check() -> None:
            if run_id in self._cancelled:
                raise Cancelled()

        return check

    def forget(self, run_id: str) -> None:
        """The run's execution in this process ended."""
        with self._lock:
            self._watched.discard(run_id)
            self._cancelled.discard(run_id)

    @property
    def watching(self) -> bool:
        return bool(self._watched)

    def due(self, now: float | None = None) -> list[str]:
        """The watched runs to ask about now (none between looks, or when none is watched)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if not self._watched or now < self._next_look:
                return []
            self._next_look = now + self.interval_s
            return sorted(self._watched - self._cancelled)

    def cancelled(self, run_ids: Iterable[str]) -> None:
        """These runs were cancelled: their text streams' next writes raise."""
        with self._lock:
            self._cancelled.update(set(run_ids) & self._watched)
