"""A worker: claims due runs, executes them on a pool of threads, renews their leases.

One loop per process does the bookkeeping (claim while a thread is free,
renew leases every third of a lease, prune old runs in small batches when it
is this worker's turn, say it is alive every `heartbeat_s`, sleep until woken
or `poll_s` passed); the pool's threads only execute runs. The same class
serves the embedded pool of each web process (`JOBS_EMBEDDED`), `flask --app
app jobs worker`, and, through `drain()`, eager mode, where runs execute
inline and tests need no threads at all.

gevent (gunicorn's workers): monkey-patching turns `threading.Thread`, and so
the threads of a stdlib `ThreadPoolExecutor`, into greenlets, and a greenlet
that computes for 2 s freezes every stream of its process for 2 s. Runs
therefore execute on gevent's own `ThreadPoolExecutor`, whose threads are real
OS threads: the hub keeps serving streams while a step computes.

The loop stays a greenlet. gevent runs a future's done-callbacks in the
hub's thread, so waking the loop from them is safe. gevent's locks (what a
patched `threading.Lock`, e.g. in SQLAlchemy's pool, is) work across native
threads; its Events are woken from a native thread only through the hub
(realtime/changes.py's `poke` uses `run_callback_threadsafe`).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from datetime import datetime, timedelta

from common.greenlets import gevent_is_patched

from .runner import Runner
from .records import Claim
from .runs import RunStore

log = logging.getLogger(__name__)

#: Runs (and events) deleted per transaction: claims wait for one batch at most.
PRUNE_BATCH = 100
PRUNE_TASK = "prune"

# Runs queued with no worker wait forever, and nothing said so (issue 19, item 5). So
# every worker loop that polls takes a turn of this task once a heartbeat: one row of
# the shared schedule, written once per heartbeat among all the workers (embedded
# pools and `flask jobs worker` alike), however many of them poll.
HEARTBEAT_TASK = "heartbeat"
#: After this many heartbeats without one, no worker is taken to be polling.
SILENT_AFTER_HEARTBEATS = 3


def last_heartbeat(runs: RunStore, heartbeat_s: float) -> datetime | None:
    """When a worker last took the heartbeat's turn, or None if none ever did.

    The turn is due again a heartbeat after it was taken; a live worker takes
    it within one of its polls of that.
    """
    due = runs.next_turn(HEARTBEAT_TASK)
    return None if due is None else due - timedelta(seconds=heartbeat_s)


@dataclass(frozen=True)
class Retention:
    """Ended runs older than `max_age` are deleted, a pass at most every `interval_s` among all workers."""

    max_age: timedelta
    interval_s: float


def make_executor(threads: int) -> Executor:
    """A pool of `threads` real OS threads, under gevent too."""
    if gevent_is_patched():
        from gevent.threadpool import ThreadPoolExecutor as NativeThreadPoolExecutor

        return NativeThreadPoolExecutor(max_workers=threads)
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="jobs")


class Worker:
    #: Seconds between a worker's heartbeats (HEARTBEAT_TASK).
    heartbeat_s = 5.0

    def __init__(
        self,
        runs: RunStore,
        runner: Runner,
        *,
        threads: int = 4,
        lease_s: float = 30.0,
        poll_s: float = 0.5,
        name: str | None = None,
        retention: Retention | None = None,
    ) -> None:
        self.runs = runs
        self.runner = runner
        self.threads = threads
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.retention = retention  # None: this worker never prunes
        self._pruned = 0  # runs deleted so far in the current pass
        self.name = name or f"{socket.gethostname()[:40]}:{os.getpid()}"
        self._held: dict[str, Future] = {}  # claim token -> its execution
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._loop_thread: threading.Thread | None = None

    # -- eager mode ---------------------------------------------------------------

    def drain(self) -> int:
        """Execute every due run inline, in this thread, until none is due; return how many executions."""
        executed = 0
        while not self._stopping and (claim := self._claim()) is not None:
            self.runner.execute(claim, lambda: self._stopping)
            executed += 1
        return executed

    # -- the pool -----------------------------------------------------------------

    def start(self) -> None:
        """Start the loop in the background once (lazily: after gunicorn forked, never at import)."""
        with self._lock:
            if self._loop_thread is not None or self._stopping:
                return
            self._loop_thread = threading.Thread(target=self.run, name="jobs-worker", daemon=True)
            self._loop_thread.start()

    def wake(self) -> None:
        """Runs were queued in this process: look now rather than at the next poll."""
        self._wake.set()

    def run(self) -> None:
        """The worker loop, in the calling thread, until `shutdown()`; then wait for running executions."""
        executor = make_executor(self.threads)
        log.info("jobs worker %s: %d threads", self.name, self.threads)
        renew_every = self.lease_s / 3
        next_renewal = time.monotonic() + renew_every
        next_prune = time.monotonic()  # whether it is our turn is asked at start, then every interval
        next_heartbeat = time.monotonic()
        pruning = False  # a pass has more to delete: one batch per turn of the loop, claims in between
        backoff = 0.0
        try:
            # Once stopping, claim nothing more but keep renewing the leases of
            # the runs still executing: a step may take longer than a lease, and
            # a lapsed lease would let another worker start it a second time.
            while not self._stopping or self._held:
                try:
                    # Renewals first: a claim failing while the database is
                    # away must not also cost the held runs their renewal.
                    if time.monotonic() >= next_renewal:
                        self._renew()
                        next_renewal = time.monotonic() + renew_every
                    self._fill(executor)
                    self._look_for_cancels()
                    # Alive and able to claim: a stopping worker, or one whose
                    # database is away, says nothing.
                    if not self._stopping and time.monotonic() >= next_heartbeat:
                        self.runs.take_turn(HEARTBEAT_TASK, self.heartbeat_s)
                        next_heartbeat = time.monotonic() + self.heartbeat_s
                    if self.retention is not None and not self._stopping:
                        if not pruning and time.monotonic() >= next_prune:
                            next_prune = time.monotonic() + self.retention.interval_s
                            pruning = self.runs.take_turn(PRUNE_TASK, self.retention.interval_s)
                        if pruning:
                            pruning = self._prune_batch()
                    backoff = 0.0
                except Exception:
                    # The database is away: say so, then look again less and less often.
                    backoff = min(max(backoff * 2, self.poll_s), 5.0)
                    log.exception("jobs worker loop failed; retrying in %.1f s", backoff)
                timeout = max(backoff, min(self.poll_s, max(0.0, next_renewal - time.monotonic())))
                if pruning and not backoff:
                    timeout = 0.0  # the next batch at once, after looking for runs to claim
                elif self.runner.cancels.watching and not backoff:
                    timeout = min(timeout, self.runner.cancels.interval_s)
                self._wake.wait(timeout)
                self._wake.clear()
        finally:
            # Executions stop at their next step boundary and hand their run back.
            executor.shutdown(wait=True)

    def shutdown(self, wait: bool = False) -> None:
        """Stop claiming; running executions release their runs at their next step.

        With `wait`, return only once they did and the loop has ended.
        """
        self._stopping = True
        self._wake.set()
        if wait and self._loop_thread is not None:
            self._loop_thread.join()

    def _fill(self, executor: Executor) -> None:
        while len(self._held) < self.threads and not self._stopping:
            claim = self._claim()
            if claim is None:
                return
            with self._lock:
                future = executor.submit(self.runner.execute, claim, lambda: self._stopping)
                self._held[claim.token] = future
            future.add_done_callback(lambda done, token=claim.token: self._finished(token, done))

    def _finished(self, token: str, future: Future) -> None:
        with self._lock:
            self._held.pop(token, None)
        exc = future.exception()
        if exc is not None:
            # A bug, or the database still away once this worker stopped
            # (runner.py): the lease lapses and the run resumes elsewhere.
            log.error("run execution crashed", exc_info=exc)
        self._wake.set()

    def _prune_batch(self) -> bool:
        """Delete one batch of expired runs and events; True while there may be more."""
        removed_runs, removed_events = self.runs.prune(self.retention.max_age, PRUNE_BATCH)
        self._pruned += removed_runs
        more = max(removed_runs, removed_events) == PRUNE_BATCH
        if not more and self._pruned:  # one line per pass, however many batches it took
            log.info("pruned %d runs that ended more than %s ago", self._pruned, self.retention.max_age)
            self._pruned = 0
        return more

    def _look_for_cancels(self) -> None:
        """Tell the text streams of this process's runs which runs were cancelled (cancels.py)."""
        cancels = self.runner.cancels
        if watched := cancels.due():
            cancels.cancelled(self.runs.cancel_requested(watched))

    def _renew(self) -> None:
        with self._lock:
            tokens = list(self._held)
        self.runs.renew(tokens, self.lease_s)

    def _claim(self) -> Claim | None:
        registry = self.runner.registry
        return self.runs.claim(
            registry.ids, registry.concurrency_limits, owner=self.name, lease_s=self.lease_s
        )
