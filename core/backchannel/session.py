"""Sessions: a client's conversation, numbered by ``seq``, kept for resume, safe to retry.

A :class:`Session` outlives its connections: every frame sent to it is numbered,
appended to its log in the broker (the outbox that makes resume possible) and written
to the attached connection, if any. :func:`resume` moves a session to a new connection
and replays what the client missed; :func:`answer_again` answers a retry of an answered
request with its original answer instead of running it twice.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .broker import SessionLog
from .contracts import decode, encode
from .errors import BackchannelError, CloseCode, ErrorCode
from .model import Message, Reply, Stash

if TYPE_CHECKING:
    from .connection import Connection
    from .hub import Hub

__all__ = ["ANONYMOUS", "Clock", "Replayed", "Session", "UNKEPT", "answer_again", "resume"]

log = logging.getLogger("backchannel.connection")

#: prefix of anonymous principals' ids
ANONYMOUS = "anonymous:"
#: errors that say "try again": not remembered, so a retry runs the request
RETRYABLE = frozenset({"overloaded", "shutting_down", "rate_limited"})

Write = Callable[[bytes], None]


class Clock:
    """Frame ids and timestamps of one App (the timestamp text is cached per millisecond:
    most frames of a busy second share it)."""

    __slots__ = ("boot", "ids", "_ms", "_text")

    def __init__(self) -> None:
        #: frame ids are ``<boot>-<n>``: unique per App start
        self.boot = os.urandom(3).hex()
        self.ids = itertools.count(1)
        self._ms = -1
        self._text = ""

    def frame_id(self) -> str:
        """A new frame id (``Session.send`` makes its own inline: the hot path)."""
        return f"{self.boot}-{next(self.ids)}"

    def now_iso(self) -> str:
        """UTC time with milliseconds, ISO 8601 (``2026-11-25T10:00:00.123Z``)."""
        now = time.time()
        ms = int(now * 1000)
        if ms != self._ms:
            self._ms = ms
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{ms % 1000:03d}Z"
        return self._text


class _Unkept:
    """The log of a session nothing may resume (a connection not admitted, or admitted
    without a principal): frames reach the client live, and are kept nowhere."""

    def append(self, seq: int, frame: bytes, deliver: Write | None) -> None:
        if deliver is not None:
            deliver(frame)

    async def since(self, seq: int) -> list[bytes] | None:
        return None

    def remember(self, request_id: str, seq: int, digest: int) -> None:
        return None

    def recall(self, request_id: str) -> tuple[bytes, int] | None:
        return None


UNKEPT: SessionLog = _Unkept()


class Session:
    """A client's conversation: numbers frames with ``seq`` and outlives connections.

    For plugins: ``id``, ``principal_id``, ``seq`` (of the last frame), ``connection``
    (attached now, or None), ``stash`` (per-plugin state), ``origin`` (the session whose
    requests this one's may be retries of: itself, or the one its client failed to resume
    and re-sends unanswered requests of) and :meth:`send`. ``pending`` holds the requests
    queued or running, by id (read it, never change it).
    """

    __slots__ = (
        "id",
        "principal_id",
        "seq",
        "connection",
        "stash",
        "pending",
        "origin",
        "log",
        "_hub",
        "_write",
    )

    def __init__(
        self,
        hub: Hub,
        principal_id: str,
        *,
        session_id: str | None = None,
        log: SessionLog = UNKEPT,
        seq: int = 0,
    ) -> None:
        self._hub = hub
        self.id = session_id or "s-" + os.urandom(12).hex()
        self.principal_id = principal_id
        self.seq = seq
        self.connection: Connection | None = None
        self._write: Write | None = None
        self.stash = Stash()
        #: the broker's log of this session (outbox and remembered answers)
        self.log = log
        self.pending: dict[str, Any] = {}
        self.origin = self.id

    def __repr__(self) -> str:
        return f"<Session {self.id} seq={self.seq}>"

    @property
    def kept(self) -> bool:
        """Whether frames are kept for a resume (the session has a principal)."""
        return self.log is not UNKEPT

    def attach(self, connection: Connection | None, write: Write | None) -> None:
        """Deliver frames to ``connection`` through ``write`` from now on (None: keep them
        in the outbox only)."""
        self.connection = connection
        self._write = write

    def send(self, type: str, content: Any, reply_to: str | None = None) -> int:
        """Number, keep and deliver one frame; returns its ``seq``.

        Raises ``TypeError`` (and sends nothing) when ``content`` is not JSON.
        A terminal answer (``replyTo`` set, not a ``chunk``) is remembered for
        safe retries.
        """
        hub = self._hub
        clock = hub.clock
        seq = self.seq + 1
        frame: dict[str, Any] = {"id": f"{clock.boot}-{next(clock.ids)}", "type": type}
        if reply_to is not None or type == "error":
            frame["replyTo"] = reply_to
        frame["content"] = content
        frame["seq"] = seq
        frame["timestamp"] = clock.now_iso()
        data = encode(frame)
        self.seq = seq
        self.log.append(seq, data, self._write)  # the log delivers it once kept
        if (
            reply_to is not None
            and type != "chunk"
            and (type != "error" or content.get("code") not in RETRYABLE)
        ):
            request = self.pending.get(reply_to)
            if request is not None:  # a terminal answer: keep it for safe retries
                if request.__class__ is not Message:
                    request = request.message
                self.log.remember(reply_to, seq, request.digest)
        hub.counters.frames_sent += 1
        if hub.observe_sent:
            hub.gateway.notify("message_sent", connection=self.connection, frame=frame)
        return seq


async def resume(
    hub: Hub, connection: Connection, write: Write, session_id: str, last_seq: int
) -> dict[str, Any]:
    """Continue session ``session_id`` on ``connection``, replaying what it missed.

    Frames with ``seq > last_seq`` are written now, in order, before any new frame.
    Returns ``{"resumed": True, "missed": N}``, or ``{"resumed": False, "reason": ...}``
    when the gap cannot be filled (the connection keeps its new session): the session is
    unknown (``unknown_session``) or was evicted for memory (``evicted``), or its outbox
    no longer holds ``last_seq + 1`` (``trimmed``) or never had it (``ahead``). Raises
    ``forbidden`` for another principal's session, ``unauthorized`` for a connection
    without a principal.
    """
    broker = hub.broker
    fresh = connection.session
    if session_id == fresh.id:
        return {"resumed": True, "missed": 0}
    principal = connection.principal
    if principal is None:
        raise BackchannelError(ErrorCode.UNAUTHORIZED, "authenticate before resuming a session")
    record = await broker.find_session(session_id)
    if record is None:
        if broker.evicted_session(session_id):  # it existed: its retries may come here
            fresh.origin = session_id
            return {"resumed": False, "reason": "evicted"}
        return {"resumed": False, "reason": "unknown_session"}
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
    session = hub.sessions.get(session_id)
    if session is not None and session.seq < record.last_seq:
        # another process numbered frames since (it took the session over, and the
        # takeover message never reached this one): this copy is stale
        hub.take_over(session_id)
        session = None
    if session is None:  # made by another process sharing the broker
        session = Session(
            hub, record.principal_id, session_id=session_id, log=record.log, seq=record.last_seq
        )
        hub.sessions[session_id] = session
    # frames the log got between the two reads (an old holder still flushing): they
    # are replayed below, so this holder numbers after them
    session.seq = max(session.seq, last_seq + len(frames))
    previous = session.connection
    session.attach(connection, write)
    connection.session = session
    if record.principal_id != principal.id:  # taking over an anonymous session
        connection.authenticate(dataclasses.replace(principal, id=record.principal_id))
    broker.attach_session(session_id, session.seq)
    if previous is not None and previous is not connection:
        previous.close(CloseCode.SESSION_TAKEN, "session resumed by another connection")
    # Forget the connection's own new session: nothing can resume it, and it is never
    # detached, so it would never expire. Its pending always holds the request that is
    # resuming (init), and answers of any other go to ``connection.session`` from now on.
    hub.sessions.pop(fresh.id, None)
    broker.drop_session(fresh.id)
    for data in frames:
        write(data)
    replayed = last_seq + len(frames)
    if session.seq > replayed:  # frames added while the log was read (networked broker)
        for data in await record.log.since(replayed) or ():
            write(data)
    hub.counters.resumes += 1
    await hub.gateway.notify_async("session_resumed", session=session, connection=connection)
    return {"resumed": True, "missed": session.seq - last_seq}


def answer_again(
    hub: Hub, connection: Connection, message: Message, answered: tuple[bytes, int]
) -> Reply:
    """A retry of an answered request: its original answer, and nothing run again.

    Returns the original answer as a :class:`Reply`; raises it when it was an error
    (:class:`Replayed`: sent, counted and observed like any error frame), or
    ``invalid_envelope`` when the answer left the outbox (the request was answered: it
    never runs twice). The inbox checks the retry (rate limits apply) and sends it.
    """
    hub.counters.retries += 1
    frame, digest = answered
    differs = digest != message.digest
    # The answer left the outbox, or its seq was reused (a takeover trimmed it): the
    # request was answered, so it must never run twice either way.
    original = decode(frame) if frame else None
    if original is None or original.get("replyTo") != message.id:
        raise BackchannelError(
            ErrorCode.INVALID_ENVELOPE,
            "this request id was already answered and its answer is no longer kept",
        )
    connection.log_refusal(  # a client's repeats: within its log budget
        logging.WARNING if differs else logging.INFO,
        "retry of answered request%s conn=%s session=%s msg=%s: not run again, its "
        "original answer is the answer",
        " with different content" if differs else "",
        connection.id,
        connection.session.id,
        message.id,
        extra={"connection_id": connection.id, "message_id": message.id},
    )
    content = original["content"]
    if original["type"] == "error":
        raise Replayed(content)
    return Reply(original["type"], content)


class Replayed(BackchannelError):
    """An error answer sent again to a retry (its content exactly as first sent); the
    client's repeat, so logged within its refusal budget whatever the code."""

    def __init__(self, content: dict[str, Any]) -> None:
        rest = {k: v for k, v in content.items() if k not in ("code", "message", "details")}
        super().__init__(
            content["code"], content["message"], details=content.get("details"), extra=rest
        )
