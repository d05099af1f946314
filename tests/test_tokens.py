"""Subscription tokens with an injected clock: no sleeping to test expiry."""
import pytest

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
