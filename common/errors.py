"""Every error leaves the app as docs/protocol.md §3 JSON, mapped here and nowhere else.

`{"error": {"code": "snake_case_code", "message": "what went wrong and what to do"}}`

Package errors (`RealtimeError`, `JobError`, `DatabaseUnavailable`, all
`AppError`s) carry `status`, `code` and `message`; Werkzeug's HTTP errors
(404, 405, 413 ...) and gunicorn's errors reading a malformed body are
translated; anything unexpected is logged with its traceback and answered
with a bare 500 that says nothing about the internals.

The same rule holds for the errors of runs and tasks, which are published on
their channels and so shown in browsers: `describe` gives an error's type
alone, and its message only for a `PublicError`.
"""
from __future__ import annotations

import logging
import re

from flask import Flask, Response, jsonify
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

#: The longest public message `describe` passes on whole.
MAX_DESCRIPTION_CHARS = 2000


class PublicError(Exception):
    """An error whose message was written for the people using the app, so it may be shown to them.

    A job or a task raises one (or a subclass) to tell the browser watching it
    why it failed: `raise PublicError("the file has no 'amount' column")`.
    Other errors' messages were written for developers and often carry what
    no browser may see (SQL, a driver's `DETAIL: Key (email)=(...)`, paths,
    another user's data): `describe` shows their type alone. Mix it in to
    make another error public: `class BadInput(NonRetriableError, PublicError)`.
    """


class AppError(PublicError):
    """What a client got wrong: the base of each package's root error.

    Subclasses carry their HTTP `status` and snake_case `code` as class
    attributes (itsdangerous' `BadData` family is the model); `message` is
    written for the person who has to fix the request, hence public.
    """

    status = 400
    code = "bad_request"
    #: Extra response headers, such as `Retry-After` on a 503.
    headers: dict[str, str] = {}

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


def describe(exc: BaseException) -> str:
    """A run's or a task's `error`, which is also published on its channel, hence shown in browsers.

    `IntegrityError` for most errors; `BadInput: the file has no 'amount'
    column` for a `PublicError`, capped at MAX_DESCRIPTION_CHARS. A log line
    wants the exception itself (`exc_info=`), not this.
    """
    name = type(exc).__name__
    if not isinstance(exc, PublicError):
        return name
    text = f"{name}: {exc}"
    return text if len(text) <= MAX_DESCRIPTION_CHARS else text[:MAX_DESCRIPTION_CHARS] + " ..."


def error_response(status: int, code: str, message: str) -> Response:
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    return response


def _http_code(exc: HTTPException) -> str:
    if exc.code == 413:
        # Werkzeug's "Request Entity Too Large": a body over a limit nobody named
        # (the endpoints' own limits raise their codes: message_too_large,
        # event_too_large; common/request_input.py).
        return "body_too_large"
    return re.sub(r"[^a-z0-9]+", "_", (exc.name or "error").lower()).strip("_")


def init_app(app: Flask) -> None:
    @app.errorhandler(AppError)
    def _app_error(exc: AppError) -> Response:
        response = error_response(exc.status, exc.code, exc.message)
        response.headers.update(exc.headers)
        return response

    @app.errorhandler(ParseException)
    def _malformed_body(exc: ParseException) -> Response:
        # gunicorn reads the body lazily, inside the view: a bad chunk
        # surfaces here, and is the client's mistake.
        return error_response(400, "malformed_request", f"the request is not valid HTTP: {type(exc).__name__}")

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        response = error_response(exc.code or 500, _http_code(exc), exc.description or exc.name)
        # A 405 says which methods would do (RFC 9110 §15.5.6).
        response.headers.extend((k, v) for k, v in exc.get_headers() if k.lower() == "allow")
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "Something went wrong on the server.")
