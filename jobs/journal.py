"""The step journal: what each step of a run did, so a resumed run skips it.

Every write is fenced by the run's lease (runs.py) in the same transaction,
so a worker that lost its run cannot record a step for it. `record_effect`
runs a side effect (a realtime publish) in the transaction that records its
step: the effect commits if and only if the step does, so a resumed run never
repeats it. `hand_back` undoes the start of the steps an execution could not
end because the database was away (runner.py).
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any, Callable, Mapping

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from common.database import database_call

from .records import COMPLETED, FAILED, RUNNING, Claim, Step
from .runs import RunStore, step_from_row
from .tables import steps
from .types import JSON

SLEEPING = "sleeping"


class StepJournal:
    def __init__(self, runs: RunStore) -> None:
        self.runs = runs
        self.db = runs.db
        self.engine = runs.engine

    def now(self) -> datetime:
        return self.runs.now()

    @database_call
    def steps_of(self, run_id: str) -> dict[str, Step]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(steps).where(steps.c.run_id == run_id)).all()
        return {row.id: step_from_row(row) for row in rows}

    @database_call
    def start(self, claim: Claim, step_id: str) -> bool:
        """Count one more execution of a step; False (and nothing written) if cancel was requested."""
        with self.runs.write() as session:
            if self.runs.fence(session, claim).cancel_requested:
                return False
            existing = session.execute(
                select(steps.c.attempts).where(steps.c.run_id == claim.run.id, steps.c.id == step_id)
            ).first()
            if existing is None:
                self._insert(session, claim.run.id, step_id, status=RUNNING, attempts=1)
            else:
                self._update(session, claim.run.id, step_id, status=RUNNING, attempts=existing.attempts + 1)
        return True

    @database_call
    def complete(self, claim: Claim, step_id: str, output_json: str) -> None:
        with self.runs.write() as session:
            self.runs.fence(session, claim)
            self._update(session, claim.run.id, step_id, status=COMPLETED, output=output_json, error=None)

    @database_call
    def fail(self, claim: Claim, step_id: str, error: str) -> None:
        with self.runs.write() as session:
            self.runs.fence(session, claim)
            self._update(session, claim.run.id, step_id, status=FAILED, error=error)

    @database_call
    def record_effect(self, claim: Claim, step_id: str, effect: Callable[[Session], JSON]) -> bool:
        """Run `effect(session)` and record its result as a completed step, atomically.

        The step exists if and only if the effect's writes committed, so a
        resumed run that finds the step skips the effect. False (and nothing
        written) if cancel was requested.
        """
        with self.runs.write() as session:
            if self.runs.fence(session, claim).cancel_requested:
                return False
            output = json.dumps(effect(session))
            self._insert(session, claim.run.id, step_id, status=COMPLETED, attempts=1, output=output)
        return True

    @database_call
    def sleep(self, claim: Claim, step_id: str, until: datetime) -> bool:
        """Record a sleep and hand the run back until `until`, atomically; False if cancel was requested."""
        with self.runs.write() as session:
            if self.runs.fence(session, claim).cancel_requested:
                return False
            output = json.dumps({"until": until.isoformat()})
            self._insert(session, claim.run.id, step_id, status=SLEEPING, attempts=1, output=output)
            self.runs.release(claim, at=until, session=session)
        return True

    @database_call
    def hand_back(self, claim: Claim, in_progress: Mapping[str, Step | None], *, after_s: float) -> None:
        """Give the run back, due in `after_s`, as if this execution had never started the steps
        `in_progress` (each with what the journal held of it before: None for nothing), atomically.

        Neither the run's attempt, nor the steps' attempts, nor a crash are counted.
        """
        with self.runs.write() as session:
            self.runs.fence(session, claim)
            for step_id, before in in_progress.items():
                if before is None:
                    session.execute(delete(steps).where(steps.c.run_id == claim.run.id, steps.c.id == step_id))
                else:
                    self._update(session, claim.run.id, step_id, status=before.status, attempts=before.attempts)
            self.runs.release(claim, at=self.now() + timedelta(seconds=after_s), session=session)

    def _insert(self, session: Session, run_id: str, step_id: str, **values: Any) -> None:
        # After the last, not at the count: a hand back may have deleted a step before others.
        position = session.execute(
            select(func.coalesce(func.max(steps.c.position) + 1, 0)).where(steps.c.run_id == run_id)
        ).scalar_one()
        session.execute(
            insert(steps).values(run_id=run_id, id=step_id, position=position, updated_at=self.now(), **values)
        )

    def _update(self, session: Session, run_id: str, step_id: str, **values: Any) -> None:
        session.execute(
            update(steps).where(steps.c.run_id == run_id, steps.c.id == step_id)
            .values(updated_at=self.now(), **values)
        )
