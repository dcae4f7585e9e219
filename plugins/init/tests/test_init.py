"""The ``init`` plugin: starts a session and says who and what the server is."""

from __future__ import annotations

import pytest

from backchannel import App, __version__, hookimpl
from backchannel.memory import MemoryBroker
from backchannel.testing import connect, serve_in_memory

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_init_returns_the_session_and_server_info() -> None:
    """``init`` answers with the connection's session id, not resumed, and server info."""
    app = App({}, plugins=["init"])
    async with serve_in_memory(app), connect(app) as client:
        reply = await client.request("init", {"client": {"name": "t", "version": "1"}})
        session = client.connection.session.id
        principal = client.connection.principal
    assert reply["type"] == "init"
    content = reply["content"]
    assert content["sessionId"] == session and session.startswith("s-")
    assert content["resumed"] is False and content["missed"] == 0
    assert content["server"] == {
        "name": "backchannel",
        "version": __version__,
        "protocol": "backchannel.v1",
    }
    assert principal is not None and content["principal"] == principal.id
    assert "reason" not in content


async def test_init_asking_for_an_unknown_session_says_so() -> None:
    """Asking to resume a session this server does not know gives ``unknown_session``."""
    app = App({}, plugins=["init"])
    async with serve_in_memory(app), connect(app) as client:
        reply = await client.request("init", {"sessionId": "s-gone", "lastSeq": 4})
    content = reply["content"]
    assert content["resumed"] is False and content["reason"] == "unknown_session"
    assert content["sessionId"] != "s-gone"


@pytest.mark.parametrize(
    ("content", "path"),
    [({"lastSeq": -1}, "content.lastSeq"), ({"sessionId": 5}, "content.sessionId")],
)
async def test_init_content_is_checked(content: dict[str, object], path: str) -> None:
    """Bad ``init`` content is ``validation_failed`` naming the field."""
    app = App({}, plugins=["init"])
    async with serve_in_memory(app), connect(app) as client:
        err = await client.request("init", content)
    assert err["content"]["code"] == "validation_failed"
    assert err["content"]["details"][0]["path"] == path


class Unreachable(MemoryBroker):
    """The in-memory broker, told it cannot serve (as the redis broker while Redis is away)."""

    reachable = True

    @property
    def ready(self) -> bool:
        return self.reachable


async def test_init_while_the_broker_is_not_ready_is_overloaded_and_retryable() -> None:
    """Issue 11 item 7: while the broker cannot serve, ``init`` is answered ``overloaded``
    (its epoch may be gone when the broker is back); the same request once it is ready
    runs (``overloaded`` is not remembered as the request's answer) and carries the epoch."""
    store = Unreachable()
    store.reachable = False

    class Supplier:
        @hookimpl
        def broker(self, app: App) -> MemoryBroker:
            return store

    app = App({}, plugins=["init", Supplier()])
    async with serve_in_memory(app), connect(app) as client:
        refused = await client.request("init", {}, id="i1")
        assert refused["type"] == "error" and refused["content"]["code"] == "overloaded"
        store.reachable = True
        answer = await client.request("init", {}, id="i1")
    assert answer["type"] == "init" and answer["content"]["epoch"] == store.epoch
