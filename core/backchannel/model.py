"""Plain data the kernel hands to plugins: messages, principals, per-object stashes."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from .errors import ErrorCode

__all__ = [
    "COMMON_ERRORS",
    "DEFERRED",
    "Deferred",
    "Message",
    "MessageType",
    "Principal",
    "Reply",
    "Stash",
    "StashKey",
]

T = TypeVar("T")


@dataclass(slots=True)
class Message:
    """One client request, after the envelope contract has accepted it."""

    id: str
    type: str
    content: dict[str, Any]
    session_id: str | None = None
    timestamp: str | None = None
    #: length of the request frame in UTF-8 bytes
    size: int = 0
    #: CRC-32 of the request frame's bytes: tells a retry from a reuse of its id
    digest: int = 0


@dataclass(slots=True)
class Reply:
    """A handler's answer when it wants another frame type than the request's.

    A handler returning a plain dict answers with a frame of the request's own type;
    ``Reply("pong", {...})`` answers with type ``pong``.
    """

    type: str
    content: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is on the other end of a connection.

    ``permissions`` holds exact names or shell-style patterns (``rooms:join:support-*``);
    ``"*"`` allows everything.
    """

    id: str
    permissions: frozenset[str] = frozenset({"*"})
    anonymous: bool = False
    claims: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def allows(self, permission: str) -> bool:
        """Whether this principal holds ``permission`` (directly or through a pattern)."""
        if "*" in self.permissions or permission in self.permissions:
            return True
        return any(fnmatch.fnmatchcase(permission, p) for p in self.permissions)


class Deferred:
    """The type of :data:`DEFERRED`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DEFERRED"


#: What an ``authenticate`` hook returns to admit a connection that will authenticate
#: later, with ``init`` (see the hookspec): until ``connection.authenticate(principal)``
#: it has no principal, only ``init`` is served, and nothing it is sent is kept.
DEFERRED = Deferred()


#: Error codes any request may be answered with, whatever its type: the kernel's own
#: (no principal yet, a full queue, a timeout, a cancel, a failing handler, shutdown, a
#: retry whose answer is gone) and those of plugins that check every request (validation
#: limits and allowed types, rate limits, an expired token). A type's contract names the
#: codes it may get beyond these (:meth:`MessageType.error_codes`).
COMMON_ERRORS: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.INVALID_ENVELOPE,
        ErrorCode.TYPE_NOT_ALLOWED,
        ErrorCode.VALIDATION_FAILED,
        ErrorCode.TOO_LARGE,
        ErrorCode.UNAUTHORIZED,
        ErrorCode.RATE_LIMITED,
        ErrorCode.TIMEOUT,
        ErrorCode.HANDLER_ERROR,
        ErrorCode.CANCELLED,
        ErrorCode.OVERLOADED,
        ErrorCode.SHUTTING_DOWN,
    }
)


@dataclass(frozen=True, slots=True)
class MessageType:
    """A registered message type, as ``app.message_types()`` describes it: its contract.

    ``reply``, ``reply_type``, ``chunks`` and ``errors`` are what the plugin declared about
    the answer (see the ``message_types`` hookspec); a type registered without them has
    ``reply_type`` None: its answer is not described.
    """

    name: str
    #: the plugin that registered it
    plugin: str
    #: JSON Schema of the request's ``content`` (None: any object)
    schema: dict[str, Any] | None
    #: what a principal needs to send it (None: nothing)
    permission: str | None
    #: seconds its handler may take (between chunks when streaming)
    timeout: float
    #: JSON Schema of the reply's ``content``; ``"ack"`` when the answer is an ``ack``;
    #: None when not declared
    reply: dict[str, Any] | str | None = None
    #: ``type`` of the reply frame (the request's own unless declared, ``"ack"`` for an
    #: ack); None when the answer is not declared
    reply_type: str | None = None
    #: JSON Schema of each ``chunk`` frame's ``content`` when the handler streams, else None
    chunks: dict[str, Any] | None = None
    #: error codes declared beyond :data:`COMMON_ERRORS`, in :class:`ErrorCode` order
    errors: tuple[ErrorCode, ...] = ()

    def error_codes(self) -> tuple[ErrorCode, ...]:
        """Every code a request of this type may be answered with, in :class:`ErrorCode`
        order: :data:`COMMON_ERRORS`, ``forbidden`` when it needs a permission, and the
        declared ones."""
        codes = COMMON_ERRORS | set(self.errors)
        if self.permission is not None:
            codes |= {ErrorCode.FORBIDDEN}
        return tuple(code for code in ErrorCode if code in codes)


class StashKey(Generic[T]):
    """A typed key for :class:`Stash`; create one per plugin per kind of state."""

    __slots__ = ()


class Stash:
    """Per-plugin state on a shared object (a connection, a session) under typed keys."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], object] = {}

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._data[key])

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __delitem__(self, key: StashKey[T]) -> None:
        del self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: StashKey[T], default: T) -> T:
        """The value under ``key``, or ``default``."""
        return cast(T, self._data.get(key, default))

    def setdefault(self, key: StashKey[T], default: T) -> T:
        """The value under ``key``, storing ``default`` first when absent."""
        return cast(T, self._data.setdefault(key, default))
