"""One SQLAlchemy engine per app, shared by the realtime store and the job store,
and the few helpers both stores need.

SQLite is the zero-install default (`make run`); PostgreSQL (psycopg 3) is for
several processes or machines. Only stores use the engine; views never do.
"""
from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

from flask import Flask
from sqlalchemy import Engine, MetaData, Table, create_engine, event, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

EXTENSION_KEY = "database"


def make_engine(url: str) -> Engine:
    """Create an engine with the settings this project relies on.

    SQLite: WAL so readers never block the writer, a busy timeout so two
    writers queue instead of failing, connections usable from any thread
    (`flask run` is threaded). PostgreSQL: `pool_pre_ping` so a restarted
    server costs one retry, not an error.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # noqa: ANN001
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def engine_for(app: Flask) -> Engine:
    """The app's engine, created on first use from `DATABASE_URL`."""
    engine = app.extensions.get(EXTENSION_KEY)
    if engine is None:
        engine = make_engine(app.config["DATABASE_URL"])
        app.extensions[EXTENSION_KEY] = engine
    return engine


# Small helpers both stores need, whatever the database.


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """A datetime read back from the database, made aware: SQLite keeps no zone, and we only write UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def upsert(engine: Engine, table: Table) -> Any:
    """`INSERT` with `on_conflict_do_*`, which SQLite and PostgreSQL both have, in their dialect."""
    return (postgresql if engine.dialect.name == "postgresql" else sqlite).insert(table)


@contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """A Session in a write transaction, committed at the end of the block.

    On SQLite it takes the write lock first (BEGIN IMMEDIATE): a transaction
    that reads and then writes could otherwise fail with "database is locked"
    instead of waiting its turn.
    """
    with Session(engine) as session, session.begin():
        if engine.dialect.name == "sqlite":
            session.connection().exec_driver_sql("BEGIN IMMEDIATE")
        yield session


# An arbitrary constant naming the schema lock on PostgreSQL.
_SCHEMA_LOCK = 0x5C4E_0001


def create_tables(engine: Engine, metadata: MetaData) -> None:
    """Create the missing tables of `metadata`; processes starting together queue, never race."""
    with write_session(engine) as session:
        if engine.dialect.name == "postgresql":
            session.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
        metadata.create_all(session.connection())
