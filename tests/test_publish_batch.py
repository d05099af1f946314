"""Batch publish (CONTRACT §7): `realtime.publish_many()` and `POST /api/realtime/publish` with
`{"messages": [...]}`: one transaction, ids in list order, all or nothing, on both databases."""
from __future__ import annotations

import json

import pytest

from conftest import PUBLISH_KEY, app_on
from json_errors import AUTH, PUBLISH, assert_json_error
from realtime.errors import InvalidRequest, MessageTooLarge


@pytest.fixture
def batch_app(database_url):
    yield from app_on(database_url, REALTIME_PUBLISH_KEY=PUBLISH_KEY, REALTIME_MAX_MESSAGE_BYTES=1024)


def item(n: int, channel: str = "batch.1", **extra) -> dict:
    return {"channel": channel, "topic": "t", "data": {"n": n}, **extra}


def history(app, channel: str) -> list[dict]:
    found, _, _ = app.extensions["realtime"].history(channel, None, None, 1000)
    return [json.loads(m.envelope_json()) for m in found]


def test_publish_many_stores_every_message_in_list_order(batch_app):
    realtime = batch_app.extensions["realtime"]
    stored = realtime.publish_many([item(0), item(1, "batch.2", run_id="r1"), item(2)])
    assert [json.loads(m.data_json) for m in stored] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [m.id for m in stored] == sorted(m.id for m in stored) and len({m.id for m in stored}) == 3
    assert stored[1].channel == "batch.2" and stored[1].run_id == "r1"
    assert [m["data"]["n"] for m in history(batch_app, "batch.1")] == [0, 2]
    assert [m["data"]["n"] for m in history(batch_app, "batch.2")] == [1]


def test_a_batch_stores_every_character_as_sent(batch_app):
    """The batch goes to PostgreSQL as binary arrays: nothing is escaped, so nothing can be
    mis-escaped. Quotes, backslashes, braces, commas and the word NULL come back as sent."""
    awkward = ['"quoted" \\ back\\slash', "{a,b}", "NULL", "", "  spaced  ", "é ü 日本 \u2603", "tab\tnew\nline"]
    realtime = batch_app.extensions["realtime"]
    realtime.publish_many([{"channel": "batch.chars", "topic": "t", "data": text} for text in awkward])
    assert [m["data"] for m in history(batch_app, "batch.chars")] == awkward


def test_http_batch_answers_every_envelope_and_the_stream_reads_them_in_order(batch_app):
    client = batch_app.test_client()
    response = client.post(PUBLISH, json={"messages": [item(n) for n in range(1000)]}, headers=AUTH)
    assert response.status_code == 201, response.get_json()
    envelopes = response.get_json()["messages"]
    assert [e["data"]["n"] for e in envelopes] == list(range(1000))
    assert history(batch_app, "batch.1") == envelopes


BAD_BATCHES = {
    "empty": ([], 400, "invalid_messages"),
    "not a list": ({"channel": "c"}, 400, "invalid_messages"),
    "1001 messages": ([item(n) for n in range(1001)], 400, "invalid_messages"),
    "an item not an object": ([item(0), "x"], 400, "invalid_messages"),
    "an item without data": ([item(0), {"channel": "c", "topic": "t"}], 400, "invalid_messages"),
    "a bad channel": ([item(0), item(1, "no spaces")], 400, "invalid_channel"),
    "a bad topic": ([item(0), {**item(1), "topic": ""}], 400, "invalid_topic"),
    "a bad run id": ([item(0), item(1, run_id=["x"])], 400, "invalid_run_id"),
    "data too large": ([item(0), {**item(1), "data": "x" * 2000}], 413, "message_too_large"),
}


@pytest.mark.parametrize("batch", BAD_BATCHES.values(), ids=BAD_BATCHES.keys())
def test_a_bad_batch_is_refused_whole_and_stores_nothing(batch_app, batch):
    messages, status, code = batch
    response = batch_app.test_client().post(PUBLISH, json={"messages": messages}, headers=AUTH)
    error = assert_json_error(response, status, code)
    if isinstance(messages, list) and 1 < len(messages) <= 1000:
        assert error["message"].startswith("messages[1]"), "the error names the message at fault"
    assert batch_app.extensions["realtime"].store.last_id() == 0


def test_publish_many_refuses_in_python_as_over_http(batch_app):
    realtime = batch_app.extensions["realtime"]
    with pytest.raises(InvalidRequest):
        realtime.publish_many([])
    with pytest.raises(MessageTooLarge, match=r"messages\[0\]"):
        realtime.publish_many([{**item(0), "data": "x" * 2000}])
    assert realtime.store.last_id() == 0


def test_a_batch_takes_no_idempotency_key_and_needs_the_publish_key(batch_app):
    client = batch_app.test_client()
    body = {"messages": [item(0)]}
    assert_json_error(client.post(PUBLISH, json=body, headers={**AUTH, "Idempotency-Key": "k1"}), 400,
                      "invalid_idempotency_key")
    assert_json_error(client.post(PUBLISH, json=body), 401, "invalid_publish_key")
    assert batch_app.extensions["realtime"].store.last_id() == 0
