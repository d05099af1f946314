"""Subscription tokens with an injected clock: no sleeping to test expiry."""
from __future__ import annotations

import pytest
from itsdangerous import Signer, URLSafeSerializer

from json_errors import MESSAGES, SUBSCRIBE, assert_json_error
from realtime.errors import InvalidRequest, InvalidToken, TokenExpired
from realtime.tokens import TokenIssuer


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_issue_then_verify_round_trip():
    clock = Clock()
    issuer = TokenIssuer("secret", ttl_s=60, now=clock)
    grant = issuer.issue("run.42", ["status", "log"])
    assert grant.expires_at == clock.now + 60
    verified = issuer.verify(grant.token)
    assert (verified.channel, verified.topics, verified.expires_at) == ("run.42", ("status", "log"), clock.now + 60)


def test_token_expires_after_its_ttl():
    clock = Clock()
    issuer = TokenIssuer("secret", ttl_s=60, now=clock)
    token = issuer.issue("run.42", ["status"]).token
    clock.now += 59.9
    issuer.verify(token)
    clock.now += 0.1
    with pytest.raises(TokenExpired) as caught:
        issuer.verify(token)
    assert (caught.value.status, caught.value.code) == (401, "token_expired")


def test_per_token_ttl_overrides_the_default():
    clock = Clock()
    issuer = TokenIssuer("secret", ttl_s=60, now=clock)
    token = issuer.issue("run.42", ["status"], ttl_s=5).token
    clock.now += 5
    with pytest.raises(TokenExpired):
        issuer.verify(token)


@pytest.mark.parametrize("bad", ["", "garbage", "a.b.c", "eyJjIjoicnVuLjQyIn0.AAAA"])
def test_garbage_is_invalid(bad):
    with pytest.raises(InvalidToken) as caught:
        TokenIssuer("secret").verify(bad)
    assert caught.value.code == "invalid_token"


def test_tampered_payload_or_other_key_is_invalid():
    issuer = TokenIssuer("secret")
    token = issuer.issue("run.42", ["status"]).token
    payload, signature = token.rsplit(".", 1)
    other = TokenIssuer("secret").issue("run.43", ["status"]).token.rsplit(".", 1)[0]
    with pytest.raises(InvalidToken):
        issuer.verify(other + "." + signature)  # another channel, same signature
    with pytest.raises(InvalidToken):
        TokenIssuer("another-secret").verify(token)
    with pytest.raises(InvalidToken):
        TokenIssuer("secret").verify(payload + "." + signature[::-1])


def test_the_secret_is_not_in_the_token():
    token = TokenIssuer("super-secret-key").issue("run.1", ["log"]).token
    assert "super-secret-key" not in token


@pytest.mark.parametrize(
    ("channel", "topics"),
    [("bad channel", ["status"]), ("run.1", []), ("run.1", ["a\nb"]), ("", ["x"]), ("run.1", "status")],
)
def test_issue_validates_names(channel, topics):
    with pytest.raises(InvalidRequest):
        TokenIssuer("secret").issue(channel, topics)


# -- signed by this key, but not a token `issue` would make ------------------------------------

EXPIRES = 2_000_000.0
ODD_PAYLOADS = {
    "topic an object": {"c": "run.1", "t": [{"a": 1}], "e": EXPIRES},
    "topics a string": {"c": "run.1", "t": "status", "e": EXPIRES},
    "topics an object": {"c": "run.1", "t": {"status": 1}, "e": EXPIRES},
    "topics empty": {"c": "run.1", "t": [], "e": EXPIRES},
    "topic with LF": {"c": "run.1", "t": ["a\nevent: x"], "e": EXPIRES},
    "channel a number": {"c": 1, "t": ["status"], "e": EXPIRES},
    "channel a list": {"c": ["run.1"], "t": ["status"], "e": EXPIRES},
    "channel with CRLF": {"c": "run.1\r\n", "t": ["status"], "e": EXPIRES},
    "expiry a string": {"c": "run.1", "t": ["status"], "e": "2030-01-01"},
    "expiry a bool": {"c": "run.1", "t": ["status"], "e": True},
    "expiry null": {"c": "run.1", "t": ["status"], "e": None},
    "expiry NaN": {"c": "run.1", "t": ["status"], "e": float("nan")},
    "expiry Infinity": {"c": "run.1", "t": ["status"], "e": float("inf")},
    "expiry overflows a float": {"c": "run.1", "t": ["status"], "e": 10**400},
    "extra key": {"c": "run.1", "t": ["status"], "e": EXPIRES, "admin": True},
    "missing key": {"c": "run.1", "t": ["status"]},
    "a list": ["run.1", ["status"], EXPIRES],
    "a string": "run.1",
    "null": None,
}


def sign(secret: str, payload: object) -> str:
    """A token signed like `TokenIssuer.issue` does, whatever the payload."""
    return URLSafeSerializer(secret, salt=TokenIssuer.salt).dumps(payload)


def test_payload_signed_the_issuers_way_verifies():
    """The control for the table below: `sign` makes tokens the issuer accepts."""
    grant = TokenIssuer("secret", now=Clock()).verify(sign("secret", {"c": "run.1", "t": ["status"], "e": EXPIRES}))
    assert (grant.channel, grant.topics, grant.expires_at) == ("run.1", ("status",), EXPIRES)


@pytest.mark.parametrize("payload", ODD_PAYLOADS.values(), ids=ODD_PAYLOADS.keys())
def test_signed_payload_of_the_wrong_shape_is_invalid(payload):
    with pytest.raises(InvalidToken) as caught:
        TokenIssuer("secret", now=Clock()).verify(sign("secret", payload))
    assert (caught.value.status, caught.value.code) == (401, "invalid_token")


def test_signed_bytes_that_are_not_json_are_invalid():
    token = Signer("secret", salt=TokenIssuer.salt).sign(b"bm90IGpzb24").decode()  # base64 of "not json"
    with pytest.raises(InvalidToken):
        TokenIssuer("secret").verify(token)


@pytest.mark.parametrize("path", [SUBSCRIBE, MESSAGES])
def test_endpoints_answer_odd_signed_payloads_with_401(client, app, path):
    for payload in ODD_PAYLOADS.values():
        token = sign(app.config["SECRET_KEY"], payload)
        assert_json_error(client.get(path, query_string={"token": token}), 401, "invalid_token")
