"""The job store: events, runs, steps and report files, in the app's database.

The only module of the package that speaks SQL. It returns frozen dataclasses,
never ORM rows, and it is the single place where the durability rules live:

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
- **Fencing.** Every write a worker makes for a run (a step, the outcome) is
  conditioned on still holding the lease. A worker that lost its lease (it
  paused longer than the lease, and someone else took over) gets `LeaseLost`
  and stops without writing.
- **Side effects in the same transaction.** Realtime messages (lifecycle
  status, `ctx.publish`) are written through hooks that receive this
  transaction's Session, so "message published" and "step recorded" commit
  together or not at all: a resumed run never publishes a message twice.
"""
from __future__ import annotations

import json
import re
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Iterator, Sequence

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from database import as_utc, upsert, utcnow

from .errors import RunFinished, RunNotFound
from .types import JSON, Clock

metadata = MetaData()

events = Table(
    "job_events",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("data", Text, nullable=False),  # JSON object
    Column("created_at", DateTime(timezone=True), nullable=False),
)

runs = Table(
    "job_runs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("function_id", String(100), nullable=False),
    Column("event_id", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempt", Integer, nullable=False),  # 1-based; grows when an attempt fails and is retried
    Column("output", Text),  # JSON
    Column("error", Text),  # the last error, "ExceptionName: message"
    Column("cancel_requested", Boolean, nullable=False),
    Column("lease_owner", String(64)),  # the claim token of the worker executing it
    Column("available_at", DateTime(timezone=True), nullable=False),  # see the module docstring
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("ended_at", DateTime(timezone=True)),
    Index("ix_job_runs_claimable", "status", "available_at"),
)

steps = Table(
    "job_steps",
    metadata,
    Column("run_id", String(32), primary_key=True),
    Column("id", String(100), primary_key=True),
    Column("position", Integer, nullable=False),  # order of first execution within the run
    Column("status", String(16), nullable=False),  # running | completed | failed | sleeping
    Column("attempts", Integer, nullable=False),  # times its code was started
    Column("output", Text),  # JSON
    Column("error", Text),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

files = Table(
    "job_files",
    metadata,
    Column("run_id", String(32), primary_key=True),
    Column("name", String(100), primary_key=True),
    Column("content_type", String(100), nullable=False),
    Column("content", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = "queued", "running", "completed", "failed", "cancelled"
FINISHED = (COMPLETED, FAILED, CANCELLED)

ID_PATTERN = re.compile(r"[0-9a-f]{16}")

# Arbitrary constants naming this package's advisory locks on PostgreSQL.
_SCHEMA_LOCK = 0x70B5_0001
_LIMITED_CLAIM_LOCK = 0x70B5_0002


def new_id() -> str:
    return secrets.token_hex(8)


def is_id(text: str) -> bool:
    """Shaped like an id we issue. Checked before any lookup by a client's id,
    so a NUL or an unencodable character never reaches a query (PostgreSQL
    refuses NUL in text with an error, not with "no such row")."""
    return isinstance(text, str) and ID_PATTERN.fullmatch(text) is not None


def _loads(text: str | None) -> JSON:
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class Event:
    id: str
    name: str
    data: dict[str, JSON]
    created_at: datetime


@dataclass(frozen=True)
class NewEvent:
    """An event to store, with the ids of the functions it starts."""

    name: str
    data_json: str
    function_ids: Sequence[str]


@dataclass(frozen=True)
class Step:
    id: str
    status: str
    attempts: int
    output: JSON
    error: str | None


@dataclass(frozen=True)
class Run:
    id: str
    function_id: str
    event_id: str
    status: str
    attempt: int
    output: JSON
    error: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    steps: tuple[Step, ...] = ()

    @property
    def channel(self) -> str:
        return f"run.{self.id}"


@dataclass(frozen=True)
class Claim:
    """A run held by one worker: every write for it is fenced by `token`."""

    run: Run
    token: str
    lease_s: float


@dataclass(frozen=True)
class StoredFile:
    run_id: str
    name: str
    content_type: str
    content: bytes


class LeaseLost(BaseException):
    """The worker no longer holds the run (its lease lapsed and another worker took it).

    A BaseException, like the step interrupts, so job code's `except Exception`
    cannot swallow it.
    """


# Called inside the transaction that changed a run's status, with the new run.
StatusHook = Callable[[Session, Run], None]


def _run(row: Any, step_rows: Sequence[Any] = ()) -> Run:
    return Run(
        id=row.id,
        function_id=row.function_id,
        event_id=row.event_id,
        status=row.status,
        attempt=row.attempt,
        output=_loads(row.output),
        error=row.error,
        cancel_requested=bool(row.cancel_requested),
        created_at=as_utc(row.created_at),
        started_at=as_utc(row.started_at),
        ended_at=as_utc(row.ended_at),
        steps=tuple(_step(s) for s in step_rows),
    )


def _step(row: Any) -> Step:
    return Step(row.id, row.status, row.attempts, _loads(row.output), row.error)


class JobStore:
    """Durable state of events, runs and steps. `now` is the clock; tests replace it."""

    def __init__(self, engine: Engine, *, on_status: StatusHook, now: Clock = utcnow) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"
        self.on_status = on_status
        self.now = now

    def create_schema(self) -> None:
        """Create the tables if missing. Safe to race with other processes."""
        with self._write() as session:
            if self.is_postgres:
                session.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
            metadata.create_all(session.connection())

    # -- events ---------------------------------------------------------------

    def add_events(self, new_events: Sequence[NewEvent]) -> list[tuple[Event, list[Run]]]:
        """Store events and queue one run per triggered function, all in one transaction."""
        now = self.now()
        created: list[tuple[Event, list[Run]]] = []
        with self._write() as session:
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
                    run = _run(row)
                    self.on_status(session, run)
                    event_runs.append(run)
                created.append((event, event_runs))
        return created

    def event(self, event_id: str) -> Event:
        with self.engine.connect() as conn:
            row = conn.execute(select(events).where(events.c.id == event_id)).one()
        return Event(row.id, row.name, json.loads(row.data), as_utc(row.created_at))

    # -- reading runs -----------------------------------------------------------

    def run(self, run_id: str) -> Run | None:
        """The run with its steps in the order they first ran, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
            if row is None:
                return None
            step_rows = conn.execute(
                select(steps).where(steps.c.run_id == run_id).order_by(steps.c.position)
            ).all()
        return _run(row, step_rows)

    def steps_of(self, run_id: str) -> dict[str, Step]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(steps).where(steps.c.run_id == run_id)).all()
        return {row.id: _step(row) for row in rows}

    # -- claiming and leases ----------------------------------------------------

    def claim(
        self, function_ids: Sequence[str], limits: dict[str, int], *, owner: str, lease_s: float
    ) -> Claim | None:
        """Atomically take the run that is due first, or return None.

        A run is due when it is queued, or running but not held (a lapsed
        lease, the end of a sleep or of a retry's backoff). Only functions in
        `function_ids` are taken; a function in `limits` only while fewer than
        its limit of runs are held.
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
        candidate = select(runs.c.id).where(due).order_by(runs.c.available_at, runs.c.id).limit(1)
        if self.is_postgres:
            candidate = candidate.with_for_update(skip_locked=True)
        with self._write() as session:
            if self.is_postgres and limits:
                # Under READ COMMITTED two claimers could each count the other's
                # claim as not yet made and exceed a limit; claims of limited
                # functions therefore queue on one lock, held until commit.
                session.execute(select(func.pg_advisory_xact_lock(_LIMITED_CLAIM_LOCK)))
            row = session.execute(
                update(runs)
                .where(runs.c.id == candidate.scalar_subquery())
                .values(status=RUNNING, lease_owner=token, available_at=now + timedelta(seconds=lease_s))
                .returning(*runs.c)
            ).first()
        return None if row is None else Claim(_run(row), token, lease_s)

    def renew(self, tokens: Sequence[str], lease_s: float) -> int:
        """Extend the leases of these claims; return how many are still held."""
        if not tokens:
            return 0
        with self._write() as session:
            return session.execute(
                update(runs)
                .where(runs.c.lease_owner.in_(tokens), runs.c.status == RUNNING)
                .values(available_at=self.now() + timedelta(seconds=lease_s))
            ).rowcount

    def mark_started(self, claim: Claim) -> None:
        """Record the first start of a run, and announce `running`, exactly once."""
        with self._write() as session:
            row = self._fence(session, claim)
            if row.started_at is None:
                row = session.execute(
                    update(runs).where(runs.c.id == claim.run.id)
                    .values(started_at=self.now()).returning(*runs.c)
                ).one()
                self.on_status(session, _run(row))

    # -- steps ------------------------------------------------------------------

    def start_step(self, claim: Claim, step_id: str) -> bool:
        """Count one more execution of a step; False (and nothing written) if cancel was requested."""
        with self._write() as session:
            if self._fence(session, claim).cancel_requested:
                return False
            existing = session.execute(
                select(steps.c.attempts).where(steps.c.run_id == claim.run.id, steps.c.id == step_id)
            ).first()
            if existing is None:
                self._insert_step(session, claim.run.id, step_id, status=RUNNING, attempts=1)
            else:
                self._update_step(session, claim.run.id, step_id, status=RUNNING, attempts=existing.attempts + 1)
        return True

    def complete_step(self, claim: Claim, step_id: str, output_json: str) -> None:
        with self._write() as session:
            self._fence(session, claim)
            self._update_step(session, claim.run.id, step_id, status=COMPLETED, output=output_json, error=None)

    def fail_step(self, claim: Claim, step_id: str, error: str) -> None:
        with self._write() as session:
            self._fence(session, claim)
            self._update_step(session, claim.run.id, step_id, status=FAILED, error=error)

    def record_effect(self, claim: Claim, step_id: str, effect: Callable[[Session], JSON]) -> bool:
        """Run `effect(session)` and record its result as a completed step, atomically.

        The step exists if and only if the effect's writes committed, so a
        resumed run that finds the step skips the effect. False (and nothing
        written) if cancel was requested.
        """
        with self._write() as session:
            if self._fence(session, claim).cancel_requested:
                return False
            output = json.dumps(effect(session))
            self._insert_step(session, claim.run.id, step_id, status=COMPLETED, attempts=1, output=output)
        return True

    def sleep_step(self, claim: Claim, step_id: str, until: datetime) -> bool:
        """Record a sleep and hand the run back until `until`, atomically; False if cancel was requested."""
        with self._write() as session:
            if self._fence(session, claim).cancel_requested:
                return False
            output = json.dumps({"until": until.isoformat()})
            self._insert_step(session, claim.run.id, step_id, status="sleeping", attempts=1, output=output)
            self._release(session, claim, at=until)
        return True

    def _insert_step(self, session: Session, run_id: str, step_id: str, **values: Any) -> None:
        position = session.execute(
            select(func.count()).select_from(steps).where(steps.c.run_id == run_id)
        ).scalar_one()
        session.execute(
            insert(steps).values(run_id=run_id, id=step_id, position=position, updated_at=self.now(), **values)
        )

    def _update_step(self, session: Session, run_id: str, step_id: str, **values: Any) -> None:
        session.execute(
            update(steps).where(steps.c.run_id == run_id, steps.c.id == step_id)
            .values(updated_at=self.now(), **values)
        )

    # -- outcomes ---------------------------------------------------------------

    def finish(self, claim: Claim, status: str, *, output_json: str | None = None, error: str | None = None) -> None:
        """End the run `completed`, `failed` or `cancelled`, and announce it."""
        assert status in FINISHED
        with self._write() as session:
            self._fence(session, claim)
            row = session.execute(
                update(runs).where(runs.c.id == claim.run.id)
                .values(status=status, output=output_json, error=error, lease_owner=None, ended_at=self.now())
                .returning(*runs.c)
            ).one()
            self.on_status(session, _run(row))

    def retry(self, claim: Claim, *, at: datetime, error: str) -> None:
        """Count a failed attempt and make the run due again at `at`."""
        with self._write() as session:
            self._fence(session, claim)
            session.execute(
                update(runs).where(runs.c.id == claim.run.id)
                .values(attempt=runs.c.attempt + 1, error=error, lease_owner=None, available_at=at)
            )

    def release(self, claim: Claim, *, at: datetime | None = None) -> None:
        """Give the run back unfinished, due again at `at` (default: now, for another worker)."""
        with self._write() as session:
            self._fence(session, claim)
            self._release(session, claim, at=at or self.now())

    def _release(self, session: Session, claim: Claim, *, at: datetime) -> None:
        session.execute(
            update(runs).where(runs.c.id == claim.run.id).values(lease_owner=None, available_at=at)
        )

    def cancel(self, run_id: str) -> None:
        """Cancel a run: at once if no worker holds it, else ask its worker to stop before the next step."""
        with self._write() as session:
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
                self.on_status(session, _run(row))

    def _fence(self, session: Session, claim: Claim) -> Any:
        """Renew the claim's lease, or raise LeaseLost; returns the run's row."""
        row = session.execute(
            update(runs)
            .where(runs.c.id == claim.run.id, runs.c.lease_owner == claim.token, runs.c.status == RUNNING)
            .values(available_at=self.now() + timedelta(seconds=claim.lease_s))
            .returning(*runs.c)
        ).first()
        if row is None:
            raise LeaseLost(f"run {claim.run.id} is no longer held by {claim.token}")
        return row

    # -- files --------------------------------------------------------------------

    def save_file(self, run_id: str, name: str, content_type: str, content: bytes) -> None:
        """Store (or replace) a file produced by a run, such as its report."""
        statement = upsert(self.engine, files).values(
            run_id=run_id, name=name, content_type=content_type, content=content, created_at=self.now()
        )
        with self._write() as session:
            session.execute(statement.on_conflict_do_update(
                index_elements=[files.c.run_id, files.c.name],
                set_={"content_type": statement.excluded.content_type, "content": statement.excluded.content},
            ))

    def load_file(self, run_id: str, name: str) -> StoredFile | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(files).where(files.c.run_id == run_id, files.c.name == name)).first()
        return None if row is None else StoredFile(row.run_id, row.name, row.content_type, bytes(row.content))

    # -- transactions -------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """A write transaction. On SQLite it takes the write lock first (BEGIN
        IMMEDIATE): a transaction that reads and then writes could otherwise
        fail with "database is locked" instead of waiting its turn."""
        with Session(self.engine) as session, session.begin():
            if not self.is_postgres:
                session.connection().exec_driver_sql("BEGIN IMMEDIATE")
            yield session
