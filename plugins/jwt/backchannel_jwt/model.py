"""What a verification says, importable without PyJWT (the hot path and the CLI
parser need these; the crypto stack is imported only when the plugin starts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backchannel import Principal

__all__ = ["Rejected", "Verified"]


class Rejected(Exception):
    """A token that authenticates no one.

    ``reason`` is a short code for counters and logs; ``message`` is the text the
    client sees (close reason or error message). Neither ever contains the token.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Verified:
    """A verified token: its principal, claims, expiry (``exp``, or None) and issuer."""

    principal: Principal
    claims: dict[str, Any]
    expires_at: float | None
    issuer: str
