"""A socket-free test kit for plugin authors (the model is httpx's ``MockTransport``).

Build an App from an explicit plugin list — nothing is autoloaded — and talk to
it in memory::

    app = App(plugins=["text", MyPlugin()])
    async with serve_in_memory(app), connect(app) as client:
        reply = await client.request("text", {"text": "hi"})
        assert reply["content"]["text"] == "hi"

Everything runs through the same pipeline as a real connection; only the bytes
are skipped. Real-socket tests still belong where a client looks:
:func:`websocket` opens one to a serving App on whichever loop the test runs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import orjson
import sniffio

from .app import App
from .http import HttpRequest
from .hub import Connection
from .runtime import AnyioRuntime

__all__ = ["MemoryClient", "connect", "serve_in_memory", "websocket"]


@asynccontextmanager
async def websocket(port: int, path: str = "/ws", **options: Any) -> AsyncIterator[Any]:
    """A real WebSocket to ``127.0.0.1:port`` with websockets' client for the running
    loop (asyncio or Trio), offering ``backchannel.v1``, no message size limit."""
    url = f"ws://127.0.0.1:{port}{path}"
    options.setdefault("subprotocols", ["backchannel.v1"])
    options.setdefault("max_size", None)
    if sniffio.current_async_library() == "trio":
        from websockets.trio.client import connect as trio_connect

        async with trio_connect(url, **options) as sock:
            yield sock
    else:
        from websockets.asyncio.client import connect as asyncio_connect

        async with asyncio_connect(url, **options) as sock:
            yield sock


@asynccontextmanager
async def serve_in_memory(app: App) -> AsyncIterator[App]:
    """Start ``app`` (hooks, pipeline, periodic checks) without listening on a socket."""
    await app._startup()
    app._ready = True
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.hub.watch)
            app._start_background(tg)  # what plugins gave app.spawn()
            app._test_group = tg  # type: ignore[attr-defined]
            try:
                yield app
            finally:
                tg.cancel_scope.cancel()
    finally:
        app._ready = False
        app._task_group = None
        await app.hooks.notify_async("shutdown", app=app)
        await app.broker.stop()


class _MemoryTransport:
    """Captures frames the connection writes; closing ends the connection."""

    def __init__(self, client: MemoryClient) -> None:
        self.client = client
        self.blocked_since: float | None = None
        self.connection: Connection | None = None

    def write(self, data: bytes) -> None:
        self.client._frames.send_nowait(orjson.loads(data))

    def close(self, code: int, reason: str) -> None:
        self.client.close_code = code
        self.client.close_reason = reason
        if self.connection is not None:
            self.connection.on_closed(code)
        self.client._frames.close()

    def heartbeat(self, now: float, interval: float, timeout: float) -> bool:
        return True


class MemoryClient:
    """The client side of an in-memory connection."""

    def __init__(self, connection: Connection, frames: Any, transport: _MemoryTransport) -> None:
        self.connection = connection
        self._ids = itertools.count(1)
        self._frames_out = frames
        self._transport = transport
        self.close_code: int | None = None
        self.close_reason = ""
        #: every frame received so far, in order.
        self.frames: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []

    _frames: Any

    def send_raw(self, payload: str | bytes) -> None:
        """Deliver one WebSocket message, exactly as a driver would."""
        self.connection.on_message(payload)

    def send(self, type: str, content: Any = None, *, id: str | None = None) -> str:
        """Send a request; returns its id."""
        ident = id or f"t-{next(self._ids)}"
        envelope: dict[str, Any] = {"id": ident, "type": type}
        if content is not None:
            envelope["content"] = content
        self.send_raw(orjson.dumps(envelope).decode())
        return ident

    async def receive(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next frame (raises ``TimeoutError`` after ``timeout`` seconds)."""
        if self._pending:
            return self._pending.pop(0)
        with anyio.fail_after(timeout):
            frame: dict[str, Any] = await self._frames_out.receive()
        self.frames.append(frame)
        return frame

    async def answer(self, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The terminal frame answering ``request_id`` (chunks and other frames are kept)."""
        with anyio.fail_after(timeout):
            for i, kept in enumerate(self._pending):
                if kept.get("replyTo") == request_id and kept["type"] != "chunk":
                    return self._pending.pop(i)
            while True:
                frame: dict[str, Any] = await self._frames_out.receive()
                self.frames.append(frame)
                if frame.get("replyTo") == request_id and frame["type"] != "chunk":
                    return frame
                self._pending.append(frame)

    async def request(
        self, type: str, content: Any = None, *, id: str | None = None, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Send a request and return its terminal answer (reply, ack or error)."""
        return await self.answer(self.send(type, content, id=id), timeout)

    def close(self, code: int = 1000) -> None:
        """Disconnect (the session lives on, as with a real client)."""
        self.connection.on_closed(code)


@asynccontextmanager
async def connect(
    app: App,
    *,
    path: str = "/ws",
    headers: dict[str, str] | None = None,
    remote: tuple[str, int] = ("127.0.0.1", 50000),
) -> AsyncIterator[MemoryClient]:
    """Open an in-memory connection to an App started with :func:`serve_in_memory`."""
    send, receive = anyio.create_memory_object_stream[dict[str, Any]](math.inf)
    request = HttpRequest("GET", path, {k.lower(): v for k, v in (headers or {}).items()}, remote)
    async with anyio.create_task_group() as tg:
        client_box: list[MemoryClient] = []
        transport = _MemoryTransport.__new__(_MemoryTransport)
        transport.blocked_since = None
        connection = Connection(app, request, transport, AnyioRuntime(tg))
        client = MemoryClient(connection, receive, transport)
        client._frames = send
        transport.client = client
        transport.connection = connection
        client_box.append(client)
        finished = anyio.Event()

        async def run() -> None:
            try:
                await connection.run()
            finally:
                finished.set()

        tg.start_soon(run)
        try:
            yield client
        finally:
            connection.on_closed(1000)
            send.close()
            # let the connection finish (``disconnect`` hooks included), within a bound
            tg.cancel_scope.deadline = anyio.current_time() + 5
