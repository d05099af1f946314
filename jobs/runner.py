"""Execute one claimed run, once, and record what came of it.

The runner turns the way a function ended into the run's next state:

    returned             -> completed, with its output
    NonRetriableError    -> failed at once
    another exception    -> retried after exponential backoff, or failed when
                            the function's retries are used up
    Cancelled            -> cancelled (at a step boundary, or a text stream's write)
    Suspended (a sleep)  -> nothing more: the journal already handed the run back
    WorkerStopping       -> released, so another worker resumes it now
    DatabaseUnavailable  -> handed back, due again in `retry_base_s`, counting
                            neither an attempt of the run or of its step in
                            progress, nor a crash (journal.py `hand_back`)
    LeaseLost            -> nothing: another worker owns the run

A database blip is the moment's fault, not the run's (issue 17, item 9). So
the runner's own writes (started, and the outcome above) are retried with
backoff while the database is unavailable: the claim stays in its worker's
hands meanwhile and its lease keeps being renewed, so a blip shorter than the
lease is no crash. Retrying a write that committed but whose answer was lost
is safe: `mark_started` announces once, and the others, finding the run no
longer held, end in LeaseLost with the run as they left it. Once its worker
is stopping, a runner no longer waits for the database: it gives up, and the
run resumes when its lease lapses, as after a crash.

It neither picks runs nor owns threads (worker.py does).
"""
from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Callable

from sqlalchemy.exc import SQLAlchemyError

from common.database import DatabaseUnavailable
from common.errors import describe

from .errors import NonRetriableError
from .registry import JobFunction, Registry
from .cancels import CancelWatch
from .steps import Cancelled, Context, PublishFunction, Steps, Suspended, TextStreams, WorkerStopping, to_json
from .journal import StepJournal
from .records import CANCELLED, COMPLETED, FAILED, Claim, LeaseLost
from .runs import RunStore

log = logging.getLogger(__name__)


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Delay before attempt `attempt + 1`: base, 2*base, 4*base, ... capped at max_s."""
    return min(base_s * 2 ** (attempt - 1), max_s)


class Runner:
    #: Waits between tries of a write while the database is unavailable: 0.25 s, 0.5 s, ... 5 s.
    write_retry_first_s = 0.25
    write_retry_max_s = 5.0

    def __init__(
        self,
        runs: RunStore,
        journal: StepJournal,
        registry: Registry,
        publisher: PublishFunction,
        *,
        retry_base_s: float = 1.0,
        retry_max_s: float = 600.0,
        context: Callable[[], AbstractContextManager] = nullcontext,
        wait: Callable[[float], None] = time.sleep,
        texts: TextStreams | None = None,
    ) -> None:
        self.runs = runs
        self.journal = journal
        self.registry = registry
        self.publisher = publisher
        self.texts = texts  # `ctx.text_stream`'s maker: the realtime extension
        self.cancels = CancelWatch()  # what the worker loop learns of cancels, for text streams' writes
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self._context = context  # e.g. the Flask app context job code may rely on
        self.wait = wait  # between tries of a write; tests replace it

    def execute(self, claim: Claim, stopping: Callable[[], bool] = lambda: False) -> str:
        """Run the function of `claim` from the top (completed steps replay); return the outcome."""
        function = self.registry.get(claim.run.function_id)
        assert function is not None, "claims only take registered functions"
        try:
            with self._context():
                outcome = self._attempt(function, claim, stopping)
        except LeaseLost:
            log.warning("run %s: lease lost to another worker; stopped without writing", claim.run.id)
            return "lease_lost"
        log.info("run %s (%s, attempt %d): %s", claim.run.id, function.id, claim.run.attempt, outcome)
        return outcome

    def _attempt(self, function: JobFunction, claim: Claim, stopping: Callable[[], bool]) -> str:
        run, runs = claim.run, self.runs

        def write(change: Callable[[], None]) -> None:
            self._write(change, run.id, stopping)

        write(lambda: runs.mark_started(claim))
        if claim.after_crash and self.texts is not None:
            # The dead worker's text streams never got their end: no page may show them streaming forever.
            write(lambda: self.texts.end_interrupted_text_streams(run.id))
        steps = None
        try:
            if run.cancel_requested:
                raise Cancelled()
            steps = Steps(self.journal, claim, self.journal.steps_of(run.id), stopping)
            ctx = Context(claim, runs.event(run.event_id), self.publisher, steps, self.texts, self.cancels)
            try:
                output_json = to_json(function(ctx), f"the return value of {function.id!r}")
            finally:
                self.cancels.forget(run.id)
        except Cancelled:
            write(lambda: runs.finish(claim, CANCELLED))
            return CANCELLED
        except Suspended:
            return "sleeping"
        except WorkerStopping:
            write(lambda: runs.release(claim))
            return "released"
        except NonRetriableError as exc:
            # The log is the operator's: the whole error, where browsers get only what describe() shows.
            log.warning("run %s failed without retry: %s", run.id, describe(exc), exc_info=exc)
            write(lambda: runs.finish(claim, FAILED, error=describe(exc)))
            return FAILED
        except DatabaseUnavailable:
            log.warning("run %s: the database is unavailable; handed back for %.1f s", run.id, self.retry_base_s)
            in_progress = steps.in_progress if steps is not None else {}
            write(lambda: self.journal.hand_back(claim, in_progress, after_s=self.retry_base_s))
            return "handed_back"
        except Exception as exc:
            if isinstance(exc, SQLAlchemyError):
                log.warning("run %s: database error", run.id, exc_info=exc)
            if run.attempt < function.max_attempts:
                delay = backoff_s(run.attempt, self.retry_base_s, self.retry_max_s)
                log.warning("run %s attempt %d failed (%s); retrying in %.1f s", run.id, run.attempt, describe(exc), delay)
                write(lambda: runs.retry(claim, at=runs.now() + timedelta(seconds=delay), error=describe(exc)))
                return "retrying"
            log.warning("run %s failed after %d attempts: %s", run.id, run.attempt, describe(exc), exc_info=exc)
            write(lambda: runs.finish(claim, FAILED, error=describe(exc)))
            return FAILED
        write(lambda: runs.finish(claim, COMPLETED, output_json=output_json))
        return COMPLETED

    def _write(self, change: Callable[[], None], run_id: str, stopping: Callable[[], bool]) -> None:
        """Make one of a run's own writes, trying again while the database is unavailable (module docstring)."""
        delay = self.write_retry_first_s
        while True:
            try:
                return change()
            except DatabaseUnavailable:
                if stopping():
                    raise
                log.warning("run %s: the database is unavailable; writing again in %.2f s", run_id, delay)
                self.wait(delay)
                delay = min(2 * delay, self.write_retry_max_s)
