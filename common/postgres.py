"""PostgreSQL connections: the statement timeout, and why the server refuses a connection.

Both must survive a pooler in transaction mode (PgBouncer) between the app
and the server, with the pooler's default settings (issue 17, item 7):

- `StatementTimeout` gets `statement_timeout` to the server whichever way
  reaches it: the `options` startup parameter directly, `SET LOCAL` in each
  transaction behind a pooler that refuses or drops `options`;
- `refusal_reason` tells a refusal that needs an operator (a wrong
  database, role or password, a refused startup parameter) from one that
  passes by itself, for `Database`'s log and /readyz.
"""
from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Engine, event

log = logging.getLogger(__name__)

# What a connection's pooled `info` holds when its session lacks the statement timeout.
_PER_TRANSACTION = "statement_timeout_per_transaction"
# In milliseconds, whichever way it was set: startup, role, database, server.
_STATEMENT_TIMEOUT_SQL = "SELECT setting FROM pg_settings WHERE name = 'statement_timeout'"


class StatementTimeout:
    """A PostgreSQL engine's `statement_timeout`, by whichever way reaches the server.

    The server then cancels a statement stuck behind a lock, instead of running
    it, and committing it, after its caller gave up. Directly, the timeout
    travels in the `options` startup parameter, at no cost. A pooler in
    transaction mode cannot keep startup parameters per client: PgBouncer
    refuses `options` by default ("unsupported startup parameter"), or drops
    it when told to ignore it (issue 17, item 7). A session `SET` on connect
    would not do either: each transaction may run on another server
    connection, and the `SET` stays behind on the one it ran on, for other
    clients. So a new connection checks that the timeout is in force; when it
    is not, each transaction on it starts with `SET LOCAL`, which ends with the
    transaction: one more round trip per transaction, which a role or database
    setting saves (docs/deploy.md, section 5).
    """

    def __init__(self, engine: Engine, timeout_ms: int) -> None:
        self.timeout_ms = timeout_ms
        self.set_local = f"SET LOCAL statement_timeout = {timeout_ms}"
        self.options_refused = False
        self._reported = False
        event.listen(engine, "do_connect", self._connect)
        event.listen(engine, "connect", self._check)
        event.listen(engine, "begin", self._begin)

    def _connect(self, dialect: Any, _record: Any, cargs: list, cparams: dict) -> Any:
        if self.options_refused:
            return None  # SQLAlchemy connects with `cparams` alone
        try:
            # A URL's own `options` win; the check below then sees what they set.
            return dialect.connect(*cargs, **{"options": f"-c statement_timeout={self.timeout_ms}", **cparams})
        except dialect.loaded_dbapi.OperationalError as error:
            if "unsupported startup parameter" not in str(error):
                raise
            self.options_refused = True
            return None

    def _check(self, dbapi_connection: Any, record: Any) -> None:
        in_force = dbapi_connection.execute(_STATEMENT_TIMEOUT_SQL).fetchone()[0]
        dbapi_connection.rollback()  # leave no transaction open on a pooled server connection
        if int(in_force) == self.timeout_ms:
            return
        record.info[_PER_TRANSACTION] = self.set_local
        if not self._reported:
            self._reported = True
            how = "was refused" if self.options_refused else "did not reach the server"
            log.info(
                "statement_timeout is %s ms on new connections, not %d (the `options` startup parameter %s, "
                "a pooler?): each transaction sets it, one more round trip, which setting it on the role saves",
                in_force, self.timeout_ms, how,
            )

    @staticmethod
    def _begin(conn: Any) -> None:
        statement = per_transaction(conn.connection)
        if statement is not None:
            conn.connection.driver_connection.execute(statement, prepare=False)


def per_transaction(connection: Any) -> str | None:
    """The `SET LOCAL statement_timeout` a transaction on this pooled connection (SQLAlchemy's
    `raw_connection()`) must start with, or None when its session has the timeout already."""
    return connection.info.get(_PER_TRANSACTION)


# PostgreSQL's and PgBouncer's refusals that pass by themselves: a full server or
# pool, a server starting or stopping, PgBouncer waiting before it retries a login.
_PASSING_REFUSALS = (
    "the database system is", "too many clients", "remaining connection slots",
    "no more connections allowed", "server_login_retry", "client_login_timeout", "query_wait_timeout",
    "cannot connect to server",
)


def refusal_reason(error: BaseException) -> str | None:
    """Why the server, or a pooler in front of it, refused a new connection, when retrying will
    not help: a database or role that does not exist, a failed authentication, a startup
    parameter the pooler refuses. None for anything else (unreachable, stalled, full).

    libpq puts the server's FATAL message after the host and port it tried; the message
    names a role or a database, never a password.
    """
    _, fatal, rest = str(getattr(error, "orig", None) or error).rpartition("FATAL:")
    lines = rest.strip().splitlines()
    if not fatal or not lines:
        return None
    reason = " ".join(lines[0].split())
    return None if any(passing in reason for passing in _PASSING_REFUSALS) else reason
