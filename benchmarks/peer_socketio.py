"""Peer baseline for scale-out: python-socketio's AsyncServer with its AsyncRedisManager.

One process of a multi-instance Socket.IO deployment: ``socketio.AsyncServer`` with
``socketio.AsyncRedisManager(--redis, channel=--channel)`` so that every instance sharing the
Redis and the channel relays room emits to its own clients. Served, on uvloop, either in
python-socketio's aiohttp mode (``--server aiohttp``, the default: the cheaper of the two here,
by 11-21 % server CPU per delivery in four full-size scaleout.py runs) or as an ASGI app under
uvicorn (``--server uvicorn``: httptools for HTTP, ``--ws`` for the WebSocket protocol). Both
are documented deployments of python-socketio. Engine.IO v4 / Socket.IO v5 at ``/socket.io/``;
clients may go straight to ``?EIO=4&transport=websocket``. Everything else is left at
python-socketio's defaults (stdlib json, ``async_handlers=True``: each event is handled in a
task of its own, so publishes with a window in flight may reach Redis out of order).

Events (all with an ack, so a client can wait for the answer):

* ``join <room>``: ``enter_room``; acks ``{"room": room}``;
* ``pub {"room", "text"}``: ``emit("msg", {"room", "from", "text"}, room=room)``: the manager
  hands it to this instance's members and publishes it once on the Redis channel, where the
  other instances pick it up and hand it to theirs; acks ``true`` after the publish.

No sessions, outbox, history, presence or offsets: the reference point for relaying through
Redis.

    python benchmarks/peer_socketio.py --port 8770 --redis redis://127.0.0.1:6379/0 \
        --channel bench-socketio [--server aiohttp|uvicorn] [--ws websockets-sansio]
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import socketio  # type: ignore[import-untyped]
import uvicorn

__all__ = ["make_server"]


def make_server(redis_url: str, channel: str, async_mode: str) -> Any:
    """One AsyncServer whose manager relays through Redis, with the two events."""
    manager = socketio.AsyncRedisManager(redis_url, channel=channel)
    sio = socketio.AsyncServer(async_mode=async_mode, client_manager=manager)

    @sio.on("join")  # type: ignore[untyped-decorator]
    async def join(sid: str, room: str) -> dict[str, str]:
        await sio.enter_room(sid, room)
        return {"room": room}

    @sio.on("pub")  # type: ignore[untyped-decorator]
    async def pub(sid: str, data: dict[str, Any]) -> bool:
        out = {"room": data["room"], "from": sid, "text": data["text"]}
        await sio.emit("msg", out, room=data["room"])
        return True

    return sio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8770)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--channel", default="bench-socketio", help="the manager's channel")
    parser.add_argument(
        "--ws",
        default="websockets-sansio",
        choices=["websockets", "websockets-sansio", "wsproto"],
        help="uvicorn's WebSocket protocol implementation (--server uvicorn)",
    )
    parser.add_argument(
        "--server",
        default="aiohttp",
        choices=["aiohttp", "uvicorn"],
        help="python-socketio's aiohttp mode, or its ASGI app under uvicorn",
    )
    args = parser.parse_args()
    if args.server == "aiohttp":
        import uvloop
        from aiohttp import web

        app = web.Application()
        make_server(args.redis, args.channel, "aiohttp").attach(app)
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
        return
    uvicorn.run(
        socketio.ASGIApp(make_server(args.redis, args.channel, "asgi")),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        ws=args.ws,
        lifespan="off",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
