"""The standalone server: TCP listeners and the drivers feeding :class:`~.websocket.Wire`.

Two drivers give the same behaviour:

* :class:`AsyncioDriver`, an ``asyncio.Protocol`` (the fast path: no task per
  read, writes go straight to the transport, backpressure from
  ``pause_writing``);
* :class:`AnyioDriver`, on anyio byte streams (Trio, and anything anyio runs on),
  with a reader and a writer task per connection.

Each owns the handshake timeout, the closing timeout and the send-side
backpressure signal (``blocked_since``). What happens with a message is up to the
:class:`Endpoint` the factory makes (the kernel's ``Connection``, or a test echo).

A connection serves one HTTP request: a WebSocket handshake, or a plain ``GET`` for
a route (:func:`route`), answered with ``Connection: close``; whatever the client
sends after that request is ignored (see :class:`~.websocket.Wire`). While more than
:data:`HIGH_WATER` bytes wait for the peer, its pings are not answered one by one
(``Wire.hold_pongs``): a client that does not read cannot make pongs pile up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import sniffio

from .http import HttpRequest, HttpResponse, RouteHandler
from .runtime import AnyioRuntime, AsyncioRuntime, Runtime
from .websocket import Wire

if TYPE_CHECKING:
    from .app import App

__all__ = [
    "AnyioDriver",
    "AsyncioDriver",
    "Endpoint",
    "ServerOptions",
    "HIGH_WATER",
    "TcpListener",
    "options_for",
    "route",
    "serve_anyio",
    "serve_asyncio",
]

log = logging.getLogger("backchannel.server")

#: bytes waiting for the peer past which it counts as not reading, for pongs (asyncio's
#: default write-buffer high-water mark, which the asyncio driver gets from its transport)
HIGH_WATER = 65536
#: what reading or writing a stream raises once the peer is gone (reset, closed)
_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class Endpoint(Protocol):
    """The message side of one accepted WebSocket."""

    def on_message(self, payload: str | bytes) -> None: ...

    def on_closed(self, code: int) -> None: ...

    async def run(self) -> None: ...


EndpointFactory = Callable[[HttpRequest, Any, Runtime], Endpoint]


@dataclass
class ServerOptions:
    """What the drivers need to know (taken from ``[server]`` config by the App)."""

    endpoint: EndpointFactory
    ws_path: str = "/ws"
    max_size: int | None = 65536
    origins: list[str] | None = None
    #: "off" or "deflate" (permessage-deflate; inflation bounded by max_size)
    compression: str = "off"
    handshake_timeout: float = 10.0
    close_timeout: float = 5.0
    routes: dict[str, RouteHandler] = field(default_factory=dict)
    #: called with the HTTP status (as text) of a refused handshake, or "timeout"
    on_reject: Callable[[str], None] = lambda reason: None


async def route(options: ServerOptions, request: HttpRequest) -> HttpResponse:
    """The answer to a plain HTTP request: the route's, 404, or 405 for a method other
    than GET (routes are GET only; a crashing route is logged and answered 500)."""
    handler = options.routes.get(request.path)
    if handler is None:
        return HttpResponse(404, b"not found\n")
    if request.method != "GET":
        return HttpResponse(405, b"only GET is served\n", headers={"Allow": "GET"})
    try:
        result = handler(request)
        if isinstance(result, Awaitable):
            result = await result
        assert isinstance(result, HttpResponse)
        return result
    except Exception:
        log.exception("HTTP route %s failed", request.path)
        return HttpResponse(500, b"internal error\n")


class _DriverBase:
    """State and sink logic both drivers share."""

    wire: Wire
    endpoint: Endpoint | None
    options: ServerOptions
    remote: tuple[str, int] | None
    blocked_since: float | None
    _ping_at: float

    def _init(self, options: ServerOptions) -> None:
        self.options = options
        self.wire = Wire(
            self,
            max_size=options.max_size,
            origins=options.origins,
            compression=options.compression,
        )
        self.endpoint = None
        self.blocked_since = None
        self._receiving = False
        self._ping_at = time.monotonic()

    # WireSink
    def on_request(self, request: HttpRequest) -> None:
        request.remote = self.remote
        if request.path == self.options.ws_path:  # websockets answers 426/400 to non-upgrades
            rejected = self.wire.accept()
            if rejected is None:
                self._opened(request)
            else:
                why = rejected.body[:200].decode(errors="replace").strip()
                log.info("handshake rejected %d from %s: %s", rejected.status, self.remote, why)
                self.options.on_reject(str(rejected.status))
            self._flush()
        else:
            self._http(request)

    def on_message(self, payload: str | bytes) -> None:
        if self.endpoint is not None:
            self.endpoint.on_message(payload)

    def on_refused(self, status: int | None, why: str) -> None:
        shown = status if status is not None else "(no answer: not HTTP)"
        log.info("handshake rejected %s from %s: %s", shown, self.remote, why)
        self.options.on_reject(str(status) if status is not None else "bad_request")

    def _feed(self, data: bytes) -> bool:
        """Feed bytes read from the peer; the answers written meanwhile (requests handled
        inline) leave together in one flush: one write, one syscall, for a whole batch.
        True when messages of this read still wait (see :meth:`_deliver_more`)."""
        self._receiving = True
        try:
            more = self.wire.receive_data(data)
        finally:
            self._receiving = False
        self._flush()
        return more

    def _deliver_more(self) -> bool:
        """Hand over the next batch of a large read; True while more wait."""
        self._receiving = True
        try:
            more = self.wire.deliver()
        finally:
            self._receiving = False
        self._flush()
        return more

    # Transport
    def write(self, data: bytes) -> None:
        self.wire.send_text(data)
        if not self._receiving:
            self._flush()

    def write_binary(self, data: bytes) -> None:
        self.wire.send_binary(data)
        if not self._receiving:
            self._flush()

    def close(self, code: int, reason: str) -> None:
        self.wire.close(code, reason)
        self._flush()

    def heartbeat(self, now: float, interval: float, timeout: float) -> bool:
        if self.wire.ping_outstanding is not None:
            return now - self._ping_at <= timeout
        if now - self._ping_at >= interval and self.wire.is_open:
            self._ping_at = now
            self.wire.ping()
            self._flush()
        return True

    # driver-specific
    def _opened(self, request: HttpRequest) -> None:
        raise NotImplementedError

    def _http(self, request: HttpRequest) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        raise NotImplementedError


class AsyncioDriver(_DriverBase, asyncio.Protocol):
    """One TCP connection on the asyncio fast path."""

    def __init__(self, options: ServerOptions, runtime: AsyncioRuntime) -> None:
        self._init(options)
        self.runtime = runtime
        self.transport: asyncio.Transport | None = None
        self.remote = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        self.remote = (peer[0], peer[1]) if peer else None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._timer = self.runtime.loop.call_later(
            self.options.handshake_timeout, self._handshake_timeout
        )

    def _handshake_timeout(self) -> None:
        log.info("handshake timeout from %s", self.remote)
        self.options.on_reject("timeout")
        self._abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        if self._feed(data):  # a flood in one read: let other connections run in between
            self._pause()

    def _pause(self) -> None:
        transport = self.transport
        if transport is not None and not self._closed:
            transport.pause_reading()
            self.runtime.loop.call_soon(self._continue)

    def _continue(self) -> None:
        if self._closed:
            return
        if self._deliver_more():
            self.runtime.loop.call_soon(self._continue)
        elif self.transport is not None:
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        self.wire.receive_eof()
        self._flush()
        # A client may half-close after its request: keep the socket to send the answer.
        return True if self.wire.answering else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel_timer()
        self.wire.receive_eof()
        if self.endpoint is not None:
            code = self.wire.close_code
            self.endpoint.on_closed(1006 if code is None else int(code))

    def pause_writing(self) -> None:
        self.blocked_since = time.monotonic()
        self.wire.hold_pongs = True

    def resume_writing(self) -> None:
        self.blocked_since = None
        self.wire.hold_pongs = False
        self._flush()  # the pong held while the peer was not reading

    def _opened(self, request: HttpRequest) -> None:
        self._cancel_timer()
        self.endpoint = self.options.endpoint(request, self, self.runtime)
        self.runtime.spawn(self.endpoint.run)

    def _http(self, request: HttpRequest) -> None:
        self._cancel_timer()

        async def respond() -> None:
            response = await route(self.options, request)
            if not self._closed:
                self.wire.respond(response)
                self._flush()

        self.runtime.spawn(respond)

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or self._closed:
            return
        chunks = self.wire.data_to_send()
        if len(chunks) == 1 and chunks[0]:
            transport.write(chunks[0])
        elif chunks and b"" not in chunks:
            transport.write(b"".join(chunks))
        else:
            for chunk in chunks:  # an empty chunk means half-close (EOF)
                if chunk:
                    transport.write(chunk)
                elif transport.can_write_eof():
                    transport.write_eof()
        if self.wire.is_closed:  # both sides ended (an answer sent after the client's EOF)
            transport.close()
        elif self._timer is None and self.wire.close_expected():
            self._timer = self.runtime.loop.call_later(self.options.close_timeout, self._abort)

    def _abort(self) -> None:
        self._timer = None
        if self.transport is not None and not self._closed:
            self.transport.abort()


async def serve_asyncio(
    options: ServerOptions, host: str, port: int, *, reuse_port: bool = False
) -> tuple[asyncio.Server, AsyncioRuntime]:
    """Listen on the running asyncio loop; returns the server (``close()`` stops accepting)."""
    runtime = AsyncioRuntime()
    server = await runtime.loop.create_server(
        lambda: AsyncioDriver(options, runtime),
        host,
        port,
        reuse_port=reuse_port or None,
        backlog=1024,
    )
    return server, runtime


class AnyioDriver(_DriverBase):
    """One TCP connection on anyio streams: a reader task, a writer task."""

    def __init__(
        self,
        options: ServerOptions,
        stream: anyio.abc.SocketStream,
        server_group: anyio.abc.TaskGroup,
    ) -> None:
        self._init(options)
        self.stream = stream
        # Endpoints run in the server's task group: requests belong to the session
        # and outlive this connection's reader and writer.
        self._server_group = server_group
        try:
            peer = stream.extra(anyio.abc.SocketAttribute.remote_address)
            self.remote = (str(peer[0]), int(peer[1]))
        except Exception:
            self.remote = None
        self._out: deque[bytes] = deque()
        self._queued = 0  # bytes in _out and in the send under way
        self._wake = anyio.Event()
        self._eof = False
        self._handshaken = anyio.Event()
        self._pending_http: HttpRequest | None = None
        #: the reader's scope once open: a closing handshake gives it close_timeout
        self._read_scope: anyio.CancelScope | None = None
        #: the whole reader's: the writer cancels it when the peer is gone
        self._reading = anyio.CancelScope()

    def _opened(self, request: HttpRequest) -> None:
        group = self._server_group
        self.endpoint = self.options.endpoint(request, self, AnyioRuntime(group))
        group.start_soon(self.endpoint.run)
        self._handshaken.set()

    def _http(self, request: HttpRequest) -> None:
        self._pending_http = request
        self._handshaken.set()

    def _flush(self) -> None:
        chunks = self.wire.data_to_send()
        self._out.extend(chunks)
        self._queued += sum(map(len, chunks))
        self.wire.hold_pongs = self._queued > HIGH_WATER
        self._wake.set()
        self._arm_close_timeout()

    def _arm_close_timeout(self) -> None:
        """Once a closing handshake started (either side), the peer has close_timeout to
        finish it: a vanished peer would otherwise keep the reader waiting for ever."""
        scope = self._read_scope
        if scope is not None and scope.deadline == math.inf and self.wire.close_expected():
            scope.deadline = anyio.current_time() + self.options.close_timeout

    async def _writer(self) -> None:
        stream = self.stream
        while True:
            while not self._out:
                if self._eof:
                    return
                self._wake = anyio.Event()
                if self._out:
                    break
                await self._wake.wait()
            chunks = []
            while self._out:
                chunk = self._out.popleft()
                if not chunk:
                    self._eof = True
                    break
                chunks.append(chunk)
            if chunks:
                self.blocked_since = time.monotonic()
                data = b"".join(chunks)
                try:
                    await stream.send(data)
                except _GONE:  # nothing more can be written: stop reading too
                    log.debug("connection from %s: peer gone while writing", self.remote)
                    self._out.clear()
                    self._reading.cancel()
                    return
                finally:
                    self.blocked_since = None
                self._queued -= len(data)
                self._flush()  # (with a pong held while more than HIGH_WATER waited)
            if self._eof:
                with contextlib.suppress(Exception):  # the peer may be gone already
                    await stream.send_eof()
                return

    async def _reader(self) -> None:
        stream = self.stream
        with anyio.move_on_after(self.options.handshake_timeout) as scope:
            while not self._handshaken.is_set() and not self.wire.is_closed:
                try:
                    data = await stream.receive()
                except _GONE:
                    self.wire.receive_eof()
                    return
                await self._take(data)
        if scope.cancelled_caught:
            log.info("handshake timeout from %s", self.remote)
            self.options.on_reject("timeout")
            return
        if self._pending_http is not None:
            response = await route(self.options, self._pending_http)
            self.wire.respond(response)
            self._flush()
        with anyio.CancelScope() as self._read_scope:
            self._arm_close_timeout()
            while not self.wire.is_closed:
                if not await self._read_once():
                    return

    async def _read_once(self) -> bool:
        try:
            data = await self.stream.receive()
        except _GONE:
            self.wire.receive_eof()
            self._flush()
            return False
        await self._take(data)
        return True

    async def _take(self, data: bytes) -> None:
        more = self._feed(data)
        while more:  # a flood in one read: let other connections run in between
            await anyio.lowlevel.checkpoint()
            more = self._deliver_more()

    async def serve(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._writer)
                with self._reading:
                    await self._reader()
                if self._reading.cancel_called:  # the writer found the peer gone
                    self.wire.receive_eof()
                if self.endpoint is not None:
                    code = self.wire.close_code
                    self.endpoint.on_closed(1006 if code is None else int(code))
                self._eof = True
                self._wake.set()
                # The writer gets close_timeout to flush the close frame.
                tg.cancel_scope.deadline = anyio.current_time() + self.options.close_timeout
        finally:
            await self.stream.aclose()


async def serve_anyio(
    options: ServerOptions,
    host: str,
    port: int,
    task_group: anyio.abc.TaskGroup,
    *,
    started: Callable[[int], None],
    reuse_port: bool = False,
) -> None:
    """Listen and serve until cancelled (anyio; used for Trio). ``reuse_port``: share the
    port with other processes (SO_REUSEPORT), as ``serve --workers N`` does."""
    listener = await anyio.create_tcp_listener(
        local_host=host, local_port=port, backlog=1024, reuse_port=reuse_port
    )
    bound = listener.extra(anyio.abc.SocketAttribute.local_port)
    started(int(bound))

    async def handle(stream: anyio.abc.SocketStream) -> None:
        driver = AnyioDriver(options, stream, task_group)
        try:
            await driver.serve()
        except Exception:  # a bug ends this connection, not the listener and every other one
            log.exception("connection from %s failed", driver.remote)

    async with listener:
        await listener.serve(handle, task_group=task_group)


def options_for(app: App) -> ServerOptions:
    """What the drivers need, from the App's settings and routes (built at start-up)."""
    server = app.settings.server
    return ServerOptions(
        endpoint=app.accept,
        ws_path=server.path,
        max_size=server.max_message_size,
        origins=server.origins,
        compression=server.compression,
        handshake_timeout=server.handshake_timeout,
        close_timeout=min(5.0, app.settings.heartbeat.timeout),
        routes=app.routes,
        on_reject=app.counters.reject,
    )


class TcpListener:
    """The standalone server's :class:`~backchannel.app.Listener`: TCP on ``host:port`` with
    the asyncio-native driver on asyncio, the anyio driver on anything else (Trio)."""

    def __init__(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        self.host = host
        self.port = port
        self.reuse_port = reuse_port
        self._server: asyncio.Server | None = None
        self._runtime: AsyncioRuntime | None = None
        self._scope = anyio.CancelScope()

    async def listen(self, app: App, group: anyio.abc.TaskGroup) -> None:
        options = options_for(app)
        if sniffio.current_async_library() == "asyncio":
            self._server, self._runtime = await serve_asyncio(
                options, self.host, self.port, reuse_port=self.reuse_port
            )
            app.port = self._server.sockets[0].getsockname()[1]
            return
        bound = anyio.Event()

        def started(port: int) -> None:
            app.port = port
            bound.set()

        async def serve() -> None:
            with self._scope:
                await serve_anyio(
                    options,
                    self.host,
                    self.port,
                    group,
                    started=started,
                    reuse_port=self.reuse_port,
                )

        group.start_soon(serve)
        await bound.wait()

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._scope.cancel()

    def abandon(self) -> None:
        if self._runtime is not None:
            for task in list(self._runtime.tasks):
                task.cancel()
