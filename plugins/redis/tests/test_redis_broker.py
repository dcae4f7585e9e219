"""The redis plugin with real Apps, real sockets and a real Redis: several instances.

Two Apps in one process share one Redis (a fresh key prefix per test): a client
resumes on the other instance, rooms order across instances, and readiness follows
Redis. Redis itself is never stopped: the readiness tests reach it through a TCP
proxy (:class:`Proxy`) that the test cuts and restores. Without a reachable Redis
these tests skip, or fail when ``CI`` is set (``backchannel_redis.testing``).
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import coredis
import pytest
from backchannel_redis import RedisBroker
from backchannel_redis.testing import delete_keys, fresh_prefix, require_redis

from backchannel import App
from backchannel.testing import raw_connect, websocket

pytestmark = pytest.mark.anyio

PLUGINS = ["init", "text", "ping", "rooms", "redis"]
#: seconds any expected event may take
BOUND = 10.0


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def redis(anyio_backend: str) -> AsyncIterator[dict[str, str]]:
    """The Redis URL and a fresh key prefix; the prefix's keys are deleted after."""
    url = require_redis()
    prefix = fresh_prefix()
    yield {"url": url, "key_prefix": prefix}
    await delete_keys(url, prefix)


def new_app(redis: dict[str, Any], **settings: Any) -> App:
    """An App using the redis broker (fast health checks, so tests stay short)."""
    app = App(
        {
            "server": {"port": 0},
            "message": {"max_in_flight": 4},
            "plugins": {
                "redis": {
                    **redis,
                    "timeout": 0.5,
                    "health_interval": 0.1,
                    "reconnect_max_delay": 0.2,
                    **settings,
                }
            },
        },
        plugins=PLUGINS,
    )
    count = {"n": 0}

    @app.handler("count")
    def counter(message: Any) -> dict[str, int]:
        count["n"] += 1
        return {"n": count["n"]}

    app.count = count  # type: ignore[attr-defined]
    return app


def broker(app: App) -> RedisBroker:
    assert isinstance(app.broker, RedisBroker)
    return app.broker


@asynccontextmanager
async def serving(app: App) -> AsyncIterator[App]:
    async with app.run(host="127.0.0.1", port=0):
        yield app


@asynccontextmanager
async def ws(app: App) -> AsyncIterator[Any]:
    """A real WebSocket client to ``app`` (websockets' asyncio or trio client, by backend)."""
    async with websocket(app.port or 0) as sock:
        yield sock


async def send(sock: Any, ident: str, type: str, content: dict[str, Any]) -> None:
    await sock.send(json.dumps({"id": ident, "type": type, "content": content}))


async def recv(sock: Any) -> dict[str, Any]:
    with anyio.fail_after(BOUND):
        frame: dict[str, Any] = json.loads(await sock.recv())
    return frame


async def answer(sock: Any, ident: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The answer to ``ident`` and the frames that came before it."""
    before: list[dict[str, Any]] = []
    while True:
        frame = await recv(sock)
        if frame.get("replyTo") == ident:
            return frame, before
        before.append(frame)


async def request(sock: Any, ident: str, type: str, content: dict[str, Any]) -> dict[str, Any]:
    await send(sock, ident, type, content)
    frame, _ = await answer(sock, ident)
    return frame


async def until(condition: Callable[[], Any], what: str) -> None:
    """Wait (bounded) until ``condition()`` is true; it may be async."""
    try:
        with anyio.fail_after(BOUND):
            while True:
                result = condition()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return
                await anyio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{what} (within {BOUND}s)") from None


async def texts(sock: Any, count: int) -> list[dict[str, Any]]:
    """The next ``count`` room messages (presence notices of other members skipped)."""
    got: list[dict[str, Any]] = []
    while len(got) < count:
        frame = await recv(sock)
        if frame["type"] != "presence":
            got.append(frame)
    return got


async def http_status(app: App, path: str) -> int:
    with anyio.fail_after(BOUND):
        async with await anyio.connect_tcp("127.0.0.1", app.port or 0) as stream:
            await stream.send(
                f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
            )
            head = await stream.receive()
    return int(head.split(b" ", 2)[1])


# ------------------------------------------------------------ resume elsewhere


async def test_client_resumes_on_another_instance_with_missed_frames_and_answers(
    redis: dict[str, str],
) -> None:
    """What instance 1 addressed to the session while the client was away (the answer of
    a request still running when it dropped) is replayed when it resumes on instance 2;
    the room messages it missed are not in its outbox: it joins the room again with
    ``since`` and gets them from the room's history. A retry there gets the original
    answer and runs nothing."""
    one, two = new_app(redis), new_app(redis)
    release = anyio.Event()

    @one.handler("slow")
    async def slow(message: Any) -> dict[str, str]:
        await release.wait()
        return {"done": "while away"}

    async with serving(one), serving(two):
        assert broker(one).epoch == broker(two).epoch  # the epoch lives in Redis
        async with ws(one) as client:
            init = (await request(client, "i1", "init", {}))["content"]
            first = await request(client, "once", "count", {})
            assert first["content"] == {"n": 1}
            joined = await request(client, "j1", "join", {"room": "lobby"})
            last_seq = joined["seq"]
            await send(client, "slow", "slow", {})
            await until(lambda: one.session(init["sessionId"]).pending, "slow never started")
        release.set()
        sent = []
        async with ws(two) as member:
            await request(member, "m0", "join", {"room": "lobby"})
            for n in range(3):
                reply = await request(
                    member, f"m{n + 1}", "text", {"room": "lobby", "text": f"{n}"}
                )
                sent.append(reply["content"])
        session = init["sessionId"]

        async def flushed() -> bool:  # instance 1 kept the answer in the outbox in Redis
            record = await broker(one).find_session(session)
            return record is not None and record.last_seq == last_seq + 1

        await until(flushed, "instance 1 never stored the answer for the absent client")
        async with ws(two) as again:
            resume = {"sessionId": session, "lastSeq": last_seq, "epoch": init["epoch"]}
            await send(again, "i2", "init", resume)
            resumed, replayed = await answer(again, "i2")
            assert resumed["content"]["resumed"] is True, resumed
            assert resumed["content"]["missed"] == 1
            # memberships are per instance: none moved to instance 2
            assert resumed["content"]["rooms"] == []
            assert [(f["replyTo"], f["content"]) for f in replayed] == [
                ("slow", {"done": "while away"})
            ]
            assert [f["seq"] for f in replayed] == [last_seq + 1]
            assert resumed["seq"] == last_seq + 2
            since = {"offset": joined["content"]["offset"], "epoch": joined["content"]["epoch"]}
            await send(again, "j2", "join", {"room": "lobby", "since": since})
            rejoined, missed = await answer(again, "j2")
            assert rejoined["content"]["recovered"] is True
            assert [f["content"] for f in missed] == sent
            assert all("seq" not in f for f in missed)
            assert rejoined["seq"] == last_seq + 3
            retry = await request(again, "once", "count", {})
            assert retry["content"] == {"n": 1} and retry["seq"] == last_seq + 4
            assert (one.count["n"], two.count["n"]) == (1, 0)  # type: ignore[attr-defined]
            fresh = await request(again, "twice", "count", {})
            assert fresh["content"] == {"n": 1} and two.count["n"] == 1  # type: ignore[attr-defined]
    await no_key_without_ttl(redis)


async def no_key_without_ttl(redis: dict[str, str]) -> None:
    """Nothing an instance wrote outlives its purpose: every key but the epoch expires."""
    async with coredis.Redis.from_url(redis["url"]) as client:
        forever = []
        seen = 0
        async for key in client.scan_iter(match=f"{redis['key_prefix']}:*"):
            seen += 1
            if await client.pttl(key) < 0 and key != f"{redis['key_prefix']}:epoch".encode():
                forever.append(key)
    assert seen > 1 and forever == []


# ------------------------------------------------------- rooms across instances


async def test_members_on_two_instances_see_every_message_once_in_offset_order(
    redis: dict[str, str],
) -> None:
    """2 instances x 2 members publish 20 messages each at once: every member sees all
    80 as room frames, offsets 1..80, and gets its 20 replies; presence lists all four
    on both instances."""
    apps = [new_app(redis), new_app(redis)]
    per_member = 20
    seen: dict[int, list[dict[str, Any]]] = {}
    replies: dict[int, list[dict[str, Any]]] = {}
    async with serving(apps[0]), serving(apps[1]), AsyncExitStack() as stack:
        socks = [await stack.enter_async_context(ws(apps[i % 2])) for i in range(4)]
        for i, sock in enumerate(socks):
            joined = await request(sock, f"j{i}", "join", {"room": "party"})
            assert joined["type"] == "join", joined
        members: list[list[str]] = []
        for i in (0, 1):
            listed = await request(socks[i], f"p{i}", "presence", {"room": "party"})
            members.append(listed["content"]["members"])
        assert len(members[0]) == 4 and members[0] == members[1] == sorted(members[0])
        everything = len(socks) * per_member

        async def member(i: int) -> None:
            sock = socks[i]
            for n in range(per_member):
                await send(sock, f"{i}-{n}", "text", {"room": "party", "text": f"{i}:{n}"})
            got = seen[i] = []
            mine = replies[i] = []
            while len(got) < everything or len(mine) < per_member:
                frame = await recv(sock)
                if frame["type"] == "error":
                    raise AssertionError(frame)
                if frame["type"] == "text":
                    (mine if "replyTo" in frame else got).append(frame)

        async with anyio.create_task_group() as tg:
            for i in range(len(socks)):
                tg.start_soon(member, i)
    for i, frames in seen.items():
        assert [f["offset"] for f in frames] == list(range(1, everything + 1)), i
        assert [f["content"]["offset"] for f in frames] == list(range(1, everything + 1)), i
        assert len({f["content"]["epoch"] for f in frames}) == 1
        assert all("seq" not in f for f in frames)
        mine = sorted(f["replyTo"] for f in replies[i])
        assert mine == sorted(f"{i}-{n}" for n in range(per_member))
        texts = sorted(f["content"]["text"] for f in frames)
        assert texts == sorted(f"{c}:{n}" for c in range(len(socks)) for n in range(per_member))


async def test_presence_of_an_instance_that_stops_beating_expires_within_its_ttl(
    redis: dict[str, str],
) -> None:
    """An instance that dies (its heartbeat stops, nothing is cleaned up) stops counting
    in presence within ``presence_ttl``; a live instance's members stay."""
    ttl = 0.5
    url, prefix = redis["url"], redis["key_prefix"]
    alive = RedisBroker(url=url, key_prefix=prefix, presence_ttl=ttl, health_interval=0.05)
    dying = RedisBroker(url=url, key_prefix=prefix, presence_ttl=ttl, health_interval=0.05)
    await alive.start()
    await dying.start()
    try:
        assert await alive.presence_add("lobby", "alice", "c-1") == (True, 1)
        assert await dying.presence_add("lobby", "bob", "c-2") == (True, 2)
        assert await alive.presence("lobby") == ["alice", "bob"]

        async def silent() -> None:
            return None

        dying._beat = silent  # type: ignore[method-assign]  # it dies: no heartbeat
        died = time.monotonic()
        with anyio.fail_after(BOUND):
            while (members := await alive.presence("lobby")) != ["alice"]:
                assert members == ["alice", "bob"]
                await anyio.sleep(0.02)
        assert time.monotonic() - died < ttl + 0.3
        assert (await alive.presence_add("lobby", "bob", "c-3"))[0] is True  # a join again
        assert await alive.presence("lobby") == ["alice", "bob"]
    finally:
        await dying.stop()
        await alive.stop()


async def test_members_of_a_dead_instance_stop_counting_without_anyone_listing_the_room(
    redis: dict[str, str],
) -> None:
    """``presence_count`` is the hash's length (O(1)); the heartbeats of live instances
    sweep the entries of dead ones, so the count comes down without a ``presence`` call;
    an instance that stops cleanly withdraws its entries at once."""
    ttl = 0.3
    url, prefix = redis["url"], redis["key_prefix"]
    options = {"url": url, "key_prefix": prefix, "presence_ttl": ttl, "health_interval": 0.05}
    alive, dying, leaving = RedisBroker(**options), RedisBroker(**options), RedisBroker(**options)
    for one in (alive, dying, leaving):
        await one.start()
    try:
        await alive.presence_add("lobby", "alice", "c-1")
        for n in range(250):  # more than one sweep's worth
            await dying.presence_add("lobby", f"ghost{n:03d}", f"c-g{n}")
        await leaving.presence_add("lobby", "carol", "c-3")
        assert await alive.presence_count("lobby") == 252
        await leaving.stop()
        assert await alive.presence_count("lobby") == 251

        async def silent() -> None:
            return None

        dying._beat = silent  # type: ignore[method-assign]  # it dies: no heartbeat

        async def swept() -> bool:
            return await alive.presence_count("lobby") == 1

        await until(swept, "the dead instance's members still count")
        assert await alive.presence("lobby") == ["alice"]
    finally:
        await dying.stop()
        await alive.stop()


# ---------------------------------------------------------- readiness, recovery


class Proxy:
    """A TCP forwarder to Redis that a test cuts and restores (Redis itself stays up)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.up = False
        self.port = 0
        self._scopes: set[anyio.CancelScope] = set()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()
        await listener.serve(self._forward)

    async def _forward(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            if not self.up:
                return
            with anyio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    upstream = await anyio.connect_tcp(*self.target)
                    async with upstream, anyio.create_task_group() as tg:
                        tg.start_soon(self._pipe, client, upstream, tg.cancel_scope)
                        tg.start_soon(self._pipe, upstream, client, tg.cancel_scope)
                finally:
                    self._scopes.discard(scope)

    @staticmethod
    async def _pipe(
        source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream, done: anyio.CancelScope
    ) -> None:
        try:
            async for chunk in source:
                await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        done.cancel()

    def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        self.up = False
        for scope in list(self._scopes):
            scope.cancel()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


async def test_readiness_follows_redis_and_requests_answer_overloaded_meanwhile(
    redis: dict[str, str],
) -> None:
    """Unreachable at start: /readyz 503, requests that need the broker answer
    overloaded, and an alert fires; reachable: ready; cut again: not ready within a
    bound; back: ready, with the alert resolved each time."""
    async with anyio.create_task_group() as tg:
        proxy = Proxy(redis["url"])
        await tg.start(proxy.serve)
        app = new_app(redis, url=proxy.url)
        alerts: list[tuple[str, str]] = []
        app.on("alert")(lambda name, state, details: alerts.append((name, state)))
        async with serving(app):
            assert app.health()["ready"] is False and broker(app).ready is False
            assert await http_status(app, "/readyz") == 503
            assert await http_status(app, "/healthz") == 200
            async with ws(app) as client:
                refused = await request(client, "p1", "presence", {"room": "lobby"})
                assert refused["type"] == "error" and refused["content"]["code"] == "overloaded"
                assert (await request(client, "ping", "ping", {}))["type"] == "pong"
                proxy.up = True
                await until(lambda: app.health()["ready"], "never became ready")
                assert await http_status(app, "/readyz") == 200
                listed = await request(client, "p2", "presence", {"room": "lobby"})
                assert listed["content"] == {"room": "lobby", "members": []}
                proxy.cut()
                await until(lambda: not app.health()["ready"], "a lost Redis went unnoticed")
                assert await http_status(app, "/readyz") == 503
                refused = await request(client, "p3", "presence", {"room": "lobby"})
                assert refused["content"]["code"] == "overloaded"
                proxy.up = True
                await until(lambda: app.health()["ready"], "never recovered")
                assert (await request(client, "p4", "presence", {"room": "lobby"}))["type"] == (
                    "presence"
                )
        tg.cancel_scope.cancel()
    assert alerts == [
        ("redis_unavailable", "firing"),
        ("redis_unavailable", "resolved"),
        ("redis_unavailable", "firing"),
        ("redis_unavailable", "resolved"),
    ]
    assert broker(app).counters["unavailable"] >= 2 and broker(app).counters["recovered"] >= 2


async def test_room_messages_published_while_redis_was_away_arrive_after_in_order(
    redis: dict[str, str],
) -> None:
    """Instance 1 loses Redis while instance 2 keeps publishing: when it is back, its
    member gets what it missed from the room's stream, in offset order, then live."""
    async with anyio.create_task_group() as tg:
        proxy = Proxy(redis["url"])
        proxy.up = True
        await tg.start(proxy.serve)
        cut_off, direct = new_app(redis, url=proxy.url), new_app(redis)
        async with serving(cut_off), serving(direct), ws(cut_off) as far, ws(direct) as near:
            await request(far, "j1", "join", {"room": "lobby"})
            await request(near, "j2", "join", {"room": "lobby"})
            proxy.cut()
            await until(lambda: not cut_off.health()["ready"], "a lost Redis went unnoticed")
            sent = []
            for n in range(3):
                reply = await request(near, f"t{n}", "text", {"room": "lobby", "text": f"{n}"})
                sent.append(reply["content"])
            proxy.up = True
            got = [f["content"] for f in await texts(far, 3)]
            assert got == sent and [m["offset"] for m in got] == [1, 2, 3]
            live = await request(near, "t3", "text", {"room": "lobby", "text": "live"})
            assert (await texts(far, 1))[0]["content"] == live["content"]
            assert broker(cut_off).counters.get("subscriber_reconnects", 0) >= 1
        tg.cancel_scope.cancel()


# ------------------------------------------- send, broadcast, takeover across instances


async def frames_before_pong(sock: Any, ident: str) -> list[dict[str, Any]]:
    """Every frame the client got before the answer to a ping sent now (a barrier)."""
    await send(sock, ident, "ping", {})
    _, before = await answer(sock, ident)
    return before


async def test_send_reaches_a_connection_held_by_another_instance(redis: dict[str, str]) -> None:
    """``app.send`` on instance 1 to a connection of instance 2 arrives once, numbered in
    its session; an id of a gone connection or instance is counted, never raised."""
    one, two = new_app(redis), new_app(redis)
    async with serving(one), serving(two), ws(two) as client:
        await request(client, "i1", "init", {})
        (conn,) = two.connections()
        assert conn.id.startswith(f"c-{two.broker.instance}.")
        assert one.send(conn.id, "system", {"event": "hello", "from": "one"}) is True
        with anyio.fail_after(BOUND):
            frame = await recv(client)
        assert frame["type"] == "system" and frame["content"]["from"] == "one", frame
        assert frame["seq"] == conn.session.seq
        assert not [f for f in await frames_before_pong(client, "p1") if f["type"] == "system"]
        assert two.metrics()["broker"]["control"] == {"send": 1}

        gone = f"c-{two.broker.instance}.000000000000"
        assert one.send(gone, "system", {"event": "x"}) is True  # handed to instance 2
        await until(lambda: two.counters.control.get("send_unknown_connection") == 1, "not counted")
        dead = "c-0123456789ab.000000000000"  # an instance nobody runs
        assert one.send(dead, "system", {"event": "x"}) is True
        await until(
            lambda: broker(one).counters.get("control_unreached") == 1, "unreached not counted"
        )
        assert one.send("not-a-connection-id", "system", {}) is False
        assert one.metrics()["broker"]["events"]["control_unreached"] == 1


async def test_broadcast_reaches_every_connection_of_every_instance_once(
    redis: dict[str, str],
) -> None:
    one, two = new_app(redis), new_app(redis)
    async with serving(one), serving(two), AsyncExitStack() as stack:
        socks = [await stack.enter_async_context(ws(app)) for app in (one, two, two)]
        for i, sock in enumerate(socks):
            await request(sock, f"i{i}", "init", {})
        assert one.broadcast("system", {"event": "maintenance", "at": "soon"}) == 1
        for i, sock in enumerate(socks):
            with anyio.fail_after(BOUND):
                frame = await recv(sock)
            assert frame["type"] == "system" and frame["content"]["event"] == "maintenance"
            later = await frames_before_pong(sock, f"p{i}")
            assert [f for f in later if f["type"] == "system"] == [], "delivered twice"


async def test_resume_on_another_instance_takes_the_session_over(redis: dict[str, str]) -> None:
    """A client resumes on instance 2 while its old connection on instance 1 still looks
    alive (a half-open socket): instance 1 closes that one 4009 and lets go of the
    session, so only instance 2 numbers its frames from then on."""
    one, two = new_app(redis), new_app(redis)
    async with serving(one), serving(two), ws(one) as old:
        init = (await request(old, "i1", "init", {}))["content"]
        await request(old, "j1", "join", {"room": "lobby"})
        session = init["sessionId"]
        last_seq = one.session(session).seq
        await until(lambda: broker(one)._flushed >= broker(one)._queued, "never flushed")
        async with ws(two) as new:
            resume = {"sessionId": session, "lastSeq": last_seq, "epoch": init["epoch"]}
            resumed = await request(new, "i2", "init", resume)
            assert resumed["content"]["resumed"] is True, resumed
            with anyio.fail_after(BOUND):
                code = None
                try:
                    while True:
                        await old.recv()
                except Exception:
                    rcvd = old.protocol.close_rcvd
                    code = rcvd.code if rcvd is not None else None
            assert code == 4009
            await until(lambda: one.session(session) is None, "instance 1 still holds it")
            assert session not in broker(one)._logs
            assert one.counters.control == {"takeover": 1}
            # instance 1 released what the session held: its membership and presence
            await until(lambda: not rooms(one).joined, "instance 1 still has it in rooms")
            assert "lobby" not in broker(one)._rooms
            rejoined = await request(new, "j2", "join", {"room": "lobby"})
            assert rejoined["content"]["members"] == [init["principal"]], rejoined
            reply = await request(new, "t1", "text", {"room": "lobby", "text": "after"})
            assert reply["seq"] == rejoined["seq"] + 1
            record = await broker(two).find_session(session)
            assert record is not None and record.last_seq >= reply["seq"]

        async def nobody() -> bool:
            return await broker(one).presence("lobby") == []

        await until(nobody, "a member is still present (instance 1 kept its entry)")


def rooms(app: App) -> Any:
    return app.plugin("rooms")


async def test_a_session_resumed_elsewhere_is_released_by_the_instance_it_left(
    redis: dict[str, str],
) -> None:
    """The common case: the client's connection to instance 1 dropped (session detached
    there, room membership kept for a resume); it resumes on instance 2. Instance 1
    lets go at once: no membership, no room subscription, no more frames from it."""
    one, two = new_app(redis), new_app(redis)
    async with serving(one), serving(two):
        async with ws(one) as first:
            init = (await request(first, "i1", "init", {}))["content"]
            joined = await request(first, "j1", "join", {"room": "lobby"})
        session = init["sessionId"]
        await until(lambda: session in broker(one)._detached, "instance 1 never detached it")
        assert rooms(one).joined == {session: {"lobby"}}
        async with ws(two) as again:
            resume = {"sessionId": session, "lastSeq": joined["seq"], "epoch": init["epoch"]}
            resumed = await request(again, "i2", "init", resume)
            assert resumed["content"]["resumed"] is True, resumed
            await until(lambda: not rooms(one).joined, "instance 1 kept the membership")
            assert "lobby" not in broker(one)._rooms and session not in broker(one)._logs
            await request(again, "j2", "join", {"room": "lobby"})
            async with ws(one) as other:  # a message published on instance 1
                await request(other, "oj", "join", {"room": "lobby"})
                sent = await request(other, "ot", "text", {"room": "lobby", "text": "hi"})
            frames = [await recv(again)]
            while frames[-1]["type"] == "presence":  # the other member's join and leave
                frames.append(await recv(again))
            assert frames[-1]["offset"] == sent["content"]["offset"]
            assert all("seq" not in f for f in frames)  # room frames: numbered by no session
            later = await frames_before_pong(again, "p1")  # the other's leave may come late
            assert [f["type"] for f in later] in ([], ["presence"]), later  # the text once
            # the join's answer and the pong: only instance 2 numbers the session
            pong = await request(again, "p2", "ping", {})
            assert pong["seq"] == resumed["seq"] + 3


async def test_a_stale_holder_cannot_write_to_a_session_taken_over(redis: dict[str, str]) -> None:
    """Frames the old holder adds after the new one read the session are dropped when the
    new one attaches, and nothing the old holder writes afterwards lands: seqs stay unique."""
    url, prefix = redis["url"], redis["key_prefix"]
    old, new = RedisBroker(url=url, key_prefix=prefix), RedisBroker(url=url, key_prefix=prefix)
    told: list[dict[str, Any]] = []
    old.on_control(told.append)
    await old.start()
    await new.start()
    try:
        log = old.open_session("s-held", "alice")
        for seq in (1, 2, 3):
            log.append(seq, f"frame {seq}".encode(), None)
        await old._barrier()
        record = await new.find_session("s-held")
        assert record is not None and record.last_seq == 3
        log.append(4, b"frame 4 (old holder, after the read)", None)
        log.remember("r-old", 4, 7)
        await old._barrier()
        new.attach_session("s-held", 3)
        await new._barrier()
        await until(
            lambda: told == [{"op": "takeover", "session": "s-held", "from": new.instance}],
            "the old holder was not told",
        )
        log.append(5, b"frame 5 (old holder, after the takeover)", None)
        await old._barrier()
        record = await new.find_session("s-held")
        assert record is not None and record.last_seq == 3
        assert await record.log.since(0) == [b"frame 1", b"frame 2", b"frame 3"]
        new_log = record.log
        new_log.append(4, b"frame 4 (new holder)", None)
        await new._barrier()
        assert await new_log.since(3) == [b"frame 4 (new holder)"]
        assert "s-held" not in old._logs
    finally:
        await new.stop()
        await old.stop()


async def test_a_session_frame_reaches_its_client_only_once_redis_holds_it(
    redis: dict[str, str],
) -> None:
    """Write-through (issue 13): while the flush carrying its write is held back, a frame
    is not delivered; once Redis acknowledged the write it is, in order, and another
    instance already reads it (a client is never ahead of what Redis holds)."""
    url, prefix = redis["url"], redis["key_prefix"]
    one, other = RedisBroker(url=url, key_prefix=prefix), RedisBroker(url=url, key_prefix=prefix)
    await one.start()
    await other.start()
    try:
        real = one._send
        flushing, gate = anyio.Event(), anyio.Event()

        async def held_back(batch: list[Any]) -> None:
            flushing.set()
            await gate.wait()
            await real(batch)

        one._send = held_back  # type: ignore[method-assign]
        log = one.open_session("s-through", "alice")
        delivered: list[bytes] = []
        log.append(1, b"frame 1", delivered.append)
        log.append(2, b"frame 2", delivered.append)
        with anyio.fail_after(BOUND):
            await flushing.wait()  # the flusher holds the batch with both writes
        assert delivered == []
        gate.set()
        await until(lambda: len(delivered) == 2, "never delivered")
        assert delivered == [b"frame 1", b"frame 2"]
        record = await other.find_session("s-through")
        assert record is not None and record.last_seq == 2
        assert await record.log.since(0) == [b"frame 1", b"frame 2"]
    finally:
        await other.stop()
        await one.stop()


async def test_presence_notices_reach_members_on_other_instances(redis: dict[str, str]) -> None:
    one, two = new_app(redis), new_app(redis)
    async with serving(one), serving(two), ws(one) as alice:
        await request(alice, "a1", "join", {"room": "lobby"})
        async with ws(two) as bob:
            init = await request(bob, "b0", "init", {})
            await request(bob, "b1", "join", {"room": "lobby"})
            with anyio.fail_after(BOUND):
                joined = await recv(alice)
            assert joined["type"] == "presence", joined
            assert joined["content"] == {
                "room": "lobby",
                "event": "join",
                "member": init["content"]["principal"],
            }
        with anyio.fail_after(BOUND):
            left = await recv(alice)
        assert left["content"]["event"] == "leave", left
        assert [f for f in await frames_before_pong(alice, "p1") if f["type"] == "presence"] == []
    assert one.counters.control == {"rooms.presence": 2}


async def test_a_join_with_since_replays_before_any_live_message(redis: dict[str, str]) -> None:
    """Members join with ``since`` (a long replay) while messages keep coming, live on the
    same instance and through a fresh subscription on another: each sees every offset
    once and in order — live messages that arrive while its replay is read wait for it."""
    one, two = new_app(redis), new_app(redis)
    async with serving(one), serving(two), ws(one) as talker:
        joined = await request(talker, "j0", "join", {"room": "busy"})
        epoch = joined["content"]["epoch"]
        done = anyio.Event()

        async def talk() -> None:
            n = 0
            while not done.is_set():
                n += 1
                await request(talker, f"t{n}", "text", {"room": "busy", "text": str(n)})

        async def join_and_check(app: App, trial: int) -> None:
            async with ws(app) as joiner:
                since = {"offset": 0, "epoch": epoch}
                await send(joiner, "j", "join", {"room": "busy", "since": since})
                _, before = await answer(joiner, "j")
                after = await frames_before_pong(joiner, "p")
            offsets = [f["content"]["offset"] for f in before + after if f["type"] == "text"]
            assert offsets == list(range(1, len(offsets) + 1)), (trial, offsets)

        async with anyio.create_task_group() as tg:
            tg.start_soon(talk)
            for trial in range(20):
                await join_and_check(one if trial % 2 else two, trial)
            done.set()


# ------------------------------------ takeover messages lost or late (at most once)


def flushed(app: App) -> bool:
    return broker(app)._flushed >= broker(app)._queued


async def leave_a_session(app: App) -> tuple[dict[str, Any], int]:
    """A client starts a session on ``app``, gets a frame and leaves: the session waits
    there, detached. Returns the init answer and the last seq the client saw."""
    async with ws(app) as c:
        init: dict[str, Any] = (await request(c, "i1", "init", {}))["content"]
        seq: int = (await request(c, "a", "count", {}))["seq"]
    await until(lambda: init["sessionId"] in broker(app)._detached, "not detached")
    return init, seq


def hold_takeovers(app: App, held: list[tuple[str, bytes]] | None) -> Callable[..., Any]:
    """Make instance ``app`` miss takeover messages (keep them in ``held`` if given), as
    when its pub/sub connection drops at that moment; returns the real handler."""
    real = broker(app)._on_control

    async def lossy(channel: str, data: bytes) -> None:
        if b"takeover" not in data:
            await real(channel, data)
        elif held is not None:
            held.append((channel, data))

    broker(app)._on_control = lossy  # type: ignore[method-assign]
    return real


async def test_a_resume_back_on_an_instance_that_missed_the_takeover_numbers_after(
    redis: dict[str, str],
) -> None:
    """Instance 1 never hears that instance 2 took the session over; the client later
    resumes back on 1: 1 sees its copy is stale and numbers after what 2 sent."""
    one, two = new_app(redis), new_app(redis)
    async with serving(one), serving(two):
        init, seq = await leave_a_session(one)
        session = init["sessionId"]
        hold_takeovers(one, None)
        async with ws(two) as c:
            resume = {"sessionId": session, "lastSeq": seq, "epoch": init["epoch"]}
            assert (await request(c, "i2", "init", resume))["content"]["resumed"] is True
            for n in range(3):
                seq = (await request(c, f"b{n}", "ping", {}))["seq"]
        await until(lambda: flushed(two), "two never flushed")
        async with ws(one) as c:
            resume = {"sessionId": session, "lastSeq": seq, "epoch": init["epoch"]}
            resumed = await request(c, "i3", "init", resume)
            after = await request(c, "c", "ping", {})
        assert resumed["content"]["resumed"] is True
        assert (resumed["seq"], after["seq"]) == (seq + 1, seq + 2)


async def test_frames_the_old_holder_adds_during_a_resume_are_replayed_then_numbered_after(
    redis: dict[str, str],
) -> None:
    one, two = new_app(redis), new_app(redis)
    async with serving(one), serving(two), ws(one) as old:
        init = (await request(old, "i1", "init", {}))["content"]
        session = init["sessionId"]
        (conn,) = one.connections()
        last_seq = conn.session.seq
        await until(lambda: flushed(one), "never flushed")
        real = broker(two)._since
        raced = False

        async def racing_since(session_id: str, seq: int) -> Any:
            nonlocal raced
            if not raced:  # the old holder is quicker than this read
                raced = True
                one.send(conn.id, "system", {"event": "late-1"})
                one.send(conn.id, "system", {"event": "late-2"})
                await until(lambda: flushed(one), "never flushed")
            return await real(session_id, seq)

        broker(two)._since = racing_since  # type: ignore[method-assign]
        async with ws(two) as new:
            resume = {"sessionId": session, "lastSeq": last_seq, "epoch": init["epoch"]}
            await send(new, "i2", "init", resume)
            resumed, replayed = await answer(new, "i2")
            seqs = [f["seq"] for f in replayed] + [resumed["seq"]]
            seqs.append((await request(new, "p", "ping", {}))["seq"])
        assert seqs == list(range(last_seq + 1, last_seq + 5)), seqs


async def test_a_late_takeover_does_not_close_a_session_resumed_back_here(
    redis: dict[str, str],
) -> None:
    """Client: 1 -> 2 -> back to 1 quickly; 1 hears of 2's takeover only after it resumed
    the session again: Redis names 1 the holder, so 1 ignores the late message."""
    one, two = new_app(redis), new_app(redis)
    async with serving(one), serving(two):
        init, seq = await leave_a_session(one)
        session = init["sessionId"]
        held: list[tuple[str, bytes]] = []
        real = hold_takeovers(one, held)
        async with ws(two) as c:
            resume = {"sessionId": session, "lastSeq": seq, "epoch": init["epoch"]}
            seq = (await request(c, "i2", "init", resume))["seq"]
        await until(lambda: bool(held) and flushed(two), "no takeover")
        broker(one)._on_control = real  # type: ignore[method-assign]
        async with ws(one) as c:
            resume = {"sessionId": session, "lastSeq": seq, "epoch": init["epoch"]}
            assert (await request(c, "i3", "init", resume))["content"]["resumed"] is True
            for channel, data in held:  # the reader gets to it now
                await real(channel, data)
            reply = await request(c, "p", "ping", {})
            assert reply["type"] == "pong" and one.session(session) is not None
        assert broker(one).counters.get("takeover_late") == 1


@pytest.mark.parametrize("lose_takeover", [False, True], ids=["told", "takeover-lost"])
async def test_a_request_answered_on_another_instance_never_runs_again_here(
    redis: dict[str, str], lose_takeover: bool
) -> None:
    """1 -> 2 (which answers x; the client misses the answer) -> back to 1, whether or not
    1 heard of the takeover: the retry of x gets 2's answer, x does not run on 1."""
    one, two = new_app(redis), new_app(redis)
    async with serving(one), serving(two):
        init, seq = await leave_a_session(one)
        session = init["sessionId"]
        if lose_takeover:
            hold_takeovers(one, None)
        async with ws(two) as c:
            resume = {"sessionId": session, "lastSeq": seq, "epoch": init["epoch"]}
            seq = (await request(c, "i2", "init", resume))["seq"]
            assert (await request(c, "x", "count", {}))["content"] == {"n": 1}
        await until(lambda: flushed(two), "two never flushed")
        async with ws(one) as c:
            resume = {"sessionId": session, "lastSeq": seq, "epoch": init["epoch"]}
            assert (await request(c, "i3", "init", resume))["content"]["resumed"] is True
            retry = await request(c, "x", "count", {})
        assert retry["content"] == {"n": 1}
        assert (one.count["n"], two.count["n"]) == (1, 1)  # type: ignore[attr-defined]


async def test_a_leave_handled_while_the_join_reads_leaves_no_trace(
    redis: dict[str, str],
) -> None:
    """With several requests in flight, a leave can finish while its join still reads the
    room's position: the join then neither adds presence nor keeps replay state."""
    one = new_app(redis)
    async with serving(one), ws(one) as c:
        await request(c, "i", "init", {})
        await send(c, "j1", "join", {"room": "lobby"})
        await send(c, "l1", "leave", {"room": "lobby"})
        replies: dict[str, dict[str, Any]] = {}
        while len(replies) < 2:
            frame = await recv(c)
            if frame.get("replyTo") in ("j1", "l1"):
                replies[frame["replyTo"]] = frame
        assert {f["type"] for f in replies.values()} == {"join", "ack"}, replies
        assert rooms(one).rooms == {} and rooms(one).joined == {}
        assert await broker(one).presence("lobby") == []


async def test_a_session_resumed_back_keeps_its_rooms_when_the_old_connection_times_out(
    redis: dict[str, str],
) -> None:
    """The client's first connection to instance 1 goes half-open; it resumes on 2 (1
    misses the takeover), then back on 1 and re-joins. When 1's close of the half-open
    connection times out, the session resumed there keeps its room membership."""
    one, two = new_app(redis), new_app(redis)
    one.config["heartbeat"]["timeout"] = 1  # the close handshake gives up after 1 s
    async with serving(one), serving(two), raw_connect(one.port or 0) as old:
        assert await old.handshake() == 101
        init = (await old.request("init", {}, id="i1"))["content"]
        seq = (await old.request("join", {"room": "lobby"}, id="j1"))["seq"]
        session = init["sessionId"]
        hold_takeovers(one, None)
        async with ws(two) as c:
            resume = {"sessionId": session, "lastSeq": seq, "epoch": init["epoch"]}
            seq = (await request(c, "i2", "init", resume))["seq"]
        await until(lambda: flushed(two), "two never flushed")
        async with ws(one) as c:
            resume = {"sessionId": session, "lastSeq": seq, "epoch": init["epoch"]}
            assert (await request(c, "i3", "init", resume))["content"]["resumed"] is True
            assert (await request(c, "j3", "join", {"room": "lobby"}))["type"] == "join"
            await until(lambda: not one._hub.released, "the old connection never left")
            assert rooms(one).joined.get(session) == {"lobby"}
            published = await request(c, "t", "text", {"room": "lobby", "text": "hi"})
            assert published["type"] == "text", published
