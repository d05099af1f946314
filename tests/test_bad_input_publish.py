"""Bad publish and token requests get a 4xx JSON error and store nothing (CONTRACT §3, issue 2 "Bad input").

Against the in-process app, one table per endpoint: POST /api/realtime/publish
(bodies, names, sizes, the publish key) and POST /api/realtime/token. Bad
tokens, cursors and limits on the reading endpoints, and the same against a
real gunicorn, are in test_bad_input_subscribe.py.
"""
from __future__ import annotations

import json

import pytest

from conftest import PUBLISH_KEY
from json_errors import AUTH, MAX_BODY, MAX_DATA, MESSAGES, PUBLISH, TOKEN, assert_json_error


@pytest.fixture
def assert_nothing_stored(client, realtime):
    """After the test: no message exists, as the store and GET /messages both say."""
    yield
    assert realtime.store.last_id() == 0
    token = realtime.create_token("c", ["t"]).token
    response = client.get(MESSAGES, query_string={"token": token})
    assert response.status_code == 200 and response.get_json()["messages"] == []


def publish_body(**fields) -> bytes:
    return json.dumps({"channel": "c", "topic": "t", "data": {"ok": True}, **fields}).encode()


# -- publish --------------------------------------------------------------------------------

BAD_BODIES = {
    # malformed JSON
    "empty": (b"", "invalid_json"),
    "truncated": (b'{"channel": "c", "topic": "t", "data": ', "invalid_json"),
    "single quotes": (b"{'channel': 'c', 'topic': 't', 'data': 1}", "invalid_json"),
    "trailing comma": (b'{"channel": "c", "topic": "t", "data": 1,}', "invalid_json"),
    "two documents": (b'{"channel": "c", "topic": "t", "data": 1} {}', "invalid_json"),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
    "huge integer": (b'{"channel": "c", "topic": "t", "data": ' + b"9" * 5000 + b"}", "invalid_json"),
    # not UTF-8
    "latin-1": ('{"channel": "c", "topic": "t", "data": "café"}'.encode("latin-1"), "invalid_json"),
    "utf-16": ('{"channel": "c", "topic": "t", "data": 1}'.encode("utf-16"), "invalid_json"),
    "invalid byte": (b'{"channel": "c", "topic": "t", "data": "\xff"}', "invalid_json"),
    # JSON, but not an object
    "null": (b"null", "invalid_json"),
    "list": (b'[{"channel": "c", "topic": "t", "data": 1}]', "invalid_json"),
    "string": (b'"hello"', "invalid_json"),
    "number": (b"42", "invalid_json"),
    # not JSON numbers
    "NaN": (b'{"channel": "c", "topic": "t", "data": NaN}', None),
    "Infinity": (b'{"channel": "c", "topic": "t", "data": [Infinity]}', None),
    "-Infinity": (b'{"channel": "c", "topic": "t", "data": {"x": -Infinity}}', None),
    "1e400 overflows to inf": (b'{"channel": "c", "topic": "t", "data": 1e400}', None),
    # fields
    "no data": (b'{"channel": "c", "topic": "t"}', "invalid_data"),
    "lone surrogate in data": (b'{"channel": "c", "topic": "t", "data": "\\ud800"}', "invalid_data"),
    "data nested too deep to encode": (
        b'{"channel": "c", "topic": "t", "data": ' + b"[" * 5000 + b"]" * 5000 + b"}", None),
    "no channel": (b'{"topic": "t", "data": 1}', "invalid_channel"),
    "no topic": (b'{"channel": "c", "data": 1}', "invalid_topic"),
    "run_id number": (publish_body(run_id=42), "invalid_run_id"),
    "run_id empty": (publish_body(run_id=""), "invalid_run_id"),
    "run_id too long": (publish_body(run_id="r" * 65), "invalid_run_id"),
    "run_id object": (publish_body(run_id={"id": 1}), "invalid_run_id"),
    "run_id lone surrogate": (b'{"channel": "c", "topic": "t", "data": 1, "run_id": "\\udc80"}', None),
}

BAD_NAMES = {
    "empty": "",
    "space": "a b",
    "LF": "a\nb",
    "CR": "a\rb",
    "CRLF": "a\r\nb",
    "trailing LF": "ab\n",
    "tab": "a\tb",
    "NUL": "a\x00b",
    "unicode letter": "é",
    "line separator": "a\u2028b",
    "slash": "runs/42",
    "null": None,
    "number": 42,
    "bool": True,
    "list": ["c"],
    "object": {"c": 1},
}


@pytest.mark.parametrize("body, code", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_publish_refuses_bad_body(client, assert_nothing_stored, body, code):
    response = client.post(PUBLISH, data=body, headers={**AUTH, "Content-Type": "application/json"})
    assert_json_error(response, 400, code)


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_publish_refuses_bad_channel_and_topic_names(client, assert_nothing_stored, name):
    response = client.post(PUBLISH, json={"channel": name, "topic": "t", "data": 1}, headers=AUTH)
    assert_json_error(response, 400, "invalid_channel")
    response = client.post(PUBLISH, json={"channel": "c", "topic": name, "data": 1}, headers=AUTH)
    assert_json_error(response, 400, "invalid_topic")


def test_publish_name_length_limits(client, realtime):
    for channel, topic, code in [("c" * 201, "t", "invalid_channel"), ("c", "t" * 101, "invalid_topic")]:
        response = client.post(PUBLISH, json={"channel": channel, "topic": topic, "data": 1}, headers=AUTH)
        assert_json_error(response, 400, code)
    assert realtime.store.last_id() == 0
    longest = client.post(PUBLISH, json={"channel": "c" * 200, "topic": "t" * 100, "data": 1}, headers=AUTH)
    assert longest.status_code == 201


def test_publish_refuses_oversize_data_and_never_truncates(client, realtime):
    too_big = "x" * (MAX_DATA - 1)  # + 2 quotes = limit + 1 bytes of JSON
    response = client.post(PUBLISH, json={"channel": "c", "topic": "t", "data": too_big}, headers=AUTH)
    assert_json_error(response, 413, "message_too_large")
    multibyte = "é" * (MAX_DATA // 2)  # counted in UTF-8 bytes, not characters
    response = client.post(PUBLISH, json={"channel": "c", "topic": "t", "data": multibyte}, headers=AUTH)
    assert_json_error(response, 413, "message_too_large")
    assert realtime.store.last_id() == 0

    exactly = "x" * (MAX_DATA - 2)
    response = client.post(PUBLISH, json={"channel": "c", "topic": "t", "data": exactly}, headers=AUTH)
    assert response.status_code == 201
    assert response.get_json()["data"] == exactly


def test_publish_refuses_body_larger_than_its_limit(client, app, assert_nothing_stored):
    """The publish endpoint's own limit: REALTIME_MAX_MESSAGE_BYTES plus 64 KiB of JSON around the data
    (views.py); no app-wide MAX_CONTENT_LENGTH (CONTRACT §6). More in test_body_limits.py."""
    assert app.config["MAX_CONTENT_LENGTH"] is None
    body = b'{"channel": "c", "topic": "t", "data": "' + b"x" * MAX_BODY + b'"}'
    response = client.post(PUBLISH, data=body, headers={**AUTH, "Content-Type": "application/json"})
    assert_json_error(response, 413, "message_too_large")


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-key"},
    {"Authorization": f"Basic {PUBLISH_KEY}"},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": f"Bearer {PUBLISH_KEY}x"},
    {"Authorization": f"Bearer {PUBLISH_KEY[:-1]}"},
], ids=["none", "wrong", "basic scheme", "bearer without key", "bearer blank", "key plus", "key prefix"])
def test_publish_refuses_missing_or_wrong_key(client, assert_nothing_stored, headers):
    response = client.post(PUBLISH, data=publish_body(), headers={**headers, "Content-Type": "application/json"})
    assert_json_error(response, 401)


def test_publish_key_is_checked_before_the_body(client, assert_nothing_stored):
    response = client.post(PUBLISH, data=b"not json", headers={"Authorization": "Bearer wrong"})
    assert_json_error(response, 401)


def test_publish_endpoint_is_off_without_a_publish_key(tmp_path):
    from app import create_app

    app = create_app({"TESTING": True, "SECRET_KEY": "s", "REALTIME_PUBLISH_KEY": None,
                      "DATABASE_URL": f"sqlite:///{tmp_path / 'off.sqlite3'}"})
    try:
        for headers in ({}, AUTH, {"Authorization": "Bearer "}):
            response = app.test_client().post(PUBLISH, data=publish_body(), headers=headers)
            assert_json_error(response, 404)
        assert app.extensions["realtime"].store.last_id() == 0
    finally:
        app.extensions["realtime"].shutdown()
        app.extensions["database"].dispose()


# -- token ----------------------------------------------------------------------------------

BAD_TOKEN_REQUESTS = {
    "malformed": (b"{", "invalid_json"),
    "not UTF-8": (b'{"channel": "\xe9", "topics": ["t"]}', "invalid_json"),
    "list": (b'[{"channel": "c", "topics": ["t"]}]', "invalid_json"),
    "NaN": (b'{"channel": "c", "topics": ["t"], "x": NaN}', "invalid_json"),
    "no channel": (b'{"topics": ["t"]}', "invalid_channel"),
    "channel LF": (b'{"channel": "c\\n", "topics": ["t"]}', "invalid_channel"),
    "channel too long": (json.dumps({"channel": "c" * 201, "topics": ["t"]}).encode(), "invalid_channel"),
    "no topics": (b'{"channel": "c"}', "invalid_topic"),
    "topics empty": (b'{"channel": "c", "topics": []}', "invalid_topic"),
    "topics a string": (b'{"channel": "c", "topics": "t"}', "invalid_topic"),
    "topics null": (b'{"channel": "c", "topics": null}', "invalid_topic"),
    "topic number": (b'{"channel": "c", "topics": [1]}', "invalid_topic"),
    "topic empty": (b'{"channel": "c", "topics": [""]}', "invalid_topic"),
    "topic CRLF": (b'{"channel": "c", "topics": ["a\\r\\nevent: x"]}', "invalid_topic"),
    "topic space": (b'{"channel": "c", "topics": ["a b"]}', "invalid_topic"),
    "topic unicode": ('{"channel": "c", "topics": ["ü"]}'.encode(), "invalid_topic"),
    "topic too long": (json.dumps({"channel": "c", "topics": ["t" * 101]}).encode(), "invalid_topic"),
    "too many topics": (json.dumps({"channel": "c", "topics": [f"t{n}" for n in range(51)]}).encode(),
                        "invalid_topic"),
}


@pytest.mark.parametrize("body, code", BAD_TOKEN_REQUESTS.values(), ids=BAD_TOKEN_REQUESTS.keys())
def test_token_request_refuses_bad_body(client, body, code):
    assert_json_error(client.post(TOKEN, data=body, content_type="application/json"), 400, code)


def test_token_request_limits_are_inclusive(client):
    ok = client.post(TOKEN, json={"channel": "c" * 200, "topics": [f"t{n}" for n in range(50)]})
    assert ok.status_code == 200


def test_token_refused_without_an_authorization_policy(realtime, client):
    realtime._policy = None  # what an app that registered no policy has
    assert_json_error(client.post(TOKEN, json={"channel": "c", "topics": ["t"]}), 403, "forbidden")


@pytest.mark.parametrize("changed", [{"data": {"ok": False}}, {"topic": "other"}, {"run_id": "r-2"}])
def test_an_idempotency_key_reused_for_another_message_is_refused(client, realtime, changed):
    """Issue 18: the second message must not be lost while its caller is told it was stored."""
    headers = {**AUTH, "Content-Type": "application/json", "Idempotency-Key": "k-1"}
    first = client.post(PUBLISH, data=publish_body(run_id="r-1"), headers=headers)
    assert first.status_code == 201
    fields = {"run_id": "r-1", **changed}
    assert_json_error(client.post(PUBLISH, data=publish_body(**fields), headers=headers), 422, "idempotency_key_reused")
    repeat = client.post(PUBLISH, data=publish_body(run_id="r-1"), headers=headers)
    assert repeat.status_code == 201 and repeat.headers["Idempotent-Replayed"] == "true"
    assert repeat.get_json() == first.get_json()
    assert realtime.store.last_id() == first.get_json()["id"], "one message stored"
