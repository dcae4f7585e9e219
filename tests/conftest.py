"""Shared fixtures: every async test runs on asyncio and on Trio; servers are real sockets."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import jsonschema
import jwt
import pytest

from backchannel import App
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


# ----------------------------------------------------------------- `backchannel serve` processes

_LISTENING = re.compile(rb"listening on wss?://[^ ]*?:(\d+)/")


@dataclass
class ServeProcess:
    """A running ``backchannel serve`` child: its port and everything it logged so far."""

    process: anyio.abc.Process
    port: int = 0
    log: bytearray = field(default_factory=bytearray)


@asynccontextmanager
async def serve_process(
    cmd: Sequence[str], env: Mapping[str, str], cwd: Path | None = None, timeout: float = 30
) -> AsyncIterator[ServeProcess]:
    """Run ``cmd`` (a ``backchannel serve``); yield once it logged "listening on …".

    Use port 0 (``--port 0`` or ``BACKCHANNEL_SERVER__PORT=0``): the port is read from
    that log line. Its stderr is drained for the whole block; on exit it gets SIGTERM,
    and is killed if it is not gone ``timeout`` seconds later.
    """
    process = await anyio.open_process(
        list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=dict(env), cwd=cwd
    )
    served = ServeProcess(process)
    settled = anyio.Event()  # listening, or the process ended first

    async def drain() -> None:
        assert process.stderr is not None
        async for chunk in process.stderr:
            served.log.extend(chunk)
            if not served.port and (found := _LISTENING.search(served.log)):
                served.port = int(found[1])
                settled.set()
        settled.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            with anyio.fail_after(timeout):
                await settled.wait()
            if not served.port:
                pytest.fail(f"{' '.join(cmd)} did not listen:\n{served.log.decode()}")
            try:
                yield served
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
                    if process.returncode is None:
                        process.send_signal(signal.SIGTERM)
                    await process.wait()
                tg.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.aclose()


# ----------------------------------- `backchannel serve --config backchannel.production.toml`


def node_with(package: str) -> str:
    """The node executable, with ``package`` installed in clients/js (``npm ci``); skips
    the test without them, fails it in CI (.ci/run installs both)."""
    node = shutil.which("node")
    why = None
    if node is None:
        why = "node is missing"
    elif not (ROOT / "clients" / "js" / "node_modules" / package).is_dir():
        why = f"{package} is missing: run npm ci in clients/js"
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must install it (.ci/run does)")
        pytest.skip(f"{why}; CI runs this test")
    assert node is not None
    return node


PRODUCTION = ROOT / "backchannel.production.toml"
ORIGIN = "https://chat.example.com"  # the one origin the file lists
CLI = str(Path(sys.executable).with_name("backchannel"))


def production_environment(backend: str, **settings: str) -> tuple[dict[str, str], str]:
    """This environment without BACKCHANNEL_* overrides, a fresh JWT secret, the backend
    and ``settings`` (``BACKCHANNEL_…`` names); and the secret."""
    secret = secrets.token_urlsafe(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKCHANNEL_")}
    env |= {"CHAT_JWT_SECRET": secret, "BACKCHANNEL_SERVER__BACKEND": backend, **settings}
    return env, secret


def token_for(secret: str, sub: str) -> str:
    """A token the production config accepts (what ``backchannel token create`` makes)."""
    claims = {"sub": sub, "iss": "https://auth.example.com/", "aud": "chat", "permissions": ["*"]}
    return jwt.encode(claims | {"exp": int(time.time()) + 600}, secret, algorithm="HS256")


@asynccontextmanager
async def production(backend: str, **settings: str) -> AsyncIterator[tuple[ServeProcess, str]]:
    """``backchannel serve --config backchannel.production.toml`` on a free port."""
    env, secret = production_environment(backend, **settings)
    cmd = [CLI, "serve", "--config", str(PRODUCTION), "--host", "127.0.0.1", "--port", "0"]
    async with serve_process(cmd, env) as served:
        yield served, secret


def records(served: ServeProcess) -> list[dict[str, Any]]:
    """Every JSON log line the server wrote so far."""
    lines = bytes(served.log).decode().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def tracebacks(served: ServeProcess) -> list[str]:
    """Log lines at ERROR or above, or carrying a traceback, and any non-JSON traceback."""
    bad = [r["msg"] for r in records(served) if r["level"] in ("ERROR", "CRITICAL") or "exc" in r]
    return bad + (["Traceback in raw output"] if b"Traceback" in served.log else [])
