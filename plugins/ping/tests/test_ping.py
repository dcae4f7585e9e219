"""The ``ping`` plugin: application-level ping answered by ``pong``."""

from __future__ import annotations

from datetime import datetime

import pytest

from backchannel import App
from backchannel.testing import connect, serve_in_memory

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("client_time", [1700000000.5, "t-17"])
async def test_ping_answers_pong_echoing_client_time(client_time: object) -> None:
    """``ping`` answers ``pong`` with the server time and the client's time echoed."""
    app = App({}, plugins=["ping"])
    async with serve_in_memory(app), connect(app) as client:
        pong = await client.request("ping", {"clientTime": client_time}, id="p")
    assert (pong["type"], pong["replyTo"]) == ("pong", "p")
    assert pong["content"]["clientTime"] == client_time
    assert datetime.fromisoformat(pong["content"]["serverTime"].replace("Z", "+00:00"))


async def test_ping_without_content() -> None:
    """A bare ``ping`` gets a ``pong`` with only the server time."""
    app = App({}, plugins=["ping"])
    async with serve_in_memory(app), connect(app) as client:
        pong = await client.request("ping")
    assert list(pong["content"]) == ["serverTime"]


async def test_ping_client_time_must_be_string_or_number() -> None:
    """``clientTime`` of another type is ``validation_failed``."""
    app = App({}, plugins=["ping"])
    async with serve_in_memory(app), connect(app) as client:
        err = await client.request("ping", {"clientTime": [1]})
    assert err["content"]["code"] == "validation_failed"
    assert err["content"]["details"][0]["path"] == "content.clientTime"
