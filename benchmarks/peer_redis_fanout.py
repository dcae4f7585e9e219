"""Peer baseline for scale-out: a hand-rolled `websockets` + Redis pub/sub room fan-out.

What a team would write in an afternoon to spread one room over several processes, and
nothing more: each process keeps a set of member connections per room and subscribes its
pub/sub connection to a room's channel when the room gets its first local member; a
published message is encoded **once** by the publishing process, sent with one
``PUBLISH``, and every subscribed process writes those bytes to its members with
``websockets.broadcast``. No offsets, history, sessions, outbox, presence, retries or
ordering guarantees: the reference point for the cost of the fan-out itself
(``scaleout.py``'s system ``wsredis``).

Speaks just enough of backchannel.v1 for ``scaleout.py``'s subscribers and publisher:

* ``init {}``: answered ``init {sessionId, resumed: false, missed: 0}``;
* ``join {room}``: the connection is added to the room's set (subscribing the channel
  first if it is the room's first member here); answered ``join {room}``;
* ``text {text, room}`` from a member: the frame ``{id, type: text, content: {room, from,
  text}, room, timestamp}`` is encoded once and published on the room's channel; the
  sender gets ``text {room, from, text}`` as the reply (``replyTo``) once Redis took it;
* anything else: an ``error`` frame ``unknown_type``.

Redis through coredis (the client ours uses), on one pub/sub connection per process.

    python benchmarks/peer_redis_fanout.py --port 8772 --redis redis://127.0.0.1:6379/0 \
        --channel bench-wsredis [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import coredis
import orjson
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

__all__ = ["main"]

_ids = itertools.count(1)
_boot = os.urandom(3).hex()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _frame(type_: str, content: Any, reply_to: str | None = None, **extra: Any) -> bytes:
    frame: dict[str, Any] = {"id": f"{_boot}-{next(_ids)}", "type": type_}
    if reply_to is not None:
        frame["replyTo"] = reply_to
    frame |= {"content": content, **extra, "timestamp": _now()}
    return orjson.dumps(frame)


class Fanout:
    """One process: its rooms' member sets and its pub/sub subscriptions."""

    def __init__(self, redis: coredis.Redis[bytes], pubsub: Any, prefix: str) -> None:
        self.redis = redis
        self.pubsub = pubsub
        self.prefix = prefix
        self.rooms: dict[str, set[ServerConnection]] = {}
        self.subscribing: dict[str, asyncio.Future[None]] = {}

    def _deliver(self, room: str) -> Callable[[Any], None]:
        def on_message(message: Any) -> None:
            broadcast(self.rooms.get(room, ()), message["data"], text=True)

        return on_message

    async def join(self, room: str, ws: ServerConnection) -> None:
        members = self.rooms.setdefault(room, set())
        members.add(ws)
        pending = self.subscribing.get(room)
        if pending is None:  # the room's first member here: subscribe its channel
            pending = self.subscribing[room] = asyncio.get_running_loop().create_future()
            await self.pubsub.subscribe(**{f"{self.prefix}:{room}": self._deliver(room)})
            pending.set_result(None)
        await pending

    async def serve(self, ws: ServerConnection) -> None:
        who = f"peer:{next(_ids)}"
        joined: set[str] = set()
        try:
            async for raw in ws:
                try:
                    req = orjson.loads(raw)
                    rid, kind, content = req["id"], req["type"], req.get("content") or {}
                    room = content.get("room")
                except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                    await ws.send(_frame("error", {"code": "bad_json", "message": str(exc)}, None))
                    continue
                if kind == "init":
                    reply = {"sessionId": who, "resumed": False, "missed": 0}
                    await ws.send(_frame("init", reply, rid))
                elif kind == "join" and isinstance(room, str):
                    await self.join(room, ws)
                    joined.add(room)
                    await ws.send(_frame("join", {"room": room}, rid))
                elif kind == "text" and isinstance(room, str) and room in joined:
                    out = {"room": room, "from": who, "text": content.get("text")}
                    await self.redis.publish(
                        f"{self.prefix}:{room}", _frame("text", out, room=room)
                    )
                    await ws.send(_frame("text", out, rid))
                else:
                    error = {"code": "unknown_type", "message": f"type {kind!r} is not handled"}
                    await ws.send(_frame("error", error, rid))
        except ConnectionClosed:
            pass
        finally:
            for room in joined:
                self.rooms.get(room, set()).discard(ws)


async def main(host: str, port: int, redis_url: str, channel: str) -> None:
    """Serve until killed."""
    async with coredis.Redis.from_url(redis_url) as redis, redis.pubsub() as pubsub:
        fanout = Fanout(redis, pubsub, channel)
        subprotocols = [Subprotocol("backchannel.v1")]
        async with serve(fanout.serve, host, port, subprotocols=subprotocols) as server:
            await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8772)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--channel", default="bench-wsredis", help="prefix of the room channels")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    run = asyncio.run
    if args.uvloop:
        import uvloop

        run = uvloop.run
    run(main(args.host, args.port, args.redis, args.channel))
