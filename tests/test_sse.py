"""The wire format as tables of exact bytes (WHATWG HTML §9.2.6)."""
import pytest

from realtime import sse
from realtime.sse import format_event

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


ENVELOPE = '{"id": 17, "channel": "run.42", "topic": "status", "data": {"percent": 10}, "run_id": null, "created_at": "2026-11-28T06:00:00.123456+00:00"}'

# Every frame this server sends (CONTRACT §4), byte for byte.
SERVER_FRAMES = [
    (sse.retry_frame(2000), b"retry: 2000\n\n"),
    (sse.message_frame("3f9a1c2b-17", "status", ENVELOPE),
     b"id: 3f9a1c2b-17\nevent: status\ndata: " + ENVELOPE.encode() + b"\n\n"),
    (sse.reset_frame("history_truncated", "3f9a1c2b-12"),
     b'id: 3f9a1c2b-12\nevent: reset\ndata: {"reason": "history_truncated", "cursor": "3f9a1c2b-12"}\n\n'),
    (sse.reset_frame("unknown_cursor", "3f9a1c2b-0"),
     b'id: 3f9a1c2b-0\nevent: reset\ndata: {"reason": "unknown_cursor", "cursor": "3f9a1c2b-0"}\n\n'),
    (sse.KEEP_ALIVE, b": keep-alive\n\n"),
    (sse.SHUTDOWN, b": server shutting down; reconnect with Last-Event-ID\n\n"),
]


@pytest.mark.parametrize(("frame", "expected"), SERVER_FRAMES)
def test_server_frames_exact_bytes(frame, expected):
    assert frame == expected


def test_a_topic_with_a_line_break_can_never_reach_the_wire():
    with pytest.raises(ValueError):
        sse.message_frame("3f9a1c2b-17", "status\ndata: injected", "{}")
