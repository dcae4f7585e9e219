"""A connection's inbox: what arrives, in order, until each request has its one answer.

:meth:`Inbox.receive` takes each WebSocket message from the driver: decode, envelope
contract, ``cancel`` (handled on arrival), retries of requests still running (attached,
not run twice), the queue bound. A request that finds nothing ahead of it is handled
right there (:meth:`~backchannel.pipeline.Pipeline.start`: a sync handler answers with
no task switch); otherwise it waits in the queue for the connection's task
(:meth:`Inbox.serve`), which finishes what needs awaiting under the timeout and cancel
machinery of :mod:`backchannel.runtime`.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any
from zlib import crc32

import anyio.lowlevel
import orjson

from .contracts import decode, violations
from .errors import BackchannelError, CloseCode, ErrorCode
from .model import Message
from .pipeline import Rest
from .runtime import Interrupt, Interruptible, Runtime
from .session import Session, answer_again

if TYPE_CHECKING:
    from .connection import Connection
    from .hub import Hub

__all__ = ["Inbox", "Job"]

log = logging.getLogger("backchannel.connection")

_BINARY = "binary frames are not part of protocol v1; send JSON text"
#: requests the connection's task handles in a row before giving the others a turn
_INLINE_RUN = 16


class Job(Interruptible):
    """One request being handled: its message, its session and its deadline."""

    __slots__ = ("message", "session", "runtime", "deadline", "result")

    def __init__(self, message: Message, session: Session, runtime: Runtime) -> None:
        super().__init__()
        self.message = message
        self.session = session
        self.runtime = runtime
        self.deadline = 0.0
        self.result: Any = None

    def interrupt(self, reason: Interrupt) -> None:
        self.runtime.interrupt(self, reason)


class _Continue:
    """A queue item: a request whose sync part ran, with the rest to await."""

    __slots__ = ("job", "rest", "id")

    def __init__(self, job: Job, rest: Rest) -> None:
        self.job = job
        self.rest = rest
        self.id = job.message.id


class Inbox:
    """The requests of one connection: arrival checks, the queue, and the task handling it."""

    __slots__ = ("_conn", "_hub", "_runtime", "_queue", "_signal", "_in_flight", "_early", "_busy")

    def __init__(self, connection: Connection, hub: Hub, runtime: Runtime) -> None:
        self._conn = connection
        self._hub = hub
        self._runtime = runtime
        self._queue: deque[Message | _Continue] = deque()
        self._signal = runtime.signal()
        self._in_flight = 0
        #: messages that arrived before admission (None once admitted)
        self._early: list[str | bytes] | None = []
        #: the connection's task is handling a request
        self._busy = False

    def wake(self) -> None:
        self._signal.set()

    # ----------------------------------------------------------------- arrival

    def receive(self, payload: str | bytes) -> None:
        """A complete WebSocket message arrived."""
        conn = self._conn
        if conn.close_code is not None:  # closing: the client re-sends after resuming
            return
        hub = self._hub
        pipeline = hub.pipeline
        if self._early is not None:  # not admitted yet: nothing is answered before that
            self._wait(payload)
            return
        hub.counters.frames_received += 1
        if type(payload) is not str:
            self._refuse(None, ErrorCode.BAD_JSON, _BINARY)
            return
        try:
            data = decode(payload)
        except orjson.JSONDecodeError as exc:
            why = "nested too deeply" if "depth" in str(exc) else "not valid JSON"
            self._refuse(None, ErrorCode.BAD_JSON, f"message is {why}")
            return
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
            self._refuse(message, ErrorCode.SHUTTING_DOWN, "server is shutting down; reconnect")
            return
        pending = conn.session.pending
        if message.id in pending:  # a retry of a request still queued or running: attach
            self._attach(message)
            return
        if len(self._queue) >= pipeline.max_queued:
            self._refuse(message, ErrorCode.OVERLOADED, "too many requests waiting; retry later")
            return
        pending[message.id] = message
        if self._queue or self._busy or pipeline.max_in_flight != 1:
            self._queue.append(message)
            self._signal.set()
            return
        # Nothing ahead of it: handle it right here, no task switch; a sync handler answers
        # now, an async one's rest goes to the front of the queue for the connection's task.
        answered = conn.session.log.recall(message.id)
        if answered is not None and not isinstance(answered, tuple):
            # a networked broker's recall needs waiting: the connection's task does it
            answered.close()  # type: ignore[attr-defined]
            self._queue.append(message)
            self._signal.set()
            return
        started = self._start(message, answered)
        if started is not None:  # something to await: first in line for the task
            self._queue.appendleft(_Continue(*started))
            self._signal.set()

    def _wait(self, payload: str | bytes) -> None:
        """Before admission: keep the message (a bounded number) for after it."""
        early = self._early
        assert early is not None
        if len(early) < self._hub.pipeline.max_queued:
            early.append(payload)
        else:
            self._conn.close(CloseCode.POLICY_VIOLATION, "too many messages before admission")

    def _refuse(self, message: Message | None, code: ErrorCode, text: str) -> None:
        reply_to = None if message is None else message.id
        self._conn.send_error(reply_to, BackchannelError(code, text), message)

    def _attach(self, message: Message) -> None:
        """A retry of a request still queued or running: its answer will serve both."""
        conn = self._conn
        self._hub.counters.retries += 1
        conn.log_refusal(  # a client's repeats: within its log budget
            logging.INFO,
            "retry attached conn=%s session=%s msg=%s",
            conn.id,
            conn.session.id,
            message.id,
            extra={"connection_id": conn.id, "message_id": message.id},
        )

    def admitted(self) -> None:
        """The connection was admitted: handle what arrived meanwhile, in order."""
        early, self._early = self._early, None
        for payload in early or ():
            self.receive(payload)

    def _bad_envelope(self, data: Any) -> None:
        reply_to = None
        if type(data) is not dict:
            error = BackchannelError(ErrorCode.INVALID_ENVELOPE, "message must be a JSON object")
        else:
            ident = data.get("id")
            if type(ident) is str and 0 < len(ident) <= 128:
                reply_to = ident
            details = violations(self._hub.pipeline.envelope, data)
            text = "; ".join(f"{d['path']}: {d['rule']}" for d in details[:3])
            error = BackchannelError(ErrorCode.INVALID_ENVELOPE, text, details=details)
        self._conn.send_error(reply_to, error)

    def _cancel(self, message: Message) -> None:
        conn = self._conn
        target = message.content.get("target")
        if type(target) is not str:
            conn.send_error(
                message.id,
                BackchannelError(
                    ErrorCode.VALIDATION_FAILED,
                    "content.target: must be of type string",
                    details=[{"path": "content.target", "rule": "must be of type string"}],
                ),
                message,
            )
            return
        cancelled = False
        pending = conn.session.pending
        for queued in self._queue:
            if queued.id == target and queued.__class__ is Message:  # not started yet
                self._queue.remove(queued)
                pending.pop(target, None)
                conn.send_error(
                    target, BackchannelError(ErrorCode.CANCELLED, "cancelled by the client")
                )
                cancelled = True
                break
        job = pending.get(target)
        if isinstance(job, Job):  # running, maybe on the session's previous connection
            job.interrupt(Interrupt.CANCELLED)
            cancelled = True
        conn.send("ack", {"target": target, "cancelled": cancelled}, message.id)

    # ---------------------------------------------------------------- handling

    async def serve(self) -> None:
        """Handle queued requests in order until the connection is closing and its queue
        is empty (with ``message.max_in_flight`` > 1, up to that many at once)."""
        conn = self._conn
        queue = self._queue
        limit = self._hub.pipeline.max_in_flight
        handled = 0
        while True:
            while not queue:
                if conn.close_code is not None:  # closing or closed: nothing more arrives
                    return
                await self._signal.wait()
            handled += 1
            if handled % _INLINE_RUN == 0:  # let other connections run during a flood
                await anyio.lowlevel.checkpoint()
            item = queue.popleft()
            if item.__class__ is _Continue:
                assert isinstance(item, _Continue)
                self._busy = True
                try:
                    await self._finish(item.job, item.rest)
                finally:
                    self._busy = False
                continue
            assert isinstance(item, Message)
            if limit == 1:
                self._busy = True
                try:
                    await self._handle(item)
                finally:
                    self._busy = False
                continue
            while self._in_flight >= limit:
                await self._signal.wait()
            self._in_flight += 1
            self._runtime.spawn(self._handle_concurrent, item)

    async def _handle_concurrent(self, message: Message) -> None:
        try:
            await self._handle(message)
        finally:
            self._in_flight -= 1
            self._signal.set()

    async def _handle(self, message: Message) -> None:
        answered = self._conn.session.log.recall(message.id)
        if answered is not None and not isinstance(answered, tuple):  # a networked broker's
            answered = await answered
        started = self._start(message, answered)
        if started is not None:
            await self._finish(*started)

    def _start(
        self, message: Message, answered: tuple[bytes, int] | None
    ) -> tuple[Job, Rest] | None:
        """Start a retry's answer again, or run the request as far as it goes without
        waiting; the Job and what is left to await, if anything."""
        conn = self._conn
        pending = conn.session.pending
        if answered is not None:
            pending.pop(message.id, None)  # the answer is the original's: nothing to remember
            return self._replay(message, answered)
        rest = self._hub.pipeline.start(conn, message)
        if rest is None:  # answered: a sync handler never needs a Job
            pending.pop(message.id, None)
            return None
        return self._job(message), rest

    def _replay(self, message: Message, answered: tuple[bytes, int]) -> tuple[Job, Rest] | None:
        """A retry of an answered request gets its original answer again
        (:func:`answer_again`), checked as any request is (:meth:`Pipeline.replay`); an
        original error answer is sent again as a refusal (counted, logged within the
        budget, seen by ``error`` observers, so abuse rules count it). A ``validate`` hook
        that awaits leaves a Job for the connection's task, as any request's does."""
        conn = self._conn
        hub = self._hub
        try:
            reply = answer_again(hub, conn, message, answered)
        except Exception as exc:
            hub.pipeline.fail(conn, message, exc)
            return None
        rest = hub.pipeline.replay(conn, message, reply, answered[1])
        if rest is None:
            return None
        job = Job(message, conn.session, self._runtime)
        hub.running.add(job)
        return job, rest

    def _job(self, message: Message) -> Job:
        """The request's rest has to be awaited: it becomes a Job (deadline, cancel)."""
        session = self._conn.session
        job = Job(message, session, self._runtime)
        session.pending[message.id] = job
        self._hub.running.add(job)
        return job

    async def _finish(self, job: Job, rest: Rest) -> None:
        try:
            await self._hub.pipeline.finish(self._conn, job, rest)
        finally:
            self._hub.running.discard(job)
            pending = job.session.pending
            if pending.get(job.message.id) is job:
                del pending[job.message.id]
