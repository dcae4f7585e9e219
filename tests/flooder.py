"""A flood from its own process (tests/test_floods.py): ``--connections`` WebSockets each send
``--requests`` requests as fast as the server takes them, reading every answer, then
close. Prints one JSON line: answers by error code, connections opened, close codes.

    python tests/flooder.py --port PORT --kind invalid|unauthenticated [--token JWT]
        [--origin URL] [--connections 20] [--requests 3000]

``invalid``: ``text`` requests whose content fails the schema (needs ``--token``);
``unauthenticated``: valid ``text`` requests from connections without a token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

CONTENT = {"invalid": '{"bogus":1}', "unauthenticated": '{"text":"hi"}'}


async def flood(ws: ClientConnection, kind: str, requests: int, codes: Counter[str]) -> None:
    """Send ``requests`` requests while reading their answers (bounded: 30 s)."""

    async def send() -> None:
        for n in range(requests):
            await ws.send(f'{{"id":"f{n}","type":"text","content":{CONTENT[kind]}}}')

    sender = asyncio.create_task(send())
    try:
        async with asyncio.timeout(30):
            for _ in range(requests):
                frame = json.loads(await ws.recv())
                codes[(frame.get("content") or {}).get("code", frame["type"])] += 1
    except (ConnectionClosed, TimeoutError):
        pass
    finally:
        sender.cancel()


async def main(args: argparse.Namespace) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    url = f"ws://127.0.0.1:{args.port}/ws"
    conns = await asyncio.gather(
        *(
            connect(
                url,
                subprotocols=["backchannel.v1"],  # type: ignore[list-item]
                origin=args.origin,  # type: ignore[arg-type]
                additional_headers=headers,
                max_size=None,
                compression=None,
            )
            for _ in range(args.connections)
        )
    )
    codes: Counter[str] = Counter()
    await asyncio.gather(*(flood(ws, args.kind, args.requests, codes) for ws in conns))
    closes = Counter(str(ws.close_code) for ws in conns if ws.close_code is not None)
    await asyncio.gather(*(ws.close() for ws in conns))
    return {"connections": len(conns), "answers": dict(codes), "closes": dict(closes)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kind", choices=sorted(CONTENT), required=True)
    parser.add_argument("--token")
    parser.add_argument("--origin")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--requests", type=int, default=3000)
    print(json.dumps(asyncio.run(main(parser.parse_args()))), flush=True)
