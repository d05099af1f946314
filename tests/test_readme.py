"""README.md: its code blocks run as printed, and it documents every configuration key the code reads.

Each `python` and `sh` block runs here or in the test named in `ELSEWHERE`; a block
that cannot run as printed says why there.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from conftest import ROOT
from jobs.extension import DEFAULTS as JOBS_DEFAULTS
from readme import code_block
from realtime.extension import DEFAULTS as REALTIME_DEFAULTS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize("key", sorted({**REALTIME_DEFAULTS, **JOBS_DEFAULTS}))
def test_every_configuration_key_is_in_the_readme(key):
    assert f"`{key}`" in README, f"README.md does not document {key}"


# -- "The Python API": scripts in the project's folder ----------------------------------------------


def run_script(code: str, database_url: str) -> None:
    """`code` as a script run from the project's folder, with the server's two settings."""
    env = {**os.environ, "DATABASE_URL": database_url, "SECRET_KEY": "readme-secret"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def rows(database_url: str, query: str) -> list[tuple]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(query))]
    finally:
        engine.dispose()


# Run in the snippet's process, after it: the grant reads what was published, and the policy
# answers by the Flask session's user.
API_CHECKS = """
client = app.test_client()
history = client.get("/api/realtime/messages", query_string={"token": grant.token}).get_json()
assert [(m["topic"], m["data"]) for m in history["messages"]] == [("status", {"stage": "fetching", "percent": 10})]
assert client.post("/api/realtime/token", json={"channel": "user.7", "topics": ["status"]}).status_code == 403
with client.session_transaction() as signed_in:
    signed_in["user_id"] = 7
assert client.post("/api/realtime/token", json={"channel": "user.7", "topics": ["status"]}).status_code == 200
assert client.post("/api/realtime/token", json={"channel": "user.8", "topics": ["status"]}).status_code == 403
"""


def test_the_python_api_block_publishes_grants_and_authorizes(database_url):
    run_script(code_block("realtime.create_token(") + API_CHECKS, database_url)
    assert rows(database_url, "SELECT channel, topic, data FROM realtime_messages") == [
        ("run.42", "status", '{"stage": "fetching", "percent": 10}')
    ]


def test_the_outbox_block_stores_the_order_and_its_message_with_its_id(database_url):
    run_script(code_block("session=session)"), database_url)
    [(order_id, item)] = rows(database_url, "SELECT id, item FROM orders")
    assert item == "a book"
    assert rows(database_url, "SELECT channel, topic, data FROM realtime_messages") == [
        ("orders", "created", f'{{"id": {order_id}}}')
    ]
