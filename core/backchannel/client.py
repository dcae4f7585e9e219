"""A Python client for backchannel: requests, streams, rooms, and reconnects that lose nothing.

::

    from backchannel.client import connect

    async with connect("ws://127.0.0.1:8765/ws", token=jwt) as client:
        reply = await client.request("text", {"text": "hi"})
        room = client.subscribe("lobby")
        await room.publish("hello, room")
        async for item in room:
            ...  # a room message (dict), or a Gap where history could not fill a hole

Frames the server pushes without a request (``app.send``, ``app.broadcast``,
``system`` notices) go to ``on_push=`` and to :meth:`Client.pushes`. ``origin=``
and ``headers=`` go into the opening handshake: a server with an Origin allow-list
(``server.origins``) refuses a client without a listed ``origin`` with HTTP 403,
raised as :class:`HandshakeRefused`.

Runs on asyncio and Trio (anyio streams + the Sans-I/O
:class:`~backchannel.websocket.ClientWire`). After a drop it reconnects with
exponential backoff and full jitter, resumes its session (``init {sessionId,
lastSeq, epoch}``; frames replayed twice are dropped by ``seq``), re-joins its rooms with
``since`` (a room delivers nothing to a resumed session until it is joined again;
room messages replayed twice are dropped by offset) and re-sends every request
without a terminal answer under the same id (the server answers a retried id
once). If the server cannot resume (state ``resynced``) the re-sent requests run
in a new session: one that had already run before the drop may run again.

Two streams reach the client: the session's frames (answers, pushes; numbered by
``seq``) and the rooms' frames (``room``, ``offset``, ``epoch``; no ``seq``). Each
is in order; nothing orders one against the other, so a subscription takes room
messages from room frames only (a publish's reply just answers the request) and
holds them while its join is unanswered.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import math
import random
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
import orjson

from . import __version__
from .errors import ErrorCode
from .websocket import ClientWire

__all__ = [
    "Backoff",
    "Client",
    "ClientError",
    "ConnectError",
    "ConnectionClosed",
    "Gap",
    "HandshakeRefused",
    "Pushes",
    "RequestError",
    "RequestTimeout",
    "State",
    "Subscription",
    "connect",
]

log = logging.getLogger("backchannel.client")

#: Close codes after which reconnecting would only repeat the refusal (policy,
#: unauthorized, forbidden) or fight another client for the session (taken over).
NO_RETRY = frozenset({1008, 4001, 4003, 4009})
#: Error codes of an ``init`` answer that mean "not now" (the server is overloaded, e.g.
#: its broker is away; shutting down; rate limiting): reconnect with backoff, keeping the
#: session to resume, even before the first connection succeeded.
RETRY_INIT = frozenset({ErrorCode.OVERLOADED, ErrorCode.SHUTTING_DOWN, ErrorCode.RATE_LIMITED})
_CLOSE_TIMEOUT = 5.0


class State(enum.StrEnum):
    """Connection states, in the order a client usually sees them.

    ``on_state`` info: connecting ``{url}``; connected ``{sessionId}``; reconnecting
    ``{attempt, delay, code, reason}``; resumed ``{sessionId, missed}``; resynced
    ``{sessionId, previous, reason, resent}``; closed ``{code, reason}``.
    """

    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    RESUMED = "resumed"  # same session: nothing lost
    RESYNCED = "resynced"  # resume refused: new session, re-sent requests may run twice
    CLOSED = "closed"


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: exponential with full jitter, so a crowd of clients spreads out."""

    initial: float = 0.1
    maximum: float = 10.0
    factor: float = 2.0
    max_attempts: int | None = None  # consecutive failed attempts before giving up

    def delay(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (0-based)."""
        return random.uniform(0, min(self.maximum, self.initial * self.factor ** min(attempt, 64)))


DEFAULT_BACKOFF = Backoff()


class ClientError(Exception):
    """Base of the client's exceptions."""


class RequestError(ClientError):
    """The server answered a request with an ``error`` frame."""

    def __init__(self, request_id: str | None, content: dict[str, Any]) -> None:
        raw = str(content.get("code", ""))
        self.code: ErrorCode | str = raw  # an ErrorCode unless the server sent an unknown code
        with contextlib.suppress(ValueError):
            self.code = ErrorCode(raw)
        self.message: str = str(content.get("message", ""))
        self.details: list[dict[str, Any]] | None = content.get("details")
        self.retry_after: float | None = content.get("retryAfter")
        self.request_id, self.content = request_id, content
        super().__init__(f"{raw}: {self.message}")


class RequestTimeout(ClientError, TimeoutError):
    """No terminal answer in time (the request is forgotten, not cancelled)."""


class ConnectionClosed(ClientError):
    """The client closed for good (:meth:`Client.close`, a no-retry close code, or
    too many failed reconnects): nothing more will be answered."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}) {reason}".strip())
        self.code, self.reason = code, reason


class ConnectError(ClientError):
    """The first connection failed (no reconnecting before one success)."""


class HandshakeRefused(ConnectError):
    """The server answered the opening handshake with an HTTP error instead of a WebSocket.

    ``status`` is that HTTP status (None if it could not be read). A backchannel
    server answers 403 when ``server.origins`` (its Origin allow-list) does not
    list the client's ``Origin`` header; 404 when the path is not its WebSocket path.
    """

    def __init__(self, url: str, status: int | None, why: str, origin: str | None) -> None:
        message = f"{url} refused the WebSocket handshake: {why}"
        if status == 403:
            sent = repr(origin) if origin else "none sent"
            message += (
                f". The server's Origin allow-list (server.origins) does not list this"
                f" client's Origin ({sent}): pass origin= one of the listed origins"
            )
        super().__init__(message)
        self.url, self.status = url, status


@dataclass(frozen=True)
class Gap:
    """Yielded by a subscription where history could not fill a hole: messages may be
    missing before the next one. ``reason``: ``not_recovered`` or ``epoch_changed``."""

    room: str
    reason: str
    epoch: str | None = None
    offset: int | None = None


class _Mailbox:
    """Unbounded single-consumer queue: the reader must never wait for a slow consumer."""

    def __init__(self) -> None:
        self.items: deque[tuple[str, Any]] = deque()
        self._event = anyio.Event()

    def put(self, kind: str, value: Any) -> None:
        self.items.append((kind, value))
        self._event.set()

    async def get(self) -> tuple[str, Any]:
        while not self.items:
            await self._event.wait()
            self._event = anyio.Event()
        return self.items.popleft()


_T = TypeVar("_T")


class _Feed(Generic[_T]):
    """An async iterator over a mailbox: its items, then its end, or the error that ended it."""

    def __init__(self) -> None:
        self._box = _Mailbox()

    def __aiter__(self) -> _Feed[_T]:
        return self

    async def __anext__(self) -> _T:
        kind, value = await self._box.get()
        if kind == "item":
            item: _T = value
            return item
        self._box.put(kind, value)  # stay ended
        if kind == "end":
            raise StopAsyncIteration
        raise value


class _Link:
    """One WebSocket connection: stream, wire, writer wake-up, and init progress."""

    def __init__(self, stream: anyio.abc.ByteStream, wire: ClientWire, token: str | None) -> None:
        self.stream, self.wire, self.token = stream, wire, token
        self.wake = anyio.Event()
        self.ready = anyio.Event()  # the init answer arrived
        self.init_id = ""
        self.early: list[dict[str, Any]] = []  # frames before the init answer
        self.failure = ""
        self.refused: str | None = None  # resume refused by an error: its code; start anew
        #: init answered "not now" (RETRY_INIT): seconds to wait at least (retryAfter, or 0)
        self.busy: float | None = None
        self.tasks: anyio.abc.TaskGroup | None = None  # ends with the connection

    def send(self, data: bytes) -> None:
        if self.wire.send_text(data):
            self.wake.set()


class Subscription(_Feed[dict[str, Any] | Gap]):
    """Messages of one room (dicts: room, offset, epoch, from, text) and :class:`Gap` markers.

    An async iterator; :meth:`publish` sends to the room; ``aclose()`` leaves the room
    and ends it.
    """

    def __init__(self, client: Client, room: str, since: dict[str, Any] | None) -> None:
        super().__init__()
        self.room = room
        self.epoch: str | None = since["epoch"] if since else None
        self.offset: int | None = since["offset"] if since else None
        self._client = client
        #: room messages that arrived while a join was unanswered (None: not joining)
        self._held: list[dict[str, Any]] | None = None

    def since(self) -> dict[str, Any] | None:
        """Position of the last message seen, for a re-join."""
        if self.offset is None or self.epoch is None:
            return None
        return {"offset": self.offset, "epoch": self.epoch}

    def _deliver(self, content: dict[str, Any]) -> None:
        """A room frame's message: held while a join is unanswered (the answer may say
        that a gap comes first), else yielded unless seen already."""
        if self._held is not None:
            self._held.append(content)
            return
        epoch, offset = content.get("epoch"), content["offset"]
        if self.epoch is not None and epoch != self.epoch:
            self._box.put("item", Gap(self.room, "epoch_changed", epoch, offset))
        elif self.offset is not None and offset <= self.offset:
            return  # seen already (a join's replay and live delivery overlap)
        self.epoch, self.offset = epoch, offset
        self._box.put("item", content)

    def _joining(self) -> None:
        if self._held is None:
            self._held = []

    def _joined(self, content: dict[str, Any], asked: dict[str, Any] | None) -> None:
        lost = asked is not None and content.get("recovered") is False
        epoch, offset = content.get("epoch"), content.get("offset")
        if lost:
            self._box.put("item", Gap(self.room, "not_recovered", epoch))
        if lost or self.offset is None or epoch != self.epoch:
            self.epoch, self.offset = epoch, offset  # the room's latest message, not ours
        held, self._held = self._held or [], None
        for message in held:  # the replay, then live messages, in offset order
            self._deliver(message)

    async def publish(self, text: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Send ``text`` to the room; return the stored message ``{room, offset, epoch,
        from, text}`` (this subscription yields it too, in its place).

        Raises as :meth:`Client.request` does (e.g. ``forbidden`` without the
        ``rooms`` permission to publish).
        """
        content = {"room": self.room, "text": text}
        return await self._client.request("text", content, timeout=timeout)

    async def aclose(self) -> None:
        """Leave the room (the answer is not awaited) and end the iteration."""
        self._client._leave(self)


class Pushes(_Feed[dict[str, Any]]):
    """Frames the server sends without a request (``app.send``, ``app.broadcast``,
    ``system`` notices, ``error`` frames that answer no request, ``presence`` events,
    messages of rooms not subscribed to): whole frames (``type``, ``content``, ``id``,
    ``timestamp``, and ``seq`` for session frames or ``room`` for room frames), each
    once, in the order of their stream.

    From :meth:`Client.pushes`: it keeps what arrives after it was made until read,
    so make it before entering the client to miss nothing, and only to read it. Ends
    when the client is closed (:class:`ConnectionClosed` if the server ended it);
    ``aclose()`` stops it earlier.
    """

    def __init__(self, client: Client) -> None:
        super().__init__()
        self._client = client

    async def aclose(self) -> None:
        """Stop collecting pushes and end the iteration."""
        self._client._pushes.discard(self)
        self._box.put("end", None)


StateCallback = Callable[[State, dict[str, Any]], None]
PushCallback = Callable[[dict[str, Any]], None]
TokenProvider = Callable[[], Awaitable[str]]


class Client:
    """A connection to a backchannel server that survives drops; use as ``async with``.

    Entering connects and starts the session. The first connection must succeed
    (else :class:`ConnectError`): a wrong URL or a refused token fails at once
    instead of retrying forever. An ``init`` answered ``overloaded``,
    ``shutting_down`` or ``rate_limited`` is "not now": the client drops that
    connection and reconnects with backoff (waiting at least ``retryAfter``), before
    the first connection too, keeping the session it resumes. ``token`` (or
    ``token_provider``, awaited before every connection) goes in the
    ``Authorization`` header and in ``init``; a
    ``system`` ``token_expiring`` notice is answered with ``auth.refresh`` and a
    token from ``token_provider``.
    ``on_state(state, info)`` is called on every :class:`State` change;
    ``on_push(frame)`` with every frame the server pushes (see :class:`Pushes`).
    ``origin`` (the ``Origin`` header) and ``headers`` go into every opening
    handshake: a server whose ``server.origins`` lists origins refuses a client
    without one of them (:class:`HandshakeRefused`, HTTP 403).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        reconnect: bool = True,
        backoff: Backoff = DEFAULT_BACKOFF,
        heartbeat: float | None = 15.0,
        on_state: StateCallback | None = None,
        on_push: PushCallback | None = None,
        origin: str | None = None,
        headers: Mapping[str, str] | None = None,
        request_timeout: float = 30.0,
    ) -> None:
        headers = dict(headers or {})
        named = {name.lower() for name in headers}
        if origin is not None and "origin" in named:
            raise ValueError("give the Origin once: origin= or headers=, not both")
        if (token or token_provider) and "authorization" in named:
            raise ValueError("token= and token_provider= set the Authorization header")
        if origin is not None:
            headers["Origin"] = origin
        self.url, self.token, self.token_provider = url, token, token_provider
        self.origin, self.headers, self.on_push = origin, headers, on_push
        self.reconnect, self.backoff, self.heartbeat = reconnect, backoff, heartbeat
        self.on_state, self.request_timeout = on_state, request_timeout
        self.session_id: str | None = None
        self.last_seq = 0  # highest seq delivered in this session
        self.epoch: str | None = None  # the broker epoch of the session (init's answer)
        self.state = State.CONNECTING
        self.close_code: int | None = None
        self._ids = itertools.count(1)
        self._pending: dict[str, tuple[bytes, _Mailbox]] = {}  # id -> request, its answers
        self._rooms: dict[str, Subscription] = {}
        self._pushes: set[Pushes] = set()
        self._refusal: HandshakeRefused | None = None  # the last refused handshake
        self._joins: dict[str, tuple[Subscription, dict[str, Any] | None]] = {}
        self._link: _Link | None = None
        self._connected = False  # an init was answered at least once
        self._closing = False  # close() was called
        self._fatal: Exception | None = None  # why to stop without retrying
        # Shielded: a caller cancelled inside ``async with`` still gets a clean close
        # (1000) from __aexit__; only close() stops the background task.
        self._scope = anyio.CancelScope(shield=True)
        self._tg: anyio.abc.TaskGroup | None = None
        self._started = anyio.Event()  # first init answered, or gave up
        self._done = anyio.Event()

    async def __aenter__(self) -> Client:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._run)
        try:
            await self._started.wait()
        except BaseException:  # cancelled while connecting
            await self._shutdown()
            raise
        if not self._connected:
            await self._shutdown()
            if isinstance(self._fatal, ConnectError):
                raise self._fatal
            raise ConnectError(str(self._fatal)) from self._fatal
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        # Leave the task group without the caller's exception (the background task is
        # over by then): that exception then comes out as raised, not in a group.
        assert self._tg is not None
        with anyio.CancelScope(shield=True):
            await self.close()
        await self._tg.__aexit__(None, None, None)

    # ------------------------------------------------------------------ public

    async def request(
        self, type: str, content: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send a request; return its answer's content (``{}`` for a bare ack).

        Raises :class:`RequestError` (error answer), :class:`RequestTimeout`,
        :class:`ConnectionClosed`. Chunks of a streamed reply are skipped.
        """
        ident, box = self._submit(type, content)
        try:
            with anyio.fail_after(self.request_timeout if timeout is None else timeout):
                kind, value = await box.get()
                while kind == "chunk":
                    kind, value = await box.get()
        except TimeoutError:
            raise RequestTimeout(f"no answer to {type} {ident!r} in time") from None
        finally:
            self._pending.pop(ident, None)
        return self._outcome(kind, value)

    async def stream(
        self, type: str, content: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield the ``chunk`` contents of a streamed reply, up to its ``ack``.

        A plain reply is yielded as the last item; an error raises :class:`RequestError`.
        ``timeout`` bounds the wait for each item.
        """
        ident, box = self._submit(type, content)
        try:
            while True:
                try:
                    with anyio.fail_after(self.request_timeout if timeout is None else timeout):
                        kind, value = await box.get()
                except TimeoutError:
                    raise RequestTimeout(f"no chunk of {type} {ident!r} in time") from None
                if kind == "chunk":
                    yield value
                    continue
                result = self._outcome(kind, value)
                if value.get("type") != "ack":
                    yield result
                return
        finally:
            self._pending.pop(ident, None)

    def subscribe(self, room: str, since: dict[str, Any] | None = None) -> Subscription:
        """Join ``room`` (now, or once connected) and iterate its messages.

        After a reconnect the room is re-joined with ``since`` = the last message
        seen; a :class:`Gap` is yielded where the server could not replay the hole.
        """
        if room in self._rooms:
            raise ValueError(f"already subscribed to {room!r}")
        self._check_open()
        sub = self._rooms[room] = Subscription(self, room, since)
        if self._link is not None and self._link.ready.is_set():
            self._join(self._link, sub)
        return sub

    def pushes(self) -> Pushes:
        """Iterate the frames the server pushes from now on (see :class:`Pushes`)."""
        self._check_open()
        feed = Pushes(self)
        self._pushes.add(feed)
        return feed

    async def close(self) -> None:
        """Close cleanly (1000) and stop reconnecting; pending requests raise ConnectionClosed."""
        self._closing = True
        link = self._link
        if link is not None and link.wire.is_open:
            link.wire.close(1000)
            link.wake.set()
            with anyio.move_on_after(_CLOSE_TIMEOUT):
                await self._done.wait()
        self._scope.cancel()
        await self._done.wait()

    # -------------------------------------------------------------- requests

    def _check_open(self) -> None:
        if self.state is State.CLOSED or self._closing:
            raise ConnectionClosed(self.close_code, "client closed")

    def _submit(self, type: str, content: dict[str, Any] | None) -> tuple[str, _Mailbox]:
        self._check_open()
        ident = f"c-{next(self._ids)}"
        data = orjson.dumps({"id": ident, "type": type, "content": content or {}})
        box = _Mailbox()
        self._pending[ident] = (data, box)
        if self._link is not None and self._link.ready.is_set():
            self._link.send(data)
        return ident, box

    @staticmethod
    def _outcome(kind: str, value: Any) -> dict[str, Any]:
        if kind == "closed":
            raise value
        if value.get("type") == "error":
            raise RequestError(value.get("replyTo"), value.get("content") or {})
        content: dict[str, Any] = value.get("content") or {}
        return content

    def _send(self, link: _Link, type: str, content: dict[str, Any]) -> str:
        ident = f"c-{next(self._ids)}"
        link.send(orjson.dumps({"id": ident, "type": type, "content": content}))
        return ident

    def _join(self, link: _Link, sub: Subscription) -> None:
        sub._joining()
        since = sub.since()
        content = {"room": sub.room} if since is None else {"room": sub.room, "since": since}
        self._joins[self._send(link, "join", content)] = (sub, since)

    def _leave(self, sub: Subscription) -> None:
        if self._rooms.get(sub.room) is sub:
            del self._rooms[sub.room]
            sub._box.put("end", None)
            if self._link is not None and self._link.ready.is_set():
                self._send(self._link, "leave", {"room": sub.room})

    # ----------------------------------------------------------------- frames

    def _on_text(self, link: _Link, raw: str) -> None:
        try:
            frame = orjson.loads(raw)
        except orjson.JSONDecodeError:
            frame = None
        if not isinstance(frame, dict) or not isinstance(frame.get("content"), dict | None):
            log.warning("ignoring a frame that is not a JSON object")
        elif link.ready.is_set():
            self._on_frame(frame)
        elif frame.get("replyTo") == link.init_id:
            self._on_init(link, frame)
        else:  # replayed frames (resume) or a new session's first ones: init decides
            link.early.append(frame)

    def _on_frame(self, frame: dict[str, Any]) -> None:
        seq = frame.get("seq")
        if isinstance(seq, int):
            if seq <= self.last_seq:
                return  # replayed twice: delivered already
            self.last_seq = seq
        kind, reply_to, content = frame.get("type"), frame.get("replyTo"), frame.get("content")
        content = content or {}
        in_room = False
        if isinstance(frame.get("room"), str) and isinstance(frame.get("offset"), int):
            sub = self._rooms.get(frame["room"])
            if sub is not None:  # a room frame: live, or a join's replay
                sub._deliver(content)
                in_room = True
        if reply_to is None:
            if kind == "error":
                log.warning("server error without a request: %s", content)
            elif kind == "system" and content.get("event") == "token_expiring":
                link = self._link
                if self.token_provider is not None and link is not None and link.tasks is not None:
                    link.tasks.start_soon(self._refresh_token)
            if not in_room:
                self._push(frame)
        elif reply_to in self._joins:
            if kind in ("join", "error"):
                sub, since = self._joins.pop(reply_to)
                if kind == "join":
                    sub._joined(content, since)
                elif self._rooms.get(sub.room) is sub:
                    del self._rooms[sub.room]
                    sub._box.put("error", RequestError(reply_to, content))
        elif reply_to in self._pending:  # else its caller gave up (timeout)
            if kind == "chunk":
                self._pending[reply_to][1].put("chunk", content)
            else:
                self._pending.pop(reply_to)[1].put("answer", frame)

    def _push(self, frame: dict[str, Any]) -> None:
        for feed in self._pushes:
            feed._box.put("item", frame)
        if self.on_push is not None:
            try:
                self.on_push(frame)
            except Exception:
                log.exception("on_push callback failed")

    def _on_init(self, link: _Link, frame: dict[str, Any]) -> None:
        content = frame.get("content") or {}
        if frame.get("type") == "error":
            if content.get("code") in RETRY_INIT:  # not now: the session is kept for later
                wait = content.get("retryAfter")
                number = isinstance(wait, int | float) and not isinstance(wait, bool)
                link.busy = max(float(wait), 0.0) if number and wait is not None else 0.0
                link.failure = f"init answered {content.get('code')}: {content.get('message', '')}"
                link.wire.close(1000)
                link.wake.set()
                return
            if self.session_id is not None and link.refused is None:  # start anew
                log.warning("resume refused (%s); starting a new session", content.get("code"))
                link.refused = str(content.get("code"))
                self._send_init(link)
                return
            self._fatal = RequestError(link.init_id, content)
            link.failure = f"init refused: {self._fatal}"
            link.wire.close(1000)
            link.wake.set()
            return
        previous = self.session_id
        resumed = previous is not None and not link.refused and content.get("resumed") is True
        if not resumed:
            self.last_seq = 0  # a new session numbers its frames from 1
        self.session_id = content.get("sessionId")
        self.epoch = content.get("epoch")
        link.ready.set()
        for early in link.early:
            self._on_frame(early)
        link.early.clear()
        self._on_frame(frame)
        # Rooms first: on another instance the session is no member yet, and a re-sent
        # message to a room would be refused; the server handles them in this order.
        self._joins.clear()
        for sub in self._rooms.values():
            self._join(link, sub)
        for data, _ in self._pending.values():  # unanswered: same ids, the server dedupes
            link.send(data)
        info: dict[str, Any] = {"sessionId": self.session_id}
        if not self._connected:
            state = State.CONNECTED
        elif resumed:
            state, info["missed"] = State.RESUMED, content.get("missed", 0)
        else:
            state = State.RESYNCED
            reason = link.refused or content.get("reason")
            info.update(previous=previous, reason=reason, resent=len(self._pending))
        self._connected = True
        self._set_state(state, info)
        self._started.set()

    async def _refresh_token(self) -> None:
        """Answer a ``token_expiring`` notice (jwt plugin) with ``auth.refresh``. On
        failure the server closes 4008; the reconnect asks the provider again."""
        assert self.token_provider is not None
        try:
            token = await self.token_provider()
            await self.request("auth.refresh", {"token": token})
        except Exception as exc:
            log.warning("token refresh failed: %s", exc)
        else:
            log.debug("token refreshed")

    def _send_init(self, link: _Link) -> None:
        content: dict[str, Any] = {"client": {"name": "backchannel-python", "version": __version__}}
        if self.session_id is not None and link.refused is None:
            content.update(sessionId=self.session_id, lastSeq=self.last_seq)
            if self.epoch is not None:  # a server whose broker lost it answers epoch_changed
                content["epoch"] = self.epoch
        if link.token:
            content["token"] = link.token
        link.init_id = self._send(link, "init", content)

    # -------------------------------------------------------------- lifecycle

    def _set_state(self, state: State, info: dict[str, Any]) -> None:
        self.state = state
        log.debug("state %s %s", state, info)
        if self.on_state is not None:
            try:
                self.on_state(state, info)
            except Exception:
                log.exception("on_state callback failed")

    async def _run(self) -> None:
        """Connect, serve and reconnect until closed; never raises."""
        code: int | None = None
        reason = ""
        try:
            with self._scope:
                code, reason = await self._loop()
        except Exception as exc:  # a bug here must still fail the waiting callers
            log.exception("client loop failed")
            reason = f"client error: {exc}"
        finally:
            if self._closing:
                reason = reason or "closed by the client"
            self.close_code = code
            closed = ConnectionClosed(code, reason)
            for _, box in self._pending.values():
                box.put("closed", closed)
            self._pending.clear()
            feeds: list[_Feed[Any]] = [*self._rooms.values(), *self._pushes]
            for feed in feeds:
                feed._box.put("end" if self._closing else "closed", closed)
            self._set_state(State.CLOSED, {"code": code, "reason": reason})
            self._started.set()
            self._done.set()

    async def _loop(self) -> tuple[int | None, str]:
        attempt = 0
        self._set_state(State.CONNECTING, {"url": self.url})
        while True:
            code, reason, was_ready, busy = await self._attempt()
            if self._closing:
                return code, reason
            if was_ready:
                attempt = 0
            # Before the first init answer only "not now" (busy) is worth retrying: a wrong
            # URL or a refused token fails at once.
            retry = busy is not None or (self._connected and code not in NO_RETRY)
            if self._fatal is not None or not self.reconnect or not retry:
                if not self._connected:
                    failure = self._fatal or self._refusal
                    self._fatal = failure or ConnectError(f"cannot connect to {self.url}: {reason}")
                return code, reason
            limit = self.backoff.max_attempts
            if limit is not None and attempt >= limit:
                gave_up = f"gave up after {attempt} reconnect attempts ({reason})"
                if not self._connected:
                    self._fatal = ConnectError(f"cannot connect to {self.url}: {gave_up}")
                return code, gave_up
            delay = max(self.backoff.delay(attempt), busy or 0.0)
            attempt += 1
            info = {"attempt": attempt, "delay": delay, "code": code, "reason": reason}
            self._set_state(State.RECONNECTING, info)
            await anyio.sleep(delay)

    async def _attempt(self) -> tuple[int | None, str, bool, float | None]:
        """One connection, from TCP connect to close: its close code, why, whether init was
        answered, and when init was answered "not now", the least delay before the next."""
        try:
            with anyio.fail_after(self.request_timeout):
                token = await self.token_provider() if self.token_provider else self.token
                headers = dict(self.headers)
                if token:
                    headers["Authorization"] = f"Bearer {token}"
                wire = ClientWire(self.url, headers=headers, max_size=None)
                stream: anyio.abc.ByteStream
                if wire.secure:
                    stream = await anyio.connect_tcp(wire.host, wire.port, tls=True)
                else:
                    stream = await anyio.connect_tcp(wire.host, wire.port)
        except Exception as exc:  # refused, DNS, TLS, a failing token provider, timeout
            return None, f"{type(exc).__name__}: {exc}", False, None
        link = self._link = _Link(stream, wire, token)
        try:
            async with anyio.create_task_group() as tg:
                link.tasks = tg
                tg.start_soon(self._writer, link, tg.cancel_scope)
                tg.start_soon(self._watchdog, link, tg.cancel_scope)
                link.wake.set()  # the handshake request
                await self._reader(link)
                tg.cancel_scope.cancel()
        finally:
            self._link = None
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)
        if wire.handshake_error:
            # websockets says "server rejected WebSocket connection: HTTP 403"
            status = re.search(r"HTTP (\d{3})", wire.handshake_error)
            why = f"HTTP {status[1]}" if status else wire.handshake_error
            self._refusal = HandshakeRefused(
                self.url, int(status[1]) if status else None, why, self.origin
            )
            return None, str(self._refusal), False, None
        code = wire.close_code if wire.is_closed else 1006
        return code, link.failure or wire.close_reason or "", link.ready.is_set(), link.busy

    async def _reader(self, link: _Link) -> None:
        wire = link.wire
        while not wire.is_closed:
            try:  # a server that sent its close frame gets a bounded time to close TCP
                with anyio.fail_after(_CLOSE_TIMEOUT if wire.close_expected() else math.inf):
                    data = await link.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError, TimeoutError):
                wire.receive_eof()
                return
            was_open = wire.is_open
            messages = wire.receive_data(data)
            if not was_open and wire.is_open:
                self._send_init(link)
            for message in messages:
                self._on_text(link, message)
            link.wake.set()  # pongs, the close echo

    async def _writer(self, link: _Link, scope: anyio.CancelScope) -> None:
        while True:
            await link.wake.wait()
            link.wake = anyio.Event()
            for data in link.wire.data_to_send():
                if not data:
                    return  # EOF: the server closed its side already
                try:
                    await link.stream.send(data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    link.failure = "connection lost while sending"
                    scope.cancel()
                    return

    async def _watchdog(self, link: _Link, scope: anyio.CancelScope) -> None:
        """Drop a link whose init goes unanswered, or that misses a pong for ``heartbeat``."""
        with anyio.move_on_after(self.request_timeout):
            await link.ready.wait()
        if not link.ready.is_set():
            link.failure = "no answer to init"
            scope.cancel()
            return
        while self.heartbeat:
            await anyio.sleep(self.heartbeat)
            if not link.wire.ping():
                link.failure = f"no pong within {self.heartbeat}s"
                scope.cancel()
                return
            link.wake.set()


#: ``async with connect(url, ...) as client`` is ``async with Client(url, ...)``.
connect = Client
