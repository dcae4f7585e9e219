"""Peer baseline: a plain `websockets` JSON echo server speaking the backchannel.v1 shape.

Each text frame carrying ``{"id", "type", "content"}`` gets exactly one answer
``{"id", "type", "replyTo", "content", "seq", "timestamp"}`` (``seq`` counts per connection).
Nothing else happens: no routing, no storage, no plugins. It is the reference point for
server CPU per message.

    python benchmarks/peer_echo.py --host 127.0.0.1 --port 8765 [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from datetime import UTC, datetime
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

_conn_ids = itertools.count(1)


def answer(raw: bytes, server_id: str, seq: int) -> dict[str, Any]:
    """Build the reply (or an error reply) for one raw request frame."""
    now = datetime.now(UTC).isoformat()
    try:
        req = orjson.loads(raw)
        return {
            "id": server_id,
            "type": req["type"],
            "replyTo": req["id"],
            "content": req["content"],
            "seq": seq,
            "timestamp": now,
        }
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        error = {"code": "bad_request", "message": str(exc)}
        return {"id": server_id, "type": "error", "content": error, "seq": seq, "timestamp": now}


async def echo(ws: ServerConnection) -> None:
    """Answer every request on one connection until it closes."""
    prefix = f"s{next(_conn_ids)}-"
    seq = 0
    while True:
        try:
            raw = await ws.recv(decode=False)  # bytes: orjson parses them without a str copy
        except ConnectionClosed:
            return
        seq += 1
        await ws.send(orjson.dumps(answer(raw, prefix + str(seq), seq)), text=True)


async def main(host: str, port: int) -> None:
    async with serve(echo, host, port, subprotocols=[Subprotocol("backchannel.v1")]) as server:
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
