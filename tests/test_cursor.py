"""Cursors (`Last-Event-ID`): what a client may send back, and what is refused with a 400."""
from __future__ import annotations

import pytest

from realtime.cursor import Cursor
from realtime.errors import InvalidCursor

MAX_ID = 2**63 - 1


@pytest.mark.parametrize(
    "cursor",
    [Cursor("3f9a1c2b", 17), Cursor("0" * 32, 0), Cursor("abcdef0123456789", MAX_ID)],
)
def test_what_the_server_sends_parses_back_to_the_same_cursor(cursor):
    assert Cursor.parse(str(cursor)) == cursor


def test_str_is_epoch_dash_message_id():
    assert str(Cursor("3f9a1c2b", 17)) == "3f9a1c2b-17"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3f9a1c2b-17", Cursor("3f9a1c2b", 17)),
        ("3f9a1c2b-0", Cursor("3f9a1c2b", 0)),
        ("f" * 32 + "-1", Cursor("f" * 32, 1)),  # longest epoch
        (f"3f9a1c2b-{MAX_ID}", Cursor("3f9a1c2b", MAX_ID)),  # largest BIGINT, 19 digits
    ],
)
def test_valid_cursors(text, expected):
    assert Cursor.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "3f9a1c2b17",  # no dash
        "3f9a1c2-17",  # epoch of 7 hex chars
        "a" * 33 + "-17",  # epoch of 33 hex chars
        "3F9A1C2B-17",  # uppercase hex
        "3f9a1c2g-17",  # non-hex
        "3f9a1c2b--17",  # negative
        "3f9a1c2b-",  # no id
        "-17",  # no epoch
        " 3f9a1c2b-17",
        "3f9a1c2b-17 ",
        "3f9a1c2b-17\n",
        "3f9a1c2b-17\x00",
        "3f9a1c2b-1.5",
        "3f9a1c2b-١٧",  # non-ASCII digits
        f"3f9a1c2b-{MAX_ID + 1}",  # above BIGINT, still 19 digits
        "3f9a1c2b-" + "9" * 19,
        "3f9a1c2b-" + "1" * 20,
        "3f9a1c2b-" + "0" * 20 + "1",
    ],
)
def test_invalid_cursors_are_refused_with_a_400(text):
    with pytest.raises(InvalidCursor) as caught:
        Cursor.parse(text)
    assert (caught.value.status, caught.value.code) == (400, "invalid_last_event_id")
