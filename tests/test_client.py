"""The Python client (``backchannel.client``) on asyncio and Trio.

Two kinds of peer: the real server (requests, errors, streams, timeouts,
reconnects, re-sends, clean close) and :class:`Peer`, a scripted server that
speaks the frames of docs/protocol.md by hand — it pins the client's side of
resume, replay dedupe, rooms and heartbeat to the spec independently of the
server.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from backchannel import BackchannelError, ErrorCode, hookimpl
from backchannel.broker import SESSION_COST
from backchannel.client import (
    Backoff,
    Client,
    ConnectError,
    ConnectionClosed,
    Gap,
    HandshakeRefused,
    RequestError,
    RequestTimeout,
    State,
    connect,
)
from backchannel.http import HttpRequest
from backchannel.memory import MemoryBroker
from backchannel.websocket import Wire
from conftest import make_app, serving

pytestmark = pytest.mark.anyio

FAST = Backoff(initial=0.01, maximum=0.05)


# --------------------------------------------------------------------------- helpers


class States:
    """Records ``on_state`` calls; ``wait`` blocks (bounded) until a state is reached."""

    def __init__(self) -> None:
        self.log: list[tuple[State, dict[str, Any]]] = []
        self._changed = anyio.Event()

    def __call__(self, state: State, info: dict[str, Any]) -> None:
        self.log.append((state, info))
        self._changed.set()

    @property
    def names(self) -> list[str]:
        return [str(s) for s, _ in self.log]

    async def wait(self, *states: State, count: int = 1, timeout: float = 5.0) -> dict[str, Any]:
        """Info of the ``count``-th entry in any of ``states``."""
        with anyio.fail_after(timeout):
            while True:
                seen = [info for s, info in self.log if s in states]
                if len(seen) >= count:
                    return seen[count - 1]
                await self._changed.wait()
                self._changed = anyio.Event()


def url(port: int | None) -> str:
    return f"ws://127.0.0.1:{port}/ws"


def kill_all(app: Any, code: int = 1011) -> None:
    for conn in list(app.connections()):
        conn.close(code, "test")


class Gate:
    """A handler that counts its executions and waits to be released."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.started = anyio.Event()
        self.release = anyio.Event()

    async def __call__(self, message: Any) -> dict[str, Any]:
        self.ids.append(message.id)
        self.started.set()
        await self.release.wait()
        return {"runs": len(self.ids)}


class Background:
    """A server in a task group of the test, so a client can outlive it (restarts)."""

    def __init__(self, app: Any, port: int) -> None:
        self.app = app
        self.port = port
        self._stop = anyio.Event()
        self._stopped = anyio.Event()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            async with self.app.run(host="127.0.0.1", port=self.port):
                task_status.started()
                await self._stop.wait()
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        self._stop.set()
        with anyio.fail_after(10):
            await self._stopped.wait()


async def start(tg: anyio.abc.TaskGroup, app: Any, port: int = 0) -> Background:
    server = Background(app, port)
    await tg.start(server.run)
    return server


# --------------------------------------------------------------------------- scripted peer


class PeerConn:
    """One connection to :class:`Peer`: read requests, write frames, drop or close."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.wire = Wire(self, max_size=None)
        self.inbox: deque[dict[str, Any]] = deque()
        self.headers: dict[str, str] = {}
        self._request = False
        self.done = anyio.Event()

    def on_request(self, request: HttpRequest) -> None:
        self.headers = request.headers
        self._request = True

    def on_message(self, payload: str | bytes) -> None:
        self.inbox.append(json.loads(payload))

    async def _flush(self) -> None:
        for data in self.wire.data_to_send():
            if data:
                await self.stream.send(data)

    async def _fill(self) -> None:
        self.wire.receive_data(await self.stream.receive())
        await self._flush()

    async def handshake(self) -> None:
        while not self._request:
            await self._fill()
        assert self.wire.accept() is None
        await self._flush()

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        with anyio.fail_after(timeout):
            while not self.inbox:
                await self._fill()
        return self.inbox.popleft()

    async def send(
        self, type: str, content: dict[str, Any], seq: int, reply_to: str | None = None
    ) -> None:
        frame: dict[str, Any] = {"id": f"f{seq}", "type": type, "content": content, "seq": seq}
        if reply_to is not None:
            frame["replyTo"] = reply_to
        frame["timestamp"] = "2026-01-01T00:00:00.000Z"
        self.wire.send_text(json.dumps(frame).encode())
        await self._flush()

    async def send_room(self, type: str, content: dict[str, Any]) -> None:
        """A room frame: ``room`` (``offset`` and ``epoch`` for a message), no ``seq``."""
        frame: dict[str, Any] = {"id": f"r{content.get('offset')}", "type": type}
        frame |= {"content": content, "room": content["room"]}
        if "offset" in content:
            frame |= {"offset": content["offset"], "epoch": content["epoch"]}
        frame["timestamp"] = "2026-01-01T00:00:00.000Z"
        self.wire.send_text(json.dumps(frame).encode())
        await self._flush()

    async def answer_init(
        self, seq: int, session: str = "s-1", resumed: bool = False, **extra: Any
    ) -> dict[str, Any]:
        init = await self.recv()
        assert init["type"] == "init"
        content = {"sessionId": session, "resumed": resumed, "missed": 0, **extra}
        await self.send("init", content, seq, init["id"])
        return init

    async def finish(self) -> None:
        """After the script: answer the client's closing handshake, then close TCP."""
        with anyio.move_on_after(5):
            try:
                while not self.wire.close_expected():
                    await self._fill()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
        await self.drop()

    async def drop(self) -> None:
        """Vanish without a close frame (the client sees 1006)."""
        await self.stream.aclose()
        self.done.set()


class Peer:
    """A scripted backchannel server on a free port; ``accept()`` the client's connections."""

    def __init__(self, port: int, conns: Any) -> None:
        self.port = port
        self._conns = conns
        self.all: list[PeerConn] = []

    async def accept(self, timeout: float = 5.0) -> PeerConn:
        with anyio.fail_after(timeout):
            conn: PeerConn = await self._conns.receive()
        return conn


@asynccontextmanager
async def scripted_peer() -> AsyncIterator[Peer]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    send, receive = anyio.create_memory_object_stream[PeerConn](16)
    peer = Peer(port, receive)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        conn = PeerConn(stream)
        peer.all.append(conn)
        await conn.handshake()
        await send.send(conn)
        await conn.done.wait()

    async with listener, send, receive, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield peer
        finally:
            tg.cancel_scope.cancel()


# --------------------------------------------------------------------------- real server


async def test_request_reply_ack_and_state() -> None:
    app = make_app()

    @app.handler("noop")
    async def noop(message: Any) -> None:
        return None

    states = States()
    async with serving(app), connect(url(app.port), on_state=states) as client:
        assert client.state is State.CONNECTED
        assert client.session_id and client.session_id.startswith("s-")
        reply = await client.request("text", {"text": "hi"})
        assert reply["text"] == "hi"
        assert (await client.request("ping"))["serverTime"]
        assert await client.request("noop") == {}
        assert client.last_seq == 4  # init, text, pong, ack
    assert states.names == ["connecting", "connected", "closed"]
    assert states.log[1][1] == {"sessionId": client.session_id}


async def test_error_answers_raise_request_error() -> None:
    app = make_app()

    @app.handler("weather")
    async def weather(message: Any) -> dict[str, Any]:
        raise BackchannelError(
            ErrorCode.RATE_LIMITED,
            "slow down",
            details=[{"path": "content", "rule": "quota"}],
            extra={"retryAfter": 2.5},
        )

    async with serving(app), connect(url(app.port)) as client:
        with pytest.raises(RequestError) as caught:
            await client.request("weather", {"city": "x"})
        err = caught.value
        assert err.code is ErrorCode.RATE_LIMITED
        assert (err.message, err.retry_after) == ("slow down", 2.5)
        assert err.details == [{"path": "content", "rule": "quota"}]
        with pytest.raises(RequestError) as caught:
            await client.request("nope")
        assert caught.value.code is ErrorCode.UNKNOWN_TYPE
        assert await client.request("ping")  # still usable


async def test_stream_yields_chunks_then_ends_or_raises() -> None:
    app = make_app()

    @app.handler("ask")
    async def ask(message: Any) -> AsyncIterator[dict[str, Any]]:
        for token in message.content["tokens"]:
            if token == "!":
                raise BackchannelError(ErrorCode.VALIDATION_FAILED, "content.tokens: no '!'")
            yield {"token": token}

    async with serving(app), connect(url(app.port)) as client:
        tokens = [c["token"] async for c in client.stream("ask", {"tokens": ["Hel", "lo"]})]
        assert tokens == ["Hel", "lo"]
        got: list[str] = []
        with pytest.raises(RequestError) as caught:
            async for chunk in client.stream("ask", {"tokens": ["a", "!"]}):
                got.append(chunk["token"])
        assert got == ["a"] and caught.value.code is ErrorCode.VALIDATION_FAILED
        assert await client.request("ask", {"tokens": ["x"]}) == {}  # request() skips chunks
        items = [c async for c in client.stream("ping")]  # a plain reply is the last item
        assert len(items) == 1 and items[0]["serverTime"]


async def test_timeout_raises_and_the_client_stays_usable() -> None:
    app = make_app()
    gate = Gate()
    app.handler("slow")(gate)
    async with serving(app), connect(url(app.port), request_timeout=5) as client:
        with pytest.raises(RequestTimeout):
            await client.request("slow", timeout=0.1)
        gate.release.set()
        assert await client.request("ping")


async def test_first_connection_failure_raises_connect_error() -> None:
    async with scripted_peer() as peer:
        port = peer.port  # a port that is closed once the peer is gone
    states = States()
    with pytest.raises(ConnectError):
        async with connect(url(port), on_state=states, backoff=FAST):
            pytest.fail("connected to nothing")
    assert states.names == ["connecting", "closed"]


async def test_refused_handshake_raises_connect_error() -> None:
    app = make_app()
    async with serving(app):
        with pytest.raises(ConnectError, match="404"):
            async with connect(f"ws://127.0.0.1:{app.port}/nowhere"):
                pytest.fail("connected to a 404")


async def test_pushes_reach_on_push_and_the_pushes_iterator_in_order() -> None:
    """``app.send``, ``app.broadcast`` and a ``system`` notice reach the application through
    both ways, once each, in order; answers and the subscribed room's messages do not."""
    anonymous = {"anonymous_permissions": ["rooms:*", "system:broadcast"]}
    app = make_app(config={"auth": anonymous})
    called: list[dict[str, Any]] = []
    async with serving(app):
        client = Client(url(app.port), on_push=called.append)
        pushes = client.pushes()  # made before connecting: misses nothing
        async with client:
            room = client.subscribe("lobby")
            sent = await room.publish("in the room")
            with anyio.fail_after(5):
                assert await room.__anext__() == sent  # published, stored, delivered once
            assert (sent["room"], sent["text"]) == ("lobby", "in the room")
            (connection,) = app.connections()
            assert app.send(connection.id, "weather.alert", {"storm": True})
            assert app.broadcast("news", {"headline": "h"}) == 1
            notice = {"event": "maintenance", "message": "at noon"}
            assert (await client.request("system", notice))["reached"] == 1
            got: list[dict[str, Any]] = []
            with anyio.fail_after(5):
                while len(got) < 3:
                    got.append(await pushes.__anext__())
        rest = [frame async for frame in pushes]  # the client closed: the iteration ends
    assert [(f["type"], f["content"]) for f in got] == [
        ("weather.alert", {"storm": True}),
        ("news", {"headline": "h"}),
        ("system", notice),
    ]
    assert all("replyTo" not in f and isinstance(f["seq"], int) for f in got)
    assert rest == [] and called == got


async def test_pushes_of_a_server_that_goes_away_end_with_connection_closed() -> None:
    """The ``going_away`` notice at shutdown is a push; then the iterator raises."""
    app = make_app()
    called: list[dict[str, Any]] = []
    async with anyio.create_task_group() as tg:
        server = await start(tg, app)
        async with connect(url(app.port), reconnect=False, on_push=called.append) as client:
            pushes = client.pushes()
            await server.stop()
            with anyio.fail_after(5):
                notice = await pushes.__anext__()
                with pytest.raises(ConnectionClosed) as closed:
                    await pushes.__anext__()
    assert (notice["type"], notice["content"]["event"]) == ("system", "going_away")
    assert closed.value.code == 1001 and called == [notice]


async def test_origin_passes_an_origin_allow_list_and_a_refusal_says_how() -> None:
    app = make_app(config={"server": {"origins": ["https://chat.test"]}})
    async with serving(app):
        with pytest.raises(HandshakeRefused) as caught:
            async with connect(url(app.port)):
                pytest.fail("connected without an Origin")
        assert caught.value.status == 403
        assert str(caught.value) == (
            f"{url(app.port)} refused the WebSocket handshake: HTTP 403. The server's Origin"
            " allow-list (server.origins) does not list this client's Origin (none sent):"
            " pass origin= one of the listed origins"
        )
        with pytest.raises(HandshakeRefused, match=r"client's Origin \('https://evil\.test'\)"):
            async with connect(url(app.port), origin="https://evil.test"):
                pytest.fail("connected from an origin not listed")
        async with connect(url(app.port), origin="https://chat.test") as client:
            assert (await client.request("text", {"text": "hi"}))["text"] == "hi"


async def test_origin_and_headers_go_into_every_handshake() -> None:
    extra = {"X-Trace": "t-1"}
    async with peer_client(origin="https://chat.test", headers=extra, token="jwt") as s:
        assert s.conn.headers["origin"] == "https://chat.test"
        assert s.conn.headers["x-trace"] == "t-1"
        assert s.conn.headers["authorization"] == "Bearer jwt"
        await s.conn.drop()
        two = await s.peer.accept()
        assert (two.headers["origin"], two.headers["x-trace"]) == ("https://chat.test", "t-1")
        await two.answer_init(1, resumed=True)


def test_a_header_given_twice_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="Origin once"):
        Client("ws://h/ws", origin="https://a.test", headers={"origin": "https://b.test"})
    with pytest.raises(ValueError, match="Authorization"):
        Client("ws://h/ws", token="t", headers={"Authorization": "Basic x"})


async def test_clean_close_sends_1000_and_stops() -> None:
    app = make_app()
    codes: list[int] = []
    app.on("connection_removed")(lambda connection, code: codes.append(code))
    states = States()
    async with serving(app):
        async with connect(url(app.port), on_state=states) as client:
            await client.request("ping")
            await client.close()
            assert client.state is State.CLOSED
            with pytest.raises(ConnectionClosed):
                await client.request("ping")
        with anyio.fail_after(5):
            while not codes:
                await anyio.sleep(0.01)
    assert codes == [1000]
    assert states.names == ["connecting", "connected", "closed"]
    assert states.log[-1][1] == {"code": 1000, "reason": "closed by the client"}


async def test_cancelled_block_still_closes_cleanly() -> None:
    app = make_app()
    codes: list[int] = []
    app.on("connection_removed")(lambda connection, code: codes.append(code))
    async with serving(app):
        with anyio.CancelScope() as scope:
            async with connect(url(app.port)) as client:
                scope.cancel()
                await anyio.sleep_forever()
        assert client.state is State.CLOSED
        with anyio.fail_after(5):
            while not codes:
                await anyio.sleep(0.01)
    assert codes == [1000]


async def test_caller_exceptions_come_out_unwrapped() -> None:
    app = make_app()
    async with serving(app):
        with pytest.raises(RequestError):
            async with connect(url(app.port)) as client:
                await client.request("nope")


async def test_reconnects_after_server_close_with_backoff() -> None:
    app = make_app()
    states = States()
    async with serving(app), connect(url(app.port), on_state=states, backoff=FAST) as client:
        first = client.session_id
        kill_all(app, 1011)
        info = await states.wait(State.RECONNECTING)
        assert info["code"] == 1011 and info["attempt"] == 1
        assert 0 <= info["delay"] <= FAST.initial
        after = await states.wait(State.RESUMED, State.RESYNCED)
        assert client.state in (State.RESUMED, State.RESYNCED)
        if client.state is State.RESYNCED:
            assert after["previous"] == first and client.session_id != first
        assert (await client.request("text", {"text": "back"}))["text"] == "back"


async def test_unanswered_request_survives_a_server_side_close() -> None:
    app = make_app()
    gate = Gate()
    app.handler("slow")(gate)
    states = States()
    async with (
        serving(app),
        connect(url(app.port), on_state=states, backoff=FAST) as client,
        anyio.create_task_group() as tg,
    ):
        results: list[dict[str, Any]] = []

        async def ask() -> None:
            results.append(await client.request("slow", {"n": 1}))

        tg.start_soon(ask)
        with anyio.fail_after(5):
            await gate.started.wait()
        kill_all(app)
        await states.wait(State.RESUMED, State.RESYNCED)
        back = client.state
        with anyio.fail_after(5):  # resynced: the re-sent request runs again in the new session
            while back is State.RESYNCED and len(gate.ids) < 2:
                await anyio.sleep(0.01)
        gate.release.set()
    assert len(results) == 1
    assert len(set(gate.ids)) == 1  # every execution saw the one id
    assert len(gate.ids) == (2 if back is State.RESYNCED else 1)


async def test_a_session_evicted_for_memory_resyncs_and_its_request_runs_again() -> None:
    """Over a real server whose session memory fits one session (``session.total_max_bytes``):
    the client's new connection needs the room, so its old (detached) session is evicted;
    the resume says ``evicted``, and the unanswered request is re-sent and answered."""
    app = make_app({"session": {"total_max_bytes": 2 * SESSION_COST + 200}})
    gate = Gate()
    app.handler("slow")(gate)
    states = States()
    async with (
        serving(app),
        connect(url(app.port), on_state=states, backoff=FAST) as client,
        anyio.create_task_group() as tg,
    ):
        first = client.session_id
        results: list[dict[str, Any]] = []

        async def ask() -> None:
            results.append(await client.request("slow", {"n": 1}))

        tg.start_soon(ask)
        with anyio.fail_after(5):
            await gate.started.wait()
        kill_all(app)
        info = await states.wait(State.RESYNCED)
        assert info == {"sessionId": client.session_id, "previous": first, "reason": "evicted"} | {
            "resent": 1
        }
        with anyio.fail_after(5):  # the re-sent request runs in the new session
            while len(gate.ids) < 2:
                await anyio.sleep(0.01)
        gate.release.set()
    assert len(results) == 1 and len(set(gate.ids)) == 1
    assert app.broker.sizes()["evicted"] == 1  # type: ignore[attr-defined]


async def test_server_restart_on_the_same_port() -> None:
    states = States()
    async with anyio.create_task_group() as tg:
        server = await start(tg, make_app())
        port = server.app.port
        async with connect(url(port), on_state=states, backoff=FAST) as client:
            await server.stop()  # going away (1001), then nothing listens
            await states.wait(State.RECONNECTING, count=3)
            reconnecting = [i for s, i in states.log if s is State.RECONNECTING]
            assert reconnecting[0]["code"] == 1001
            assert [i["attempt"] for i in reconnecting] == list(range(1, len(reconnecting) + 1))
            assert all(i["delay"] <= FAST.maximum for i in reconnecting)
            await start(tg, make_app(), port)
            await states.wait(State.RESUMED, State.RESYNCED)
            assert await client.request("ping")
        tg.cancel_scope.cancel()


async def test_gives_up_after_max_attempts() -> None:
    states = States()
    backoff = Backoff(initial=0.01, maximum=0.02, max_attempts=3)
    async with anyio.create_task_group() as tg:
        server = await start(tg, make_app())
        async with connect(url(server.app.port), on_state=states, backoff=backoff) as client:
            await server.stop()
            info = await states.wait(State.CLOSED)
            assert [i["attempt"] for s, i in states.log if s is State.RECONNECTING] == [1, 2, 3]
            assert "gave up after 3" in info["reason"]
            with pytest.raises(ConnectionClosed):
                await client.request("ping")


@pytest.mark.parametrize("code", [1008, 4001, 4003])
async def test_no_retry_close_codes(code: int) -> None:
    app = make_app()
    gate = Gate()
    app.handler("slow")(gate)
    states = States()
    async with serving(app), connect(url(app.port), on_state=states, backoff=FAST) as client:
        async with anyio.create_task_group() as tg:
            failures: list[BaseException] = []

            async def ask() -> None:
                try:
                    await client.request("slow")
                except ConnectionClosed as exc:
                    failures.append(exc)

            tg.start_soon(ask)
            with anyio.fail_after(5):
                await gate.started.wait()
            kill_all(app, code)
            info = await states.wait(State.CLOSED)
        assert info["code"] == code
        assert State.RECONNECTING not in [s for s, _ in states.log]
        assert [getattr(f, "code", None) for f in failures] == [code]
        gate.release.set()


async def test_no_reconnect_when_disabled() -> None:
    app = make_app()
    states = States()
    async with serving(app), connect(url(app.port), on_state=states, reconnect=False):
        kill_all(app, 1011)
        assert (await states.wait(State.CLOSED))["code"] == 1011


# --------------------------------------------------------------------------- real server: resume


async def test_resume_keeps_the_session_and_runs_once() -> None:
    app = make_app()
    gate = Gate()
    app.handler("slow")(gate)
    states = States()
    async with (
        serving(app),
        connect(url(app.port), on_state=states, backoff=FAST) as client,
        anyio.create_task_group() as tg,
    ):
        session = client.session_id
        results: list[dict[str, Any]] = []

        async def ask() -> None:
            results.append(await client.request("slow"))

        tg.start_soon(ask)
        try:
            with anyio.fail_after(5):
                await gate.started.wait()
            kill_all(app)
            await states.wait(State.RESUMED, State.RESYNCED)
            assert client.state is State.RESUMED and client.session_id == session
        finally:
            gate.release.set()
    assert results == [{"runs": 1}] and len(gate.ids) == 1


async def test_rooms_across_a_reconnect() -> None:
    app = make_app(config={"auth": {"anonymous_permissions": ["rooms:*"]}})
    states = States()
    async with (
        serving(app),
        connect(url(app.port), backoff=FAST) as alice,
        connect(url(app.port), backoff=FAST, on_state=states) as bob,
    ):
        room = bob.subscribe("lobby")
        await alice.request("join", {"room": "lobby"})
        await alice.request("text", {"room": "lobby", "text": "one"})
        with anyio.fail_after(5):
            first = await room.__anext__()
        assert isinstance(first, dict) and first["text"] == "one"
        kill_all(app)
        await states.wait(State.RESUMED, State.RESYNCED)
        await alice.request("text", {"room": "lobby", "text": "two"})
        with anyio.fail_after(5):
            second = await room.__anext__()
        assert isinstance(second, dict) and second["text"] == "two"
        assert second["offset"] == first["offset"] + 1


async def test_token_expiring_is_answered_with_auth_refresh(tmp_path: Path) -> None:
    jwt = pytest.importorskip("jwt")
    pytest.importorskip("backchannel_jwt")
    secret = b"k" * 48
    (tmp_path / "secret").write_bytes(secret)
    key = {"kid": "hs", "algorithms": ["HS256"], "secret_file": str(tmp_path / "secret")}
    cfg = {
        "issuers": [{"issuer": "https://issuer.test/", "keys": [key]}],
        "audience": "chat",
        "leeway": 0,
        "refresh_before": 1.5,
        "expiry_grace": 0.2,
    }
    plugins = ["jwt", "init", "ping", "system", "validation"]
    app = make_app({"plugins": {"jwt": cfg}, "auth": {"allow_anonymous": False}}, plugins)
    first_exp = int(time.time()) + 2
    minted: list[int] = []

    async def provider() -> str:
        exp = first_exp if not minted else int(time.time()) + 600
        minted.append(exp)
        claims = {"sub": "alice", "iss": "https://issuer.test/", "aud": "chat", "exp": exp}
        return str(jwt.encode(claims, secret, algorithm="HS256", headers={"kid": "hs"}))

    states = States()
    async with serving(app), connect(url(app.port), token_provider=provider, on_state=states) as c:
        with anyio.fail_after(5):  # the notice comes 1.5 s before exp; the refresh follows
            while app.plugin("jwt").refreshed == 0:  # type: ignore[union-attr]
                await anyio.sleep(0.05)
        assert minted[0] == first_exp and all(exp > first_exp for exp in minted[1:])
        while time.time() < first_exp + 0.5:  # past the first exp + grace: still open
            assert "serverTime" in await c.request("ping", timeout=2)
            await anyio.sleep(0.1)
        assert c.state is State.CONNECTED
    assert states.names.count(str(State.CONNECTED)) == 1
    assert State.RECONNECTING not in [s for s, _ in states.log]
    assert app.plugin("jwt").expired == 0  # type: ignore[union-attr]


# --------------------------------------------------------------------------- scripted peer


class Scripted:
    """A client connected to a :class:`Peer` whose first connection answered ``init``."""

    def __init__(self, peer: Peer, client: Client, conn: PeerConn, init: dict[str, Any]) -> None:
        self.peer, self.client, self.conn, self.init = peer, client, conn, init


@asynccontextmanager
async def peer_client(
    session: str = "s-1", seq: int = 1, epoch: str | None = None, **options: Any
) -> AsyncIterator[Scripted]:
    """Connect to a scripted peer, which answers the first ``init`` meanwhile (with
    ``epoch`` when given)."""
    options = {"heartbeat": None, "backoff": FAST, **options}
    first: list[Any] = []
    extra = {} if epoch is None else {"epoch": epoch}

    async def answer_first(peer: Peer) -> None:
        conn = await peer.accept()
        first.extend([conn, await conn.answer_init(seq, session=session, **extra)])

    async with scripted_peer() as peer, anyio.create_task_group() as tg:
        tg.start_soon(answer_first, peer)
        async with connect(url(peer.port), **options) as client:
            try:
                yield Scripted(peer, client, first[0], first[1])
            finally:
                for conn in peer.all:
                    tg.start_soon(conn.finish)


async def test_resume_replay_is_deduped_and_only_unanswered_requests_are_resent() -> None:
    states = States()
    async with peer_client(on_state=states) as s, anyio.create_task_group() as tg:
        client, one = s.client, s.conn
        assert "sessionId" not in s.init["content"]
        chunks: list[str] = []
        answers: dict[str, Any] = {}
        got_a = anyio.Event()

        async def streaming() -> None:
            async for chunk in client.stream("ask", {"q": 1}):
                chunks.append(chunk["t"])
                got_a.set()

        async def plain() -> None:
            answers["text"] = await client.request("text", {"text": "x"})

        tg.start_soon(streaming)
        ask = await one.recv()
        tg.start_soon(plain)
        text = await one.recv()
        await one.send("chunk", {"t": "a"}, 2, ask["id"])
        with anyio.fail_after(5):
            await got_a.wait()
        await one.drop()

        two = await s.peer.accept()
        init = await two.recv()
        assert init["content"]["sessionId"] == "s-1" and init["content"]["lastSeq"] == 2
        await two.send("chunk", {"t": "a"}, 2, ask["id"])  # replayed again: dropped by seq
        await two.send("chunk", {"t": "b"}, 3, ask["id"])
        await two.send("text", {"text": "x"}, 4, text["id"])  # answered while away
        await two.send("init", {"sessionId": "s-1", "resumed": True, "missed": 2}, 5, init["id"])
        resent = await two.recv()
        assert resent == ask  # same id, type and content; the answered one is not re-sent
        await two.send("ack", {}, 6, ask["id"])
        info = await states.wait(State.RESUMED)
        assert info == {"sessionId": "s-1", "missed": 2}
    assert chunks == ["a", "b"] and answers["text"] == {"text": "x"}
    assert client.last_seq == 6


@pytest.mark.parametrize("reason", ["trimmed", "evicted"])
async def test_resume_refused_resyncs_and_resends(reason: str) -> None:
    """``resumed: false`` for any reason (``evicted``: the server let the session go to stay
    within ``session.total_max_bytes``): a new session, unanswered requests re-sent."""
    states = States()
    async with peer_client("s-old", 7, on_state=states) as s, anyio.create_task_group() as tg:
        results: list[dict[str, Any]] = []

        async def ask() -> None:
            results.append(await s.client.request("text", {"text": "y"}))

        tg.start_soon(ask)
        request = await s.conn.recv()
        await s.conn.drop()
        two = await s.peer.accept()
        init = await two.answer_init(1, session="s-new", reason=reason)
        assert init["content"]["lastSeq"] == 7
        assert await two.recv() == request
        await two.send("text", {"text": "y"}, 2, request["id"])
        info = await states.wait(State.RESYNCED)
        assert info == {"sessionId": "s-new", "previous": "s-old", "reason": reason, "resent": 1}
    assert results == [{"text": "y"}] and s.client.last_seq == 2


async def test_forbidden_resume_falls_back_to_a_new_session() -> None:
    states = States()
    async with peer_client("s-a", 3, on_state=states) as s:
        await s.conn.drop()
        two = await s.peer.accept()
        init = await two.recv()
        assert init["content"]["sessionId"] == "s-a"
        await two.send("error", {"code": "forbidden", "message": "not yours"}, 1, init["id"])
        fresh = await two.recv()
        assert fresh["type"] == "init" and "sessionId" not in fresh["content"]
        await two.send("init", {"sessionId": "s-b", "resumed": False, "missed": 0}, 2, fresh["id"])
        info = await states.wait(State.RESYNCED)
        assert (info["previous"], info["reason"]) == ("s-a", "forbidden")
        assert (s.client.session_id, s.client.last_seq) == ("s-b", 2)


NOT_NOW = ["overloaded", "shutting_down", "rate_limited"]


@pytest.mark.parametrize("code", NOT_NOW)
async def test_init_answered_not_now_before_the_first_connection_is_retried(code: str) -> None:
    """An init answered overloaded / shutting_down / rate_limited is no refusal: the client
    drops that connection and comes back after at least ``retryAfter``, then connects."""
    states = States()
    async with scripted_peer() as peer, anyio.create_task_group() as tg:
        connected: list[Client] = []
        entered, done = anyio.Event(), anyio.Event()

        async def use() -> None:
            async with connect(url(peer.port), on_state=states, heartbeat=None, backoff=FAST) as c:
                connected.append(c)
                entered.set()
                await done.wait()

        tg.start_soon(use)
        one = await peer.accept()
        init = await one.recv()
        refusal = {"code": code, "message": "not now", "retryAfter": 0.3}
        await one.send("error", refusal, 1, init["id"])
        tg.start_soon(one.finish)  # the client closes this connection: answer its close
        info = await states.wait(State.RECONNECTING)
        assert info["delay"] >= 0.3 and info["code"] == 1000
        assert info["reason"] == f"init answered {code}: not now"
        two = await peer.accept()
        again = await two.answer_init(1, session="s-1", epoch="e1")
        assert "sessionId" not in again["content"]
        with anyio.fail_after(5):
            await entered.wait()
        assert [s for s, _ in states.log] == [
            State.CONNECTING,
            State.RECONNECTING,
            State.CONNECTED,
        ]
        assert connected[0].session_id == "s-1" and connected[0].epoch == "e1"
        done.set()
        for conn in peer.all:
            tg.start_soon(conn.finish)


async def test_init_answered_not_now_gives_up_after_max_attempts() -> None:
    """Retrying a busy server is bounded by ``max_attempts`` like any reconnect."""
    backoff = Backoff(initial=0.01, maximum=0.02, max_attempts=2)
    async with scripted_peer() as peer, anyio.create_task_group() as tg:

        async def busy() -> None:
            for _ in range(3):
                conn = await peer.accept()
                init = await conn.recv()
                await conn.send("error", {"code": "overloaded", "message": "x"}, 1, init["id"])
                tg.start_soon(conn.finish)

        tg.start_soon(busy)
        with pytest.raises(ConnectError, match="gave up after 2 reconnect attempts"):
            async with connect(url(peer.port), heartbeat=None, backoff=backoff):
                pass


@pytest.mark.parametrize("code", NOT_NOW)
async def test_init_answered_not_now_while_resuming_keeps_the_session(code: str) -> None:
    states = States()
    async with (
        peer_client("s-1", 3, epoch="e1", on_state=states) as s,
        anyio.create_task_group() as tg,
    ):
        await s.conn.drop()
        two = await s.peer.accept()
        init = await two.recv()
        resume = {"sessionId": "s-1", "lastSeq": 3, "epoch": "e1"}
        assert {k: init["content"].get(k) for k in resume} == resume
        await two.send("error", {"code": code, "message": "not now"}, 1, init["id"])
        tg.start_soon(two.finish)
        three = await s.peer.accept()
        init = await three.recv()
        assert {k: init["content"].get(k) for k in resume} == resume  # kept, not started anew
        answer = {"sessionId": "s-1", "resumed": True, "missed": 0, "epoch": "e1"}
        await three.send("init", answer, 4, init["id"])
        assert await states.wait(State.RESUMED) == {"sessionId": "s-1", "missed": 0}
        assert (s.client.session_id, s.client.last_seq) == ("s-1", 4)


async def test_resume_sends_the_epoch_and_epoch_changed_resyncs() -> None:
    """``init`` carries the epoch of the last answer; a server whose broker lost the session's
    epoch answers ``epoch_changed``, and the next resume carries the new epoch."""
    states = States()
    async with peer_client("s-1", 2, epoch="e1", on_state=states) as s:
        await s.conn.drop()
        two = await s.peer.accept()
        init = await two.recv()
        assert init["content"]["epoch"] == "e1"
        answer = {"sessionId": "s-2", "resumed": False, "missed": 0, "epoch": "e2"}
        await two.send("init", {**answer, "reason": "epoch_changed"}, 1, init["id"])
        info = await states.wait(State.RESYNCED)
        assert (info["previous"], info["reason"]) == ("s-1", "epoch_changed")
        await two.drop()
        three = await s.peer.accept()
        init = await three.recv()
        assert (init["content"]["sessionId"], init["content"]["epoch"]) == ("s-2", "e2")
        await three.send("init", {**answer, "resumed": True}, 2, init["id"])
        await states.wait(State.RESUMED)


class AwayBroker(MemoryBroker):
    """The in-memory broker, not ready until told (as a Redis broker while Redis is away)."""

    up = False

    @property
    def ready(self) -> bool:
        return self.up


class Away:
    @hookimpl
    def broker(self, app: Any) -> AwayBroker:
        return AwayBroker()


async def test_client_waits_out_a_server_whose_broker_is_away() -> None:
    """Against the real server: init is answered overloaded while the broker is not ready;
    the client retries with backoff and connects once it is."""
    app = make_app(plugins=["init", "text", Away()])
    states = States()
    async with serving(app), anyio.create_task_group() as tg:
        answers: list[dict[str, Any]] = []

        async def use() -> None:
            async with connect(url(app.port), on_state=states, backoff=FAST) as client:
                answers.append(await client.request("text", {"text": "hi"}))

        tg.start_soon(use)
        info = await states.wait(State.RECONNECTING, count=2)
        assert info["reason"].startswith("init answered overloaded: ")
        assert isinstance(app.broker, AwayBroker)
        app.broker.up = True
        await states.wait(State.CONNECTED)
    assert answers == [{"text": "hi", "from": answers[0]["from"]}]


async def test_subscribe_dedupes_by_offset_rejoins_with_since_and_flags_gaps() -> None:
    """A subscription takes its room's messages from room frames only (a publish's reply
    just answers it), holds those that arrive before its join is answered (the answer
    may announce a gap that comes first), re-joins with ``since`` after every reconnect
    (a resumed session too: its rooms deliver nothing until joined again) and drops
    what it has by offset."""
    async with peer_client() as s, anyio.create_task_group() as tg:
        room = s.client.subscribe("lobby")
        one = s.conn
        join = await one.recv()
        assert join["type"] == "join" and join["content"] == {"room": "lobby"}
        msg = {"room": "lobby", "epoch": "e1", "from": "u:1"}
        await one.send_room("text", {**msg, "offset": 1, "text": "m1"})  # before the answer
        answer = {"room": "lobby", "count": 1, "offset": 0, "epoch": "e1"}
        await one.send("join", answer, 2, join["id"])
        replies: list[dict[str, Any]] = []

        async def publish() -> None:
            replies.append(await room.publish("m2"))

        tg.start_soon(publish)
        text = await one.recv()
        assert text["content"] == {"room": "lobby", "text": "m2"}
        mine = {**msg, "offset": 2, "text": "m2"}
        await one.send("text", mine, 3, text["id"])  # the reply: no room message
        await one.send_room("text", mine)  # the room frame: one
        items: list[Any] = []
        with anyio.fail_after(5):
            items += [await room.__anext__(), await room.__anext__()]
        await one.drop()

        two = await s.peer.accept()
        await two.answer_init(4, session="s-1", resumed=True, rooms=["lobby"])
        join = await two.recv()
        assert join["content"] == {"room": "lobby", "since": {"offset": 2, "epoch": "e1"}}
        await two.send_room("text", {**msg, "offset": 2, "text": "m2"})  # overlap
        await two.send_room("text", {**msg, "offset": 3, "text": "m3"})  # replayed
        await two.send_room("text", {**msg, "offset": 4, "text": "m4"})  # live, early
        await two.send("join", {**answer, "offset": 3, "recovered": True}, 5, join["id"])
        with anyio.fail_after(5):
            items += [await room.__anext__(), await room.__anext__()]
        await two.drop()

        three = await s.peer.accept()
        await three.answer_init(1, session="s-3")  # resume refused: the room replay fills in
        join = await three.recv()
        assert join["content"]["since"] == {"offset": 4, "epoch": "e1"}
        await three.send_room("text", {**msg, "epoch": "e2", "offset": 1, "text": "n1"})
        lost = {**answer, "epoch": "e2", "recovered": False}
        await three.send("join", lost, 2, join["id"])
        with anyio.fail_after(5):
            items += [await room.__anext__(), await room.__anext__()]
        await room.aclose()
        leave = await three.recv()
        assert leave["type"] == "leave" and leave["content"] == {"room": "lobby"}
        assert [i async for i in room] == []
    texts = [i["text"] if isinstance(i, dict) else i for i in items]
    assert texts == ["m1", "m2", "m3", "m4", Gap("lobby", "not_recovered", "e2", None), "n1"]
    assert replies == [mine]


async def test_heartbeat_reconnects_when_pongs_stop() -> None:
    states = States()
    async with peer_client(heartbeat=0.1, on_state=states) as s:
        # The peer never reads again after init: the client's pings get no pong.
        info = await states.wait(State.RECONNECTING)
        assert info["code"] == 1006 and "no pong" in info["reason"]
        live = await s.peer.accept()
        await live.answer_init(1, session="s-2")
        await states.wait(State.RESYNCED)
        assert s.client.session_id == "s-2"
        await s.conn.drop()


async def test_token_goes_in_header_and_init_and_is_fetched_per_connection() -> None:
    tokens = iter(["t-1", "t-2"])

    async def provider() -> str:
        return next(tokens)

    states = States()
    async with peer_client(token_provider=provider, on_state=states) as s:
        assert s.conn.headers["authorization"] == "Bearer t-1"
        assert s.init["content"]["token"] == "t-1"
        await s.conn.drop()
        two = await s.peer.accept()
        assert two.headers["authorization"] == "Bearer t-2"
        init = await two.answer_init(1, session="s-1", resumed=True)
        assert init["content"]["token"] == "t-2"
        await states.wait(State.RESUMED)


def test_backoff_is_full_jitter_and_bounded() -> None:
    backoff = Backoff(initial=1.0, maximum=8.0, factor=2.0)
    for attempt, cap in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (10, 8.0), (5000, 8.0)]:
        delays = [backoff.delay(attempt) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap / 2  # spread over the whole range, not a fixed step
