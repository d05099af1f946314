"""The job tables: events, the runs they start, each run's steps, and the shared schedule."""
from __future__ import annotations

from sqlalchemy import (
    Boolean, Column, DateTime, Engine, Index, Integer, MetaData, String, Table, Text, func, inspect, select, text,
)
from sqlalchemy.orm import Session
from sqlalchemy.schema import CreateIndex

from common.database import add_missing_columns, create_tables, write_session

metadata = MetaData()

events = Table(
    "job_events",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("data", Text, nullable=False),  # JSON object
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_job_events_created", "created_at"),  # retention: the oldest first
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
    # Times its worker died (or stalled) mid-run: claims of a lapsed lease (runs.py).
    # A server default, so databases made before this column get it (create_schema).
    Column("crashes", Integer, nullable=False, server_default=text("0")),
    # The earliest moment a worker may claim the run: the lease's expiry while
    # it executes, its wake-up time while it sleeps or backs off (runs.py).
    Column("available_at", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("ended_at", DateTime(timezone=True)),
    Index("ix_job_runs_claimable", "status", "available_at"),
    # Retention (runs.py `prune`): ended runs oldest first, and whether an event still has a run.
    Index("ix_job_runs_ended", "ended_at"),
    Index("ix_job_runs_event", "event_id"),
)

steps = Table(
    "job_steps",
    metadata,
    Column("run_id", String(32), primary_key=True),
    # A step id (100 characters at most), or the id of a publish inside one (`fetch/publish:1`, steps.py).
    Column("id", String(200), primary_key=True),
    Column("position", Integer, nullable=False),  # order of first execution within the run
    Column("status", String(16), nullable=False),  # running | completed | failed | sleeping
    Column("attempts", Integer, nullable=False),  # times its code was started
    Column("output", Text),  # JSON
    Column("error", Text),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


# When each periodic task of all the workers sharing the database is next due
# (runs.py `take_turn`): one row per task, such as "prune".
schedule = Table(
    "job_schedule",
    metadata,
    Column("task", String(100), primary_key=True),
    Column("due_at", DateTime(timezone=True), nullable=False),
)

# An arbitrary constant naming the lock under which processes add missing indexes on PostgreSQL.
_INDEX_LOCK = 0x70B5_0003


def create_schema(engine: Engine) -> None:
    """Create the tables if missing, and what later versions added to them. Safe to race with other processes."""
    create_tables(engine, metadata)
    add_missing_columns(engine, runs)  # job_runs.crashes, missing from databases made before it
    # create_all makes a table's indexes with the table only: databases made
    # before retention lack these.
    with write_session(engine) as session:
        if engine.dialect.name == "postgresql":
            session.execute(select(func.pg_advisory_xact_lock(_INDEX_LOCK)))
        for index in (*events.indexes, *runs.indexes):
            session.execute(CreateIndex(index, if_not_exists=True))
        _widen_step_ids(session)


def _widen_step_ids(session: Session) -> None:
    """Give job_steps.id its current width in a database made when it was 100 characters.

    SQLite never enforces a VARCHAR's length; PostgreSQL widens one without
    rewriting the table or its index.
    """
    conn = session.connection()
    if conn.dialect.name != "postgresql":
        return
    [column] = [c for c in inspect(conn).get_columns(steps.name) if c["name"] == "id"]
    if column["type"].length < steps.c.id.type.length:
        conn.exec_driver_sql(f"ALTER TABLE {steps.name} ALTER COLUMN id TYPE VARCHAR({steps.c.id.type.length})")
