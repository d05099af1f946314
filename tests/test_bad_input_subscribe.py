"""Bad tokens, cursors and limits on /subscribe and /messages get a 4xx JSON error (CONTRACT §3, issue 2).

Most cases run against the in-process app (fast, one table per endpoint);
`test_live_server_answers_bad_input_with_json` replays a sample of every
endpoint's bad input, publishing included, against a real gunicorn on SQLite
and PostgreSQL, where the database driver and the HTTP server add their own
ways to fail. Bad publish and token requests are in test_bad_input_publish.py.
"""
from __future__ import annotations

import time

import httpx
import pytest

from conftest import PUBLISH_KEY
from json_errors import MAX_BODY, MAX_DATA, MESSAGES, PUBLISH, SUBSCRIBE, TOKEN, assert_json_error


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
    ("PATCH", "/metrics", 405),
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


def test_live_server_refuses_an_idempotency_key_reused_for_another_message(live_server):
    """Issue 18: the same key with another body is 422, and the second message is not lost silently."""
    headers = {"Authorization": f"Bearer {PUBLISH_KEY}", "Idempotency-Key": "order-7"}
    first = httpx.post(live_server.url + PUBLISH, json={"channel": "c", "topic": "t", "data": 1}, headers=headers,
                       timeout=10)
    assert first.status_code == 201
    other = httpx.post(live_server.url + PUBLISH, json={"channel": "c", "topic": "t", "data": 2}, headers=headers,
                       timeout=10)
    assert_json_error(other, 422, "idempotency_key_reused")
    again = httpx.post(live_server.url + PUBLISH, json={"channel": "c", "topic": "t", "data": 1}, headers=headers,
                       timeout=10)
    assert again.status_code == 201 and again.json() == first.json()
    token = live_server.token("c", ["t"])
    history = httpx.get(live_server.url + MESSAGES, params={"token": token}, timeout=10).json()["messages"]
    assert [m["data"] for m in history] == [1]
