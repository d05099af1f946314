"""One SQLAlchemy engine per app, shared by the realtime store and the job store.

SQLite is the zero-install default (`make run`); PostgreSQL (psycopg 3) is for
several processes or machines. Only stores use the engine; views never do.
"""
from __future__ import annotations

from flask import Flask
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

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
