"""Kernel-only cost of one request: ``Connection.on_message`` to the answer written.

No sockets and no WebSocket framing: a recording transport stands in for the
driver, so this isolates the pipeline (envelope, dispatch, validation, handler,
session, outbox). Process CPU time over N closed-loop ``text`` requests.

    uv run python benchmarks/pipeline_micro.py [N]
"""

from __future__ import annotations

import asyncio
import sys
import time

import orjson

from backchannel import App, Connection, State
from backchannel.http import HttpRequest
from backchannel.runtime import AsyncioRuntime
from backchannel.testing import serve_in_memory

PLUGIN_SETS = (["text"], ["init", "text", "ping", "system", "validation"])


class _Recorder:
    """Counts written frames; sets an event after the last one."""

    blocked_since = None

    def __init__(self, target: int) -> None:
        self.written = 0
        self.target = target
        self.done = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.written += 1
        if self.written >= self.target:
            self.done.set()

    def close(self, code: int, reason: str) -> None:
        return None

    def heartbeat(self, now: float, interval: float, timeout: float) -> bool:
        return True


async def measure(plugins: list[str], n: int) -> float:
    """Microseconds of process CPU per request."""
    app = App({"log": {"level": "WARNING"}}, plugins=plugins)
    async with serve_in_memory(app):
        conn, recorder = await open_connection(app, n)
        return await cpu_per_request(conn, recorder, n)


async def open_connection(
    app: App, n: int, remote: tuple[str, int] | None = None
) -> tuple[Connection, _Recorder]:
    """A connection of the serving ``app`` writing to a :class:`_Recorder`, admitted."""
    runtime = AsyncioRuntime()
    recorder = _Recorder(n)
    request = HttpRequest("GET", "/ws", {})
    request.remote = remote
    conn = app.accept(request, recorder, runtime)
    runtime.spawn(conn.run)
    for _ in range(1000):  # authenticate and connect hooks ran
        if conn.state is State.OPEN:
            break
        await asyncio.sleep(0.001)
    return conn, recorder


async def cpu_per_request(conn: Connection, recorder: _Recorder, n: int) -> float:
    """µs of process CPU per ``text`` request sent to ``conn``, one at a time, until
    ``recorder`` has every answer."""
    payloads = [
        orjson.dumps({"id": f"c-{i}", "type": "text", "content": {"text": "hello"}}).decode()
        for i in range(n)
    ]
    started = time.process_time()
    for payload in payloads:
        conn.on_message(payload)
        await asyncio.sleep(0)  # one request at a time, as a closed-loop client
    await recorder.done.wait()
    return (time.process_time() - started) / n * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    for plugins in PLUGIN_SETS:
        print(f"{','.join(plugins)}: {asyncio.run(measure(plugins, n)):.2f} µs/request")


if __name__ == "__main__":
    main()
