"""Execute one claimed run, once, and record what came of it.

The runner turns the way a function ended into the run's next state:

    returned             -> completed, with its output
    NonRetriableError    -> failed at once
    another exception    -> retried after exponential backoff, or failed when
                            the function's retries are used up
    CancelRequested      -> cancelled (at a step boundary)
    Suspended (a sleep)  -> nothing more: the journal already handed the run back
    WorkerStopping       -> released, so another worker resumes it now
    LeaseLost            -> nothing: another worker owns the run

It neither picks runs nor owns threads (worker.py does).
"""
from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Callable

from sqlalchemy.exc import SQLAlchemyError

from common.errors import describe

from .errors import NonRetriableError
from .registry import JobFunction, Registry
from .steps import CancelRequested, Context, Publisher, Steps, Suspended, WorkerStopping, to_json
from .journal import StepJournal
from .records import CANCELLED, COMPLETED, FAILED, Claim, LeaseLost
from .runs import RunStore

log = logging.getLogger(__name__)


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Delay before attempt `attempt + 1`: base, 2*base, 4*base, ... capped at max_s."""
    return min(base_s * 2 ** (attempt - 1), max_s)


class Runner:
    def __init__(
        self,
        runs: RunStore,
        journal: StepJournal,
        registry: Registry,
        publisher: Publisher,
        *,
        retry_base_s: float = 1.0,
        retry_max_s: float = 600.0,
        context: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        self.runs = runs
        self.journal = journal
        self.registry = registry
        self.publisher = publisher
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self._context = context  # e.g. the Flask app context job code may rely on

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
        runs.mark_started(claim)
        try:
            if run.cancel_requested:
                raise CancelRequested()
            steps = Steps(self.journal, claim, self.journal.steps_of(run.id), stopping)
            ctx = Context(claim, runs.event(run.event_id), self.publisher, steps)
            output_json = to_json(function(ctx), f"the return value of {function.id!r}")
        except CancelRequested:
            runs.finish(claim, CANCELLED)
            return CANCELLED
        except Suspended:
            return "sleeping"
        except WorkerStopping:
            runs.release(claim)
            return "released"
        except NonRetriableError as exc:
            log.warning("run %s failed without retry: %s", run.id, describe(exc))
            runs.finish(claim, FAILED, error=describe(exc))
            return FAILED
        except Exception as exc:
            if isinstance(exc, SQLAlchemyError):
                log.warning("run %s: database error", run.id, exc_info=exc)
            if run.attempt < function.max_attempts:
                delay = backoff_s(run.attempt, self.retry_base_s, self.retry_max_s)
                log.warning("run %s attempt %d failed (%s); retrying in %.1f s", run.id, run.attempt, describe(exc), delay)
                runs.retry(claim, at=runs.now() + timedelta(seconds=delay), error=describe(exc))
                return "retrying"
            log.warning("run %s failed after %d attempts: %s", run.id, run.attempt, describe(exc))
            runs.finish(claim, FAILED, error=describe(exc))
            return FAILED
        runs.finish(claim, COMPLETED, output_json=output_json)
        return COMPLETED
