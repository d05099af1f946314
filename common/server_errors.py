"""gunicorn's own error answers, as docs/protocol.md §3 JSON: the requests the app never sees.

gunicorn refuses a request it cannot parse (a request line over `limit_request_line`,
too many or too large headers, a malformed request line, an unknown Transfer-Encoding)
before calling the app, with an HTML page it writes itself; no setting changes that body
(benoitc/gunicorn#993). What it does have is the worker class as a setting, which may be
"a subclass of gunicorn.workers.base.Worker", and one method that answers every such
error, `Worker.handle_error(req, client, addr, exc)`. `JsonErrorGeventWorker` is
gunicorn's gevent worker with that method answering `{"error": {"code", "message"}}`
(gunicorn.conf.py's `worker_class`).

The statuses are gunicorn's (414, 431, 417, 400 ...) but one: a transfer coding gunicorn
does not know (`Transfer-Encoding: xchunked`) is 400, not gunicorn's 501. RFC 9112 §6.1
only suggests 501 ("SHOULD"); §6.3 requires 400 for a request whose last coding is not
`chunked`, which covers every such request but `xchunked, chunked`; and docs/protocol.md
§3.1 allows no 5xx for what a client sends. A 500 is left for the server's own faults (a
response header the app got wrong, a configuration problem), with no detail.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from http import HTTPStatus
from ssl import SSLError
from typing import Any

from gunicorn import util
from gunicorn.http import errors as http_errors
from gunicorn.http.wsgi import Response, default_environ
from gunicorn.workers.ggevent import GeventWorker

#: The most of the request quoted back in a message: a request line may be 8 KiB.
MAX_QUOTED_CHARS = 200

#: Raised while parsing, yet the server's fault, not the client's.
SERVER_FAULTS = (
    http_errors.InvalidResponseHeader,  # a subclass of InvalidHeader: checked first
    http_errors.InvalidResponseHeaderName,
    http_errors.ConfigurationProblem,
)


@dataclass(frozen=True)
class ErrorAnswer:
    status: int
    code: str
    message: str

    @property
    def body(self) -> bytes:
        return json.dumps({"error": {"code": self.code, "message": self.message}}).encode()

    def to_bytes(self) -> bytes:
        """The whole HTTP/1.1 answer; the connection closes after it, as after gunicorn's own."""
        body = self.body
        head = (
            f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}\r\n"
            "Connection: close\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode("latin-1") + body


INTERNAL_ERROR = ErrorAnswer(500, "internal_error", "Something went wrong on the server.")


def _quoted(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= MAX_QUOTED_CHARS else text[:MAX_QUOTED_CHARS] + " ..."


def answer_for(exc: BaseException, cfg: Any) -> ErrorAnswer:
    """What the worker answers for `exc`, raised while gunicorn read a request (`cfg`: its settings)."""
    if isinstance(exc, SERVER_FAULTS) or not isinstance(exc, (http_errors.ParseException, SSLError)):
        return INTERNAL_ERROR
    if isinstance(exc, http_errors.LimitRequestLine):
        return ErrorAnswer(414, "request_line_too_long",
                           f"the request line is longer than {cfg.limit_request_line} bytes: shorten the URL")
    if isinstance(exc, http_errors.LimitRequestHeaders):
        return ErrorAnswer(431, "headers_too_large",
                           f"the headers are over this server's limits ({cfg.limit_request_fields} headers,"
                           f" {cfg.limit_request_field_size} bytes each): send fewer or shorter ones")
    if isinstance(exc, http_errors.UnsupportedTransferCoding):
        return ErrorAnswer(400, "unsupported_transfer_coding",
                           f"{_quoted(exc)}: send the body with Content-Length or Transfer-Encoding: chunked")
    if isinstance(exc, http_errors.ExpectationFailed):
        return ErrorAnswer(417, "expectation_failed", f"{_quoted(exc)}: the only one met is Expect: 100-continue")
    if isinstance(exc, (http_errors.ForbiddenProxyRequest, SSLError)):
        return ErrorAnswer(403, "forbidden", "this connection is not accepted")
    return ErrorAnswer(400, "malformed_request", f"the request is not valid HTTP: {_quoted(exc)}")


class JsonErrorGeventWorker(GeventWorker):
    """gunicorn's gevent worker, answering the requests it refuses as JSON (module docstring)."""

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        # What gunicorn's own handle_error does, with another body and the 400 above.
        addr = addr or ("", -1)  # a unix socket
        error = answer_for(exc, self.cfg)
        if error is INTERNAL_ERROR:
            self.log.exception("Error handling request %s", getattr(req, "uri", "(no URI read)"))
        else:
            self.log.warning("Invalid request from ip=%s: %s", addr[0], exc)
        if req is None and isinstance(exc, (http_errors.InvalidHeader, http_errors.InvalidHeaderName)):
            req = getattr(exc, "req", None)  # the request read so far, for the access log
        if req is not None:
            environ = default_environ(req, client, self.cfg)
            environ.update(REMOTE_ADDR=addr[0], REMOTE_PORT=str(addr[1]), PATH_INFO=req.path)
            response = Response(req, client, self.cfg)
            response.status = f"{error.status} {HTTPStatus(error.status).phrase}"
            response.response_length = len(error.body)
            self.log.access(response, req, environ, timedelta(0))  # never served: no duration
        try:
            util.write_nonblock(client, error.to_bytes())
        except Exception:
            self.log.debug("Failed to send error message.")
