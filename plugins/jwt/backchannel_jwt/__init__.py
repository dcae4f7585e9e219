"""JWT authentication for backchannel, enforced for the whole life of a connection.

Tokens come from the ``Authorization: Bearer`` header or the ``token`` query
parameter (checked in ``authenticate``), or from the ``token`` of ``init``
(checked by a ``wrap_handler`` around init, before it runs, so a resume sees
the authenticated principal). Without a token at the handshake a connection is
anonymous when ``[auth] allow_anonymous`` says so; otherwise it may wait
``init_timeout`` seconds for ``init {token}``, refused everything else
(``unauthorized``), and is closed 4001 when none comes. Before ``exp`` the
client gets a ``system`` ``token_expiring`` notice and answers ``auth.refresh
{token}``; a connection whose token expired is closed 4008 after
``expiry_grace``. Settings: ``schemas/jwt.config.schema.json``; threat model
and codes: ``docs/security.md``.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from backchannel import (
    DEFERRED,
    App,
    BackchannelError,
    CloseCode,
    Connection,
    ErrorCode,
    Message,
    Principal,
    Reject,
    StashKey,
    State,
    hookimpl,
)
from backchannel.contracts import load_schema
from backchannel.http import HttpRequest

from .deadlines import Deadlines
from .model import Rejected, Verified

if TYPE_CHECKING:
    from .verify import Verifier

__all__ = ["Plugin", "Rejected", "Verified"]

log = logging.getLogger("backchannel.jwt")
_PKG = "backchannel_jwt"


@dataclass(slots=True)
class _Auth:
    """Per-connection token state (``connection.stash``)."""

    #: waiting for init {token}; until then only init is served
    pending: bool
    #: monotonic deadline of a pending connection
    deadline: float = 0.0
    #: the token's exp (seconds since the epoch), None without exp
    expires_at: float | None = None
    warned: bool = False
    #: the connection left
    done: bool = False
    #: the deadline this state is scheduled for (older heap entries are skipped)
    next_at: float = -1.0


_STATE = StashKey[_Auth | None]()


def _unauthorized(text: str) -> BackchannelError:
    return BackchannelError(ErrorCode.UNAUTHORIZED, text)


class Plugin:
    """Authenticates connections with JWTs; registers ``auth.refresh``."""

    #: the config table and registration name, also when used in-process (App.use)
    name = "jwt"

    def __init__(self) -> None:
        self.app: App | None = None
        self.verifier: Verifier | None = None
        self.sources: frozenset[str] = frozenset()
        self.init_timeout = 10.0
        self.refresh_before = 60.0
        self.grace = 5.0
        self.leeway = 5.0
        #: counters (read by :meth:`metrics`)
        self.accepted: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.refreshed = 0
        self.expired = 0
        self.timed_out = 0
        self.deadlines: Deadlines[_Auth] = Deadlines(self._due, lambda state: not state.done)

    # set-up -----------------------------------------------------------------

    @hookimpl
    def config_schema(self) -> dict[str, Any]:
        return load_schema(_PKG, "jwt.config.schema.json")

    @hookimpl
    def startup(self, app: App) -> None:
        from . import redact
        from .verify import Verifier

        redact.install()
        cfg = app.plugin_config("jwt")
        self.app = app
        self.verifier = Verifier.from_config(cfg)
        self.sources = frozenset(cfg["sources"])
        self.init_timeout = cfg["init_timeout"]
        self.refresh_before = cfg["refresh_before"]
        self.grace = cfg["expiry_grace"]
        self.leeway = cfg["leeway"]
        app.add_metrics("jwt", lambda: {"jwt": self.metrics()})
        app.spawn(self.deadlines.run)

    @hookimpl
    def message_types(self, register: Callable[..., None]) -> None:
        schema = load_schema(_PKG, "auth.refresh.schema.json")
        register(
            "auth.refresh",
            schema=schema,
            handler=self.refresh,
            reply=schema["$defs"]["reply"],
            errors=["forbidden"],  # a token naming another principal
        )

    @hookimpl(tryfirst=True)  # outermost: the principal is settled before anything else runs
    def wrap_handler(self, type: str, handler: Callable[..., Any]) -> Callable[..., Any] | None:
        if type != "init":
            return None

        async def init(message: Message, connection: Connection) -> Any:
            token = message.content.get("token")
            if token is not None:
                await self._init_token(token, connection)
            elif self._pending(connection):
                raise _unauthorized("send init with a token")
            result = handler(message, connection)
            if inspect.isawaitable(result):
                result = await result
            return result

        return init

    @hookimpl
    def cli_commands(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        from .cli import add_commands

        add_commands(subparsers)

    # connection -------------------------------------------------------------

    @hookimpl
    async def authenticate(self, connection: Connection) -> Principal | object | None:
        token, source = self._handshake_token(connection)
        if token is None:
            app = self._app
            if app.settings.auth.allow_anonymous:
                return None  # the kernel makes the anonymous principal
            if "init" in self.sources and self.init_timeout > 0:
                connection.stash[_STATE] = _Auth(
                    pending=True, deadline=time.monotonic() + self.init_timeout
                )
                # No principal until init {token}: the kernel answers every other
                # request `unauthorized` before looking at its type, and keeps nothing.
                return DEFERRED
            self._count_reject(connection, "no_token", source, "no token")
            return None  # the kernel closes 4001 (unless another plugin authenticates)
        try:
            verified = await self._verify(connection, token, source)
        except Rejected as exc:
            raise Reject(CloseCode.UNAUTHORIZED, exc.message) from None
        connection.stash[_STATE] = _Auth(pending=False, expires_at=verified.expires_at)
        self._count_accept(connection, verified, source)
        return verified.principal

    @hookimpl
    def connection_added(self, connection: Connection) -> None:
        state = connection.stash.get(_STATE, None)
        if state is not None:
            self._plan(connection, state)

    @hookimpl(tryfirst=True)
    def validate(self, message: Message, connection: Connection) -> None:
        state = connection.stash.get(_STATE, None)
        if state is None or state.pending:  # (pending: the kernel lets only init through)
            return
        if (
            state.expires_at is not None
            and time.time() > state.expires_at + self.leeway
            and message.type != "auth.refresh"
            and not (message.type == "init" and "token" in message.content)
        ):
            raise _unauthorized("token expired: send auth.refresh with a new token")

    @hookimpl
    def disconnect(self, connection: Connection, code: int) -> None:
        state = connection.stash.get(_STATE, None)
        if state is not None:
            state.done = True
            self.deadlines.dropped()

    # auth.refresh -----------------------------------------------------------

    async def refresh(self, message: Message, connection: Connection) -> dict[str, Any]:
        """``auth.refresh {token}``: a new token for the same principal."""
        state = connection.stash.get(_STATE, None)
        if state is None or state.pending:
            raise _unauthorized("no token to refresh: send init with a token")
        try:
            verified = await self._verify(connection, message.content["token"], "refresh")
        except Rejected as exc:  # the current token still counts until it expires
            raise _unauthorized(exc.message) from None
        self._same_principal(connection, verified, "refresh")
        self._renew(connection, state, verified)
        self.refreshed += 1
        return {"principal": verified.principal.id, "expiresAt": verified.expires_at}

    # internals --------------------------------------------------------------

    @property
    def _app(self) -> App:
        assert self.app is not None, "jwt plugin used before startup"
        return self.app

    def _pending(self, connection: Connection) -> bool:
        state = connection.stash.get(_STATE, None)
        return state is not None and state.pending

    def _handshake_token(self, connection: Connection) -> tuple[str | None, str]:
        request: HttpRequest = connection.request
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, value = header.strip().partition(" ")
            if scheme.lower() == "bearer":
                if "header" not in self.sources:
                    self._count_reject(connection, "source_disabled", "header", "")
                    raise Reject(CloseCode.UNAUTHORIZED, "bearer tokens are not accepted here")
                value = value.strip()
                if not value:
                    self._count_reject(connection, "malformed", "header", "empty bearer")
                    raise Reject(CloseCode.UNAUTHORIZED, "token malformed")
                return value, "header"
        token = request.query.get("token")
        if token is not None:
            if "query" not in self.sources:
                self._count_reject(connection, "source_disabled", "query", "")
                raise Reject(CloseCode.UNAUTHORIZED, "tokens in the query are not accepted here")
            return token, "query"
        return None, ""

    async def _verify(self, connection: Connection, token: str, source: str) -> Verified:
        """The verified token; :class:`Rejected` is counted and logged, then raised."""
        assert self.verifier is not None
        try:
            return await self.verifier.verify(token)
        except Rejected as exc:
            self._count_reject(connection, exc.reason, source, exc.message)
            raise

    async def _init_token(self, token: str, connection: Connection) -> None:
        """Authenticate (or re-authenticate) the connection from ``init {token}``."""
        if "init" not in self.sources:
            raise _unauthorized("tokens in init are not accepted here")
        try:
            verified = await self._verify(connection, token, "init")
        except Rejected as exc:
            # A bad credential ends the connection, as at the handshake. The close is
            # spawned, so it runs after this request's error answer has been written.
            self._app.spawn(partial(self._close_soon, connection, exc.message))
            raise _unauthorized(exc.message) from None
        state = connection.stash.get(_STATE, None)
        if state is not None and not state.pending:  # already authenticated with a token
            self._same_principal(connection, verified, "init")
            self._renew(connection, state, verified)
            return
        if state is None and connection.session.seq > 0:
            raise BackchannelError(
                ErrorCode.FORBIDDEN, "send the token in the connection's first init"
            )
        connection.authenticate(verified.principal)
        if state is None:
            state = connection.stash[_STATE] = _Auth(pending=False)
        state.pending = False
        self._renew(connection, state, verified)
        self._count_accept(connection, verified, "init")

    def _same_principal(self, connection: Connection, verified: Verified, source: str) -> None:
        current = connection.principal
        if current is None or verified.principal.id != current.id:
            self._count_reject(connection, "other_subject", source, "token names another sub")
            raise BackchannelError(ErrorCode.FORBIDDEN, "the token names another principal")

    def _renew(self, connection: Connection, state: _Auth, verified: Verified) -> None:
        connection.authenticate(verified.principal)  # the new token's permissions apply
        state.expires_at = verified.expires_at
        state.warned = False
        if connection.state is State.OPEN:  # else connection_added plans it
            self._plan(connection, state)

    def _plan(self, connection: Connection, state: _Auth) -> None:
        """Do what is due for this connection's token now; schedule the next deadline."""
        if state.done or connection.close_code is not None:
            return
        mono = time.monotonic()
        if state.pending:
            if mono >= state.deadline:
                self.timed_out += 1
                self._close(connection, CloseCode.UNAUTHORIZED, "no token within init_timeout")
                return
            when = state.deadline
        elif state.expires_at is None:
            return
        else:
            expiry = state.expires_at + self.leeway
            now = time.time()
            if not state.warned and now >= expiry - self.refresh_before:
                state.warned = True
                connection.send(
                    "system",
                    {
                        "event": "token_expiring",
                        "expiresAt": state.expires_at,
                        "expiresIn": max(0.0, round(expiry - now, 3)),
                        "message": "send auth.refresh with a new token",
                    },
                )
            if now >= expiry + self.grace:
                self.expired += 1
                self._close(connection, CloseCode.TOKEN_EXPIRED, "token expired")
                return
            until = expiry + self.grace if state.warned else expiry - self.refresh_before
            when = mono + (until - now)
        state.next_at = when
        self.deadlines.at(when, connection.id, state)

    def _due(self, when: float, connection_id: str, state: _Auth) -> None:
        if when != state.next_at or state.done:
            return  # superseded by a refresh, or the connection left
        connection = self._app.connection(connection_id)
        if connection is not None and connection.stash.get(_STATE, None) is state:
            self._plan(connection, state)

    def _close(self, connection: Connection, code: int, reason: str) -> None:
        connection.close(code, reason)

    async def _close_soon(self, connection: Connection, reason: str) -> None:
        connection.close(CloseCode.UNAUTHORIZED, reason)

    def _count_accept(self, connection: Connection, verified: Verified, source: str) -> None:
        self.accepted[source] = self.accepted.get(source, 0) + 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "jwt accepted conn=%s source=%s principal=%s issuer=%s",
                connection.id,
                source,
                verified.principal.id,
                verified.issuer or "-",
                extra={"connection_id": connection.id},
            )

    def _count_reject(self, connection: Connection, reason: str, source: str, text: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        log.info(
            "jwt rejected conn=%s source=%s reason=%s: %s",
            connection.id,
            source or "-",
            reason,
            text,
            extra={"connection_id": connection.id, "reason": reason},
        )

    def metrics(self) -> dict[str, Any]:
        """Counters since start: accepted by source, rejected by reason, JWKS fetches."""
        issuers = self.verifier.by_iss.values() if self.verifier is not None else ()
        return {
            "accepted": dict(self.accepted),
            "rejected": dict(self.rejected),
            "refreshed": self.refreshed,
            "expired": self.expired,
            "initTimeouts": self.timed_out,
            "jwks": {
                i.keys.name: {"fetches": i.keys.fetches, "failures": i.keys.failures}
                for i in issuers
                if i.keys.jwks_url is not None
            },
        }
