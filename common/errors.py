"""Every error leaves the app as CONTRACT §3 JSON, mapped here and nowhere else.

`{"error": {"code": "snake_case_code", "message": "what went wrong and what to do"}}`

Package errors (`RealtimeError`, `JobError`, both `AppError`s) carry `status`,
`code` and `message`; Werkzeug's HTTP errors (404, 405, 413 ...) are translated; anything
unexpected is logged with its traceback and answered with a bare 500 that says
nothing about the internals.
"""
from __future__ import annotations

import logging
import re

from flask import Flask, Response, jsonify
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

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


def error_response(status: int, code: str, message: str) -> Response:
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    return response


def _http_code(exc: HTTPException) -> str:
    if exc.code == 413:
        return "message_too_large"
    return re.sub(r"[^a-z0-9]+", "_", (exc.name or "error").lower()).strip("_")


def init_app(app: Flask) -> None:
    @app.errorhandler(AppError)
    def _app_error(exc: AppError) -> Response:
        return error_response(exc.status, exc.code, exc.message)

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
