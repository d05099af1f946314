"""Logging: plain text by default, one JSON object per line with `LOG_FORMAT=json`.

Every line carries time, level, logger and message, and the request id while
a request is served (`X-Request-ID` from the proxy, or a new one, echoed in
the response). Streams log one line when they end (realtime/stream.py) with
the channel's hash, never its name. No line ever holds a token, a key or
message data: the access log keeps the path without its query string, and
the dev server's log redacts `token=`.
"""
from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Mapping

from flask import Flask, g, has_request_context, request
from pythonjsonlogger.json import JsonFormatter

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestId(logging.Filter):
    """Adds `request_id` to every record logged while a request is served."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = g.get("request_id") if has_request_context() else None
        return True


class RedactTokens(logging.Filter):
    """Blank `token=...` in log lines: EventSource can only send its token in the URL."""

    _TOKEN = re.compile(r"(token=)[^&\s\"]+")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message:
            record.msg, record.args = self._TOKEN.sub(r"\1[redacted]", message), ()
        return True


def json_formatter() -> logging.Formatter:
    """time (ISO 8601, UTC), level, logger, message, then whatever the record adds (`extra=`)."""
    return JsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
    )


class AccessJsonFormatter(JsonFormatter):
    """gunicorn's access log as JSON: only atoms that cannot hold a secret.

    gunicorn logs each request with a dict of "atoms"; `r` (the request line)
    and `q` (the query string) would carry `?token=`, so they are never read.
    """

    ATOMS = {"h": "remote", "m": "method", "U": "path", "s": "status", "B": "bytes", "M": "duration_ms",
             "{x-request-id}o": "request_id"}

    def add_fields(self, log_record, record, message_dict):  # noqa: ANN001
        super().add_fields(log_record, record, message_dict)
        atoms = record.args if isinstance(record.args, Mapping) else {}
        log_record["message"] = "request"
        for atom, field in self.ATOMS.items():
            value = atoms.get(atom) if atoms else None
            if value not in (None, "-"):
                log_record[field] = int(value) if field in ("status", "bytes", "duration_ms") and str(value).isdigit() else value


def access_json_formatter() -> logging.Formatter:
    return AccessJsonFormatter("{levelname}{name}", style="{", rename_fields={"levelname": "level", "name": "logger"},
                               timestamp="time")


def gunicorn_logconfig() -> dict:
    """`logconfig_dict` for gunicorn.conf.py with LOG_FORMAT=json: its error and access logs as JSON lines."""
    stream = {"class": "logging.StreamHandler"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {"()": "common.logs.json_formatter"},
            "access": {"()": "common.logs.access_json_formatter"},
        },
        "handlers": {
            "error": {**stream, "formatter": "json", "stream": "ext://sys.stderr"},
            "access": {**stream, "formatter": "access", "stream": "ext://sys.stdout"},
        },
        "root": {"level": "INFO", "handlers": []},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["error"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["access"], "propagate": False},
        },
    }


def configure(log_format: str | None = None) -> None:
    """Set up the root logger once per process: JSON lines or plain text, on stderr."""
    log_format = (log_format or os.environ.get("LOG_FORMAT") or "text").lower()
    root = logging.getLogger()
    if getattr(root, "_configured_by_app", False):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        json_formatter() if log_format == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(RequestId())
    handler.addFilter(RedactTokens())
    root.addHandler(handler)
    if root.level == logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    # httpx (realtime.client, `tail --url`) logs every request at INFO: noise in a
    # terminal that shows frames, and a URL may carry a token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    root._configured_by_app = True  # type: ignore[attr-defined]


def init_app(app: Flask) -> None:
    """Request ids: the proxy's `X-Request-ID` when it sends a sane one, else a new one."""

    @app.before_request
    def _request_id() -> None:
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex

    @app.after_request
    def _echo_request_id(response):  # noqa: ANN001, ANN202
        if "request_id" in g:
            response.headers["X-Request-ID"] = g.request_id
        return response

    logging.getLogger("werkzeug").addFilter(RedactTokens())
