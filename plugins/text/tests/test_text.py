"""The ``text`` plugin: echoes chat text to the sender."""

from __future__ import annotations

import pytest

from backchannel import App
from backchannel.testing import connect, serve_in_memory

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_text_is_echoed_with_the_sender() -> None:
    """A ``text`` request is answered with the same text and the sender's principal."""
    app = App({}, plugins=["text"])
    async with serve_in_memory(app), connect(app) as client:
        reply = await client.request("text", {"text": "hello"}, id="t1")
        principal = client.connection.principal
    assert principal is not None
    assert (reply["type"], reply["replyTo"]) == ("text", "t1")
    assert reply["content"] == {"text": "hello", "from": principal.id}


async def test_room_needs_the_rooms_plugin() -> None:
    """Without the rooms plugin a ``room`` is refused, naming ``content.room``."""
    app = App({}, plugins=["text"])
    async with serve_in_memory(app), connect(app) as client:
        err = await client.request("text", {"text": "hi", "room": "lobby"})
    assert err["content"]["code"] == "validation_failed"
    assert err["content"]["details"] == [{"path": "content.room", "rule": "needs the rooms plugin"}]


@pytest.mark.parametrize(
    "content",
    [{}, {"text": ""}, {"text": 5}, {"text": "x", "colour": "crimson-value"}],
    ids=["missing", "empty", "number", "extra"],
)
async def test_bad_text_content_is_validation_failed(content: dict[str, object]) -> None:
    """Content that breaks ``text.schema.json`` is ``validation_failed``, never echoed."""
    app = App({}, plugins=["text"])
    async with serve_in_memory(app), connect(app) as client:
        err = await client.request("text", content)
    assert err["type"] == "error" and err["content"]["code"] == "validation_failed"
    assert "crimson-value" not in str(err["content"])
