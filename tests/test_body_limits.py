"""Each endpoint owns its body limit (CONTRACT §6): publish one message, events a hundred, the
rest a small one; each names what was too large; chunked bodies are cut at the same limits.
"""
from __future__ import annotations

import io
import json

import pytest
from werkzeug.exceptions import RequestEntityTooLarge

from common.errors import _http_code
from common.jsontext import MAX_VALUES
from common.request_input import SMALL_BODY_BYTES
from conftest import app_on
from json_errors import AUTH, MAX_BODY, PUBLISH, TOKEN, assert_json_error

JSON = {"Content-Type": "application/json"}
EVENTS = "/api/events"


@pytest.fixture
def jobs(app):
    jobs = app.extensions["jobs"]
    jobs.eager = False  # queued is enough: these tests are about bodies
    return jobs


def post_chunked(client, path: str, body: bytes):
    """POST `body` without a Content-Length, as a chunked request reaches the app from gunicorn."""
    return client.post(path, headers={**AUTH, **JSON, "Transfer-Encoding": "chunked"},
                       environ_overrides={"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True})


def padded(fields: dict, size: int) -> bytes:
    """`fields` as a JSON object of exactly `size` bytes, padded by an extra field."""
    empty = json.dumps({**fields, "pad": ""}).encode()
    return json.dumps({**fields, "pad": "x" * (size - len(empty))}).encode()


def test_there_is_no_app_wide_limit(app):
    assert app.config["MAX_CONTENT_LENGTH"] is None


# -- POST /api/events: a hundred events of JOBS_MAX_EVENT_BYTES ----------------------------


def test_a_hundred_events_of_ten_kilobytes_are_accepted(client, jobs):
    """1 MB of valid events: over the old app-wide limit of one realtime message."""
    batch = [{"name": "report.requested", "data": {"note": "x" * 10_000}}] * 100
    response = client.post(EVENTS, json=batch)
    assert response.status_code == 202, response.get_data(as_text=True)
    assert len(response.get_json()["runs"]) == 100


def test_the_events_limit_follows_jobs_max_event_bytes(client, jobs):
    jobs.max_event_bytes = 1000
    assert jobs.max_body_bytes == 100 * 1000 + 64 * 1024
    fits = [{"name": "a.b", "data": {"note": "x" * 900}}] * 100
    assert client.post(EVENTS, json=fits).status_code == 202
    over = padded({"name": "a.b", "data": {}}, jobs.max_body_bytes + 1)
    error = assert_json_error(client.post(EVENTS, data=over, headers=JSON), 413, "event_too_large")
    assert "request body" in error["message"]


def test_by_default_an_event_holds_32_kib_and_a_full_batch_about_3_mib(client, jobs):
    """An event starts runs and carries references (issue 18: 100 x 512 KiB froze a worker)."""
    data = {"note": "x" * (32 * 1024 - len('{"note": ""}'))}  # stored as exactly 32 KiB
    assert client.post(EVENTS, json=[{"name": "a.b", "data": data}] * 100).status_code == 202
    error = assert_json_error(client.post(EVENTS, json={"name": "a.b", "data": {**data, "n": 1}}), 413, "event_too_large")
    assert "JOBS_MAX_EVENT_BYTES" in error["message"]
    over = padded({"name": "a.b", "data": {}}, 100 * 32 * 1024 + 64 * 1024 + 1)
    assert_json_error(client.post(EVENTS, data=over, headers=JSON), 413, "event_too_large")


def test_a_chunked_events_body_is_cut_at_its_limit(client, jobs):
    jobs.max_event_bytes = 1000
    over = padded({"name": "a.b", "data": {}}, jobs.max_body_bytes + 1)
    assert_json_error(post_chunked(client, EVENTS, over), 413, "event_too_large")
    under = padded({"name": "a.b", "data": {}}, jobs.max_body_bytes - 1)
    assert post_chunked(client, EVENTS, under).status_code == 202


# -- POST /api/realtime/publish: one message --------------------------------------------------


def test_publish_bodies_up_to_the_message_limit_plus_room(client, realtime):
    fields = {"channel": "c", "topic": "t", "data": 1}
    assert_json_error(client.post(PUBLISH, data=padded(fields, MAX_BODY + 1), headers={**AUTH, **JSON}),
                      413, "message_too_large")
    assert_json_error(post_chunked(client, PUBLISH, padded(fields, MAX_BODY + 1)), 413, "message_too_large")
    assert realtime.store.last_id() == 0
    assert client.post(PUBLISH, data=padded(fields, MAX_BODY), headers={**AUTH, **JSON}).status_code == 201
    assert post_chunked(client, PUBLISH, padded(fields, MAX_BODY - 1)).status_code == 201


# -- every body: at most MAX_VALUES values, counted before any is built -----------------------


def test_a_body_of_one_value_too_many_is_413_before_it_is_parsed(client, jobs):
    """`[0,...]` is 2 bytes of body a value: well within the events limit, and each an object once built."""
    fits = b"[" + b"0," * (MAX_VALUES - 2) + b"0]"  # the array and MAX_VALUES - 1 numbers
    assert_json_error(client.post(EVENTS, data=fits, headers=JSON), 400, "invalid_json")  # parsed: not events
    over = b"[" + b"0," * (MAX_VALUES - 1) + b"0]"
    error = assert_json_error(client.post(EVENTS, data=over, headers=JSON), 413, "event_too_large")
    assert f"more than {MAX_VALUES} JSON values" in error["message"]


def test_only_what_is_outside_strings_counts_as_values(client, realtime):
    """Text that holds commas, colons and brackets (CSV, JSON sent as a string) is one value;
    escaped quotes and backslashes do not end it early."""
    text = '\\"' + ",:[{" * (MAX_VALUES // 4 + 1) + '\\",'
    message = {"channel": "c", "topic": "t", "data": text}
    assert client.post(PUBLISH, json=message, headers=AUTH).status_code == 201
    values = {"messages": [{"channel": "c", "topic": "t", "data": [0] * (MAX_VALUES // 2)}] * 2}
    assert_json_error(client.post(PUBLISH, json=values, headers=AUTH), 413, "message_too_large")
    assert realtime.store.last_id() == 1


# -- small bodies: tokens --------------------------------------------------------------------


@pytest.mark.parametrize("path, fields", [
    (TOKEN, {"channel": "c", "topics": ["t"]}),
    ("/demo/token", {"run_id": "0123456789abcdef"}),
], ids=["token", "demo token"])
def test_small_endpoints_take_64_kib(client, path, fields):
    assert client.post(path, data=padded(fields, SMALL_BODY_BYTES), headers=JSON).status_code == 200
    over = padded(fields, SMALL_BODY_BYTES + 1)
    error = assert_json_error(client.post(path, data=over, headers=JSON), 413, "body_too_large")
    assert str(SMALL_BODY_BYTES) in error["message"]
    assert_json_error(post_chunked(client, path, over), 413, "body_too_large")


def test_werkzeugs_own_413_is_a_generic_body_too_large():
    assert _http_code(RequestEntityTooLarge()) == "body_too_large"


def test_an_operators_max_content_length_stays_a_ceiling(tmp_path):
    for app in app_on(f"sqlite:///{tmp_path / 'cap.sqlite3'}", MAX_CONTENT_LENGTH=1000):
        client = app.test_client()
        fields = {"name": "a.b", "data": {}}
        assert client.post(EVENTS, data=padded(fields, 1000), headers=JSON).status_code == 202
        assert_json_error(client.post(EVENTS, data=padded(fields, 1001), headers=JSON), 413, "event_too_large")
