"""Direct writes of live frames: the chunk bytes, partial sends, and the hand-back to the stream."""
from __future__ import annotations

import socket
import threading

import pytest

from realtime.dispatch import KEEP_ALIVE_FRAME, Subscription
from realtime.fastpath import SocketWriter, socket_writer
from realtime.store import Message


class GeventLikeSocket:
    """What SocketWriter needs of a gevent socket: `_sock` (non-blocking) and a blocking `sendall`."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        sock.setblocking(False)

    def sendall(self, data: bytes) -> None:
        self._sock.setblocking(True)
        try:
            self._sock.sendall(data)
        finally:
            self._sock.setblocking(False)


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    yield GeventLikeSocket(ours), theirs
    ours.close()
    theirs.close()


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += sock.recv(size - len(data))
    return data


def test_a_frame_goes_out_as_one_http_chunk(pair):
    ours, theirs = pair
    assert SocketWriter(ours, chunked=True).try_send(b"data: x\n\n") == b""
    assert _read(theirs, 14) == b"9\r\ndata: x\n\n\r\n"
    assert SocketWriter(ours, chunked=False).try_send(b": keep-alive\n\n") == b""
    assert _read(theirs, 14) == b": keep-alive\n\n"


def test_what_the_socket_does_not_take_is_returned(pair):
    ours, _theirs = pair
    writer = SocketWriter(ours, chunked=True)
    big = b"x" * (8 * 1024 * 1024)
    rest = writer.try_send(big)
    assert 0 < len(rest) < len(big) + 16  # the kernel buffer took a part, nobody reads


def _message(n: int) -> Message:
    return Message(n, "c", "t", "{}", None, None)


def _parked(subscription: Subscription) -> threading.Thread:
    waiter = threading.Thread(target=subscription.take, daemon=True)
    waiter.start()
    while not subscription._parked:  # noqa: SLF001 - the state this test is about
        pass
    return waiter


def test_a_parked_subscription_is_written_directly_and_never_twice(pair):
    ours, theirs = pair
    subscription = Subscription("c", None, limit=10, writer=SocketWriter(ours, chunked=False))
    subscription.sent_through = 1  # replay sent message 1
    waiter = _parked(subscription)
    subscription.offer(_message(1), b"one\n\n")  # overlap with the replay: skipped
    subscription.offer(_message(2), b"two\n\n")
    subscription.keep_alive()
    assert _read(theirs, 5 + len(KEEP_ALIVE_FRAME[1])) == b"two\n\n" + KEEP_ALIVE_FRAME[1]
    assert subscription.sent_through == 2
    assert waiter.is_alive()  # nothing woke the stream
    subscription.close("shutdown")
    waiter.join(timeout=5)


def test_a_partial_direct_write_is_finished_by_the_stream_before_anything_else(pair):
    ours, theirs = pair
    subscription = Subscription("c", None, limit=10, writer=SocketWriter(ours, chunked=False))
    waiter = _parked(subscription)
    big = b"x" * (8 * 1024 * 1024)
    subscription.offer(_message(1), big)
    waiter.join(timeout=5)  # woken to finish the write
    assert subscription.unsent
    subscription.offer(_message(2), b"after\n\n")  # queued behind the rest, not sent directly
    subscription.close("shutdown")
    assert subscription.unsent  # closing keeps the half-written frame
    reader = threading.Thread(target=lambda: _read(theirs, len(big)), daemon=True)
    reader.start()
    subscription.finish_unsent()
    reader.join(timeout=10)
    assert not reader.is_alive() and subscription.unsent == b""


def test_the_fast_path_applies_only_to_gunicorn_gevent_http1(pair):
    ours, _ = pair
    assert socket_writer({}) is None
    assert socket_writer({"gunicorn.socket": ours._sock, "REQUEST_METHOD": "GET", "SERVER_PROTOCOL": "HTTP/1.1"}) is None
