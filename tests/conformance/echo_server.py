"""Test fixture: WebSocket echo server for the Autobahn|Testsuite conformance run.

STAND-IN: this version echoes with plain ``websockets`` and ignores ``--driver``.
It will be replaced by one that runs backchannel's own drivers; the CLI stays:

    python tests/conformance/echo_server.py --driver DRIVER --host HOST --port PORT

Every text and binary message is sent back unchanged (a raw echo, no JSON).
"""

from __future__ import annotations

import argparse
import asyncio

from websockets.asyncio.server import ServerConnection, serve

MAX_MESSAGE_SIZE = 64 * 1024 * 1024  # Autobahn 9.x sends messages up to 16 MiB


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


async def main(host: str, port: int) -> None:
    async with serve(echo, host, port, max_size=MAX_MESSAGE_SIZE) as server:
        print(f"echo server listening on ws://{host}:{port}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--driver", default="asyncio", help="ignored by the stand-in")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        asyncio.run(main(args.host, args.port))
    except KeyboardInterrupt:
        pass
