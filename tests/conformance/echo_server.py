"""Test fixture: WebSocket echo server for the Autobahn|Testsuite conformance run.

Runs backchannel's own drivers (:mod:`backchannel.server`) and wire
(:mod:`backchannel.websocket`) with a raw echo endpoint instead of the kernel's
JSON pipeline: every text message goes back as text, every binary message as
binary, unchanged. A test fixture only, not a product feature.

    python tests/conformance/echo_server.py --driver DRIVER --host HOST --port PORT [--deflate]

Drivers:

* ``asyncio``        -- :func:`serve_asyncio` (the ``asyncio.Protocol`` driver) on
  a plain asyncio loop;
* ``asyncio-uvloop`` -- the same on a uvloop loop (needs the ``uvloop`` extra);
* ``anyio-asyncio``  -- :func:`serve_anyio` (the anyio-streams driver) under
  ``anyio.run(backend="asyncio")``;
* ``anyio-trio``     -- :func:`serve_anyio` under ``anyio.run(backend="trio")``.

The WebSocket endpoint is at ``/`` (``WS_PATH``): conformance/run gives wstest
the URL ``ws://HOST:PORT/``. permessage-deflate is negotiated only with ``--deflate``
(``ServerOptions.compression = "deflate"``, what ``conformance/run --deflate`` passes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from backchannel.http import HttpRequest
from backchannel.runtime import Runtime
from backchannel.server import ServerOptions, serve_anyio, serve_asyncio

WS_PATH = "/"
MAX_MESSAGE_SIZE = 64 * 1024 * 1024  # Autobahn 9.x sends messages up to 16 MiB
DRIVERS = ("asyncio", "asyncio-uvloop", "anyio-asyncio", "anyio-trio")


class EchoEndpoint:
    """Sends every message back on the driver it came from, with the same type."""

    __slots__ = ("_closed", "_done", "_transport")

    def __init__(self, request: HttpRequest, transport: Any, runtime: Runtime) -> None:
        self._transport = transport
        self._closed = False
        self._done = runtime.signal()

    def on_message(self, payload: str | bytes) -> None:
        if isinstance(payload, str):
            self._transport.write(payload.encode())  # a text frame of UTF-8 bytes
        else:
            self._transport.write_binary(payload)

    def on_closed(self, code: int) -> None:
        self._closed = True
        self._done.set()

    async def run(self) -> None:
        # Live as long as the connection, like the kernel's Connection does.
        # No await between the check and wait(): a close cannot slip in between.
        if not self._closed:
            await self._done.wait()


#: set from --deflate before serving: offer permessage-deflate (Autobahn cases 12.x, 13.x)
COMPRESSION = "off"


def options() -> ServerOptions:
    return ServerOptions(
        endpoint=EchoEndpoint,
        ws_path=WS_PATH,
        max_size=MAX_MESSAGE_SIZE,
        compression=COMPRESSION,
        handshake_timeout=10.0,
        close_timeout=5.0,
    )


def listening(driver: str, host: str, port: int) -> None:
    print(f"echo server ({driver}) listening on ws://{host}:{port}{WS_PATH}", flush=True)


async def main_asyncio(driver: str, host: str, port: int) -> None:
    server, _runtime = await serve_asyncio(options(), host, port)
    listening(driver, host, server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


async def main_anyio(driver: str, host: str, port: int) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(_listen_anyio, driver, host, port, tg)


async def _listen_anyio(
    driver: str,
    host: str,
    port: int,
    tg: anyio.abc.TaskGroup,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    def started(bound: int) -> None:
        listening(driver, host, bound)
        task_status.started()

    await serve_anyio(options(), host, port, tg, started=started)


def run(driver: str, host: str, port: int) -> None:
    if driver == "asyncio":
        asyncio.run(main_asyncio(driver, host, port))
    elif driver == "asyncio-uvloop":
        try:
            import uvloop
        except ImportError:
            sys.exit("echo_server: driver asyncio-uvloop needs uvloop (backchannel[uvloop])")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main_asyncio(driver, host, port))
    elif driver == "anyio-asyncio":
        anyio.run(main_anyio, driver, host, port, backend="asyncio")
    elif driver == "anyio-trio":
        anyio.run(main_anyio, driver, host, port, backend="trio")
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(driver)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    parser.add_argument("--driver", choices=DRIVERS, default="asyncio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--deflate", action="store_true", help="offer permessage-deflate")
    args = parser.parse_args()
    if args.deflate:
        COMPRESSION = "deflate"
    with contextlib.suppress(KeyboardInterrupt):
        run(args.driver, args.host, args.port)
