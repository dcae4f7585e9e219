"""A connection: one client WebSocket as plugins see it, and its life from handshake to gone.

A :class:`Connection` is admitted (``authenticate`` and ``connect`` hooks), then
hands its messages to its :class:`~backchannel.inbox.Inbox` and its frames to the
transport through :class:`Output`, which enforces the send budget. Its
:class:`State` says where it is; its session (:mod:`backchannel.session`) outlives it.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Protocol

from .errors import BackchannelError, CloseCode, ErrorCode, Reject
from .hooks import HookFailed
from .http import HttpRequest
from .inbox import Inbox
from .model import DEFERRED, Message, Principal, Stash
from .runtime import Runtime
from .session import ANONYMOUS, Replayed, Session, resume

if TYPE_CHECKING:
    from .app import App
    from .hub import Hub

__all__ = ["Connection", "State", "Transport"]

log = logging.getLogger("backchannel.connection")


class Transport(Protocol):
    """What a driver offers a connection."""

    #: monotonic time the peer stopped reading (send buffer full), else None.
    blocked_since: float | None

    def write(self, data: bytes) -> None:
        """Send one text message (encoded JSON)."""

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; abort the TCP connection if it does not finish."""

    def heartbeat(self, now: float, interval: float, timeout: float) -> bool:
        """Ping when ``interval`` passed since the last one; False when a ping is
        unanswered for longer than ``timeout``."""


class State(enum.Enum):
    """Where a connection is in its life (``connection.state``)."""

    #: handshake done; ``authenticate`` and ``connect`` run; its messages wait
    CONNECTING = "connecting"
    #: admitted: its requests are handled (``close_code`` set: the server is closing it)
    OPEN = "open"
    #: the transport is gone; ``disconnect`` hooks run
    CLOSED = "closed"
    #: removed from the App (or never admitted); its session may live on
    GONE = "gone"


_SERVER_SIDE = frozenset({ErrorCode.HANDLER_ERROR, ErrorCode.TIMEOUT, ErrorCode.OVERLOADED})
#: refusals of one connection logged per interval before the rest are only counted
REFUSALS_LOGGED = 5
REFUSAL_INTERVAL = 10.0


class Output:
    """A connection's send side: writes frames and enforces the send budget.

    While the peer is not reading (``transport.blocked_since`` set), every frame written
    waits in the transport's queue; past ``connection.send_queue_size`` of them, or
    ``connection.send_queue_bytes`` of their bytes, the client is a slow consumer (closed
    1013, its session keeps what it missed).
    """

    __slots__ = (
        "_transport",
        "_frames",
        "_bytes",
        "_overflow",
        "_blocked_at",
        "_backlog",
        "_backlog_bytes",
        "open",
    )

    def __init__(self, transport: Transport, frames: int, size: int, overflow: Any) -> None:
        self._transport = transport
        self._frames = frames
        self._bytes = size
        self._overflow = overflow
        self._blocked_at: float | None = None  # the blocked_since we count frames for
        self._backlog = 0  # frames written since then
        self._backlog_bytes = 0  # and their bytes
        #: False once the transport is gone: frames are kept (by the session), not written
        self.open = True

    @property
    def blocked_since(self) -> float | None:
        return self._transport.blocked_since

    def heartbeat(self, now: float, interval: float, timeout: float) -> bool:
        """Ping when due; False when the last ping went unanswered past ``timeout``."""
        return self._transport.heartbeat(now, interval, timeout)

    def write(self, data: bytes) -> None:
        if not self.open:
            return
        transport = self._transport
        transport.write(data)
        blocked = transport.blocked_since
        if blocked is not None:  # the peer is not reading: this frame waits in the queue
            if blocked != self._blocked_at:
                self._blocked_at = blocked
                self._backlog = self._backlog_bytes = 0
            self._backlog += 1
            self._backlog_bytes += len(data)
            if self._backlog > self._frames or self._backlog_bytes > self._bytes:
                self._overflow()


class Connection:
    """One client WebSocket as plugins see it (never a ``websockets`` object).

    Attributes: ``id`` (``c-<instance>.<random>``: the instance names the process
    holding it), ``app``, ``request`` (path, query, headers of the handshake),
    ``remote`` (address, port), ``principal`` (None until authenticated),
    ``session``, ``stash`` (per-plugin state), ``opened_at`` (``time.time()``),
    ``state`` (:class:`State`), ``close_code`` once closing or closed (the code the
    server closed with, else the peer's; 1006 when the TCP connection dropped),
    ``blocked_since`` (monotonic time the client stopped reading, else None).
    """

    __slots__ = (
        "id",
        "app",
        "request",
        "remote",
        "session",
        "stash",
        "opened_at",
        "close_code",
        "state",
        "on_message",
        "principal",
        "_hub",
        "_transport",
        "_runtime",
        "_output",
        "_inbox",
        "_refusals",
    )

    def __init__(
        self, app: App, hub: Hub, request: HttpRequest, transport: Transport, runtime: Runtime
    ) -> None:
        self.app = app
        self._hub = hub
        self.id = f"c-{hub.broker.instance}.{os.urandom(6).hex()}"
        self.request = request
        self.remote = request.remote
        self._transport = transport
        self._runtime = runtime
        #: who is on the other end; None while it has not authenticated (see ``DEFERRED``);
        #: read it, change it with :meth:`authenticate`
        self.principal: Principal | None = None
        self.stash = Stash()
        self.opened_at = time.time()
        self.close_code: int | None = None
        self.state = State.CONNECTING
        limits = hub.settings.connection
        self._output = Output(
            transport, limits.send_queue_size, limits.send_queue_bytes, self._overflow
        )
        # The session gets its principal and its broker log once authenticated.
        self.session = Session(hub, "")
        self.session.attach(self, self._output.write)
        self._inbox = Inbox(self, hub, runtime)
        #: the driver calls it with each complete WebSocket message (the inbox takes it)
        self.on_message = self._inbox.receive
        self._refusals: list[float] | None = None  # [interval start, logged, suppressed]

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.state.value} session={self.session.id}>"

    # ---------------------------------------------------------------- principal

    def authenticate(self, principal: Principal) -> None:
        """Make ``principal`` this connection's.

        For a plugin whose ``authenticate`` hook returned ``DEFERRED``, once the client
        proved who it is (e.g. a token in ``init``): from now on its requests are served
        and its session is kept for a resume by this principal only. Also renews the
        principal (same id: e.g. a refreshed token's permissions), or upgrades an
        anonymous one (its session is kept under the new principal from now on; what
        it kept before is not). Replacing a principal by another id is refused
        (``ValueError``).
        """
        current = self.principal
        if current is not None and current.id != principal.id and not current.anonymous:
            raise ValueError(f"connection {self.id} is {current.id!r}, not {principal.id!r}")
        self.principal = principal
        session = self.session
        if session.principal_id != principal.id:
            session.principal_id = principal.id
            if session.kept:  # an anonymous session upgraded: only the new principal resumes it
                session.log = self._hub.broker.open_session(session.id, principal.id)
        if not session.kept and self.state is State.OPEN:
            self._keep(session)

    def _keep(self, session: Session) -> None:
        """Start keeping ``session`` (a principal is known): it becomes resumable."""
        hub = self._hub
        session.log = hub.broker.open_session(session.id, session.principal_id)
        hub.sessions[session.id] = session

    # ------------------------------------------------------------------- output

    @property
    def blocked_since(self) -> float | None:
        """Monotonic time the client stopped reading (its send buffer is full), else None."""
        return self._transport.blocked_since

    def send(self, type: str, content: Any, reply_to: str | None = None) -> int:
        """Send one frame to this connection's session (see :meth:`Session.send`)."""
        return self.session.send(type, content, reply_to)

    def deliver(self, frame: bytes) -> bool:
        """Write one encoded frame that is not numbered (no ``seq``) and not kept: a room
        frame or notice made once by :meth:`App.encode_frame` and written to many
        connections. It goes through the send budget like any frame (a client that does
        not read it is a slow consumer). False when the connection is not open (nothing
        is written: room frames are recovered by room offset, not from the outbox)."""
        if self.state is State.OPEN and self.close_code is None:
            self._output.write(frame)
            return True
        return False

    def _overflow(self) -> None:
        if self.close_code is None:
            self._hub.slow_consumer(self, "send queue full")

    def send_error(
        self, reply_to: str | None, error: BackchannelError, message: Message | None = None
    ) -> None:
        """Answer with an ``error`` frame; log it with ids, count it, notify observers.

        Refusals (the client's mistakes) are logged at most :data:`REFUSALS_LOGGED`
        times per :data:`REFUSAL_INTERVAL` seconds per connection, then summarised.
        """
        hub = self._hub
        hub.counters.error(error.code.value)
        # a server-side error is logged each time, unless it is only sent again to a retry
        server_side = error.code in _SERVER_SIDE and not isinstance(error, Replayed)
        level = logging.WARNING if server_side else logging.INFO
        if log.isEnabledFor(level):
            args = (error.code.value, self.id, self.session.id, reply_to, error.message)
            extra = {
                "connection_id": self.id,
                "session_id": self.session.id,
                "message_id": reply_to,
                "code": error.code.value,
            }
            text = "error %s conn=%s session=%s msg=%s: %s"
            if server_side:
                log.log(level, text, *args, extra=extra)
            else:
                self.log_refusal(level, text, *args, extra=extra)
        self.session.send("error", error.content(), reply_to)
        if hub.observe_errors:
            hub.gateway.notify(
                "error", connection=self, message_id=reply_to, error=error, message=message
            )

    def log_refusal(self, level: int, text: str, *args: Any, extra: dict[str, Any]) -> bool:
        """Log a line about something this client did wrong (or repeated), within its log
        budget: at most :data:`REFUSALS_LOGGED` lines per :data:`REFUSAL_INTERVAL` seconds,
        the rest counted and summarised in one line. True when the line was logged."""
        if not self._may_log_refusal():
            return False
        log.log(level, text, *args, extra=extra)
        return True

    def _may_log_refusal(self) -> bool:
        """Whether this refusal gets its log line (else it is counted for the summary)."""
        now = time.monotonic()
        budget = self._refusals
        if budget is None or now - budget[0] >= REFUSAL_INTERVAL:
            self._summarise_refusals()
            self._refusals = budget = [now, 0, 0]
        if budget[1] < REFUSALS_LOGGED:
            budget[1] += 1
            return True
        budget[2] += 1
        return False

    def _summarise_refusals(self) -> None:
        budget = self._refusals
        if budget is not None and budget[2]:
            log.info(
                "... %d more refusals from conn=%s in %.0f s (not logged one by one)",
                budget[2],
                self.id,
                time.monotonic() - budget[0],
                extra={"connection_id": self.id, "suppressed": int(budget[2])},
            )
            budget[2] = 0

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close this connection with ``code`` (its session lives on)."""
        if self.close_code is None and self.state is not State.GONE:
            self.close_code = code
            log.info(
                "closing conn=%s code=%d %s",
                self.id,
                code,
                reason,
                extra={"connection_id": self.id, "close_code": code},
            )
            self._transport.close(code, reason)

    @property
    def closing(self) -> bool:
        """The server is closing it, or it is closed."""
        return self.close_code is not None

    # ------------------------------------------------------------------ session

    async def resume(self, session_id: str, last_seq: int) -> dict[str, Any]:
        """Continue session ``session_id`` on this connection, replaying what it missed
        (the ``init`` plugin calls it); see :func:`backchannel.session.resume`."""
        return await resume(self._hub, self, self._output.write, session_id, last_seq)

    # ------------------------------------------------------------ the driver's side

    def on_closed(self, code: int) -> None:
        """The transport is gone (called by the driver, once)."""
        state = self.state
        if state is State.CLOSED or state is State.GONE:
            return
        # A client the server closed (heartbeat, slow consumer) rarely echoes the close:
        # report why the server closed it, not the 1006 of the dropped TCP connection.
        if self.close_code is None:
            self.close_code = code
        self.state = State.CLOSED
        self._output.open = False
        self._inbox.wake()
        if state is State.OPEN:  # leave now; queued and running requests go on
            self._runtime.spawn(self._leave)

    async def run(self) -> None:
        """The connection's task: admit it, then handle its requests in order.

        Requests still queued when the connection closes are handled anyway: they
        belong to the session, and their answers wait in its outbox for a resume.
        Nothing a plugin does escapes this task: a kernel bug closes the connection
        (1011) with a log line instead of reaching the event loop.
        """
        hub = self._hub
        admitted = False
        try:
            hub.admitting += 1  # holds a slot while authenticate/connect hooks await
            try:
                admitted = await self._admit()
            finally:
                hub.admitting -= 1
            if not admitted:
                return
            self.state = State.OPEN
            if self.principal is not None:
                self._keep(self.session)
            hub.add(self, self._output)
            hub.gateway.notify("connection_added", connection=self)
            self._inbox.admitted()
            await self._inbox.serve()
        except Exception:
            log.exception("connection task failed conn=%s", self.id)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            if not admitted:  # refused, or closed while being admitted
                self.state = State.GONE
                self.session.attach(None, None)

    async def _admit(self) -> bool:
        hub = self._hub
        settings = hub.settings
        if len(hub.connections) + hub.admitting > settings.server.max_connections:
            hub.counters.close(CloseCode.TRY_AGAIN_LATER)
            self.close(CloseCode.TRY_AGAIN_LATER, "server is at max_connections")
            return False
        try:
            principal = await hub.gateway.gate("authenticate", connection=self)
            if principal is None:
                auth = settings.auth
                if not auth.allow_anonymous:
                    raise Reject(CloseCode.UNAUTHORIZED, "authentication required")
                principal = Principal(
                    ANONYMOUS + self.id[2:], frozenset(auth.anonymous_permissions), anonymous=True
                )
            if principal is not DEFERRED:
                self.authenticate(principal)
            await hub.gateway.gate("connect", connection=self)
        except Reject as exc:
            hub.counters.close(exc.code)
            self.close(exc.code, exc.reason)
            return False
        except HookFailed as exc:
            hub.gateway.report(exc, f"conn={self.id}", connection_id=self.id)
            hub.counters.close(CloseCode.INTERNAL_ERROR)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
            return False
        return self.close_code is None

    async def _leave(self) -> None:
        """Once per admitted connection: detach the session, run hooks, unregister."""
        hub = self._hub
        session = self.session
        if session.connection is self:
            session.attach(None, None)
            if session.kept:
                hub.broker.detach_session(session.id, session.seq, hub.settings.session.ttl)
        self._summarise_refusals()
        code = self.close_code if self.close_code is not None else 1006
        try:
            await hub.gateway.notify_async("disconnect", connection=self, code=code)
        finally:
            hub.remove(self)
            self.state = State.GONE
            hub.gateway.notify("connection_removed", connection=self, code=code)
            hub.released_left(session)
