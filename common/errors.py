"""Every error leaves the app as CONTRACT §3 JSON, mapped here and nowhere else.

`{"error": {"code": "snake_case_code", "message": "what went wrong and what to do"}}`

Package errors (`RealtimeError`, `JobError`, `DatabaseUnavailable`, all
`AppError`s) carry `status`, `code` and `message`; Werkzeug's HTTP errors
(404, 405, 413 ...) and gunicorn's errors reading a malformed body are
translated; anything unexpected is logged with its traceback and answered
with a bare 500 that says nothing about the internals.
"""
from __future__ import annotations

import logging
import re

from flask import Flask, Response, jsonify
from gunicorn.http.errors import ParseException
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class AppError(Exception):
    """What a client got wrong: the base of each package's root error.

    Subclasses carry their HTTP `status` and snake_case `code` as class
    attributes (itsdangerous' `BadData` family is the model); `message` is
    written for the person who has to fix the request.
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
    """A run's or a task's `error`, which is also published on its channel, hence shown in browsers."""
    if isinstance(exc, SQLAlchemyError):
        # SQL text and parameters stay in the worker's log.
        return f"{type(exc).__name__}: a database error; the worker's log has the details"
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 2000 else text[:2000] + " ..."


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
