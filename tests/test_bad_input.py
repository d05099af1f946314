"""Every bad input gets a 4xx JSON error and stores nothing (CONTRACT §3, issue 2 "Bad input").

Most cases run against the in-process app (fast, one table per endpoint);
`test_live_server_answers_bad_input_with_json` replays a sample against a
real gunicorn on SQLite and PostgreSQL, where the database driver and the
HTTP server add their own ways to fail.
"""
from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from conftest import PUBLISH_KEY

PUBLISH = "/api/realtime/publish"
TOKEN = "/api/realtime/token"
MESSAGES = "/api/realtime/messages"
SUBSCRIBE = "/api/realtime/subscribe"
AUTH = {"Authorization": f"Bearer {PUBLISH_KEY}"}
MAX_DATA = 524288  # REALTIME_MAX_MESSAGE_BYTES default
MAX_BODY = MAX_DATA + 64 * 1024  # MAX_CONTENT_LENGTH set by the extension


def assert_json_error(response, status: int, code: str | None = None) -> dict:
    """CONTRACT §3: `{"error": {"code": "snake_case", "message": "..."}}` with this 4xx status."""
    body = response.get_json(silent=True) if hasattr(response, "get_json") else _json_or_none(response)
    assert response.status_code == status, (response.status_code, body or response_text(response))
    assert response.headers["Content-Type"].startswith("application/json")
    assert isinstance(body, dict) and list(body) == ["error"], body
    error = body["error"]
    assert sorted(error) == ["code", "message"], error
    assert re.fullmatch(r"[a-z][a-z0-9_]*", error["code"]), error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def _json_or_none(response):
    try:
        return response.json()
    except ValueError:
        return None


def response_text(response) -> str:
    return response.get_data(as_text=True)[:300] if hasattr(response, "get_data") else response.text[:300]


@pytest.fixture
def realtime(app):
    return app.extensions["realtime"]


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


def test_publish_refuses_body_larger_than_max_content_length(client, app, assert_nothing_stored):
    """The body limit is REALTIME_MAX_MESSAGE_BYTES plus 64 KiB of JSON around the data (extension.py)."""
    assert app.config["MAX_CONTENT_LENGTH"] == MAX_BODY
    body = b'{"channel": "c", "topic": "t", "data": "' + b"x" * MAX_BODY + b'"}'
    response = client.post(PUBLISH, data=body, headers={**AUTH, "Content-Type": "application/json"})
    assert_json_error(response, 413)


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


# -- subscription tokens on /subscribe and /messages ---------------------------------------------


def tampered(token: str) -> list[str]:
    """The token with one character changed, in the payload and in the signature.

    Changed mid-string: the last base64 character of each part carries
    padding bits that decoders ignore, so changing it may change nothing.
    """
    payload, _, signature = token.rpartition(".")

    def change(text: str) -> str:
        middle = len(text) // 2
        return text[:middle] + ("A" if text[middle] != "A" else "Q") + text[middle + 1:]

    return [
        change(payload) + "." + signature,
        payload + "." + change(signature),
        payload + ".",  # signature dropped
        payload,
        token + "x",
    ]


def bad_tokens(realtime) -> dict[str, str]:
    from realtime.tokens import TokenIssuer

    good = realtime.create_token("c", ["t"]).token
    cases = {"garbage": "not-a-token", "dots": "...", "unicode": "tökén", "huge": "A" * 3000,
             "other secret": TokenIssuer("another-secret").issue("c", ["t"]).token}
    cases.update({f"tampered {n}": token for n, token in enumerate(tampered(good))})
    return cases


@pytest.mark.parametrize("path", [SUBSCRIBE, MESSAGES])
def test_missing_garbage_and_tampered_tokens_are_401(client, realtime, path):
    assert_json_error(client.get(path), 401, "invalid_token")
    assert_json_error(client.get(path, headers={"Authorization": "Bearer "}), 401, "invalid_token")
    assert_json_error(client.get(path, query_string={"token": ""}), 401, "invalid_token")
    for name, token in bad_tokens(realtime).items():
        assert_json_error(client.get(path, query_string={"token": token}), 401, "invalid_token")
        response = client.get(path, headers={"Authorization": f"Bearer {token}"})
        assert_json_error(response, 401, "invalid_token")


@pytest.mark.parametrize("path", [SUBSCRIBE, MESSAGES])
def test_expired_tokens_are_401_token_expired(client, realtime, app, path):
    from realtime.tokens import TokenIssuer

    expired = realtime.create_token("c", ["t"], ttl=-1).token
    assert_json_error(client.get(path, query_string={"token": expired}), 401, "token_expired")
    an_hour_ago = TokenIssuer(app.config["SECRET_KEY"], now=lambda: time.time() - 3600)
    stale = an_hour_ago.issue("c", ["t"]).token
    assert_json_error(client.get(path, headers={"Authorization": f"Bearer {stale}"}), 401, "token_expired")


@pytest.mark.parametrize("path", [SUBSCRIBE, MESSAGES])
def test_token_for_another_channel_or_topic_is_403(client, realtime, path):
    token = realtime.create_token("run.1", ["status"]).token
    response = client.get(path, query_string={"token": token, "channel": "run.2"})
    assert_json_error(response, 403, "forbidden")
    response = client.get(path, query_string={"token": token, "topic": "log"})
    assert_json_error(response, 403, "forbidden")


BAD_CURSORS = {
    "word": "abc",
    "no id": "3f9a1c2b",
    "dash no id": "3f9a1c2b-",
    "no epoch": "-17",
    "short epoch": "3f9a1c2-17",
    "non-hex epoch": "zzzzzzzz-17",
    "upper-case epoch": "3F9A1C2B-17",
    "negative": "3f9a1c2b--17",
    "suffix": "3f9a1c2b-17x",
    "space": "3f9a1c2b-17 x",
    "fullwidth digits": "3f9a1c2b-１７",
    "20 digits": "3f9a1c2b-" + "9" * 20,
    "two cursors": "3f9a1c2b-17,3f9a1c2b-18",
}


@pytest.mark.parametrize("cursor", BAD_CURSORS.values(), ids=BAD_CURSORS.keys())
def test_malformed_cursor_is_400_via_header_and_query(client, realtime, cursor):
    token = realtime.create_token("c", ["t"]).token
    response = client.get(SUBSCRIBE, query_string={"token": token, "last_event_id": cursor})
    assert_json_error(response, 400, "invalid_last_event_id")
    try:
        header = {"Last-Event-ID": cursor.encode().decode("latin-1")}
    except UnicodeError:
        header = None
    if header is not None:
        response = client.get(SUBSCRIBE, query_string={"token": token}, headers=header)
        assert_json_error(response, 400, "invalid_last_event_id")
    response = client.get(MESSAGES, query_string={"token": token, "after": cursor})
    assert_json_error(response, 400, "invalid_last_event_id")


def test_cursor_beyond_any_id_is_refused_before_the_stream(client, realtime):
    """Well-formed, this database's epoch, but no database id can be that large."""
    token = realtime.create_token("c", ["t"]).token
    cursor = f"{realtime.store.epoch}-{2**63}"
    response = client.get(MESSAGES, query_string={"token": token, "after": cursor})
    assert_json_error(response, 400, "invalid_last_event_id")
    response = client.get(SUBSCRIBE, query_string={"token": token}, headers={"Last-Event-ID": cursor})
    assert_json_error(response, 400, "invalid_last_event_id")


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "abc", "", "1.5", "1e3", " 5", "0x10", "²", "٣" * 5])
def test_bad_history_limit_is_400(client, realtime, limit):
    token = realtime.create_token("c", ["t"]).token
    response = client.get(MESSAGES, query_string={"token": token, "limit": limit})
    assert_json_error(response, 400, "invalid_limit")


# -- routes and methods -----------------------------------------------------------------------


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/nope", 404),
    ("GET", "/api/realtime/nope", 404),
    ("POST", "/api/realtime/subscribe/extra", 404),
    ("GET", PUBLISH, 405),
    ("PUT", PUBLISH, 405),
    ("GET", TOKEN, 405),
    ("POST", SUBSCRIBE, 405),
    ("DELETE", MESSAGES, 405),
    ("PATCH", "/api/realtime/stats", 405),
])
def test_unknown_routes_and_wrong_methods_are_json(client, method, path, status):
    assert_json_error(client.open(path, method=method), status)


# -- the same, against gunicorn ---------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path) -> str:
    """conftest's `database_url`, with the PostgreSQL run marked `postgres`."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'live.sqlite3'}"
    return request.getfixturevalue("postgres_url")


@pytest.mark.integration
def test_live_server_answers_bad_input_with_json(live_server):
    server = live_server
    publish = {"Authorization": f"Bearer {PUBLISH_KEY}", "Content-Type": "application/json"}
    token = server.token("c", ["t"])
    epoch_probe = httpx.get(server.url + MESSAGES, params={"token": token}, timeout=10).json()["cursor"]
    epoch = epoch_probe.partition("-")[0]

    def oversize_chunks():
        yield b'{"channel": "c", "topic": "t", "data": "'
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    requests = {
        "malformed JSON": ("POST", PUBLISH, dict(content=b"{", headers=publish), 400),
        "not UTF-8": ("POST", PUBLISH, dict(content=b'{"channel": "\xff"}', headers=publish), 400),
        "NaN": ("POST", PUBLISH, dict(content=b'{"channel": "c", "topic": "t", "data": NaN}', headers=publish), 400),
        "channel CRLF": ("POST", PUBLISH, dict(json={"channel": "c\r\nid: 1", "topic": "t", "data": 1},
                                               headers=publish), 400),
        "run_id NUL": ("POST", PUBLISH, dict(json={"channel": "c", "topic": "t", "data": 1, "run_id": "a\x00b"},
                                             headers=publish), 400),
        "run_id lone surrogate": ("POST", PUBLISH, dict(
            content=b'{"channel": "c", "topic": "t", "data": 1, "run_id": "\\ud800"}', headers=publish), 400),
        "data too large": ("POST", PUBLISH, dict(json={"channel": "c", "topic": "t", "data": "x" * MAX_DATA},
                                                 headers=publish), 413),
        "body too large": ("POST", PUBLISH, dict(content=b"x" * (MAX_BODY + 1), headers=publish), 413),
        "chunked body too large": ("POST", PUBLISH, dict(content=oversize_chunks(), headers=publish), 413),
        "no publish key": ("POST", PUBLISH, dict(json={"channel": "c", "topic": "t", "data": 1}), 401),
        "garbage token": ("GET", SUBSCRIBE, dict(params={"token": "garbage"}), 401),
        "tampered token": ("GET", SUBSCRIBE, dict(params={"token": tampered(token)[1]}), 401),
        "other channel": ("GET", SUBSCRIBE, dict(params={"token": token, "channel": "d"}), 403),
        "malformed cursor": ("GET", SUBSCRIBE, dict(params={"token": token},
                                                     headers={"Last-Event-ID": "nope"}), 400),
        "cursor beyond any id": ("GET", SUBSCRIBE, dict(params={"token": token, "last_event_id": f"{epoch}-{2**63}"}),
                                 400),
        "history cursor beyond any id": ("GET", MESSAGES, dict(params={"token": token, "after": f"{epoch}-{2**63}"}),
                                         400),
        "limit superscript": ("GET", MESSAGES, dict(params={"token": token, "limit": "²"}), 400),
        "unknown route": ("GET", "/api/nope", dict(), 404),
        "wrong method": ("DELETE", SUBSCRIBE, dict(), 405),
    }
    failures = []
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for name, (method, path, kwargs, status) in requests.items():
            try:
                with http.stream(method, path, **kwargs) as response:
                    if response.headers.get("content-type", "").startswith("text/event-stream"):
                        failures.append(f"{name}: a {response.status_code} stream: {next(response.iter_raw())!r}")
                        continue
                    response.read()
                    assert_json_error(response, status)
            except (AssertionError, httpx.HTTPError) as exc:
                failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
    history = httpx.get(server.url + MESSAGES, params={"token": token}, timeout=10).json()["messages"]
    log = server.log_path.read_text()
    assert not failures, "\n".join(failures)
    assert history == [], "a refused request stored a message"
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
