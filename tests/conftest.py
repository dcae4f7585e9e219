"""Shared fixtures: every async test runs on asyncio and on Trio; servers are real sockets."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import pytest

from backchannel import App
from backchannel.pytest_plugin import no_traceback_logged  # noqa: F401  (autouse: the guard)
from backchannel.testing import websocket

ROOT = Path(__file__).resolve().parent.parent
STANDARD = ["init", "text", "ping", "system", "validation", "rooms"]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _frame_validator() -> jsonschema.protocols.Validator:
    schemas = {p.name: json.loads(p.read_text()) for p in (ROOT / "schemas").glob("*.json")}
    from referencing import Registry, Resource

    registry = Registry().with_resources(
        (s["$id"], Resource.from_contents(s)) for s in schemas.values()
    )
    frame = schemas["frame.schema.json"]
    return jsonschema.Draft202012Validator(frame, registry=registry)


FRAME = _frame_validator()


def check_frame(frame: dict[str, Any]) -> dict[str, Any]:
    """Assert ``frame`` matches ``schemas/frame.schema.json`` and return it."""
    FRAME.validate(frame)
    return frame


class WsClient:
    """A real WebSocket client (websockets' asyncio or trio client, by backend)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._n = 0

    async def send(self, type: str, content: Any = None, id: str | None = None) -> str:
        self._n += 1
        ident = id or f"r{self._n}"
        msg: dict[str, Any] = {"id": ident, "type": type}
        if content is not None:
            msg["content"] = content
        await self.ws.send(json.dumps(msg))
        return ident

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        with anyio.fail_after(timeout):
            raw = await self.ws.recv()
        frame = check_frame(json.loads(raw))
        self.frames.append(frame)
        return frame

    async def answer(self, ident: str, timeout: float = 5.0) -> dict[str, Any]:
        """Next terminal frame for ``ident`` (skips chunks and unrelated frames)."""
        with anyio.fail_after(timeout):
            while True:
                frame = await self.recv(timeout)
                if frame.get("replyTo") == ident and frame["type"] != "chunk":
                    return frame

    async def request(self, type: str, content: Any = None, timeout: float = 5.0) -> dict[str, Any]:
        return await self.answer(await self.send(type, content), timeout)

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Wait for the server to close; return its close code."""
        with anyio.fail_after(timeout):
            try:
                while True:
                    await self.ws.recv()
            except Exception:
                pass
        rcvd = self.ws.protocol.close_rcvd
        return rcvd.code if rcvd is not None else None


@asynccontextmanager
async def ws_connect(port: int, path: str = "/ws", **kwargs: Any) -> AsyncIterator[WsClient]:
    """Connect with websockets' client for the running backend."""
    async with websocket(port, path, **kwargs) as ws:
        yield WsClient(ws)


def make_app(config: dict[str, Any] | None = None, plugins: list[Any] | None = None) -> App:
    """An App on a free port with an explicit plugin list (never autoloaded)."""
    cfg: dict[str, Any] = {"server": {"port": 0}, "log": {"level": "DEBUG"}}
    for key, value in (config or {}).items():
        cfg.setdefault(key, {}).update(value)
    return App(cfg, plugins=STANDARD if plugins is None else plugins)


@asynccontextmanager
async def serving(app: App) -> AsyncIterator[App]:
    async with app.run(host="127.0.0.1", port=0):
        yield app


@pytest.fixture
def caplog_bc(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="backchannel")
    return caplog
