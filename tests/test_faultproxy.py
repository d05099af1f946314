"""The fault-test helpers themselves: tests/faultproxy.py and tests/pgbouncer.py, on the real PostgreSQL.

What the fault tests will lean on: through the proxy, `cut()` closes and refuses
connections and `stall()` holds them and their bytes until `restore()`;
PgBouncer in transaction mode runs plain queries, and breaks server-side
prepared statements, which is why the app must not use them behind it.
"""
from __future__ import annotations

import socket
import threading

import psycopg
import pytest
from sqlalchemy.engine import make_url

from conftest import wait_until
from faultproxy import FaultProxy
from pgbouncer import pgbouncer  # noqa: F401 - the fixture

GUARD_S = 10  # bounds a join that must not hang; never a timing assertion


def libpq(url: str) -> str:
    """The SQLAlchemy URL `postgresql+psycopg://...` as a libpq URL for psycopg."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def connect(url: str, connect_timeout: int = 2, **kwargs: object) -> psycopg.Connection:
    return psycopg.connect(libpq(url), autocommit=True, connect_timeout=connect_timeout, **kwargs)


class Background(threading.Thread):
    """Run `fn` in a thread, keeping its result or its exception."""

    def __init__(self, fn) -> None:  # noqa: ANN001
        super().__init__(daemon=True)
        self.fn = fn
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def outcome(self) -> object:
        self.join(GUARD_S)
        assert not self.is_alive(), "still running after the guard timeout"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def proxy():
    with FaultProxy("127.0.0.1", 5432) as proxy:
        yield proxy


def proxy_threads(port: int) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith(f"faultproxy-{port}")]


# -- FaultProxy ------------------------------------------------------------------------


def test_url_for_points_the_same_database_at_the_proxy():
    with FaultProxy("127.0.0.1", 5432) as proxy:
        url = proxy.url_for("postgresql+psycopg://postgres@127.0.0.1:5432/rt_test_1234")
        assert url == f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/rt_test_1234"


def test_close_stops_listening_and_every_thread():
    proxy = FaultProxy("127.0.0.1", 5432)
    port = proxy.port
    assert proxy_threads(port)
    proxy.close()
    proxy.close()  # idempotent
    assert proxy_threads(port) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.postgres
def test_proxy_forwards_queries(proxy, postgres_url):
    with connect(proxy.url_for(postgres_url)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert proxy.open_connections == 1
    wait_until(lambda: proxy.open_connections == 0, what="the proxy to see the client go")
    assert proxy.connections_accepted >= 1
    assert proxy.connections_refused == 0


@pytest.mark.postgres
def test_cut_closes_open_connections_and_refuses_new_ones_until_restore(proxy, postgres_url):
    url = proxy.url_for(postgres_url)
    with connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        proxy.cut()
        assert proxy.open_connections == 0
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        connect(url)
    assert proxy.connections_refused >= 1  # libpq may retry once without SSL
    proxy.restore()
    with connect(url) as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)


@pytest.mark.postgres
def test_stall_holds_a_query_until_restore(proxy, postgres_url):
    with connect(proxy.url_for(postgres_url)) as conn:
        proxy.stall()
        query = Background(lambda: conn.execute("SELECT 42").fetchone())
        query.start()
        try:
            wait_until(lambda: proxy.held_bytes > 0, what="the query held by the proxy")
            assert query.is_alive()  # its bytes never reached the server
            assert proxy.open_connections == 1
        finally:
            proxy.restore()
        assert query.outcome() == (42,)
        assert proxy.held_bytes == 0


@pytest.mark.postgres
def test_stall_holds_a_new_connection_until_restore(proxy, postgres_url):
    url = proxy.url_for(postgres_url)
    proxy.stall()

    def connect_and_query() -> object:
        with connect(url, connect_timeout=GUARD_S) as conn:
            return conn.execute("SELECT 7").fetchone()

    attempt = Background(connect_and_query)
    attempt.start()
    try:
        wait_until(lambda: proxy.held_connections == 1, what="the new connection held by the proxy")
        assert attempt.is_alive()
    finally:
        proxy.restore()
    assert attempt.outcome() == (7,)


@pytest.mark.postgres
def test_cut_during_a_stall_closes_the_held_connections(proxy, postgres_url):
    url = proxy.url_for(postgres_url)
    with connect(url) as conn:
        proxy.stall()
        attempt = Background(lambda: connect(url, connect_timeout=GUARD_S).close())
        attempt.start()
        wait_until(lambda: proxy.held_connections == 1, what="the new connection held by the proxy")
        proxy.cut()
        assert proxy.open_connections == 0
        with pytest.raises(psycopg.OperationalError):
            attempt.outcome()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")


# -- PgBouncer (transaction mode) --------------------------------------------------------


@pytest.mark.postgres
def test_pgbouncer_runs_queries_in_transaction_mode(pgbouncer, postgres_url):
    url = pgbouncer.url_for(postgres_url)
    assert url == postgres_url.replace(":5432/", f":{pgbouncer.port}/")
    with connect(url, application_name="fault-tests", prepare_threshold=None) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # application_name is a startup parameter pgbouncer tracks and sets on each server it lends.
        assert conn.execute("SELECT current_setting('application_name')").fetchone() == ("fault-tests",)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(1)")  # what the app uses: fine in one transaction
    with psycopg.connect(host="127.0.0.1", port=pgbouncer.port, user="postgres", dbname="pgbouncer",
                         autocommit=True) as admin:
        config = {row[0]: row[1] for row in admin.execute("SHOW CONFIG").fetchall()}
    assert config["pool_mode"] == "transaction"


@pytest.mark.postgres
def test_pgbouncer_ignores_the_options_startup_parameter(pgbouncer, postgres_url):
    # Accepted (ignore_startup_parameters), but not applied: a statement_timeout set
    # through `options` does not reach the server behind pgbouncer.
    with connect(pgbouncer.url_for(postgres_url), options="-c statement_timeout=1234") as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() != ("1234ms",)


def _second_server_query(url: str, prepare_threshold: int | None) -> object:
    """Run a query, then again while another client holds the server connection it ran on."""
    with connect(url, prepare_threshold=prepare_threshold) as client, connect(url) as other:
        assert client.execute("SELECT %s::int", [1]).fetchone() == (1,)
        with other.transaction():  # takes the one idle server connection, the one `client` used
            other.execute("SELECT 1")
            return client.execute("SELECT %s::int", [2]).fetchone()  # on a new server connection


@pytest.mark.postgres
def test_pgbouncer_loses_server_side_prepared_statements_across_transactions(pgbouncer, postgres_url):
    with pytest.raises(psycopg.errors.InvalidSqlStatementName):
        _second_server_query(pgbouncer.url_for(postgres_url), prepare_threshold=0)


@pytest.mark.postgres
def test_pgbouncer_plain_queries_work_across_server_connections(pgbouncer, postgres_url):
    assert _second_server_query(pgbouncer.url_for(postgres_url), prepare_threshold=None) == (2,)
