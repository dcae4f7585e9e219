"""The hub: every live connection and known session of one App, and the checks over them.

It owns the registries (connections, sessions, running requests), the periodic work
(handler deadlines, slow consumers, session expiry, heartbeat pings), control messages
from other processes sharing the broker, and the graceful drain at shutdown. It also
carries what every connection shares (settings, hook gateway, pipeline, broker,
counters, clock), so a connection needs nothing but its hub.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import anyio

from .broker import Broker
from .config import Settings
from .connection import Connection, Output, State
from .counters import Counters
from .errors import CloseCode
from .hooks import Gateway
from .inbox import Job
from .pipeline import Pipeline
from .runtime import Interrupt
from .session import Clock, Session

if TYPE_CHECKING:
    from .app import App

__all__ = ["Hub", "holder_of"]

log = logging.getLogger("backchannel.connection")


def holder_of(connection_id: str) -> str | None:
    """The broker instance (process) holding ``connection_id``, or None if not one of ours."""
    if not connection_id.startswith("c-"):
        return None
    instance, dot, _ = connection_id[2:].partition(".")
    return instance if dot and instance else None


class Hub:
    """Every live connection of one App, and the periodic checks over them."""

    def __init__(
        self,
        app: App,
        settings: Settings,
        gateway: Gateway,
        pipeline: Pipeline,
        broker: Broker,
        counters: Counters,
    ) -> None:
        self.app = app
        self.settings = settings
        self.gateway = gateway
        self.pipeline = pipeline
        #: the App's broker (replaced at start-up when a plugin supplies one)
        self.broker = broker
        self.counters = counters
        self.clock = Clock()
        self.connections: dict[str, Connection] = {}
        self.outputs: dict[str, Output] = {}
        #: sessions known to this process (attached, or detached within session.ttl)
        self.sessions: dict[str, Session] = {}
        self.running: set[Job] = set()
        self.shutting_down = False
        #: connections past the handshake still in authenticate/connect (they count
        #: against max_connections, so simultaneous handshakes cannot overshoot it)
        self.admitting = 0
        #: sessions taken over by another process whose connection here is closing
        self.released: set[str] = set()
        #: whether anyone observes message_sent / error (read on every frame)
        self.observe_sent = False
        self.observe_errors = False

    def observe(self) -> None:
        """Read which observers exist (after every plugin is registered)."""
        self.observe_sent = self.gateway.has("message_sent")
        self.observe_errors = self.gateway.has("error")

    # ------------------------------------------------------------- registries

    def add(self, connection: Connection, output: Output) -> None:
        self.connections[connection.id] = connection
        self.outputs[connection.id] = output
        counters = self.counters
        counters.connections_total += 1
        counters.connections_peak = max(counters.connections_peak, len(self.connections))

    def holds(self, connection: Connection) -> bool:
        return self.connections.get(connection.id) is connection

    def remove(self, connection: Connection) -> None:
        self.connections.pop(connection.id, None)
        self.outputs.pop(connection.id, None)
        code = connection.close_code or 1006
        self.counters.close(code)
        log.log(
            logging.DEBUG if code in (1000, 1001) else logging.INFO,
            "closed conn=%s session=%s code=%d",
            connection.id,
            connection.session.id,
            code,
            extra={"connection_id": connection.id, "close_code": code},
        )

    def slow_consumer(self, connection: Connection, why: str = "not reading") -> None:
        """Close a client that stopped reading (its session keeps what it missed)."""
        self.counters.error("slow_consumer")
        connection.close(CloseCode.TRY_AGAIN_LATER, f"slow consumer: {why}")

    def expire_sessions(self) -> None:
        """Forget sessions detached for longer than ``session.ttl``; stop their requests."""
        for session_id in self.broker.expired_sessions():
            session = self.sessions.pop(session_id, None)
            if session is None:
                continue
            for job in list(session.pending.values()):
                if isinstance(job, Job):
                    job.interrupt(Interrupt.EXPIRED)
            session.pending.clear()
            self.gateway.notify("session_expired", session=session)

    def broadcast(self, type: str, content: Any) -> int:
        """Send a frame to every connection of this process; returns how many."""
        connections = list(self.connections.values())
        for conn in connections:
            conn.send(type, content)
        return len(connections)

    # ------------------------------------------------------- other processes

    def on_control(self, message: dict[str, Any]) -> None:
        """A control message from another process sharing the broker (:meth:`Broker.tell`)."""
        op = message.get("op")
        if op == "send":
            conn = self.connections.get(message["connection"])
            if conn is None:
                self.counters.control_op("send_unknown_connection")
                log.info("send from another instance to unknown conn=%s", message["connection"])
                return
            conn.send(message["type"], message["content"])
        elif op == "broadcast":
            self.broadcast(message["type"], message["content"])
        elif op == "takeover":
            self.take_over(message["session"])
        elif isinstance(op, str) and "." in op:  # a plugin's ("<plugin>.<what>")
            self.gateway.notify("control_message", app=self.app, message=message)
        else:
            self.counters.control_op("unknown_op")
            log.warning("unknown control message op=%r from another instance", op)
            return
        self.counters.control_op(str(op))

    def take_over(self, session_id: str) -> None:
        """Another process resumed session ``session_id``: forget it here and close the
        connection still holding it (4009), so two processes never number its frames.

        ``session_expired`` observers release what the session held here (room
        memberships) once that connection's ``disconnect`` hooks ran."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        conn = session.connection
        session.attach(None, None)
        if conn is None or conn.state is State.GONE:
            self.gateway.notify("session_expired", session=session)
        else:
            self.released.add(session_id)
            conn.close(CloseCode.SESSION_TAKEN, "session resumed on another instance")

    def released_left(self, session: Session) -> None:
        """A connection left: if its session was taken over meanwhile (and not resumed here
        again since), it is gone from this process now."""
        if session.id in self.released:
            self.released.discard(session.id)
            if session.id not in self.sessions:
                self.gateway.notify("session_expired", session=session)

    # -------------------------------------------------------- periodic checks

    def tick_interval(self) -> float:
        settings = self.settings
        return float(
            max(0.01, min(0.25, settings.message.timeout / 10, settings.heartbeat.interval / 4))
        )

    async def watch(self) -> None:
        """Forever: time out handlers, close slow consumers, expire sessions (one tick)."""
        slow_after = self.settings.connection.slow_consumer_timeout
        interval = self.tick_interval()
        next_expiry = 0.0
        while True:
            await anyio.sleep(interval)
            now = time.monotonic()
            if now >= next_expiry:
                next_expiry = now + 1.0
                self.expire_sessions()
            for job in list(self.running):
                if job.deadline and now > job.deadline:
                    job.interrupt(Interrupt.TIMEOUT)
            for conn_id, output in list(self.outputs.items()):
                blocked = output.blocked_since
                if blocked is not None and now - blocked > slow_after:
                    conn = self.connections.get(conn_id)
                    if conn is not None and conn.close_code is None:
                        self.slow_consumer(conn)

    async def heartbeat(self) -> None:
        """Forever: ping every connection each ``heartbeat.interval``; close silent ones 1011."""
        interval = self.settings.heartbeat.interval
        timeout = self.settings.heartbeat.timeout
        while True:
            await anyio.sleep(min(interval, timeout) / 2)
            now = time.monotonic()
            for conn_id, output in list(self.outputs.items()):
                if not output.heartbeat(now, interval, timeout):
                    conn = self.connections.get(conn_id)
                    if conn is not None:
                        conn.close(CloseCode.INTERNAL_ERROR, "heartbeat timeout")

    async def drain(self, grace: float) -> None:
        """Shutdown: warn every client, give handlers ``grace`` seconds, then close 1001."""
        self.shutting_down = True
        for conn in list(self.connections.values()):
            try:
                conn.send("system", {"event": "going_away", "reconnect": True})
            except Exception:  # never let one connection stop the shutdown
                log.exception("going-away notice failed conn=%s", conn.id)
        with anyio.move_on_after(grace):
            while self.running:
                await anyio.sleep(0.01)
        for job in list(self.running):
            job.interrupt(Interrupt.SHUTTING_DOWN)
        # Interrupted handlers answer `shutting_down` as they unwind: let those errors go
        # out before the close frame (bounded: a handler may swallow its cancellation).
        with anyio.move_on_after(1.0):
            while self.running:
                await anyio.sleep(0.01)
        # The notices and answers are session frames: a networked broker hands them to
        # their connections once kept (write-through); let them leave before the close.
        await self.broker.flush()
        for conn in list(self.connections.values()):
            conn.close(CloseCode.GOING_AWAY, "server shutting down")
