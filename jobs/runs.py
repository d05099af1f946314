"""The run queue: events in, runs claimed, leased, fenced and ended.

The only module besides journal.py that speaks SQL for jobs. The rules that
make runs durable live here:

- **Claiming** a run is atomic, so two workers never execute it at once.
  SQLite serializes writers, so one conditional `UPDATE ... WHERE id = (SELECT
  ...)` is enough. PostgreSQL picks the candidate with `FOR UPDATE SKIP LOCKED`,
  so concurrent claimers take different rows instead of queueing on one.
- **Leases.** A claim writes a fresh `lease_owner` token and pushes
  `available_at` a lease ahead; the worker renews it while the run executes.
  `available_at` is one column for two ideas: the lease's expiry while a run
  executes, its wake-up time while it sleeps or backs off. Either way it is
  the earliest moment another worker may claim the run, so a killed worker's
  run is claimed again once its lease lapses.
- **Crashes.** Runs handed back on purpose (a sleep, a retry, a stopping
  worker) have no `lease_owner`; a due run that still has one was held by a
  worker that died or stalled mid-run. Such a claim counts a crash, and the
  run fails once its worker died `max_crashes` times (docs/protocol.md §7), instead of
  killing one worker after another forever. A database blip is no crash: the
  runner keeps the claim and tries its write again (runner.py).
- **Fencing.** Every write a worker makes for a run (a step, the outcome) is
  conditioned on still holding the lease (`fence`). A worker that lost its
  lease gets `LeaseLost` and stops without writing.
- **Announcing.** A status change calls `on_status` with this transaction's
  Session, so the realtime message saying so commits with it, or not at all.
- **Retention.** `prune` deletes ended runs past their retention with their
  steps and events, a small batch per transaction, and calls `on_prune` in
  that transaction so what others keep per run (the demo's files) goes with it.
"""
from __future__ import annotations

import json
import logging
import secrets
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any, Callable, Sequence

from sqlalchemy import and_, delete, exists, func, insert, or_, select, update
from sqlalchemy.orm import Session

from common.database import Database, as_utc, database_call, upsert, utcnow, write_session

from .errors import RunFinished, RunNotFound
from .records import (
    CANCELLED, FAILED, FINISHED, QUEUED, RUNNING, Claim, Event, LeaseLost, NewEvent, Run, Step, new_id,
)
from .tables import events, runs, schedule, steps
from .types import Clock

log = logging.getLogger(__name__)

# Called inside the transaction that changed a run's status, with the new run.
StatusHook = Callable[[Session, Run], None]
# Called inside the transaction that deletes runs, with their ids.
PruneHook = Callable[[Session, Sequence[str]], None]

# An arbitrary constant naming the lock of limited-concurrency claims on PostgreSQL.
_LIMITED_CLAIM_LOCK = 0x70B5_0002


def run_from_row(row: Any, step_rows: Sequence[Any] = ()) -> Run:
    return Run(
        id=row.id,
        function_id=row.function_id,
        event_id=row.event_id,
        status=row.status,
        attempt=row.attempt,
        output=None if row.output is None else json.loads(row.output),
        error=row.error,
        cancel_requested=bool(row.cancel_requested),
        created_at=as_utc(row.created_at),
        started_at=as_utc(row.started_at),
        ended_at=as_utc(row.ended_at),
        steps=tuple(step_from_row(s) for s in step_rows),
    )


def step_from_row(row: Any) -> Step:
    return Step(row.id, row.status, row.attempts, None if row.output is None else json.loads(row.output), row.error)


class RunStore:
    """Events, runs and their leases. `now` is the clock; tests replace it.

    A run whose worker died `max_crashes` times mid-run ends `failed` (JOBS_MAX_CRASHES).
    """

    def __init__(self, db: Database, *, on_status: StatusHook, max_crashes: int = 3, now: Clock = utcnow) -> None:
        self.db = db
        self.engine = db.engine
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self.on_status = on_status
        self.on_prune: list[PruneHook] = []
        self.max_crashes = max_crashes
        self.now = now

    def write(self) -> AbstractContextManager[Session]:
        """A write transaction (common/database.py)."""
        return write_session(self.engine)

    # -- events in, runs queued ---------------------------------------------------

    @database_call
    def add_events(self, new_events: Sequence[NewEvent]) -> list[tuple[Event, list[Run]]]:
        """Store events and queue one run per triggered function, all in one transaction."""
        now = self.now()
        created: list[tuple[Event, list[Run]]] = []
        with self.write() as session:
            for new in new_events:
                event = Event(new_id(), new.name, json.loads(new.data_json), now)
                session.execute(
                    insert(events).values(id=event.id, name=new.name, data=new.data_json, created_at=now)
                )
                event_runs = []
                for function_id in new.function_ids:
                    row = session.execute(
                        insert(runs)
                        .values(
                            id=new_id(), function_id=function_id, event_id=event.id, status=QUEUED,
                            attempt=1, cancel_requested=False, available_at=now, created_at=now,
                        )
                        .returning(*runs.c)
                    ).one()
                    run = run_from_row(row)
                    self.on_status(session, run)
                    event_runs.append(run)
                created.append((event, event_runs))
        return created

    @database_call
    def event(self, event_id: str) -> Event:
        with self.engine.connect() as conn:
            row = conn.execute(select(events).where(events.c.id == event_id)).one()
        return Event(row.id, row.name, json.loads(row.data), as_utc(row.created_at))

    @database_call
    def run(self, run_id: str) -> Run | None:
        """The run with its steps in the order they first ran, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
            if row is None:
                return None
            step_rows = conn.execute(
                select(steps).where(steps.c.run_id == run_id).order_by(steps.c.position)
            ).all()
        return run_from_row(row, step_rows)

    # -- claims and leases --------------------------------------------------------

    @database_call
    def claim(
        self, function_ids: Sequence[str], limits: dict[str, int], *, owner: str, lease_s: float
    ) -> Claim | None:
        """Atomically take the run that is due first, or return None.

        A run is due when it is queued, or running but not held (a lapsed
        lease, the end of a sleep or of a retry's backoff). Only functions in
        `function_ids` are taken; a function in `limits` only while fewer than
        its limit of runs are held. A lapsed lease counts a crash; a run that
        has crashed too often ends `failed` here and the next due run is taken.
        """
        if not function_ids:
            return None
        now = self.now()
        token = f"{owner}:{secrets.token_hex(6)}"
        due = and_(
            runs.c.status.in_((QUEUED, RUNNING)),
            runs.c.available_at <= now,
            runs.c.function_id.in_(function_ids),
        )
        if limits:
            held = runs.alias("held")
            held_count = (
                select(func.count())
                .where(held.c.function_id == runs.c.function_id, held.c.status == RUNNING,
                       held.c.lease_owner.is_not(None), held.c.available_at > now)
                .scalar_subquery()
            )
            due = and_(due, or_(
                runs.c.function_id.not_in(list(limits)),
                *(and_(runs.c.function_id == fid, held_count < limit) for fid, limit in limits.items()),
            ))
        candidate = select(runs.c.id, runs.c.lease_owner, runs.c.crashes, runs.c.cancel_requested).where(due)
        candidate = candidate.order_by(runs.c.available_at, runs.c.id).limit(1)
        if self.is_postgres:
            candidate = candidate.with_for_update(skip_locked=True)
        with self.write() as session:
            if self.is_postgres and limits:
                # Under READ COMMITTED two claimers could each count the other's
                # claim as not yet made and exceed a limit; claims of limited
                # functions therefore queue on one lock, held until commit.
                session.execute(select(func.pg_advisory_xact_lock(_LIMITED_CLAIM_LOCK)))
            # The candidate stays locked until commit: the row lock on
            # PostgreSQL, the database's write lock on SQLite (BEGIN IMMEDIATE).
            while (found := session.execute(candidate).first()) is not None:
                crashed = found.lease_owner is not None  # due, yet held: its lease lapsed mid-run
                crashes = found.crashes + crashed
                # A run to cancel is claimed anyway: the runner cancels it without calling the function.
                if crashed and crashes >= self.max_crashes and not found.cancel_requested:
                    self._fail_crashed(session, found.id, crashes)
                    continue
                row = session.execute(
                    update(runs)
                    .where(runs.c.id == found.id)
                    .values(status=RUNNING, lease_owner=token, crashes=crashes,
                            available_at=now + timedelta(seconds=lease_s))
                    .returning(*runs.c)
                ).one()
                return Claim(run_from_row(row), token, lease_s, after_crash=crashed)
        return None

    def _fail_crashed(self, session: Session, run_id: str, crashes: int) -> None:
        """End a run whose worker died once too often, and announce it, in `session`'s transaction."""
        error = f"WorkerCrashed: the run's worker died {crashes} times mid-run (JOBS_MAX_CRASHES={self.max_crashes})"
        log.warning("run %s failed: %s", run_id, error)
        row = session.execute(
            update(runs).where(runs.c.id == run_id)
            .values(status=FAILED, error=error, crashes=crashes, lease_owner=None, ended_at=self.now())
            .returning(*runs.c)
        ).one()
        self.on_status(session, run_from_row(row))

    @database_call
    def renew(self, tokens: Sequence[str], lease_s: float) -> int:
        """Extend the leases of these claims; return how many are still held."""
        if not tokens:
            return 0
        with self.write() as session:
            return session.execute(
                update(runs)
                .where(runs.c.lease_owner.in_(tokens), runs.c.status == RUNNING)
                .values(available_at=self.now() + timedelta(seconds=lease_s))
            ).rowcount

    def fence(self, session: Session, claim: Claim) -> Any:
        """Renew the claim's lease in `session`'s transaction, or raise LeaseLost; returns the run's row."""
        row = session.execute(
            update(runs)
            .where(runs.c.id == claim.run.id, runs.c.lease_owner == claim.token, runs.c.status == RUNNING)
            .values(available_at=self.now() + timedelta(seconds=claim.lease_s))
            .returning(*runs.c)
        ).first()
        if row is None:
            raise LeaseLost(f"run {claim.run.id} is no longer held by {claim.token}")
        return row

    # -- what a held run becomes ------------------------------------------------------

    @database_call
    def mark_started(self, claim: Claim) -> None:
        """Record the first start of a run, and announce `running`, exactly once."""
        with self.write() as session:
            row = self.fence(session, claim)
            if row.started_at is None:
                row = session.execute(
                    update(runs).where(runs.c.id == claim.run.id)
                    .values(started_at=self.now()).returning(*runs.c)
                ).one()
                self.on_status(session, run_from_row(row))

    @database_call
    def finish(self, claim: Claim, status: str, *, output_json: str | None = None, error: str | None = None) -> None:
        """End the run `completed`, `failed` or `cancelled`, and announce it."""
        assert status in FINISHED
        with self.write() as session:
            self.fence(session, claim)
            row = session.execute(
                update(runs).where(runs.c.id == claim.run.id)
                .values(status=status, output=output_json, error=error, lease_owner=None, ended_at=self.now())
                .returning(*runs.c)
            ).one()
            self.on_status(session, run_from_row(row))

    @database_call
    def retry(self, claim: Claim, *, at: datetime, error: str) -> None:
        """Count a failed attempt and make the run due again at `at`."""
        with self.write() as session:
            self.fence(session, claim)
            session.execute(
                update(runs).where(runs.c.id == claim.run.id)
                .values(attempt=runs.c.attempt + 1, error=error, lease_owner=None, available_at=at)
            )

    @database_call
    def release(self, claim: Claim, *, at: datetime | None = None, session: Session | None = None) -> None:
        """Give the run back unfinished, due again at `at` (default: now, for another worker).

        With `session`, in that transaction (the caller fenced it already).
        """
        if session is None:
            with self.write() as session:
                self.fence(session, claim)
                self.release(claim, at=at, session=session)
            return
        session.execute(
            update(runs).where(runs.c.id == claim.run.id).values(lease_owner=None, available_at=at or self.now())
        )

    @database_call
    def cancel_requested(self, run_ids: Sequence[str]) -> set[str]:
        """Those of `run_ids` whose cancel was requested."""
        query = select(runs.c.id).where(runs.c.id.in_(run_ids), runs.c.cancel_requested.is_(True))
        with self.engine.connect() as conn:
            return set(conn.execute(query).scalars())

    @database_call
    def cancel(self, run_id: str) -> None:
        """Cancel a run: at once if no worker holds it, else ask its worker to stop before the next step."""
        with self.write() as session:
            query = select(runs).where(runs.c.id == run_id)
            if self.is_postgres:
                query = query.with_for_update()  # a concurrent claim waits, or skips this row
            row = session.execute(query).first()
            if row is None:
                raise RunNotFound(f"there is no run {run_id!r}")
            if row.status in FINISHED:
                raise RunFinished(f"run {run_id!r} already ended {row.status}; there is nothing to cancel")
            now = self.now()
            held = row.lease_owner is not None and as_utc(row.available_at) > now
            values: dict[str, Any] = {"cancel_requested": True}
            if not held:
                values.update(status=CANCELLED, lease_owner=None, ended_at=now)
            row = session.execute(
                update(runs).where(runs.c.id == run_id).values(**values).returning(*runs.c)
            ).one()
            if not held:
                self.on_status(session, run_from_row(row))

    # -- retention ------------------------------------------------------------------

    @database_call
    def prune(self, max_age: timedelta, limit: int) -> tuple[int, int]:
        """Delete up to `limit` runs that ended more than `max_age` ago, and up to `limit`
        events that old which no run refers to any more; return (runs, events) deleted.

        One short transaction: callers loop while either count is `limit`, so
        claims and writes of live runs wait for one batch at most.
        """
        cutoff = self.now() - max_age
        with self.write() as session:
            run_ids = session.execute(
                # Only ended runs have an ended_at.
                select(runs.c.id).where(runs.c.ended_at < cutoff).order_by(runs.c.ended_at).limit(limit)
            ).scalars().all()
            if run_ids:
                for hook in self.on_prune:
                    hook(session, run_ids)
                session.execute(delete(steps).where(steps.c.run_id.in_(run_ids)))
                session.execute(delete(runs).where(runs.c.id.in_(run_ids)))
            # An event goes once no run of it remains: with its last run, or on
            # its own when it started none. Its runs are newer than it, so an
            # event whose runs were just deleted is past the cutoff too.
            orphans = (
                select(events.c.id)
                .where(events.c.created_at < cutoff, ~exists().where(runs.c.event_id == events.c.id))
                .order_by(events.c.created_at).limit(limit)
            )
            removed_events = session.execute(delete(events).where(events.c.id.in_(orphans))).rowcount
        return len(run_ids), removed_events

    @database_call
    def take_turn(self, task: str, every_s: float) -> bool:
        """Whether the caller should do `task` now: True for one caller per `every_s`, among
        every process sharing the database (a conditional UPDATE: the first one wins)."""
        now = self.now()
        next_due = now + timedelta(seconds=every_s)
        with self.write() as session:
            taken = session.execute(
                update(schedule).where(schedule.c.task == task, schedule.c.due_at <= now)
                .values(due_at=next_due).returning(schedule.c.task)
            ).first()
            if taken is not None:
                return True
            first = (
                upsert(self.engine, schedule).values(task=task, due_at=next_due)
                .on_conflict_do_nothing().returning(schedule.c.task)
            )
            return session.execute(first).first() is not None  # no row: someone else's turn

    @database_call
    def next_turn(self, task: str) -> datetime | None:
        """When `task` is next due (`take_turn`), or None if no caller ever took a turn of it."""
        with self.engine.connect() as conn:
            return as_utc(conn.execute(select(schedule.c.due_at).where(schedule.c.task == task)).scalar_one_or_none())

    @database_call
    def count_due(self) -> int:
        """Runs a free worker could claim now: queued or running, and due.

        Due means `available_at` has passed, which a live lease never has
        (a claim pushes it a lease ahead): lapsed leases count, sleeping runs
        and backoffs do not.
        """
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.count()).select_from(runs)
                .where(runs.c.status.in_((QUEUED, RUNNING)), runs.c.available_at <= self.now())
            ).scalar_one()
