"""One root error for the realtime package; common/errors.py turns each into docs/protocol.md §3 JSON.

Every subclass sets its HTTP `status` and snake_case `code` (see `AppError`).
"""
from __future__ import annotations

from common.errors import AppError


class RealtimeError(AppError):
    """The root of the realtime package's errors."""


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


class IdempotencyKeyReused(RealtimeError):
    """An Idempotency-Key already used on the channel for a different message (as Stripe answers)."""

    status = 422
    code = "idempotency_key_reused"


class InvalidCursor(RealtimeError):
    code = "invalid_last_event_id"
