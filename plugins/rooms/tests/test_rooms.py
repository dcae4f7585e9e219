"""The ``rooms`` plugin: join, leave, presence, ``text`` published to a room, history.

Most tests talk to the App in memory (``backchannel.testing``); the ordering and
resume tests use real sockets. An absence ("nothing else was sent") is proven
with a witness: a ``ping`` whose ``pong`` must be the very next frame.

Two streams reach a member (issue 13): its session's frames (answers, numbered by
``seq``) and the rooms' frames (``room``, ``offset``, ``epoch``, no ``seq``), each
in its own exact order, with no order promised between the two.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import jsonschema
import pytest
from backchannel_rooms import Plugin as Rooms
from referencing import Registry, Resource

from backchannel import App, Connection, Principal, hookimpl
from backchannel.contracts import load_schema
from backchannel.testing import MemoryClient, connect, serve_in_memory, websocket

pytestmark = pytest.mark.anyio

PLUGINS = ["init", "text", "ping", "validation", "rooms"]
_JOIN = load_schema("backchannel_rooms", "join.schema.json")
JOIN_REPLY = jsonschema.Draft202012Validator({**_JOIN, **_JOIN["$defs"]["reply"]})
ROOM_MESSAGE = jsonschema.Draft202012Validator({**_JOIN, **_JOIN["$defs"]["message"]})
PRESENCE_EVENT = jsonschema.Draft202012Validator({**_JOIN, **_JOIN["$defs"]["presenceEvent"]})
_INIT = load_schema("backchannel_init", "init.schema.json")
INIT_REPLY = jsonschema.Draft202012Validator({**_INIT, **_INIT["$defs"]["reply"]})
FRAME = jsonschema.Draft202012Validator(
    load_schema("backchannel", "frame.schema.json"),
    registry=Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema))
        for schema in (load_schema("backchannel", name) for name in ("error.schema.json",))
    ),
)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class HeaderAuth:
    """The principal named by the ``x-user`` header (every permission); else anonymous."""

    @hookimpl
    def authenticate(self, connection: Connection) -> Principal | None:
        user = connection.request.headers.get("x-user")
        return Principal(user) if user else None


def new_app(config: dict[str, Any] | None = None) -> App:
    return App(config or {}, plugins=[*PLUGINS, HeaderAuth()])


def rooms(app: App) -> Rooms:
    plugin = app.plugin("rooms")
    assert isinstance(plugin, Rooms)
    return plugin


def me(client: MemoryClient) -> str:
    principal = client.connection.principal
    assert principal is not None
    return principal.id


def user(name: str) -> dict[str, str]:
    return {"x-user": name}


async def frames_until_quiet(client: MemoryClient) -> list[dict[str, Any]]:
    """Every frame the client has not read yet (a ``ping`` marks the end)."""
    ident = client.send("ping")
    got = []
    while True:
        frame = await client.receive()
        if frame.get("replyTo") == ident:
            assert frame["type"] == "pong"
            return got
        got.append(frame)


async def quiet(client: MemoryClient) -> None:
    """Assert nothing was sent to ``client`` that it has not read."""
    assert await frames_until_quiet(client) == []


def room_frame(frame: dict[str, Any], type: str = "text") -> dict[str, Any]:
    """``frame`` is a room frame of ``type`` (no ``seq``, no ``replyTo``); its content."""
    FRAME.validate(frame)
    assert frame["type"] == type and "seq" not in frame and "replyTo" not in frame, frame
    content: dict[str, Any] = frame["content"]
    assert frame["room"] == content["room"]
    if type == "presence":
        PRESENCE_EVENT.validate(content)
        assert "offset" not in frame and "epoch" not in frame  # not kept: no position
    else:
        ROOM_MESSAGE.validate(content)
        assert (frame["offset"], frame["epoch"]) == (content["offset"], content["epoch"])
    return content


async def pushed(client: MemoryClient, type: str) -> dict[str, Any]:
    """The next frame, which must be a room frame of ``type``."""
    return room_frame(await client.receive(), type)


async def join(client: MemoryClient, room: str = "lobby", **extra: Any) -> dict[str, Any]:
    answer = await client.request("join", {"room": room, **extra})
    assert answer["type"] == "join", answer
    FRAME.validate(answer)
    assert isinstance(answer["seq"], int)  # an answer is a session frame
    content: dict[str, Any] = answer["content"]
    JOIN_REPLY.validate(content)
    return content


async def say(client: MemoryClient, text: str, room: str = "lobby") -> dict[str, Any]:
    """Publish; the reply's content. The sender's own room frame is left unread."""
    answer = await client.request("text", {"room": room, "text": text})
    assert answer["type"] == "text", answer
    content: dict[str, Any] = answer["content"]
    ROOM_MESSAGE.validate(content)
    return content


async def said(client: MemoryClient, text: str, room: str = "lobby") -> dict[str, Any]:
    """Publish and read the sender's own room frame too (it is a member)."""
    content = await say(client, text, room)
    assert await pushed(client, "text") == content
    return content


async def eventually(condition: Any, timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds, within ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.02)


# ------------------------------------------------------------------ join, text


async def test_join_answers_count_members_offset_and_epoch() -> None:
    app = new_app()
    async with serve_in_memory(app), connect(app) as a, connect(app) as b:
        first = await join(a)
        _, _, epoch = await app.broker.room_since("lobby", 0, "")
        assert first == {
            "room": "lobby",
            "count": 1,
            "members": [me(a)],
            "offset": 0,
            "epoch": epoch,
        }
        await said(a, "one")
        second = await join(b)
        assert second == {
            "room": "lobby",
            "count": 2,
            "members": sorted([me(a), me(b)]),
            "offset": 1,
            "epoch": epoch,
        }
        assert await pushed(a, "presence") == {"room": "lobby", "event": "join", "member": me(b)}
        await quiet(a)
        await quiet(b)  # no presence event about oneself, no old messages without since


async def test_a_room_message_is_one_room_frame_for_every_member_and_a_reply_to_its_sender() -> (
    None
):
    """The message reaches every member connection, the sender's included, as one frame
    encoded once (same ``id``), without ``seq``; the sender's answer is a session frame
    (``seq``, ``replyTo``) with the same content. Nothing reaches a non-member."""
    app = new_app()
    async with (
        serve_in_memory(app),
        connect(app) as a,
        connect(app) as b,
        connect(app) as c,
        connect(app) as outsider,
    ):
        epoch = (await join(a))["epoch"]
        await join(b)
        await join(c)
        for client in (a, b):
            await frames_until_quiet(client)  # presence events of the later joiners
        seqs = {client: client.connection.session.seq for client in (a, b, c)}
        reply = await a.request("text", {"room": "lobby", "text": "hello"}, id="m1")
        assert reply["type"] == "text" and reply["replyTo"] == "m1"
        FRAME.validate(reply)
        assert reply["seq"] == seqs[a] + 1
        expected = {"room": "lobby", "offset": 1, "epoch": epoch, "from": me(a), "text": "hello"}
        assert reply["content"] == expected
        frames = [await client.receive() for client in (a, b, c)]
        assert [room_frame(f) for f in frames] == [expected] * 3
        assert len({f["id"] for f in frames}) == 1  # encoded once for every member
        assert (frames[0]["room"], frames[0]["offset"], frames[0]["epoch"]) == ("lobby", 1, epoch)
        for client in (a, b, c):
            await quiet(client)
        await quiet(outsider)
        # room frames are not numbered: the members' sessions sent nothing else
        assert b.connection.session.seq == seqs[b] + 1  # the pong of quiet()
        assert (await say(b, "hi back"))["offset"] == 2
        assert (await pushed(a, "text"))["text"] == "hi back"


async def test_room_frames_are_not_kept_in_the_outbox() -> None:
    """A member's outbox holds what was addressed to its session only: a message
    published to its room leaves nothing there, so a resume replays none."""
    app = new_app()
    async with serve_in_memory(app), connect(app) as a, connect(app) as b:
        await join(a)
        await join(b)
        await frames_until_quiet(a)  # b's presence event
        session = b.connection.session
        before = session.seq
        for n in range(5):
            await said(a, f"m{n}")
        assert session.seq == before
        record = await app.broker.find_session(session.id)
        assert record is not None and record.last_seq == before
        assert await record.log.since(before) == []


async def test_publishing_without_joining_is_forbidden_and_sends_nothing() -> None:
    app = new_app()
    async with serve_in_memory(app), connect(app) as member, connect(app) as stranger:
        await join(member)
        err = await stranger.request("text", {"room": "lobby", "text": "let me in"})
        assert err["type"] == "error" and err["content"]["code"] == "forbidden"
        await frames_until_quiet(member)
        assert (await app.broker.room_since("lobby", 0, ""))[1] == 0
        await quiet(member)
        # text without a room is still the text plugin's echo
        echo = await stranger.request("text", {"text": "plain"})
        assert echo["content"] == {"text": "plain", "from": me(stranger)}


# ----------------------------------------------------------------- permissions


async def test_join_outside_the_permitted_pattern_is_forbidden_and_changes_nothing() -> None:
    app = new_app(
        {
            "auth": {
                "anonymous_permissions": [
                    "rooms:join:support-*",
                    "rooms:publish:support-*",
                    "rooms:presence:support-*",
                ]
            }
        }
    )
    async with (
        serve_in_memory(app),
        connect(app, headers=user("admin")) as admin,
        connect(app) as guest,
    ):
        await join(admin, "sales")
        await join(admin, "support-1")
        err = await guest.request("join", {"room": "sales"})
        assert err["type"] == "error" and err["content"]["code"] == "forbidden"
        assert "rooms:join:sales" in err["content"]["message"]
        assert await app.broker.presence("sales") == ["admin"]
        assert guest.connection.session.id not in rooms(app).joined
        await quiet(admin)  # no presence event for the refused join
        refused = await guest.request("text", {"room": "sales", "text": "x"})
        assert refused["content"]["code"] == "forbidden"
        looked = await guest.request("presence", {"room": "sales"})
        assert looked["content"]["code"] == "forbidden"

        assert (await join(guest, "support-1"))["members"] == sorted(["admin", me(guest)])
        assert (await pushed(admin, "presence"))["member"] == me(guest)
        assert (await said(guest, "help", room="support-1"))["offset"] == 1
        assert (await pushed(admin, "text"))["text"] == "help"
        members = await guest.request("presence", {"room": "support-1"})
        assert members["content"]["members"] == sorted(["admin", me(guest)])
        await quiet(admin)


async def test_publishing_needs_the_publish_permission_of_the_room() -> None:
    app = new_app({"auth": {"anonymous_permissions": ["rooms:join:*", "rooms:publish:support-*"]}})
    async with serve_in_memory(app), connect(app) as guest:
        await join(guest, "sales")
        err = await guest.request("text", {"room": "sales", "text": "x"})
        assert err["type"] == "error" and err["content"]["code"] == "forbidden"
        assert "rooms:publish:sales" in err["content"]["message"]
        assert (await app.broker.room_since("sales", 0, ""))[1] == 0
        await join(guest, "support-7")
        assert (await say(guest, "ok", room="support-7"))["offset"] == 1


# -------------------------------------------------------------- leave, presence


async def test_leave_acks_stops_messages_and_tells_the_others() -> None:
    app = new_app()
    async with serve_in_memory(app), connect(app) as a, connect(app) as b:
        await join(a)
        await join(b)
        await frames_until_quiet(a)
        ack = await b.request("leave", {"room": "lobby"})
        assert (ack["type"], ack["content"]) == ("ack", {})
        assert await pushed(a, "presence") == {"room": "lobby", "event": "leave", "member": me(b)}
        await said(a, "anyone?")
        await quiet(b)
        members = await a.request("presence", {"room": "lobby"})
        assert members["content"] == {"room": "lobby", "members": [me(a)]}
        again = await b.request("leave", {"room": "lobby"})
        assert again["type"] == "error" and again["content"]["code"] == "validation_failed"
        await quiet(a)


async def test_presence_request_lists_members_sorted() -> None:
    app = new_app()
    async with (
        serve_in_memory(app),
        connect(app, headers=user("carol")) as carol,
        connect(app, headers=user("alice")) as alice,
        connect(app, headers=user("bob")) as bob,
    ):
        for client in (carol, alice, bob):
            await join(client)
        answer = await bob.request("presence", {"room": "lobby"})
        assert answer["type"] == "presence"
        assert answer["content"] == {"room": "lobby", "members": ["alice", "bob", "carol"]}
        empty = await bob.request("presence", {"room": "nobody-here"})
        assert empty["content"] == {"room": "nobody-here", "members": []}


async def test_presence_follows_connections_a_resumed_session_is_present_once_it_joins_again() -> (
    None
):
    """A disconnect is a leave event to the others; resuming the session is not a join
    (it receives nothing from the room yet); joining again is."""
    app = new_app()
    async with serve_in_memory(app), connect(app) as a:
        await join(a)
        async with connect(app) as b:
            init = (await b.request("init", {}))["content"]
            await join(b)
            bob = me(b)
            assert await pushed(a, "presence") == {"room": "lobby", "event": "join", "member": bob}
            last_seq = max(f["seq"] for f in b.frames if "seq" in f)
            b.close()
        assert await pushed(a, "presence") == {"room": "lobby", "event": "leave", "member": bob}
        members = await a.request("presence", {"room": "lobby"})
        assert members["content"]["members"] == [me(a)]
        async with connect(app) as b2:
            resumed = await b2.request(
                "init",
                {"sessionId": init["sessionId"], "lastSeq": last_seq, "epoch": init["epoch"]},
            )
            assert resumed["content"]["resumed"] is True
            assert resumed["content"]["rooms"] == ["lobby"]
            await quiet(a)  # not present again before it joins
            rejoin = {"room": "lobby", "since": {"offset": 0, "epoch": init["epoch"]}}
            # a new id: the session remembers its first connection's ids (safe retries)
            assert (await b2.request("join", rejoin, id="rejoin"))["type"] == "join"
            assert await pushed(a, "presence") == {"room": "lobby", "event": "join", "member": bob}
            members = await a.request("presence", {"room": "lobby"})
            assert members["content"]["members"] == sorted([me(a), bob])
            await said(a, "welcome back")
            assert (await pushed(b2, "text"))["text"] == "welcome back"
            await quiet(a)


async def test_a_session_taken_over_here_leaves_no_presence_of_its_old_connection() -> None:
    """A new connection resumes a session whose old connection is still open (closed
    4009) and joins again at once: whichever of the rejoin and the old connection's
    disconnect comes first, the member is present through the new connection only."""
    app = new_app()
    async with serve_in_memory(app), connect(app) as watcher:
        await join(watcher)
        async with connect(app, headers=user("bob")) as old:
            init = (await old.request("init", {}))["content"]
            joined = await join(old)
            last = max(f["seq"] for f in old.frames if "seq" in f)
            async with connect(app, headers=user("bob")) as new:
                resume = {"sessionId": init["sessionId"], "lastSeq": last, "epoch": init["epoch"]}
                resumed = await new.request("init", resume, id="resume")
                assert resumed["content"]["resumed"] is True
                since = {"offset": joined["offset"], "epoch": joined["epoch"]}
                rejoined = await new.request("join", {"room": "lobby", "since": since}, id="j2")
                assert rejoined["type"] == "join"
                await eventually(lambda: app.connection(old.connection.id) is None)
                assert old.close_code == 4009
                assert await app.broker.presence("lobby") == sorted([me(watcher), "bob"])
            await eventually(lambda: app.connection(new.connection.id) is None)
        assert await app.broker.presence("lobby") == [me(watcher)]


async def test_a_member_on_two_connections_joins_and_leaves_once() -> None:
    app = new_app()
    async with serve_in_memory(app), connect(app, headers=user("bob")) as bob:
        await join(bob)
        async with connect(app, headers=user("alice")) as first:
            await join(first)
            assert (await pushed(bob, "presence"))["event"] == "join"
            async with connect(app, headers=user("alice")) as second:
                assert (await join(second))["members"] == ["alice", "bob"]
                await quiet(bob)  # alice was already present
                first.close()
                await eventually(lambda: app.connection(first.connection.id) is None)
                await quiet(bob)  # still present through the second connection
                assert await app.broker.presence("lobby") == ["alice", "bob"]
            assert await pushed(bob, "presence") == {
                "room": "lobby",
                "event": "leave",
                "member": "alice",
            }
        assert await app.broker.presence("lobby") == ["bob"]


async def test_a_large_room_announces_nothing_and_answers_joins_with_a_count() -> None:
    """Past ``large_room`` members, joins and leaves send no presence frames and the
    join answer gives the count without the list: n joins cost O(n) frames. Below it
    again, leaves and joins are announced."""
    large = 3
    app = new_app({"plugins": {"rooms": {"large_room": large}}})
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(serve_in_memory(app))
        crowd = [
            await stack.enter_async_context(connect(app, headers=user(f"u{i}"))) for i in range(6)
        ]
        answers = [await join(client) for client in crowd]
        assert [a["count"] for a in answers] == [1, 2, 3, 4, 5, 6]
        assert answers[2]["members"] == ["u0", "u1", "u2"]
        assert all("members" not in a for a in answers[3:])
        frames = [await frames_until_quiet(client) for client in crowd]
        # u0 saw u1 and u2 join, u1 saw u2; nobody saw u3..u5 (the room was large then)
        assert [[room_frame(f, "presence")["member"] for f in got] for got in frames] == [
            ["u1", "u2"],
            ["u2"],
            [],
            [],
            [],
            [],
        ]
        listed = await crowd[0].request("presence", {"room": "lobby"})
        assert listed["content"]["members"] == [f"u{i}" for i in range(6)]
        for client in crowd[3:]:  # 6 -> 3 members: each leaves a large room, untold
            await client.request("leave", {"room": "lobby"})
        for client in crowd[:3]:
            await quiet(client)
        await crowd[2].request("leave", {"room": "lobby"})  # 3 -> 2: told
        assert (await join(crowd[5]))["members"] == ["u0", "u1", "u5"]  # 2 -> 3: told
        for client in crowd[:2]:
            events = [room_frame(f, "presence") for f in await frames_until_quiet(client)]
            assert [(e["event"], e["member"]) for e in events] == [("leave", "u2"), ("join", "u5")]


# --------------------------------------------------------------------- history


async def test_join_with_since_replays_missed_messages_as_room_frames() -> None:
    app = new_app()
    async with serve_in_memory(app), connect(app) as a, connect(app) as b:
        epoch = (await join(a))["epoch"]
        sent = [await said(a, text) for text in ("one", "two", "three")]
        answer = await join(b, since={"offset": 1, "epoch": epoch})
        assert answer == {
            "room": "lobby",
            "count": 2,
            "members": sorted([me(a), me(b)]),
            "offset": 3,
            "epoch": epoch,
            "recovered": True,
            "missed": 2,
        }
        replayed, last = b.frames[:-1], b.frames[-1]
        assert [room_frame(f) for f in replayed] == sent[1:]
        assert last["type"] == "join" and last["seq"] == 1
        assert len(await frames_until_quiet(b)) == 2  # only the replayed ones were unread
        assert (await say(a, "four"))["offset"] == 4
        assert (await pushed(b, "text"))["offset"] == 4  # live after the replay
        async with connect(app) as c:
            current = await join(c, since={"offset": 4, "epoch": epoch})
            assert (current["recovered"], current["missed"]) == (True, 0)
            assert [f["type"] for f in c.frames] == ["join"]


@pytest.mark.parametrize(
    "since",
    [
        {"offset": 1, "epoch": None},  # the history (size 2) lost offset 2
        {"offset": 9, "epoch": None},  # beyond the room's offset
        {"offset": 0, "epoch": "stale-epoch"},  # another epoch
    ],
    ids=["beyond-history", "ahead", "wrong-epoch"],
)
async def test_join_with_since_history_cannot_cover_is_not_recovered(
    since: dict[str, Any],
) -> None:
    app = new_app({"plugins": {"rooms": {"history_size": 2}}})
    async with serve_in_memory(app), connect(app) as a, connect(app) as b:
        epoch = (await join(a))["epoch"]
        for i in range(5):
            await say(a, f"m{i}")
        answer = await join(b, since={**since, "epoch": since["epoch"] or epoch})
        assert (answer["recovered"], answer["missed"]) == (False, 0)
        assert (answer["offset"], answer["epoch"]) == (5, epoch)
        assert [f["type"] for f in b.frames] == ["join"]  # nothing partial replayed
        # the history still covers what it holds
        async with connect(app) as c:
            covered = await join(c, since={"offset": 3, "epoch": epoch})
            assert (covered["recovered"], covered["missed"]) == (True, 2)


# --------------------------------------------------------- real sockets: order


@asynccontextmanager
async def ws(port: int) -> AsyncIterator[Any]:
    """A real WebSocket client (websockets' asyncio or trio client, by backend)."""
    async with websocket(port) as sock:
        yield sock


async def send(sock: Any, ident: str, type: str, content: dict[str, Any]) -> None:
    await sock.send(json.dumps({"id": ident, "type": type, "content": content}))


async def recv(sock: Any) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await sock.recv())
    FRAME.validate(frame)
    return frame


async def answer(sock: Any, ident: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The answer to ``ident`` and the frames that came before it."""
    before = []
    while True:
        frame = await recv(sock)
        if frame.get("replyTo") == ident:
            return frame, before
        before.append(frame)


@asynccontextmanager
async def serving(app: App) -> AsyncIterator[App]:
    async with app.run(host="127.0.0.1", port=0):
        yield app


async def test_concurrent_publishers_every_member_sees_all_in_offset_order_once() -> None:
    """5 members publish 50 messages each at once: each sees all 250 as room frames,
    offsets 1..250, and gets one answer per request, in its session's order."""
    clients, per_client = 5, 50
    app = new_app({"message": {"max_in_flight": 4}})
    seen: dict[int, list[dict[str, Any]]] = {}
    answers: dict[int, list[dict[str, Any]]] = {}
    async with serving(app), AsyncExitStack() as stack:
        socks = [await stack.enter_async_context(ws(app.port or 0)) for _ in range(clients)]
        for i, sock in enumerate(socks):
            await send(sock, f"j{i}", "join", {"room": "party"})
            joined, _ = await answer(sock, f"j{i}")
            assert joined["type"] == "join"

        async def member(i: int) -> None:
            sock = socks[i]
            for n in range(per_client):
                await send(sock, f"{i}-{n}", "text", {"room": "party", "text": f"{i}:{n}"})
            got = seen[i] = []
            mine = answers[i] = []
            while len(got) < clients * per_client or len(mine) < per_client:
                frame = await recv(sock)
                if frame["type"] == "error":
                    raise AssertionError(frame)
                if frame["type"] == "text":
                    (mine if "replyTo" in frame else got).append(frame)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(clients):
                    tg.start_soon(member, i)
    everything = clients * per_client
    for i, frames in seen.items():
        assert [f["offset"] for f in frames] == list(range(1, everything + 1))
        assert [f["content"]["offset"] for f in frames] == list(range(1, everything + 1))
        assert len({f["epoch"] for f in frames}) == 1
        assert all("seq" not in f for f in frames)
        texts = sorted(f["content"]["text"] for f in frames)
        assert texts == sorted(f"{c}:{n}" for c in range(clients) for n in range(per_client))
        mine = answers[i]
        assert sorted(f["replyTo"] for f in mine) == sorted(f"{i}-{n}" for n in range(per_client))
        assert all(f["content"]["text"] == f["replyTo"].replace("-", ":") for f in mine)
        by_offset = {f["content"]["offset"]: f["content"] for f in frames}
        assert all(by_offset[f["content"]["offset"]] == f["content"] for f in mine)
        seqs = [f["seq"] for f in mine]
        assert seqs == sorted(seqs)


async def test_a_resumed_member_gets_room_messages_only_once_it_joins_again_with_since() -> None:
    """A member away while 3 messages are published resumes its session: the outbox
    replays none of them (they are no session frames), ``init`` lists the room, and the
    room delivers nothing (not even a message published after the resume) until the
    member joins again with ``since``, which replays all 4, then live ones follow."""
    app = new_app()
    async with serving(app), ws(app.port or 0) as a:
        await send(a, "a1", "join", {"room": "lobby"})
        await answer(a, "a1")
        async with ws(app.port or 0) as b:
            await send(b, "b1", "init", {})
            init, _ = await answer(b, "b1")
            await send(b, "b2", "join", {"room": "lobby"})
            joined, _ = await answer(b, "b2")
            last_seq, position = joined["seq"], joined["content"]
        sent = []

        async def publish(ident: str, text: str) -> None:
            await send(a, ident, "text", {"room": "lobby", "text": text})
            reply, _ = await answer(a, ident)
            sent.append(reply["content"])

        for n in range(3):
            await publish(f"a-{n}", f"while away {n}")
        async with ws(app.port or 0) as b:
            content = init["content"]
            await send(
                b,
                "b3",
                "init",
                {"sessionId": content["sessionId"], "lastSeq": last_seq, "epoch": content["epoch"]},
            )
            resumed, replayed = await answer(b, "b3")
            INIT_REPLY.validate(resumed["content"])
            assert resumed["content"]["resumed"] is True
            assert resumed["content"]["missed"] == 0 and replayed == []
            assert resumed["content"]["rooms"] == ["lobby"]
            assert resumed["seq"] == last_seq + 1
            await publish("a-3", "after the resume, before the join")
            await send(b, "ping", "ping", {})  # the witness: nothing from the room before it
            pong, before = await answer(b, "ping")
            assert before == [] and pong["type"] == "pong"
            since = {"offset": position["offset"], "epoch": position["epoch"]}
            await send(b, "b4", "join", {"room": "lobby", "since": since})
            rejoined, missed = await answer(b, "b4")
            assert (rejoined["content"]["recovered"], rejoined["content"]["missed"]) == (True, 4)
            assert [f["content"] for f in missed] == sent
            assert all("seq" not in f for f in missed)
            await publish("a-live", "live")
            with anyio.fail_after(5):
                live = await recv(b)
            assert live["content"] == sent[-1] and live["offset"] == 5


# ---------------------------------------------------------------------- expiry


async def test_session_expiry_removes_membership() -> None:
    app = new_app({"session": {"ttl": 0.1}})
    plugin = rooms(app)
    async with serve_in_memory(app), connect(app) as a:
        await join(a)
        async with connect(app) as b:
            init = (await b.request("init", {}))["content"]
            await join(b)
            await join(b, "solo")
            gone = b.connection.session.id
            b.close()
        assert gone in plugin.joined and gone in plugin.rooms["lobby"].members
        await eventually(lambda: gone not in plugin.joined, timeout=5)
        assert plugin.rooms["lobby"].members == {a.connection.session.id}
        assert "solo" not in plugin.rooms  # its last member went: unsubscribed
        assert await app.broker.find_session(gone) is None
        async with connect(app) as late:
            again = await late.request("init", {"sessionId": gone, "epoch": init["epoch"]})
            assert again["content"]["reason"] == "unknown_session"
        events = [room_frame(f, "presence") for f in await frames_until_quiet(a)]
        assert [(e["room"], e["event"]) for e in events] == [("lobby", "join"), ("lobby", "leave")]
        assert (await said(a, "still here"))["offset"] == 1
        await quiet(a)
