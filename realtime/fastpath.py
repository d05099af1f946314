"""Writing live frames straight to the client's socket, under gunicorn's gevent worker.

The ordinary path for a live frame is: the dispatcher queues it and sets the
stream's event; the hub switches to the stream's greenlet; the generator
yields it; gunicorn frames it as an HTTP chunk and writes it; the greenlet
waits again and switches back. Measured at 1,000 streams (bench/), the event,
the two switches and the write layers cost about twice the `send()` itself.

So while a stream is idle, parked in `Subscription.take()` with everything it
yielded already written, the dispatcher may write the frame itself: one
non-blocking `send()` of the same bytes gunicorn would have written (the
frame as an HTTP/1.1 chunk). If the socket takes only part of it, the rest
goes back to the stream's greenlet, which finishes it with a blocking write
before anything else, so the bytes on the wire stay in order.

Only for plain-text HTTP/1.x on gunicorn's gevent worker; anything else
(Flask's dev server, other workers, TLS, HTTP/2) keeps the ordinary path.
Bytes written this way bypass gunicorn's byte count in the access log.
"""
from __future__ import annotations

from typing import Any


class SocketWriter:
    def __init__(self, sock: Any, *, chunked: bool) -> None:
        self._sock = sock  # gevent socket: blocking for this greenlet only
        self._raw = sock._sock  # the OS socket beneath it, in non-blocking mode
        self._chunked = chunked

    def try_send(self, frame: bytes) -> bytes:
        """Send what the socket takes now, without waiting; return the rest (b"" when all went).

        Raises OSError when the client is gone.
        """
        data = b"%X\r\n%s\r\n" % (len(frame), frame) if self._chunked else frame
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            sent = 0
        return data[sent:]

    def send_all(self, data: bytes) -> None:
        """Write bytes that `try_send` left over, waiting as long as it takes (greenlet only)."""
        self._sock.sendall(data)


def socket_writer(environ: dict[str, Any]) -> SocketWriter | None:
    """A writer for this request's socket, or None when the fast path does not apply."""
    sock = environ.get("gunicorn.socket")
    if (
        sock is None
        or not type(sock).__module__.startswith("gevent")
        or not hasattr(sock, "_sock")
        or hasattr(sock, "_sslobj")  # TLS: `_sock` lies beneath the encryption
        or environ.get("REQUEST_METHOD") != "GET"
        or environ.get("SERVER_PROTOCOL") not in ("HTTP/1.1", "HTTP/1.0")
    ):
        return None
    # gunicorn frames a body of unknown length as chunks exactly for HTTP/1.1.
    return SocketWriter(sock, chunked=environ["SERVER_PROTOCOL"] == "HTTP/1.1")
