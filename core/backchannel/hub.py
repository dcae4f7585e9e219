"""Connections and sessions: what the kernel knows about each client.

A :class:`Connection` is one WebSocket; a :class:`Session` is the client's
conversation, which numbers every server frame (``seq``) and outlives a
connection. Drivers own the bytes (:class:`Transport`); the :class:`Hub` owns the
set of connections, the periodic heartbeat/timeout/slow-consumer checks and
graceful shutdown.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol
from zlib import crc32

import anyio
import anyio.lowlevel
import orjson

from .broker import Broker, SessionLog
from .contracts import decode, encode, violations
from .errors import BackchannelError, CloseCode, ErrorCode, Reject
from .hooks import HookFailed
from .http import HttpRequest
from .model import Message, Principal, Stash
from .runtime import Interruptible, Runtime

if TYPE_CHECKING:
    from .app import App
    from .pipeline import Pipeline, Rest

__all__ = ["Connection", "Hub", "Job", "Session", "Transport", "holder_of", "now_iso"]

log = logging.getLogger("backchannel.connection")

_BOOT = os.urandom(3).hex()
_isawaitable = inspect.isawaitable
#: prefix of anonymous principals' ids
ANONYMOUS = "anonymous:"
_frame_ids = itertools.count(1)
_ts_ms = -1
_ts_text = ""


def holder_of(connection_id: str) -> str | None:
    """The broker instance (process) holding ``connection_id``, or None if not one of ours."""
    if not connection_id.startswith("c-"):
        return None
    instance, dot, _ = connection_id[2:].partition(".")
    return instance if dot and instance else None


def now_iso() -> str:
    """UTC timestamp with milliseconds, cached per millisecond (hot path)."""
    global _ts_ms, _ts_text
    now = time.time()
    ms = int(now * 1000)
    if ms != _ts_ms:
        _ts_ms = ms
        _ts_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{ms % 1000:03d}Z"
    return _ts_text


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


class Session:
    """A client's conversation: numbers frames with ``seq`` and outlives connections.

    Frames go through the session: each is numbered, kept in the broker's session
    log (the outbox that makes resume possible) and written to the attached
    connection, if any. Requests belong to the session too: ``pending`` holds the
    ones queued or running, so a retry is attached instead of run twice.
    """

    __slots__ = (
        "id",
        "principal_id",
        "seq",
        "connection",
        "stash",
        "log",
        "hub",
        "pending",
        "origin",
    )

    def __init__(
        self,
        hub: Hub,
        principal_id: str,
        *,
        session_id: str | None = None,
        log: SessionLog | None = None,
        seq: int = 0,
    ) -> None:
        self.hub = hub
        self.id = session_id or "s-" + os.urandom(12).hex()
        self.principal_id = principal_id
        self.seq = seq
        self.connection: Connection | None = None
        self.stash = Stash()
        self.log = log if log is not None else hub.broker.open_session(self.id, principal_id)
        self.pending: dict[str, Any] = {}
        #: the session whose requests this one's may be retries of: itself, or the one its
        #: client failed to resume (``ahead``/``trimmed``) and re-sends unanswered requests of
        self.origin = self.id

    def __repr__(self) -> str:
        return f"<Session {self.id} seq={self.seq}>"

    def send(self, type: str, content: Any, reply_to: str | None = None) -> int:
        """Number, keep and deliver one frame; returns its ``seq``.

        Raises ``TypeError`` (and sends nothing) when ``content`` is not JSON.
        A terminal answer (``replyTo`` set, not a ``chunk``) is remembered for
        safe retries.
        """
        seq = self.seq + 1
        frame: dict[str, Any] = {"id": f"{_BOOT}-{next(_frame_ids)}", "type": type}
        if reply_to is not None or type == "error":
            frame["replyTo"] = reply_to
        frame["content"] = content
        frame["seq"] = seq
        frame["timestamp"] = now_iso()
        data = encode(frame)
        self.seq = seq
        self.log.append(seq, data)
        if (
            reply_to is not None
            and type != "chunk"
            and (type != "error" or content.get("code") not in _RETRYABLE)
        ):
            request = self.pending.get(reply_to)
            if request is not None:  # a terminal answer: keep it for safe retries
                if request.__class__ is Job:
                    request = request.message
                self.log.remember(reply_to, seq, request.digest)
        hub = self.hub
        hub.frames_sent += 1
        conn = self.connection
        if conn is not None:
            conn._write(data)
        if hub.app.pipeline.observe_sent:
            hub.app.hooks.notify("message_sent", connection=conn, frame=frame)
        return seq


class _NoLog:
    """The log of a session whose connection is not admitted yet (keeps nothing)."""

    def append(self, seq: int, frame: bytes) -> None:
        return None

    async def since(self, seq: int) -> list[bytes] | None:
        return None

    def remember(self, request_id: str, seq: int, digest: int) -> None:
        return None

    def recall(self, request_id: str) -> tuple[bytes, int] | None:
        return None


_UNADMITTED = _NoLog()


#: requests the connection's task handles in a row before giving the others a turn
_INLINE_RUN = 16

#: errors that say "try again": not remembered, so a retry runs the request
_RETRYABLE = frozenset({"overloaded", "shutting_down", "rate_limited"})


class Job(Interruptible):
    """One request being handled: its message and its deadline."""

    __slots__ = ("message", "deadline", "connection", "result")

    def __init__(self, message: Message, connection: Connection) -> None:
        super().__init__()
        self.message = message
        self.connection = connection
        self.deadline = 0.0
        self.result: Any = None


class Connection:
    """One client WebSocket as plugins see it (never a ``websockets`` object).

    Attributes: ``id``, ``request`` (path, query, headers of the handshake),
    ``remote`` (address, port), ``principal``, ``session``, ``stash`` (per-plugin
    state), ``opened_at`` (``time.time()``), ``close_code`` once closed (the code
    the server closed with, else the peer's; 1006 when the TCP connection dropped).
    """

    __slots__ = (
        "id",
        "app",
        "hub",
        "request",
        "remote",
        "transport",
        "principal",
        "session",
        "stash",
        "opened_at",
        "close_code",
        "accepted",
        "_queue",
        "_signal",
        "_in_flight",
        "_closing",
        "_blocked_at",
        "_backlog",
        "_left",
        "_early",
        "_busy",
        "runtime",
    )

    def __init__(
        self, app: App, request: HttpRequest, transport: Transport, runtime: Runtime
    ) -> None:
        self.app = app
        self.hub = app.hub
        # the instance names the process holding it: app.send from another one finds it
        self.id = f"c-{self.hub.broker.instance}.{os.urandom(6).hex()}"
        self.request = request
        self.remote = request.remote
        self.transport = transport
        self.runtime = runtime
        self.principal: Principal | None = None
        # The session gets its principal and its broker log once admitted.
        self.session = Session(self.hub, "", log=_UNADMITTED)
        self.session.connection = self
        self.stash = Stash()
        self.opened_at = time.time()
        self.close_code: int | None = None
        self.accepted = False
        self._queue: deque[Message | _Continue] = deque()
        self._signal = runtime.signal()
        self._in_flight = 0
        self._closing = 0  # close code the server sent (0: none yet)
        self._blocked_at: float | None = None  # the transport's blocked_since we count for
        self._backlog = 0  # frames written since then (bounded by send_queue_size)
        self._left = False
        self._early: list[str | bytes] | None = []  # messages that arrived before admission
        self._busy = False  # the connection's task is handling a request

    def __repr__(self) -> str:
        return f"<Connection {self.id} session={self.session.id}>"

    # ------------------------------------------------------------------ output

    def send(self, type: str, content: Any, reply_to: str | None = None) -> int:
        """Send one frame to this connection's session (see :meth:`Session.send`)."""
        return self.session.send(type, content, reply_to)

    def _write(self, data: bytes) -> None:
        """Write an encoded frame; close a client whose queue overflows (1013)."""
        if self.close_code is not None:
            return
        transport = self.transport
        transport.write(data)
        blocked = transport.blocked_since
        if blocked is not None:  # the peer is not reading: this frame waits in the queue
            if blocked != self._blocked_at:
                self._blocked_at = blocked
                self._backlog = 0
            self._backlog += 1
            if self._backlog > self.hub.send_queue_size and not self._closing:
                self.app.slow_consumer(self, "send queue full")

    def send_error(
        self, reply_to: str | None, error: BackchannelError, message: Message | None = None
    ) -> None:
        """Answer with an ``error`` frame; log it with ids, count it, notify observers."""
        self.hub.count_error(error.code.value)
        level = logging.WARNING if error.code in _SERVER_SIDE else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "error %s conn=%s session=%s msg=%s: %s",
                error.code.value,
                self.id,
                self.session.id,
                reply_to,
                error.message,
                extra={
                    "connection_id": self.id,
                    "session_id": self.session.id,
                    "message_id": reply_to,
                    "code": error.code.value,
                },
            )
        self.send("error", error.content(), reply_to)
        if self.app.pipeline.observe_errors:
            self.app.hooks.notify("error", connection=self, message_id=reply_to, error=error)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close this connection with ``code`` (its session lives on)."""
        if self.close_code is None and not self._closing:
            self._closing = code
            log.info(
                "closing conn=%s code=%d %s",
                self.id,
                code,
                reason,
                extra={"connection_id": self.id, "close_code": code},
            )
            self.transport.close(code, reason)

    # ------------------------------------------------------------------- input

    def on_message(self, payload: str | bytes) -> None:
        """A complete WebSocket message arrived (called by the driver)."""
        if self._closing:  # the server is closing it: the client re-sends after resuming
            return
        early = self._early
        if early is not None:  # not admitted yet: nothing is answered before that
            if len(early) < self.app.pipeline.max_queued:
                early.append(payload)
            else:
                self.close(CloseCode.POLICY_VIOLATION, "too many messages before admission")
            return
        hub = self.hub
        hub.frames_received += 1
        if type(payload) is not str:
            self.send_error(
                None,
                BackchannelError(
                    ErrorCode.BAD_JSON, "binary frames are not part of protocol v1; send JSON text"
                ),
            )
            return
        try:
            data = decode(payload)
        except orjson.JSONDecodeError as exc:
            why = "nested too deeply" if "depth" in str(exc) else "not valid JSON"
            self.send_error(None, BackchannelError(ErrorCode.BAD_JSON, f"message is {why}"))
            return
        pipeline = self.app.pipeline
        if type(data) is not dict or not pipeline.envelope.is_valid(data):
            self._bad_envelope(data)
            return
        raw = payload.encode()
        message = Message(
            data["id"],
            data["type"],
            data.get("content") or {},
            data.get("sessionId"),
            data.get("timestamp"),
            len(raw),
            crc32(raw),
        )
        if message.type == "cancel":
            self._cancel(message)
            return
        if hub.shutting_down:
            self.send_error(
                message.id,
                BackchannelError(ErrorCode.SHUTTING_DOWN, "server is shutting down; reconnect"),
            )
            return
        pending = self.session.pending
        if message.id in pending:  # a retry of a request still queued or running: attach
            hub.retries += 1
            log.info(
                "retry attached conn=%s session=%s msg=%s",
                self.id,
                self.session.id,
                message.id,
                extra={"connection_id": self.id, "message_id": message.id},
            )
            return
        if len(self._queue) >= pipeline.max_queued:
            self.send_error(
                message.id,
                BackchannelError(ErrorCode.OVERLOADED, "too many requests waiting; retry later"),
            )
            return
        pending[message.id] = message
        if not self._queue and not self._busy and pipeline.max_in_flight == 1:
            self._handle_now(message, pipeline)  # nothing ahead of it: no task switch
        else:
            self._queue.append(message)
            self._signal.set()

    def _bad_envelope(self, data: Any) -> None:
        reply_to = None
        if type(data) is not dict:
            error = BackchannelError(ErrorCode.INVALID_ENVELOPE, "message must be a JSON object")
        else:
            ident = data.get("id")
            if type(ident) is str and 0 < len(ident) <= 128:
                reply_to = ident
            details = violations(self.app.pipeline.envelope, data)
            text = "; ".join(f"{d['path']}: {d['rule']}" for d in details[:3])
            error = BackchannelError(ErrorCode.INVALID_ENVELOPE, text, details=details)
        self.send_error(reply_to, error)

    def _cancel(self, message: Message) -> None:
        target = message.content.get("target")
        if type(target) is not str:
            self.send_error(
                message.id,
                BackchannelError(
                    ErrorCode.VALIDATION_FAILED,
                    "content.target: must be of type string",
                    details=[{"path": "content.target", "rule": "must be of type string"}],
                ),
            )
            return
        cancelled = False
        for queued in self._queue:
            if queued.id == target and queued.__class__ is Message:  # not started yet
                self._queue.remove(queued)
                self.session.pending.pop(target, None)
                self.send_error(
                    target, BackchannelError(ErrorCode.CANCELLED, "cancelled by the client")
                )
                cancelled = True
                break
        job = self.session.pending.get(target)
        if isinstance(job, Job):  # running, maybe on the session's previous connection
            job.connection.runtime.interrupt(job, "cancelled")
            cancelled = True
        self.send("ack", {"target": target, "cancelled": cancelled}, message.id)

    def on_closed(self, code: int) -> None:
        """The transport is gone (called by the driver, once)."""
        if self.close_code is not None:
            return
        # A client the server closed (heartbeat, slow consumer) rarely echoes the close:
        # report why the server closed it, not the 1006 of the dropped TCP connection.
        self.close_code = self._closing or code
        self._signal.set()
        if self.accepted:  # leave now; queued and running requests go on for the session
            self.runtime.spawn(self._leave)

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """The connection's task: admit it, then handle its requests in order.

        Requests still queued when the connection closes are handled anyway: they
        belong to the session, and their answers wait in its outbox for a resume.
        """
        hub = self.hub
        app = self.app
        try:
            hub.admitting += 1  # holds a slot while authenticate/connect hooks await
            try:
                admitted = await self._admit()
            finally:
                hub.admitting -= 1
            if not admitted:
                return
            hub.add(self)
            self.accepted = True
            app.hooks.notify("connection_added", connection=self)
            early, self._early = self._early, None
            for payload in early or ():
                self.on_message(payload)
            if self.close_code is not None:  # closed while being admitted
                self.runtime.spawn(self._leave)
            await self._serve()
        finally:
            if not self.accepted:
                self._detach()

    async def _leave(self) -> None:
        """Once per accepted connection: unregister, detach the session, run hooks."""
        if self._left:
            return
        self._left = True
        self._detach()
        code = self.close_code if self.close_code is not None else 1006
        try:
            await self.app.hooks.notify_async("disconnect", connection=self, code=code)
        finally:
            hub = self.hub
            hub.remove(self)
            self.app.hooks.notify("connection_removed", connection=self, code=code)
            if self.session.id in hub.released:  # taken over by another process
                hub.released.discard(self.session.id)
                if self.session.id not in hub.sessions:  # (not resumed here again since)
                    self.app.hooks.notify("session_expired", session=self.session)

    def _detach(self) -> None:
        session = self.session
        if isinstance(session.log, _NoLog):
            session.connection = None
            return
        if session.connection is self:
            session.connection = None
            self.hub.broker.detach_session(
                session.id, session.seq, self.app.config["session"]["ttl"]
            )

    async def resume(self, session_id: str, last_seq: int) -> dict[str, Any]:
        """Continue session ``session_id`` on this connection, replaying what it missed.

        Frames with ``seq > last_seq`` are written now, in order, before any new
        frame. Returns ``{"resumed": True, "missed": N}``, or ``{"resumed": False,
        "reason": ...}`` when the gap cannot be filled (the connection keeps its
        new session). Raises ``forbidden`` for another principal's session.
        """
        hub = self.hub
        broker = hub.broker
        fresh = self.session
        if session_id == fresh.id:
            return {"resumed": True, "missed": 0}
        record = await broker.find_session(session_id)
        if record is None:
            return {"resumed": False, "reason": "unknown_session"}
        principal = self.principal
        assert principal is not None
        if record.principal_id != principal.id and not (
            # An anonymous session is a bearer token: its unguessable id is the
            # credential, so another anonymous connection may take it over.
            principal.anonymous and record.principal_id.startswith(ANONYMOUS)
        ):
            raise BackchannelError(ErrorCode.FORBIDDEN, "this session belongs to another principal")
        if last_seq > record.last_seq:  # its instance died before storing what it sent
            fresh.origin = session_id
            return {"resumed": False, "reason": "ahead"}
        frames = await record.log.since(last_seq)
        if frames is None:
            fresh.origin = session_id
            return {"resumed": False, "reason": "trimmed"}
        if record.principal_id != principal.id:  # taking over an anonymous session
            self.principal = dataclasses.replace(principal, id=record.principal_id)
        session = hub.sessions.get(session_id)
        if session is not None and session.seq < record.last_seq:
            # another process numbered frames since (it took the session over, and the
            # takeover message never reached this one): this copy is stale
            hub.take_over(session_id)
            session = None
        if session is None:  # made by another process sharing the broker
            session = Session(
                hub,
                record.principal_id,
                session_id=session_id,
                log=record.log,
                seq=record.last_seq,
            )
            hub.sessions[session_id] = session
        # frames the log got between the two reads (an old holder still flushing): they
        # are replayed below, so this holder numbers after them
        session.seq = max(session.seq, last_seq + len(frames))
        previous = session.connection
        session.connection = self
        self.session = session
        broker.attach_session(session_id, session.seq)
        if previous is not None and previous is not self:
            previous.close(CloseCode.SESSION_TAKEN, "session resumed by another connection")
        # Forget the connection's own new session: nothing can resume it, and it is never
        # detached, so it would never expire. Its pending always holds the request that is
        # resuming (init), and answers of any other go to ``self.session`` from now on.
        hub.sessions.pop(fresh.id, None)
        broker.drop_session(fresh.id)
        for data in frames:
            self._write(data)
        replayed = last_seq + len(frames)
        if session.seq > replayed:  # frames added while the log was read (networked broker)
            for data in await record.log.since(replayed) or ():
                self._write(data)
        hub.resumes += 1
        await self.app.hooks.notify_async("session_resumed", session=session, connection=self)
        return {"resumed": True, "missed": session.seq - last_seq}

    async def _admit(self) -> bool:
        app = self.app
        hub = self.hub
        if hub.active + hub.admitting > app.config["server"]["max_connections"]:
            hub.count_close(CloseCode.TRY_AGAIN_LATER)
            self.close(CloseCode.TRY_AGAIN_LATER, "server is at max_connections")
            return False
        try:
            principal = await app.hooks.call_first("authenticate", connection=self)
            if principal is None:
                auth = app.config["auth"]
                if not auth["allow_anonymous"]:
                    raise Reject(CloseCode.UNAUTHORIZED, "authentication required")
                principal = Principal(
                    ANONYMOUS + self.id[2:],
                    frozenset(auth["anonymous_permissions"]),
                    anonymous=True,
                )
            self.principal = principal
            session = self.session
            session.principal_id = principal.id
            session.log = hub.broker.open_session(session.id, principal.id)
            hub.sessions[session.id] = session
            await app.hooks.call_all("connect", connection=self)
        except Reject as exc:
            hub.count_close(exc.code)
            self.close(exc.code, exc.reason)
            return False
        except HookFailed as exc:
            app.hooks.record_failure(exc.hook, exc.plugin)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
            return False
        return self.close_code is None

    async def _serve(self) -> None:
        pipeline = self.app.pipeline
        queue = self._queue
        limit = pipeline.max_in_flight
        handled = 0
        while True:
            while not queue:
                if self.close_code is not None:
                    return
                await self._signal.wait()
            handled += 1
            if handled % _INLINE_RUN == 0:  # let other connections run during a flood
                await anyio.lowlevel.checkpoint()
            message = queue.popleft()
            if isinstance(message, _Continue):
                self._busy = True
                try:
                    await self._finish(message.job, message.rest, pipeline)
                finally:
                    self._busy = False
                continue
            if limit == 1:
                self._busy = True
                try:
                    await self._handle(message, pipeline)
                finally:
                    self._busy = False
                continue
            while self._in_flight >= limit:
                await self._signal.wait()
            self._in_flight += 1
            self.runtime.spawn(self._handle_concurrent, message, pipeline)

    async def _handle_concurrent(self, message: Message, pipeline: Any) -> None:
        try:
            await self._handle(message, pipeline)
        finally:
            self._in_flight -= 1
            self._signal.set()

    async def _handle(self, message: Message, pipeline: Pipeline) -> None:
        answered = self.session.log.recall(message.id)
        if answered is not None and _isawaitable(answered):  # a networked broker's log
            answered = await answered
        started = self._start(message, answered, pipeline)
        if started is not None:
            await self._finish(*started, pipeline)

    def _handle_now(self, message: Message, pipeline: Pipeline) -> None:
        """:meth:`_handle` without waiting: a sync handler answers right here; an
        async one's rest goes to the front of the queue for the connection's task."""
        answered = self.session.log.recall(message.id)
        if answered is not None and _isawaitable(answered):  # needs waiting: queue it
            answered.close()  # type: ignore[attr-defined]
            self._queue.append(message)
            self._signal.set()
            return
        started = self._start(message, answered, pipeline)
        if started is not None:
            self._queue.appendleft(_Continue(*started))
            self._signal.set()

    def _start(
        self, message: Message, answered: tuple[bytes, int] | None, pipeline: Pipeline
    ) -> tuple[Job, Rest] | None:
        """Answer a retry again, or run the request as far as it goes without waiting;
        the Job and what is left to await, if anything."""
        pending = self.session.pending
        if answered is not None:
            pending.pop(message.id, None)
            self._answer_again(message, answered)
            return None
        rest = pipeline.start(self, message)
        if rest is None:  # answered: a sync handler never needs a Job
            pending.pop(message.id, None)
            return None
        job = Job(message, self)
        pending[message.id] = job
        self.hub.running.add(job)
        return job, rest

    async def _finish(self, job: Job, rest: Rest, pipeline: Pipeline) -> None:
        try:
            await pipeline.finish(self, job, rest)
        finally:
            self._done(job)

    def _done(self, job: Job) -> None:
        self.hub.running.discard(job)
        pending = job.connection.session.pending
        if pending.get(job.message.id) is job:
            del pending[job.message.id]

    def _answer_again(self, message: Message, answered: tuple[bytes, int]) -> None:
        """A retry of an answered request: send the original answer again, run nothing."""
        self.hub.retries += 1
        frame, digest = answered
        differs = digest != message.digest
        # The answer left the outbox, or its seq was reused (a takeover trimmed it): the
        # request was answered, so it must never run twice either way.
        original = decode(frame) if frame else None
        if original is None or original.get("replyTo") != message.id:
            self.send_error(
                message.id,
                BackchannelError(
                    ErrorCode.INVALID_ENVELOPE,
                    "this request id was already answered and its answer is no longer kept",
                ),
            )
            return
        log.log(
            logging.WARNING if differs else logging.INFO,
            "retry of answered request%s conn=%s session=%s msg=%s: original answer sent again",
            " with different content" if differs else "",
            self.id,
            self.session.id,
            message.id,
            extra={"connection_id": self.id, "message_id": message.id},
        )
        self.session.send(original["type"], original["content"], message.id)

    def jobs(self) -> Iterator[Job]:
        """Requests of this connection's session being handled now."""
        return iter([j for j in self.session.pending.values() if isinstance(j, Job)])


_SERVER_SIDE = frozenset({ErrorCode.HANDLER_ERROR, ErrorCode.TIMEOUT, ErrorCode.OVERLOADED})


class _Continue:
    """A queue item: a request whose sync part ran, with the rest to await."""

    __slots__ = ("job", "rest", "id")

    def __init__(self, job: Job, rest: Rest) -> None:
        self.job = job
        self.rest = rest
        self.id = job.message.id


class Hub:
    """Every live connection of one App, and the periodic checks over them."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.send_queue_size: int = app.config["connection"]["send_queue_size"]
        self.connections: dict[str, Connection] = {}
        #: sessions known to this process (attached, or detached within session.ttl)
        self.sessions: dict[str, Session] = {}
        self.running: set[Job] = set()
        self.retries = 0
        self.resumes = 0
        self.shutting_down = False
        self.total = 0
        self.peak = 0
        self.frames_received = 0
        self.frames_sent = 0
        self.errors: dict[str, int] = {}
        self.closes: dict[int, int] = {}
        #: refused handshakes by HTTP status ("403") or "timeout"
        self.rejected: dict[str, int] = {}
        #: connections past the handshake still in authenticate/connect (they count
        #: against max_connections, so simultaneous handshakes cannot overshoot it)
        self.admitting = 0
        #: control messages from other processes handled here, by op
        self.control: dict[str, int] = {}
        #: sessions taken over by another process whose connection here is closing
        self.released: set[str] = set()

    @property
    def active(self) -> int:
        return len(self.connections)

    @property
    def broker(self) -> Broker:
        return self.app.broker

    def expire_sessions(self) -> None:
        """Forget sessions detached for longer than ``session.ttl``; stop their requests."""
        for session_id in self.broker.expired_sessions():
            session = self.sessions.pop(session_id, None)
            if session is None:
                continue
            for job in list(session.pending.values()):
                if isinstance(job, Job):
                    job.connection.runtime.interrupt(job, "expired")
            session.pending.clear()
            self.app.hooks.notify("session_expired", session=session)

    def broadcast(self, type: str, content: Any) -> int:
        """Send a frame to every connection of this process; returns how many."""
        connections = list(self.connections.values())
        for conn in connections:
            conn.send(type, content)
        return len(connections)

    def on_control(self, message: dict[str, Any]) -> None:
        """A control message from another process sharing the broker (:meth:`Broker.tell`)."""
        op = message.get("op")
        if op == "send":
            conn = self.connections.get(message["connection"])
            if conn is None:
                self.count_control("send_unknown_connection")
                log.info("send from another instance to unknown conn=%s", message["connection"])
                return
            conn.send(message["type"], message["content"])
        elif op == "broadcast":
            self.broadcast(message["type"], message["content"])
        elif op == "takeover":
            self.take_over(message["session"])
        elif isinstance(op, str) and "." in op:  # a plugin's ("<plugin>.<what>")
            self.app.hooks.notify("control_message", app=self.app, message=message)
        else:
            self.count_control("unknown_op")
            log.warning("unknown control message op=%r from another instance", op)
            return
        self.count_control(str(op))

    def take_over(self, session_id: str) -> None:
        """Another process resumed session ``session_id``: forget it here and close the
        connection still holding it (4009), so two processes never number its frames.

        ``session_expired`` observers release what the session held here (room
        memberships) once that connection's ``disconnect`` hooks ran."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        conn, session.connection = session.connection, None
        if conn is None or conn._left:
            self.app.hooks.notify("session_expired", session=session)
        else:
            self.released.add(session_id)
            conn.close(CloseCode.SESSION_TAKEN, "session resumed on another instance")

    def count_control(self, name: str) -> None:
        self.control[name] = self.control.get(name, 0) + 1

    def add(self, connection: Connection) -> None:
        self.connections[connection.id] = connection
        self.total += 1
        self.peak = max(self.peak, len(self.connections))

    def remove(self, connection: Connection) -> None:
        self.connections.pop(connection.id, None)
        code = connection.close_code or 1006
        self.count_close(code)
        log.log(
            logging.DEBUG if code in (1000, 1001) else logging.INFO,
            "closed conn=%s session=%s code=%d",
            connection.id,
            connection.session.id,
            code,
            extra={"connection_id": connection.id, "close_code": code},
        )

    def count_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def count_close(self, code: int) -> None:
        self.closes[code] = self.closes.get(code, 0) + 1

    def count_rejected(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def tick_interval(self) -> float:
        cfg = self.app.config
        return float(
            max(0.01, min(0.25, cfg["message"]["timeout"] / 10, cfg["heartbeat"]["interval"] / 4))
        )

    async def watch(self) -> None:
        """Forever: time out handlers and close slow consumers (one tick for all)."""
        slow_after = self.app.config["connection"]["slow_consumer_timeout"]
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
                    job.connection.runtime.interrupt(job, "timeout")
            for conn in list(self.connections.values()):
                blocked = conn.transport.blocked_since
                if blocked is not None and now - blocked > slow_after:
                    self.app.slow_consumer(conn)

    async def heartbeat(self) -> None:
        """Forever: ping every connection each ``heartbeat.interval``; close silent ones 1011."""
        cfg = self.app.config["heartbeat"]
        interval, timeout = cfg["interval"], cfg["timeout"]
        while True:
            await anyio.sleep(min(interval, timeout) / 2)
            now = time.monotonic()
            for conn in list(self.connections.values()):
                if not conn.transport.heartbeat(now, interval, timeout):
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
            job.connection.runtime.interrupt(job, "shutting_down")
        # Interrupted handlers answer `shutting_down` as they unwind: let those errors go
        # out before the close frame (bounded: a handler may swallow its cancellation).
        with anyio.move_on_after(1.0):
            while self.running:
                await anyio.sleep(0.01)
        for conn in list(self.connections.values()):
            conn.close(CloseCode.GOING_AWAY, "server shutting down")
