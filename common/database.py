"""The app's database: one engine, and the rules every database call follows.

SQLite is the zero-install default (`make run`); PostgreSQL (psycopg 3) is for
several processes or machines. Only stores touch the engine, and each of
their public methods is a `@database_call`, which:

- creates the schema on first use, not at import or in `create_app`: a worker
  that starts while the database is away boots, serves what needs no
  database, and creates the tables once it is back;
- under gevent, bounds the call in time (`call_timeout_s`) and runs SQLite,
  whose C library blocks the whole thread while it waits for a lock, on one
  of gevent's native threads, so the other streams of the worker go on;
- turns "the database is away, stalled or locked" into `DatabaseUnavailable`
  (503 with `Retry-After`), never a 500; when the server refuses connections
  for a reason waiting will not cure (a wrong database or role, a startup
  parameter a pooler refuses), that reason goes to the log, once a minute,
  and to /readyz (`ping`), never to API clients.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, TypeVar

import gevent
from sqlalchemy import Engine, MetaData, Table, create_engine, event, exc, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from .config import flag
from .errors import AppError
from .greenlets import gevent_hub, native_thread_ident
from .postgres import StatementTimeout, refusal_reason

log = logging.getLogger(__name__)

EXTENSION_KEY = "database"
T = TypeVar("T")


class DatabaseUnavailable(AppError):
    status = 503
    code = "database_unavailable"
    headers = {"Retry-After": "2"}


def make_engine(
    url: str, *, connect_timeout_s: float = 3.0, statement_timeout_s: float = 5.0, prepared_statements: bool = True
) -> Engine:
    """Create an engine with the settings this project relies on.

    SQLite: WAL so readers never block the writer, a busy timeout so two
    writers queue instead of failing (and fail, rather than hang, when another
    process holds the lock for long), connections usable from any thread.
    PostgreSQL: a connect timeout; a statement timeout (`StatementTimeout`);
    server-side prepared statements (psycopg prepares a
    statement on its fifth run) unless `prepared_statements` is false, for a
    pooler in transaction mode (PgBouncer before 1.21) cannot keep them. No `pool_pre_ping`: it is a
    round trip before every call (bench/README.md has its cost); a
    connection the server dropped fails its next call instead, as a 503, and
    SQLAlchemy then replaces the whole pool.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        busy_ms = int(statement_timeout_s * 1000)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": statement_timeout_s})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # noqa: ANN001
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.close()

        return engine
    connect_args = {
        "connect_timeout": max(1, round(connect_timeout_s)),
        "prepare_threshold": 5 if prepared_statements else None,
        # A peer that vanishes without a FIN is noticed within seconds. Options of
        # libpq's own sockets, not startup parameters: a pooler never sees them.
        "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
        "tcp_user_timeout": int(statement_timeout_s * 1000),
    }
    engine = create_engine(
        url, pool_size=10, max_overflow=20, pool_timeout=connect_timeout_s,
        connect_args=connect_args,
    )
    StatementTimeout(engine, int(statement_timeout_s * 1000))
    return engine


class Database:
    """The app's engine, its schemas, and `call`: how every store method runs."""

    #: How often a refusal that goes on is logged again, per process.
    refusal_log_interval_s = 60.0

    def __init__(
        self, url: str, *, call_timeout_s: float = 8.0, statement_timeout_s: float = 5.0, prepared_statements: bool = True
    ) -> None:
        self.engine = make_engine(url, statement_timeout_s=statement_timeout_s, prepared_statements=prepared_statements)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self.call_timeout_s = call_timeout_s
        self._schemas: list[Callable[[Engine], None]] = []
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        # Per greenlet (per thread outside gevent), keyed by threading.get_ident() and
        # removed when done: a threading.local would keep a dict for every stream's greenlet.
        self._time_limits: dict[int, float] = {}
        self._inside: set[int] = set()
        # Why the server refused the last new connection, until one succeeds: PgBouncer says
        # it once, then holds the next attempts until they time out (`server_login_retry`).
        self.refusal: str | None = None
        self._refusal_logged = (None, 0.0)
        event.listen(self.engine, "connect", self._accepted)
        # The same from the driver itself, for the one path that skips SQLAlchemy's wrapping.
        dbapi = self.engine.dialect.loaded_dbapi
        self._driver_errors = (dbapi.OperationalError, dbapi.InterfaceError)

    def add_schema(self, create: Callable[[Engine], None]) -> None:
        """Register what creates a package's tables; run once per process, at the first call.

        SQLite: now. Its file is never away, and at the first call the caller may hold
        SQLite's one write lock in a transaction of its own (a `session=` publish): the
        schema, made on another connection, would then wait for it until timed out.
        """
        if self.is_sqlite:
            create(self.engine)
            return
        self._schemas.append(create)
        self._schema_ready = False

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)`, a unit of database work, by the rules in the module docstring."""
        return self._call(fn, args, kwargs, self._time_limits.get(threading.get_ident()) or self.call_timeout_s)

    @contextmanager
    def time_limit(self, seconds: float) -> Iterator[None]:
        """Bound the calls this greenlet makes in the block by `seconds` instead of `call_timeout_s`.

        A stream replaying history uses its heartbeat: it would rather send a
        keep-alive and try again than keep its client waiting in silence.
        """
        ident = threading.get_ident()
        previous = self._time_limits.get(ident)
        self._time_limits[ident] = seconds
        try:
            yield
        finally:
            if previous is None:
                del self._time_limits[ident]
            else:
                self._time_limits[ident] = previous

    def ping(self, timeout_s: float) -> None:
        """A `SELECT 1` that answers within `timeout_s` or raises DatabaseUnavailable (for /readyz),
        whose message is the server's reason when it refuses connections."""
        try:
            self._call(self._select_one, (), {}, timeout_s)
        except DatabaseUnavailable as error:
            if self.refusal is None:
                raise
            raise DatabaseUnavailable(f"the database refuses connections: {self.refusal}") from error

    def _select_one(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def _call(self, fn: Callable[..., T], args: tuple, kwargs: dict, timeout_s: float) -> T:
        if threading.get_ident() in self._inside:
            return fn(*args, **kwargs)  # nested in a call already (a publish inside a job's transaction)
        hub = gevent_hub()
        if hub is None or hub.thread_ident != native_thread_ident():
            return self._run(fn, args, kwargs)  # a plain thread (flask run, a job thread): no hub to keep free
        # gevent's own Timeout, a BaseException: SQLAlchemy then discards the
        # connection it interrupted instead of rolling back on a stalled socket.
        timeout = gevent.Timeout(timeout_s)
        timeout.start()
        try:
            if self.is_sqlite:
                return hub.threadpool.apply(self._run, (fn, args, kwargs))
            return self._run(fn, args, kwargs)
        except BaseException as error:
            # Ours, or whatever the driver raised while it was interrupted
            # (psycopg cannot reset a connection that was mid-query).
            if error is not timeout and timeout.pending:
                raise
            log.warning("database call timed out after %g s", timeout_s)
            raise DatabaseUnavailable(f"the database did not answer within {timeout_s:g} s; try again shortly") from None
        finally:
            timeout.close()

    def _run(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        ident = threading.get_ident()
        self._inside.add(ident)
        try:
            self.ensure_schema()
            return fn(*args, **kwargs)
        except (exc.OperationalError, exc.InterfaceError, exc.TimeoutError, *self._driver_errors) as error:
            # The server is away, stalled, refuses us, or holds a lock too long:
            # the request is fine, the moment is not. Details stay in the log.
            reason = refusal_reason(error)
            if reason is None:
                log.warning("database unavailable: %s", type(getattr(error, "orig", None) or error).__name__)
            else:
                self._refused(reason)
            if self.is_sqlite and "locked" in str(getattr(error, "orig", None) or error):
                raise DatabaseUnavailable(
                    "the SQLite database is locked by another transaction; try again shortly (if that is a "
                    "transaction of this caller's own, pass its session= to publish in it, or commit first)"
                ) from error
            raise DatabaseUnavailable("the database is unavailable; try again shortly") from error
        finally:
            self._inside.discard(ident)

    def _refused(self, reason: str) -> None:
        self.refusal = reason
        now = time.monotonic()
        last_reason, last_time = self._refusal_logged
        if reason == last_reason and now - last_time < self.refusal_log_interval_s:
            return
        self._refusal_logged = (reason, now)
        log.error("the database refuses connections: %s (retrying will not help: check DATABASE_URL's "
                  "database and role, the password, and the settings of any pooler in between)", reason)

    def _accepted(self, _dbapi_connection: Any, _record: Any) -> None:
        self.refusal = None

    def ensure_schema(self) -> None:
        """Create every registered schema, once per process (every call does this first)."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if not self._schema_ready:
                for create in self._schemas:
                    create(self.engine)
                self._schema_ready = True

    def dispose(self) -> None:
        self.engine.dispose()


def database_call(method: Callable[..., T]) -> Callable[..., T]:
    """Mark a store method as one unit of database work, run through its store's `Database.call`."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> T:
        return self.db.call(method, self, *args, **kwargs)

    return call


def prepared_statements(config: Any) -> bool:
    """DATABASE_PREPARED_STATEMENTS: true, false, or "auto" (the default): off when a separate
    REALTIME_LISTEN_URL says DATABASE_URL goes through a pooler such as PgBouncer."""
    setting = str(config.get("DATABASE_PREPARED_STATEMENTS", "auto")).strip().lower()
    if setting == "auto":
        listen_url = config.get("REALTIME_LISTEN_URL")
        return not listen_url or listen_url == config.get("DATABASE_URL")
    return flag(setting)


def database_for(app: Any) -> Database:
    """The app's Database, created on first use from `DATABASE_URL`."""
    database = app.extensions.get(EXTENSION_KEY)
    if database is None:
        database = Database(app.config["DATABASE_URL"], prepared_statements=prepared_statements(app.config))
        app.extensions[EXTENSION_KEY] = database
    return database


# Small helpers the stores share, whatever the database.


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


def add_missing_columns(engine: Engine, table: Table) -> None:
    """Add the columns of `table` that its database table lacks: a database made by an older version.

    `create_all` makes missing tables but never touches existing ones. A new
    column must therefore be nullable or have a `server_default`, so that the
    rows already there get a value. Under the schema lock, like `create_tables`.
    """
    with write_session(engine) as session:
        if engine.dialect.name == "postgresql":
            session.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
        add_missing_columns_in(session.connection(), table)


def add_missing_columns_in(conn: Any, table: Table) -> None:
    """`add_missing_columns` in the caller's transaction, under its own schema lock."""
    from sqlalchemy import inspect
    from sqlalchemy.schema import CreateColumn

    present = {column["name"] for column in inspect(conn).get_columns(table.name)}
    for column in table.columns:
        if column.name in present:
            continue
        if not column.nullable and column.server_default is None:
            raise RuntimeError(
                f"{table.name}.{column.name} is missing and NOT NULL without a server_default: "
                "existing rows would have no value; add it by hand"
            )
        # The column as CREATE TABLE would spell it, in this dialect: name, type, DEFAULT, NOT NULL.
        spec = CreateColumn(column).compile(dialect=conn.dialect)
        name = conn.dialect.identifier_preparer.format_table(table)
        log.info("adding column %s.%s", table.name, column.name)
        conn.exec_driver_sql(f"ALTER TABLE {name} ADD COLUMN {spec}")


def add_missing_indexes(conn: Any, table: Table) -> None:
    """Create the indexes of `table` that its database table lacks, in the caller's transaction
    (under its schema lock): `create_all` adds none to an existing table.

    On PostgreSQL a one-time build on a large table may take longer than the statement
    timeout: lifted for this transaction, only when an index is missing.
    """
    from sqlalchemy import inspect

    present = {index["name"] for index in inspect(conn).get_indexes(table.name)}
    missing = [index for index in table.indexes if index.name not in present]
    if missing and conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
    for index in missing:
        log.info("adding index %s", index.name)
        index.create(conn)
