"""Peer baseline for room broadcast: a plain `websockets` server relaying to a set of members.

Speaks just enough of backchannel.v1's rooms to run ``broadcast.py`` against it:

* ``join {room}``: the connection is added to the room's set; answer ``join {room, offset,
  epoch}`` (no member list, no presence events: the peer keeps nothing but the set);
* ``text {text, room}``: the room's offset grows by one; every *other* member gets one frame
  ``{"id", "type": "text", "content": {room, offset, epoch, from, text}, "seq", "timestamp"}``,
  encoded once and written to all of them with ``websockets.broadcast``; the sender gets the
  same content as the reply (``replyTo`` = its id). ``seq`` is the room offset: a frame that is
  encoded once cannot carry a per-connection number;
* ``leave {room}``: ``ack``; anything else: an ``error`` frame ``unknown_type``.

No validation, no sessions, no outbox, no history: the reference point for fan-out cost.

    python benchmarks/peer_broadcast.py --host 127.0.0.1 --port 8765 [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
from datetime import UTC, datetime
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

__all__ = ["main"]

_conn_ids = itertools.count(1)
_frame_ids = itertools.count(1)
EPOCH = os.urandom(4).hex()
rooms: dict[str, set[ServerConnection]] = {}
offsets: dict[str, int] = {}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _frame(type_: str, content: Any, seq: int, reply_to: str | None = None) -> bytes:
    frame: dict[str, Any] = {"id": f"p-{next(_frame_ids)}", "type": type_}
    if reply_to is not None:
        frame["replyTo"] = reply_to
    frame |= {"content": content, "seq": seq, "timestamp": _now()}
    return orjson.dumps(frame)


async def member(ws: ServerConnection) -> None:
    """Serve one connection: join/leave rooms, relay room texts, until it closes."""
    who = f"peer:{next(_conn_ids)}"
    seq = 0
    joined: set[str] = set()
    try:
        async for raw in ws:
            seq += 1
            try:
                req = orjson.loads(raw)
                rid, kind, content = req["id"], req["type"], req.get("content") or {}
                room = content.get("room")
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                error = {"code": "bad_json", "message": str(exc)}
                await ws.send(_frame("error", error, seq, None), text=True)
                continue
            if kind == "join" and isinstance(room, str):
                rooms.setdefault(room, set()).add(ws)
                joined.add(room)
                reply = {"room": room, "offset": offsets.get(room, 0), "epoch": EPOCH}
                await ws.send(_frame("join", reply, seq, rid), text=True)
            elif kind == "leave" and isinstance(room, str):
                rooms.get(room, set()).discard(ws)
                joined.discard(room)
                await ws.send(_frame("ack", {}, seq, rid), text=True)
            elif kind == "text" and isinstance(room, str) and room in joined:
                offset = offsets[room] = offsets.get(room, 0) + 1
                out = {
                    "room": room,
                    "offset": offset,
                    "epoch": EPOCH,
                    "from": who,
                    "text": content.get("text"),
                }
                broadcast((c for c in rooms[room] if c is not ws), _frame("text", out, offset))
                await ws.send(_frame("text", out, seq, rid), text=True)
            else:
                error = {"code": "unknown_type", "message": f"type {kind!r} is not handled"}
                await ws.send(_frame("error", error, seq, rid), text=True)
    except ConnectionClosed:
        pass
    finally:
        for room in joined:
            rooms.get(room, set()).discard(ws)


async def main(host: str, port: int) -> None:
    """Serve until killed."""
    async with serve(member, host, port, subprotocols=[Subprotocol("backchannel.v1")]) as server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    run = asyncio.run
    if args.uvloop:
        import uvloop

        run = uvloop.run
    run(main(args.host, args.port))
