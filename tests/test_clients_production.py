"""Both shipped clients against ``backchannel serve --config backchannel.production.toml``.

That file requires a JWT (HS256, its secret in ``CHAT_JWT_SECRET``) on every connection
and lists one Origin (``server.origins``). The tokens come from ``backchannel token
create --config backchannel.production.toml`` (docs/security.md); each client passes
the listed Origin as README says non-browser clients do, and without it says why the
handshake was refused. The JS client runs as ``clients/js/examples/node.mjs`` with the
``ws`` package that ``npm ci`` in clients/js installs: without node or ws this test
skips locally and fails in CI (``CI`` set), where ``.ci/run`` installs them.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.text import TextReceiveStream

from backchannel.client import Client, ConnectError, HandshakeRefused, connect
from conftest import ROOT, node_with, serve_process

pytestmark = pytest.mark.anyio

PRODUCTION = ROOT / "backchannel.production.toml"
ORIGIN = "https://chat.example.com"  # the one origin the file lists
CLI = str(Path(sys.executable).with_name("backchannel"))
NODE_EXAMPLE = ROOT / "clients" / "js" / "examples" / "node.mjs"


def environment() -> dict[str, str]:
    """This environment without BACKCHANNEL_* overrides, with a fresh random JWT secret."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKCHANNEL_")}
    env["CHAT_JWT_SECRET"] = secrets.token_urlsafe(32)
    return env


def token_for(env: dict[str, str], sub: str, *permissions: str) -> str:
    """``backchannel token create --config backchannel.production.toml`` (docs/security.md)."""
    cmd = [CLI, "token", "create", "--config", str(PRODUCTION), "--sub", sub]
    for permission in permissions:
        cmd += ["--perm", permission]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@asynccontextmanager
async def production(backend: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """The production config served on a free local port (this test's backend); its URL and
    the environment holding its secret."""
    env = environment() | {"BACKCHANNEL_SERVER__BACKEND": backend}
    cmd = [CLI, "serve", "--config", str(PRODUCTION), "--host", "127.0.0.1", "--port", "0"]
    async with serve_process(cmd, env) as served:
        yield f"ws://127.0.0.1:{served.port}/ws", env


async def test_python_client_passes_the_origin_allow_list_with_a_token(anyio_backend: str) -> None:
    async with production(anyio_backend) as (url, env):
        alice = token_for(env, "alice", "rooms:*", "system:broadcast")
        with pytest.raises(HandshakeRefused) as refused:
            async with connect(url, token=alice):
                pytest.fail("connected without the listed Origin")
        assert refused.value.status == 403 and "server.origins" in str(refused.value)
        with pytest.raises(ConnectError, match="unauthorized"):
            async with connect(url, origin=ORIGIN, reconnect=False):
                pytest.fail("connected without a token")

        client = Client(url, token=alice, origin=ORIGIN)
        pushes = client.pushes()
        async with client:
            assert await client.request("text", {"text": "hi"}) == {"text": "hi", "from": "alice"}
            room = client.subscribe("lobby")
            sent = await room.publish("hello, lobby")
            notice = {"event": "maintenance", "message": "at noon"}
            assert (await client.request("system", notice))["reached"] == 1
            with anyio.fail_after(10):
                assert await room.__anext__() == sent
                pushed = await pushes.__anext__()
        assert (sent["from"], sent["room"], sent["text"]) == ("alice", "lobby", "hello, lobby")
        assert (pushed["type"], pushed["content"]) == ("system", notice)


async def lines(stream: anyio.abc.ByteReceiveStream) -> AsyncIterator[dict[str, Any]]:
    """The JSON lines a process prints."""
    pending = ""
    async for text in TextReceiveStream(stream):
        pending += text
        *complete, pending = pending.split("\n")
        for line in complete:
            yield json.loads(line)


async def test_js_client_on_node_with_ws_passes_the_origin_allow_list(anyio_backend: str) -> None:
    node = node_with("ws")
    async with production(anyio_backend) as (url, env):
        alice = token_for(env, "alice", "rooms:*")
        js_env = env | {"BACKCHANNEL_TOKEN": alice}
        refused = await anyio.run_process([node, str(NODE_EXAMPLE), url], env=js_env, check=False)
        assert refused.returncode == 1, refused.stderr
        failed = json.loads(refused.stdout.splitlines()[-1])
        assert failed["event"] == "failed" and failed["code"] == "connect_failed"
        assert "403" in failed["message"] and "server.origins" in failed["message"]

        bob = token_for(env, "bob", "rooms:*", "system:broadcast")
        async with await anyio.open_process(
            [node, str(NODE_EXAMPLE), url, ORIGIN], env=js_env
        ) as process:
            assert process.stdout is not None and process.stdin is not None
            events: list[dict[str, Any]] = []
            with anyio.fail_after(20):
                output = lines(process.stdout)
                async for event in output:
                    events.append(event)
                    if event["event"] == "published":
                        break
                notice = {"event": "maintenance", "message": "at noon"}
                async with connect(url, token=bob, origin=ORIGIN) as admin:
                    await admin.request("join", {"room": "lobby"})
                    await admin.request("text", {"room": "lobby", "text": "hi, alice"})
                    await admin.request("system", notice)
                    async for event in output:
                        events.append(event)
                        if event["event"] == "push" and event["frame"]["type"] == "system":
                            break
                await process.stdin.aclose()  # the example closes its client and exits
                async for event in output:
                    events.append(event)
                assert await process.wait() == 0
    assert events[0] == {"event": "state", "state": "connecting", "info": {"attempt": 1}}
    reply = next(e["content"] for e in events if e["event"] == "reply")
    assert reply == {"text": "hello from Node", "from": "alice"}
    room = [e["message"]["text"] for e in events if e["event"] == "room"]
    assert room == ["hello, lobby", "hi, alice"]
    pushed = [e["frame"] for e in events if e["event"] == "push"]
    assert [(f["type"], f["content"]) for f in pushed if f["type"] == "system"] == [
        ("system", notice)
    ]
    assert events[-1]["state"] == "closed" and events[-1]["info"]["code"] == 1000
