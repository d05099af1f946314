"""The wire format as tables of exact bytes (WHATWG HTML §9.2.6)."""
import pytest

from realtime.sse import KEEP_ALIVE, format_event

FRAMES = [
    (dict(retry=2000), "retry: 2000\n\n"),
    (dict(comment="keep-alive"), ": keep-alive\n\n"),
    (dict(data="hello"), "data: hello\n\n"),
    (dict(data=""), "data: \n\n"),
    (dict(id="ab12cd34-7", event="status", data='{"percent": 10}'),
     'id: ab12cd34-7\nevent: status\ndata: {"percent": 10}\n\n'),
    # Every line ending inside data becomes a new data line; the client joins them with LF.
    (dict(data="a\nb"), "data: a\ndata: b\n\n"),
    (dict(data="a\rb"), "data: a\ndata: b\n\n"),
    (dict(data="a\r\nb"), "data: a\ndata: b\n\n"),
    (dict(data="a\n\nb"), "data: a\ndata: \ndata: b\n\n"),
    (dict(data="trailing\n"), "data: trailing\ndata: \n\n"),
    (dict(data="\r\n\r"), "data: \ndata: \ndata: \n\n"),
    (dict(comment="two\nlines"), ": two\n: lines\n\n"),
    (dict(comment=""), ":\n\n"),
    (dict(retry=0, id="1", event="e", data="d", comment="c"), ": c\nretry: 0\nid: 1\nevent: e\ndata: d\n\n"),
    (dict(data="naïve ✓"), "data: naïve ✓\n\n"),
]


@pytest.mark.parametrize(("fields", "expected"), FRAMES)
def test_format_event_exact_bytes(fields, expected):
    assert format_event(**fields) == expected


@pytest.mark.parametrize(
    "fields",
    [
        dict(id="1\n2"),
        dict(id="1\r"),
        dict(event="a\r\nb"),
        dict(event="x\ny", data="d"),
        dict(id="a\0b"),
        dict(retry=-1),
        dict(retry=1.5),
        dict(retry=True),
        dict(),
    ],
)
def test_format_event_refuses_what_would_break_a_frame(fields):
    with pytest.raises(ValueError):
        format_event(**fields)


def test_keep_alive_is_a_comment():
    assert KEEP_ALIVE == ": keep-alive\n\n"


def test_format_event_does_not_mutate_or_keep_state():
    data = "x\ny"
    assert format_event(data=data) == format_event(data=data)
    assert data == "x\ny"
