"""The closed sets of error codes and close codes, and the exceptions that carry them.

Every way a request can fail maps to one code of :class:`ErrorCode` (the set is
closed: ``schemas/error.schema.json`` lists the same values and a test keeps the
two equal). Close codes are the WebSocket close codes the server uses (DESIGN §4).
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = [
    "BackchannelError",
    "CloseCode",
    "ErrorCode",
    "Reject",
    "StartupError",
]


class ErrorCode(enum.StrEnum):
    """Codes of ``error`` frames (``content.code``)."""

    BAD_JSON = "bad_json"
    INVALID_ENVELOPE = "invalid_envelope"
    UNKNOWN_TYPE = "unknown_type"
    TYPE_NOT_ALLOWED = "type_not_allowed"
    VALIDATION_FAILED = "validation_failed"
    TOO_LARGE = "too_large"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    HANDLER_ERROR = "handler_error"
    CANCELLED = "cancelled"
    OVERLOADED = "overloaded"
    SHUTTING_DOWN = "shutting_down"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server sends."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4001
    FORBIDDEN = 4003
    TOKEN_EXPIRED = 4008
    SESSION_TAKEN = 4009


class BackchannelError(Exception):
    """Raise from a handler or hook to answer the request with this error frame.

    ``message`` is shown to the client: keep it short and never include the
    offending value or anything secret. ``details`` is a list of JSON objects.
    """

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        *,
        details: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.details = details
        self.extra = extra

    def content(self) -> dict[str, Any]:
        """The ``content`` object of the error frame."""
        content: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.details:
            content["details"] = self.details
        if self.extra:
            content.update(self.extra)
        return content


class Reject(Exception):
    """Raise from ``authenticate`` or ``connect`` to close the connection with ``code``."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"{code} {reason}")
        self.code = int(code)
        self.reason = reason


class StartupError(Exception):
    """Configuration or plugin problem that stops the server from starting.

    The message is written for the operator: it names the key, plugin or
    distribution involved and what would fix it.
    """
