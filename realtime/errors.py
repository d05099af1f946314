"""One root error for the realtime package; views turn each into CONTRACT §3 JSON.

Every subclass carries its HTTP `status` and snake_case `code` as class
attributes (itsdangerous' `BadData` family is the model), and a `message`
written for the person who has to fix the request.
"""
from __future__ import annotations


class RealtimeError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidRequest(RealtimeError):
    """A body, field or name the contract does not allow (400)."""


class InvalidToken(RealtimeError):
    status = 401
    code = "invalid_token"


class TokenExpired(InvalidToken):
    code = "token_expired"


class Forbidden(RealtimeError):
    status = 403
    code = "forbidden"


class NotFound(RealtimeError):
    status = 404
    code = "not_found"


class MessageTooLarge(RealtimeError):
    status = 413
    code = "message_too_large"


class InvalidCursor(RealtimeError):
    code = "invalid_last_event_id"
