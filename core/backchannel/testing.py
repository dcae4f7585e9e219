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

import base64
import itertools
import json
import math
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import orjson
import sniffio

from .app import App
from .connection import Connection
from .http import HttpRequest
from .runtime import AnyioRuntime

__all__ = [
    "MemoryClient",
    "RawClient",
    "connect",
    "opening_handshake",
    "raw_connect",
    "serve_in_memory",
    "websocket",
]

OP_TEXT, OP_CLOSE, OP_PING = 0x1, 0x8, 0x9


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


class _InMemory:
    """A listener that listens to nothing: connections come from :func:`connect`."""

    async def listen(self, app: App, group: anyio.abc.TaskGroup) -> None:
        return None

    def stop(self) -> None:
        return None

    def abandon(self) -> None:
        return None


@asynccontextmanager
async def serve_in_memory(app: App) -> AsyncIterator[App]:
    """Start ``app`` without listening on a socket: the same lifecycle as a real server
    (start-up, heartbeat, handler deadlines, session expiry, graceful drain, shutdown)."""
    async with app.serving(_InMemory()):
        yield app


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
        connection = app.accept(request, transport, AnyioRuntime(tg))
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


# ---------------------------------------------------------------- by hand, on a socket


def opening_handshake(*extra: str, path: str = "/ws") -> bytes:
    """A valid WebSocket opening handshake offering ``backchannel.v1``, plus ``extra``
    header lines."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: backchannel.v1",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawClient:
    """A WebSocket client on a bare TCP stream that does only what it is told: unlike a
    real client it answers no ping and no close, and it can stop reading, dribble bytes
    or vanish mid-conversation (slow consumers, half-open peers, handshake limits)."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.pings = 0

    async def handshake(self, origin: str | None = None, path: str = "/ws") -> int:
        """Send the opening handshake by hand; return the HTTP status of the answer."""
        extra = () if origin is None else (f"Origin: {origin}",)
        await self.stream.send(opening_handshake(*extra, path=path))
        while b"\r\n\r\n" not in self.buf:
            await self._fill()
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        return int(head.split(b" ", 2)[1])

    async def _fill(self) -> None:
        self.buf += await self.stream.receive(1 << 20)

    async def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_frame(self) -> tuple[int, bytes]:
        """One server frame (servers never mask): ``(opcode, payload)``."""
        b0, b1 = await self._take(2)
        assert not b1 & 0x80, "server frames are not masked"
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self._take(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self._take(8))
        return b0 & 0x0F, await self._take(length)

    async def next_message(self) -> dict[str, Any] | int:
        """The next text frame as JSON, or the close code once a close frame arrives."""
        while True:
            opcode, payload = await self.read_frame()
            if opcode == OP_PING:
                self.pings += 1  # and never answered
            elif opcode == OP_CLOSE:
                return int(struct.unpack("!H", payload[:2])[0]) if payload else 1005
            elif opcode == OP_TEXT:
                frame: dict[str, Any] = json.loads(payload)
                return frame

    async def close_code(self) -> int:
        """Skip messages until the server's close frame; return its code."""
        while True:
            got = await self.next_message()
            if isinstance(got, int):
                return got

    async def send(self, type: str, content: Any = None, id: str = "r1") -> None:
        """Send one request as a masked text frame."""
        payload = json.dumps({"id": id, "type": type, "content": content or {}}).encode()
        mask = os.urandom(4)
        assert len(payload) < 126
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await self.stream.send(bytes([0x80 | OP_TEXT, 0x80 | len(payload)]) + mask + masked)

    async def request(self, type: str, content: Any = None, id: str = "r1") -> dict[str, Any]:
        """Send a request and read until its answer (other frames are skipped)."""
        await self.send(type, content, id)
        while True:
            got = await self.next_message()
            assert not isinstance(got, int), f"closed {got} before answering {id}"
            if got.get("replyTo") == id:
                return got

    async def eof(self) -> bool:
        """Read until the server ends the TCP connection; True when it did."""
        try:
            while True:
                await self.stream.receive(1 << 20)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return True

    def reset_on_close(self) -> None:
        """Make ``aclose()`` send a TCP RST instead of a FIN (SO_LINGER 0)."""
        sock = self.stream.extra(anyio.abc.SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@asynccontextmanager
async def raw_connect(port: int) -> AsyncIterator[RawClient]:
    """A :class:`RawClient` on a TCP connection to ``127.0.0.1:port`` (not handshaken)."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    try:
        yield RawClient(stream)
    finally:
        await stream.aclose()
