"""PostgreSQL connections (common/postgres.py), directly and behind PgBouncer in transaction mode.

Issue 17, item 7: with PgBouncer's default settings, which refuse the
`options` startup parameter, every call answered 503 forever, saying nothing
of why. Now the statement timeout reaches the server without it.
"""
from __future__ import annotations

from contextlib import closing

import httpx
import psycopg
import pytest
from sqlalchemy import exc
from sqlalchemy.engine import make_url

from conftest import PUBLISH_KEY, wait_until
from pgbouncer import pgbouncer, stock_pgbouncer  # noqa: F401 - the fixtures
from sseclient import events_of, history, open_stream, read_frames

def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# -- the statement timeout --------------------------------------------------------------------------


@pytest.fixture(params=["direct", "pgbouncer ignoring options", "stock pgbouncer", "stock pgbouncer, timeout on the database"])
def timeout_setup(request, postgres_url):
    """(URL, whether transactions set the timeout): the setups the app meets."""
    if request.param == "direct":
        return postgres_url, False
    if request.param == "pgbouncer ignoring options":
        return request.getfixturevalue("pgbouncer").url_for(postgres_url), True
    if request.param == "stock pgbouncer, timeout on the database":
        with closing(psycopg.connect(libpq(postgres_url), autocommit=True)) as conn:
            conn.execute(f"ALTER DATABASE {make_url(postgres_url).database} SET statement_timeout = 500")
        return request.getfixturevalue("stock_pgbouncer").url_for(postgres_url), False
    return request.getfixturevalue("stock_pgbouncer").url_for(postgres_url), True


@pytest.mark.postgres
def test_a_statement_stuck_behind_a_lock_is_cancelled_by_the_server(timeout_setup, postgres_url):
    """What the timeout is for: the server ends the statement, which then never commits
    after its caller gave up. Each transaction sets it only when the session lacks it."""
    from common.database import make_engine
    from common.postgres import per_transaction

    url, per_transaction_expected = timeout_setup
    engine = make_engine(url, statement_timeout_s=0.5, prepared_statements=False)
    with closing(psycopg.connect(libpq(postgres_url), autocommit=True)) as conn:
        conn.execute("CREATE TABLE held (n int)")
    try:
        with closing(engine.raw_connection()) as raw:
            assert (per_transaction(raw) is not None) == per_transaction_expected
        with closing(psycopg.connect(libpq(postgres_url))) as holder:
            # The server ends the holder if the statement is not cancelled: a failure, never a hang.
            holder.execute("SET idle_in_transaction_session_timeout = '30s'")
            holder.execute("LOCK TABLE held IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(exc.OperationalError) as written, engine.begin() as conn:
                conn.exec_driver_sql("INSERT INTO held VALUES (1)")
            assert isinstance(written.value.orig, psycopg.errors.QueryCanceled), written.value
            with pytest.raises(exc.OperationalError) as read, engine.connect() as conn:
                conn.exec_driver_sql("SELECT count(*) FROM held")  # SQLAlchemy's autobegin
            assert isinstance(read.value.orig, psycopg.errors.QueryCanceled), read.value
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM held").scalar() == 0
    finally:
        engine.dispose()


# -- the app behind a stock PgBouncer -----------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.integration
def test_the_app_publishes_and_streams_through_a_stock_pgbouncer(start_server, stock_pgbouncer, postgres_url):
    """PgBouncer's defaults, transaction mode, LISTEN on a direct connection (docs/deploy.md)."""
    server = start_server(stock_pgbouncer.url_for(postgres_url), DEMO_ENABLED=True,
                          REALTIME_LISTEN_URL=postgres_url)
    wait_until(lambda: httpx.get(server.url + "/readyz", timeout=30).status_code == 200, what="/readyz ready")
    token = server.token("stock.1", ["t"])
    with open_stream(server, token) as stream:
        items = events_of(stream)
        next(items)  # retry:
        # More than psycopg's prepare threshold (5), and one through SQLAlchemy (the idempotent path).
        published = [server.publish("stock.1", "t", n) for n in range(12)]
        once = httpx.post(server.url + "/api/realtime/publish", json={"channel": "stock.1", "topic": "t", "data": "once"},
                          headers={"Authorization": f"Bearer {PUBLISH_KEY}", "Idempotency-Key": "k1"}, timeout=10)
        assert once.status_code == 201, once.text
        published.append(once.json())
        frames = read_frames(items, 13)
    assert [f.envelope for f in frames] == published
    assert history(server, token) == published
    # Each worker offers `options` once; refused, it connects without from then on.
    refused = stock_pgbouncer.log().count("closing because: unsupported startup parameter")
    assert refused <= len(server.worker_pids()), stock_pgbouncer.log()
