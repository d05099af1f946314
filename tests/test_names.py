"""Channel, topic and run id names (CONTRACT §3): what is accepted, what is refused and with which code."""
from __future__ import annotations

import pytest

from realtime.errors import InvalidRequest
from realtime.names import MAX_TOPICS, check_channel, check_run_id, check_topic, check_topics

CHECKS = [(check_channel, 200, "invalid_channel"), (check_topic, 100, "invalid_topic"), (check_run_id, 64, "invalid_run_id")]
CHECK_IDS = ["channel", "topic", "run_id"]

ACCEPTED = ["a", "Z", "0", "run.42", "user:7", "a_b", "a-b", "_.:-", "Run-42_a.b:c"]
REFUSED = [
    "", " ", "a b", " a", "a ", "a\tb", "a\rb", "a\nb", "a\r\n", "a\n", "a\x00", "a/b", "a,b", "a;b",
    "a*", "é", "ünïcode", "канал", "٤٢", "a\u00a0b", None, 1, 1.5, [], ["a"], {"a": 1}, b"abc",
]


@pytest.mark.parametrize(("check", "limit", "code"), CHECKS, ids=CHECK_IDS)
@pytest.mark.parametrize("value", ACCEPTED)
def test_accepted_names_are_returned_unchanged(check, limit, code, value):
    assert check(value) == value


@pytest.mark.parametrize(("check", "limit", "code"), CHECKS, ids=CHECK_IDS)
@pytest.mark.parametrize("value", REFUSED, ids=repr)
def test_refused_names_raise_a_400_with_the_field_code(check, limit, code, value):
    with pytest.raises(InvalidRequest) as caught:
        check(value)
    assert (caught.value.status, caught.value.code) == (400, code)


@pytest.mark.parametrize(("check", "limit", "code"), CHECKS, ids=CHECK_IDS)
def test_length_limit_is_exact(check, limit, code):
    assert check("x" * limit) == "x" * limit
    with pytest.raises(InvalidRequest) as caught:
        check("x" * (limit + 1))
    assert caught.value.code == code


@pytest.mark.parametrize(("check", "limit", "code"), CHECKS, ids=CHECK_IDS)
def test_no_accepted_name_contains_cr_or_lf(check, limit, code):
    """What keeps an `event: <topic>` line from being split or a frame from being forged."""
    for line_break in ("\r", "\n", "\r\n"):
        for value in (line_break, "a" + line_break, line_break + "a", "a" + line_break + "data: x"):
            with pytest.raises(InvalidRequest):
                check(value)


def test_check_topics_dedupes_keeping_first_seen_order():
    assert check_topics(["log", "status", "log", "done", "status"]) == ("log", "status", "done")


def test_check_topics_accepts_up_to_max_topics():
    topics = [f"t{n}" for n in range(MAX_TOPICS)]
    assert check_topics(topics) == tuple(topics)


@pytest.mark.parametrize(
    "value",
    [[], None, "status", {"status": 1}, 1, [f"t{n}" for n in range(MAX_TOPICS + 1)], ["ok", "bad topic"], ["ok", None]],
    ids=["empty", "None", "string", "dict", "int", "too-many", "bad-name", "non-string"],
)
def test_check_topics_refusals(value):
    with pytest.raises(InvalidRequest) as caught:
        check_topics(value)
    assert (caught.value.status, caught.value.code) == (400, "invalid_topic")
