"""The ``system`` plugin: admin broadcast over the wire (``system:broadcast``) and from Python."""

from __future__ import annotations

from typing import Any

import pytest
from backchannel_system import PERMISSION, broadcast_notice

from backchannel import App
from backchannel.testing import MemoryClient, connect, serve_in_memory

pytestmark = pytest.mark.anyio

NOTICE = {"event": "maintenance", "message": "restart at noon"}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def system_app(permissions: list[str]) -> App:
    return App({"auth": {"anonymous_permissions": permissions}}, plugins=["system", "ping"])


async def admitted(*clients: MemoryClient) -> None:
    """Wait until each client's connection is admitted (its first request is answered)."""
    for client in clients:
        assert (await client.request("ping"))["type"] == "pong"


@pytest.mark.parametrize("permissions", [["*"], [PERMISSION], ["system:*"]])
async def test_permitted_principal_broadcasts_to_every_connection(permissions: list[str]) -> None:
    """With ``system:broadcast`` a request reaches every connection, the sender included."""
    app = system_app(permissions)
    async with serve_in_memory(app), connect(app) as admin, connect(app) as other:
        await admitted(admin, other)
        reply = await admin.request("system", NOTICE, id="b")
        notice = await other.receive()
        own = [f for f in admin.frames if f["type"] == "system" and "replyTo" not in f]
    assert (reply["type"], reply["replyTo"]) == ("system", "b")
    assert reply["content"] == {"event": "maintenance", "reached": 2}
    assert notice["type"] == "system" and notice["content"] == NOTICE
    assert [f["content"] for f in own] == [NOTICE]


@pytest.mark.parametrize("permissions", [[], ["text"], ["system:read"]])
async def test_principal_without_the_permission_is_forbidden(permissions: list[str]) -> None:
    """Without ``system:broadcast`` the request is ``forbidden`` and nothing is sent."""
    app = system_app(permissions)
    async with serve_in_memory(app), connect(app) as client:
        err = await client.request("system", NOTICE)
    assert err["content"]["code"] == "forbidden"
    assert PERMISSION in err["content"]["message"]
    assert [f["type"] for f in client.frames] == ["error"]  # no notice went out


async def test_broadcast_notice_from_python() -> None:
    """``broadcast_notice(app, ...)`` sends a ``system`` frame to every connection."""
    app = system_app([])
    async with serve_in_memory(app), connect(app) as a, connect(app) as b:
        await admitted(a, b)
        reached = broadcast_notice(app, "notice", "hello all", level="info")
        frames: list[dict[str, Any]] = [await a.receive(), await b.receive()]
    assert reached == 2
    for frame in frames:
        assert frame["type"] == "system" and "replyTo" not in frame
        assert frame["content"] == {"event": "notice", "message": "hello all", "level": "info"}


async def test_system_content_is_checked() -> None:
    """An unknown ``event`` is ``validation_failed`` naming ``content.event``."""
    app = system_app(["*"])
    async with serve_in_memory(app), connect(app) as client:
        err = await client.request("system", {"event": "party", "message": "x"})
    assert err["content"]["code"] == "validation_failed"
    assert err["content"]["details"][0]["path"] == "content.event"
