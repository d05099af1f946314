"""PostgreSQL connections (common/postgres.py), directly and behind PgBouncer in transaction mode.

Issue 17, item 7: with PgBouncer's default settings, which refuse the
`options` startup parameter, every call answered 503 forever, saying nothing
of why. Now the statement timeout reaches the server without it, and a
connection the server refuses for good says why, in /readyz and once in the log.
"""
from __future__ import annotations

import logging
import secrets
from contextlib import closing

import httpx
import psycopg
import pytest
from sqlalchemy import exc
from sqlalchemy.engine import make_url

from conftest import PUBLISH_KEY, wait_until
from pgbouncer import pgbouncer, stock_pgbouncer  # noqa: F401 - the fixtures
from sseclient import events_of, history, open_stream, read_frames

PASSWORD = "s3cret-pw"  # in the URLs below; it must never show in a log or a reason


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def missing_database(url: str) -> str:
    """`url` with a password, naming a database that does not exist."""
    name = "rt_missing_" + secrets.token_hex(4)
    return make_url(url).set(database=name, password=PASSWORD).render_as_string(hide_password=False)


# -- why a connection was refused ----------------------------------------------------------------

AT = 'connection failed: connection to server at "127.0.0.1", port 6432 failed: '


@pytest.mark.parametrize("message, reason", [
    (AT + "FATAL:  unsupported startup parameter: options", "unsupported startup parameter: options"),
    (AT + 'FATAL:  database "shop" does not exist', 'database "shop" does not exist'),
    (AT + 'FATAL:  role "app" does not exist', 'role "app" does not exist'),
    (AT + 'FATAL:  password authentication failed for user "app"', 'password authentication failed for user "app"'),
    (AT + 'FATAL:  no pg_hba.conf entry for host "10.0.0.7", user "app", database "shop", no encryption',
     'no pg_hba.conf entry for host "10.0.0.7", user "app", database "shop", no encryption'),
    # libpq tried several addresses: the server's refusal, not what followed it
    (AT + 'FATAL:  database "shop" does not exist\n' + AT + "Connection refused", 'database "shop" does not exist'),
    # these pass by themselves: retrying is the cure
    (AT + "FATAL:  sorry, too many clients already", None),
    (AT + "FATAL:  remaining connection slots are reserved for roles with the SUPERUSER attribute", None),
    (AT + "FATAL:  the database system is starting up", None),
    (AT + "FATAL:  no more connections allowed (max_client_conn)", None),
    (AT + "FATAL:  server login has been failing, try again later (server_login_retry)", None),
    (AT + "Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?", None),
    ("connection timeout expired", None),
])
def test_refusal_reason_is_the_servers_fatal_message_when_retrying_will_not_help(message, reason):
    from common.postgres import refusal_reason

    assert refusal_reason(psycopg.OperationalError(message)) == reason
    wrapped = exc.OperationalError(None, None, psycopg.OperationalError(message))
    assert refusal_reason(wrapped) == reason  # as SQLAlchemy raises it


@pytest.mark.postgres
def test_a_refused_connection_says_why_in_readyz_and_once_in_the_log(postgres_url, caplog):
    from app import create_app

    url = missing_database(postgres_url)
    name = make_url(url).database
    app = create_app({"TESTING": True, "SECRET_KEY": "test-secret", "DATABASE_URL": url,
                      "JOBS_EMBEDDED": False, "REALTIME_PUBLISH_KEY": PUBLISH_KEY})
    client = app.test_client()
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                readyz = client.get("/readyz")
                assert readyz.status_code == 503
                assert readyz.json["checks"]["database"] == (
                    f'the database refuses connections: database "{name}" does not exist')
                published = client.post("/api/realtime/publish", json={"channel": "c", "topic": "t", "data": 1},
                                        headers={"Authorization": f"Bearer {PUBLISH_KEY}"})
                assert published.status_code == 503
                # API clients learn that it is the database, not which one or why
                assert published.json["error"] == {"code": "database_unavailable",
                                                   "message": "the database is unavailable; try again shortly"}
    finally:
        app.extensions["realtime"].shutdown(wait_s=15)
        app.extensions["database"].dispose()
    refusals = [r for r in caplog.records if r.name == "common.database" and "refuses connections" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]
    assert f'database "{name}" does not exist' in refusals[0].getMessage()
    assert PASSWORD not in caplog.text and "postgresql" not in caplog.text


@pytest.mark.postgres
@pytest.mark.integration
def test_behind_pgbouncer_a_refusal_stays_in_readyz_while_pgbouncer_holds_the_retries(
        start_server, stock_pgbouncer, postgres_url):
    """PgBouncer passes the server's refusal on once, then holds new logins until its
    `server_login_retry`, so later attempts only time out: /readyz keeps the reason."""
    url = missing_database(postgres_url)
    name = make_url(url).database
    server = start_server(stock_pgbouncer.url_for(url), workers=1, REALTIME_LISTEN_URL=postgres_url)
    reason = f'the database refuses connections: database "{name}" does not exist'

    def database_check() -> str:
        return httpx.get(server.url + "/readyz", timeout=30).json()["checks"]["database"]

    wait_until(lambda: database_check() == reason, timeout=60, what="the refusal in /readyz")
    for _ in range(3):
        assert database_check() == reason
    log = server.log_path.read_text()
    assert log.count("the database refuses connections") == 1, log
    assert PASSWORD not in log


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


def test_a_publish_stuck_behind_a_lock_is_cancelled_by_the_server(timeout_setup, postgres_url):
    """The same for the publish paths that skip SQLAlchemy's transactions (realtime/store.py):
    one message (one statement, autocommit) and a batch."""
    from common.database import Database, DatabaseUnavailable
    from realtime.store import MessageStore, NewMessage

    url, _ = timeout_setup
    db = Database(url, statement_timeout_s=0.5, prepared_statements=False)
    store = MessageStore(db)
    try:
        db.ensure_schema()
        with closing(psycopg.connect(libpq(postgres_url))) as holder:
            holder.execute("SET idle_in_transaction_session_timeout = '30s'")
            holder.execute("LOCK TABLE realtime_messages IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(DatabaseUnavailable) as one:
                store.append("c", "t", "1")
            assert isinstance(one.value.__cause__, psycopg.errors.QueryCanceled), one.value.__cause__
            with pytest.raises(DatabaseUnavailable) as many:
                store.append_many([NewMessage("c", "t", "2"), NewMessage("c", "t", "3")])
            assert isinstance(many.value.__cause__, psycopg.errors.QueryCanceled), many.value.__cause__
        assert list(store.read_after("c", None, 0, 10)) == [], "nothing committed after its caller gave up"
    finally:
        db.dispose()


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
