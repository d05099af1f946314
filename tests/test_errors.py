"""What a failed run or task tells the browsers watching it (issue 17, item 12; common/errors.py).

An error's message stays out of the stream unless the error is a `PublicError`:
a driver's text such as `DETAIL: Key (email)=(...)` names other people's data.
(The task queues' own tests check the same through a real worker.)
"""
from __future__ import annotations

import psycopg.errors
import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from common.errors import MAX_DESCRIPTION_CHARS, AppError, PublicError, describe
from jobs import NonRetriableError
from test_jobs import clock, jobs, messages, send  # noqa: F401 - fixtures and helpers

#: What PostgreSQL answers an INSERT of an email already taken, as psycopg raises it.
UNIQUE_VIOLATION = (
    'duplicate key value violates unique constraint "users_email_key"\n'
    "DETAIL:  Key (email)=(alice@example.com) already exists."
)


class MissingColumn(NonRetriableError, PublicError):
    """An app's own error: never retried, its message written for the user."""


@pytest.mark.parametrize("error, shown", [
    (psycopg.errors.UniqueViolation(UNIQUE_VIOLATION), "UniqueViolation"),
    (IntegrityError("INSERT INTO users (email) VALUES (%(email)s)", {"email": "alice@example.com"},
                    psycopg.errors.UniqueViolation(UNIQUE_VIOLATION)), "IntegrityError"),
    (OperationalError("SELECT secret_column FROM t WHERE k = %(k)s", {"k": "hunter2"}, Exception("boom")),
     "OperationalError"),
    (ValueError("/home/alice/orders.csv, row 7: 'n/a'"), "ValueError"),
    (NonRetriableError(UNIQUE_VIOLATION), "NonRetriableError"),  # "do not retry" is not "show this"
    (PublicError("the file has no 'amount' column"), "PublicError: the file has no 'amount' column"),
    (MissingColumn("the file has no 'amount' column"), "MissingColumn: the file has no 'amount' column"),
    (AppError("'data' is required"), "AppError: 'data' is required"),  # written for clients already
], ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None)
def test_only_a_public_error_shows_its_message(error, shown):
    assert describe(error) == shown


def test_a_long_public_message_is_capped():
    prefix = "PublicError: "
    exactly = "x" * (MAX_DESCRIPTION_CHARS - len(prefix))
    assert describe(PublicError(exactly)) == prefix + exactly
    assert describe(PublicError(exactly + "y")) == prefix + exactly + " ..."
    assert describe(PublicError("z" * 100_000)) == (prefix + "z" * 100_000)[:MAX_DESCRIPTION_CHARS] + " ..."


def insert_alice() -> None:
    raise psycopg.errors.UniqueViolation(UNIQUE_VIOLATION)


def test_a_job_failing_on_a_unique_violation_publishes_only_its_type(app, client, jobs):  # noqa: F811
    @jobs.function(id="signup", trigger="test.signup", retries=0)
    def signup(ctx):
        ctx.publish(ctx.channel, "log", "signing up")
        ctx.step.run("insert", insert_alice)

    run_id = send(jobs, "test.signup")
    assert messages(app, run_id, "run")[-1] == ("run", {"status": "failed", "error": "UniqueViolation"})
    shown = client.get(f"/api/runs/{run_id}").get_json()
    assert shown["error"] == "UniqueViolation"
    assert "alice@example.com" not in str(messages(app, run_id)) + str(shown)


def test_a_job_failing_with_a_public_error_publishes_its_message(app, jobs):  # noqa: F811
    @jobs.function(id="import", trigger="test.import", retries=5)
    def import_orders(ctx):
        raise MissingColumn("the file has no 'amount' column")

    run_id = send(jobs, "test.import")
    assert messages(app, run_id, "run")[-1] == (
        "run", {"status": "failed", "error": "MissingColumn: the file has no 'amount' column"},
    )
    assert jobs.run(run_id).attempt == 1, "a NonRetriableError too"
