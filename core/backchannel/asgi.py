"""The ASGI adapter: the same kernel behind an ASGI server (uvicorn) or inside Starlette/FastAPI.

Served on its own::

    from backchannel import App
    from backchannel.asgi import asgi_app

    application = asgi_app(App(plugins=["init", "text", "ping"]))
    # uvicorn module:application   -> ws://host:8000/ws, /healthz, /readyz, plugin routes

Inside FastAPI or Starlette, whose lifespan does not reach mounted apps (so the
framework runs ours), and whose ``Mount("/ws")`` matches ``/ws/...`` but not ``/ws``
itself (so a route takes that)::

    chat = asgi_app(App(...))
    api = FastAPI(lifespan=chat.lifespan)  # or: async with chat.lifespan(): in your own
    api.router.add_websocket_route("/ws", chat)  # the WebSocket at /ws (= server.path)
    api.mount("/ws", chat)  # /ws/healthz, /ws/readyz, /ws/static/..., plugin routes

Mounted, it also takes WebSockets at its mount point (``/ws/`` here).

How ASGI events map to the kernel (the drivers of :mod:`.server` do the same for TCP):

* ``websocket.connect``: ``server.origins`` and the path (refused: HTTP 403), then
  ``websocket.accept`` with subprotocol ``backchannel.v1`` when offered, and the
  kernel's ``Connection`` (``max_connections`` gives 1013 there, as standalone);
* ``websocket.receive``: ``server.max_message_size`` (close 1009), then
  ``Connection.on_message``; frames go out through ``websocket.send`` in order;
* ``websocket.disconnect``: ``Connection.on_closed``;
* HTTP: the App's routes (``/healthz``, ``/readyz``, ``http_routes`` hooks, the
  static client and demo page), 426 on the WebSocket path, 404 elsewhere;
* ``lifespan``: the App's start-up, background tasks and graceful shutdown.

Relative to the standalone server, the ASGI server owns the handshake timeout,
the protocol pings (uvicorn's ``ws_ping_interval``/``ws_ping_timeout``, so
``heartbeat.*`` is not used here) and a size limit of its own (uvicorn's
``ws_max_size``, 16 MiB). On shutdown uvicorn closes WebSockets (1012) before
the lifespan's drain runs; sessions outlive that, so clients resume.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import sniffio

from .http import HttpRequest, HttpResponse
from .runtime import AnyioRuntime, AsyncioRuntime, Runtime, Signal
from .server import Endpoint, ServerOptions, options_for, route
from .websocket import SUBPROTOCOL

if TYPE_CHECKING:
    from .app import App

__all__ = ["AsgiApp", "asgi_app"]

log = logging.getLogger("backchannel.asgi")

Scope = MutableMapping[str, Any]
Event = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Event]]
Send = Callable[[Event], Awaitable[None]]


def asgi_app(app: App) -> AsgiApp:
    """The ASGI application serving ``app`` (``uvicorn module:application``)."""
    return AsgiApp(app)


class AsgiApp:
    """An ASGI 3 application around one :class:`~backchannel.App`."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._options: ServerOptions | None = None  # set while the App runs
        self._runtime: Runtime | None = None
        self._accepting = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http(scope, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            raise ValueError(f"unsupported ASGI scope type {kind!r}")

    # --------------------------------------------------------------- lifespan

    @asynccontextmanager
    async def lifespan(self, _parent: object = None) -> AsyncIterator[None]:
        """Run the App while inside: start-up, background tasks, graceful shutdown on exit.

        The ASGI lifespan protocol uses it; a framework that keeps lifespan events
        to itself takes it as its own (``FastAPI(lifespan=chat.lifespan)``; the
        argument is the framework's app, unused).
        """
        if self._options is not None:
            raise RuntimeError("this backchannel ASGI app is already running")
        try:
            async with self.app.serving(_Lifespan(self)):
                log.info(
                    "serving over ASGI (%s; WebSocket path %s)",
                    sniffio.current_async_library(),
                    self.app.settings.server.path,
                )
                yield
        finally:
            self._options = self._runtime = None
            self._accepting = False

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        started = False
        try:
            async with self.lifespan():
                started = True
                await send({"type": "lifespan.startup.complete"})
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
        except Exception as exc:  # the server reports it (uvicorn exits on a failed start-up)
            phase = "shutdown" if started else "startup"
            log.exception("ASGI lifespan %s failed", phase)
            await send({"type": f"lifespan.{phase}.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})

    # ------------------------------------------------------------------- HTTP

    async def _http(self, scope: Scope, send: Send) -> None:
        options = self._options
        if options is None:
            response = HttpResponse(503, _NOT_STARTED)
        else:
            request = _request(scope)
            if request.path != options.ws_path:
                response = await route(options, request)  # (405 for a method but GET)
            elif request.method == "GET":
                response = HttpResponse(426, _UPGRADE, headers={"Upgrade": "websocket"})
            else:
                response = HttpResponse(405, b"only GET is served\n", headers={"Allow": "GET"})
        headers = [
            (b"content-type", response.content_type.encode()),
            (b"content-length", str(len(response.body)).encode()),
        ]
        headers += [(k.lower().encode(), v.encode()) for k, v in response.headers.items()]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    # -------------------------------------------------------------- WebSocket

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        options, runtime = self._options, self._runtime
        if options is None or runtime is None or not self._accepting:
            why = "not started (no lifespan ran)" if options is None else "shutting down"
            await _refuse(self.app, scope, send, why)
            return
        request = _request(scope)
        if request.path != options.ws_path and not (scope.get("root_path") and request.path == "/"):
            await _refuse(self.app, scope, send, f"no WebSocket at {request.path}")
            return
        if options.origins is not None and not _origin_allowed(request, options.origins):
            await _refuse(self.app, scope, send, "origin not allowed")
            return
        offered = scope.get("subprotocols") or ()
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
        await send({"type": "websocket.accept", "subprotocol": subprotocol})
        socket = _Socket(send, runtime.signal())
        endpoint = options.endpoint(request, socket, runtime)
        runtime.spawn(endpoint.run)
        code = 1006
        try:
            async with anyio.create_task_group() as tg:
                socket.abort = tg.cancel_scope.cancel
                tg.start_soon(socket.write_loop)
                code = await _read(receive, socket, endpoint, options.max_size)
                tg.cancel_scope.cancel()
        finally:
            endpoint.on_closed(code)
        if socket.closing is not None and not socket.close_sent:
            # Closed while a send was stuck (slow consumer): what waited, then the close
            # frame, go out if the peer reads again in time (as from a TCP send buffer).
            with anyio.move_on_after(options.close_timeout):
                await socket.flush()


class _Lifespan:
    """The App's :class:`~backchannel.app.Listener` while an ASGI server runs it: the ASGI
    server accepts the connections; this opens and closes the door."""

    def __init__(self, asgi: AsgiApp) -> None:
        self.asgi = asgi
        self.tasks: AsyncioRuntime | None = None

    async def listen(self, app: App, group: anyio.abc.TaskGroup) -> None:
        if sniffio.current_async_library() == "asyncio":
            self.asgi._runtime = self.tasks = AsyncioRuntime()
        else:  # Trio (e.g. under hypercorn): requests run in the App's task group
            self.asgi._runtime = AnyioRuntime(group)
        self.asgi._options = options_for(app)
        self.asgi._accepting = True

    def stop(self) -> None:
        self.asgi._accepting = False

    def abandon(self) -> None:
        for task in list(self.tasks.tasks if self.tasks is not None else ()):
            task.cancel()


class _Socket:
    """One accepted ASGI WebSocket as the kernel's ``Transport``.

    ``write`` must not block, and ``websocket.send`` is a coroutine: frames wait in
    ``out`` for whoever flushes first. The reading task flushes right after each
    message it delivers (a handler that answers at once costs no task switch);
    frames written at any other time wake the writer task. ``blocked_since`` is set
    while a send is in progress, so a send the server holds back (the peer stopped
    reading) shows as backpressure: past ``connection.send_queue_size`` frames or
    ``connection.slow_consumer_timeout`` the kernel closes with 1013, which cancels
    the stuck send. That is what bounds ``out``, as with the standalone drivers.
    """

    __slots__ = (
        "blocked_since",
        "out",
        "held",
        "sending",
        "closing",
        "close_sent",
        "abort",
        "_send",
        "_wake",
    )

    def __init__(self, send: Send, wake: Signal) -> None:
        self.blocked_since: float | None = None
        self.out: deque[bytes] = deque()
        self.held = False  # the reading task is delivering a message: it flushes after
        self.sending = False  # a flush is in progress: it takes what is added meanwhile
        self.closing: tuple[int, str] | None = None
        self.close_sent = False
        self.abort: Callable[[], None] = lambda: None
        self._send = send
        self._wake = wake

    # Transport
    def write(self, data: bytes) -> None:
        if self.closing is not None:
            return
        self.out.append(data)
        if not self.held and not self.sending:
            self._wake.set()

    def close(self, code: int, reason: str) -> None:
        if self.closing is not None:
            return
        self.closing = (code, reason[:120])  # a close frame's reason fits 123 bytes
        if self.blocked_since is not None:  # the peer is not reading: never waits for it
            self.abort()
        elif not self.held and not self.sending:
            self._wake.set()

    def heartbeat(self, now: float, interval: float, timeout: float) -> bool:
        return True  # the ASGI server pings (uvicorn: ws_ping_interval, ws_ping_timeout)

    # flushing
    async def flush(self) -> None:
        """Send what waits, in order, then the close frame if one was asked for."""
        if self.sending or self.close_sent:
            return
        self.sending = True
        out, send = self.out, self._send
        try:
            while out:
                self.blocked_since = time.monotonic()
                await send({"type": "websocket.send", "text": out[0].decode()})
                out.popleft()  # only now: a send cancelled by abort() is tried again
                self.blocked_since = None
            if self.closing is not None:
                self.close_sent = True
                code, reason = self.closing
                await send({"type": "websocket.close", "code": code, "reason": reason})
        except Exception as exc:  # the peer is gone: websocket.disconnect follows
            log.debug("send failed: %r", exc)
            out.clear()
            self.close_sent = True
        finally:
            self.sending = False
            self.blocked_since = None

    async def write_loop(self) -> None:
        while True:
            await self.flush()  # first: what was written before this task started waiting
            await self._wake.wait()


async def _read(receive: Receive, socket: _Socket, endpoint: Endpoint, max_size: int | None) -> int:
    """Deliver messages until ``websocket.disconnect``; return its close code."""
    while True:
        event = await receive()
        kind = event["type"]
        if kind == "websocket.receive":
            text = event.get("text")
            payload: str | bytes = text if text is not None else event.get("bytes") or b""
            if socket.closing is not None:
                continue  # closing: the close handshake is all that is left
            if max_size is not None and _size(payload, max_size) > max_size:
                log.info("message over max_message_size (%d bytes): closing 1009", max_size)
                socket.close(1009, "message too big")
                await socket.flush()
                continue
            socket.held = True
            try:
                endpoint.on_message(payload)
            finally:
                socket.held = False
            if socket.out or socket.closing is not None:
                await socket.flush()
        elif kind == "websocket.disconnect":
            return int(event.get("code", 1005))


def _size(payload: str | bytes, limit: int) -> int:
    """Bytes on the wire, without encoding text that is clearly within ``limit``."""
    if type(payload) is str and len(payload) * 4 > limit:
        return len(payload.encode())
    return len(payload)


def _request(scope: Scope) -> HttpRequest:
    """The kernel's request, with the path relative to where the app is mounted."""
    path: str = scope["path"]
    root: str = scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    query = scope.get("query_string") or b""
    target = f"{path}?{query.decode('latin-1')}" if query else path
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    request = HttpRequest(str(scope.get("method", "GET")), target, headers)
    client = scope.get("client")
    request.remote = (str(client[0]), int(client[1])) if client else None
    return request


def _origin_allowed(request: HttpRequest, origins: list[str]) -> bool:
    """As the standalone server: ``"null"`` in the list stands for a missing Origin header."""
    origin = request.headers.get("origin")
    if origin is None:
        return "null" in origins
    return origin != "null" and origin in origins


async def _refuse(app: App, scope: Scope, send: Send, why: str) -> None:
    """Refuse a handshake (ASGI servers answer HTTP 403); logged and counted like standalone.

    Not ``websocket.http.response`` for other statuses: uvicorn logs an error for each.
    """
    log.info("handshake rejected 403 from %s: %s", scope.get("client"), why)
    app.counters.reject("403")
    await send({"type": "websocket.close", "code": 1008})


_NOT_STARTED = (
    b"backchannel is not started: serve it with an ASGI server that runs the lifespan, "
    b"or give the framework its lifespan (FastAPI(lifespan=chat.lifespan))\n"
)
_UPGRADE = b"this path is for WebSocket connections (subprotocol backchannel.v1)\n"
