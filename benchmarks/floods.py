"""What a flooding client costs a ``backchannel serve`` process (issue 11, item 4).

Starts ``backchannel serve`` (``--backend``, the default plugins, settings from the
environment), connects one well-behaved client, then ``--attackers`` connections that
flood for ``--seconds`` without ever reading what the server sends:

* ``pings``: ping frames with 125-byte payloads, back to back (each wants a pong);
* ``unread``: ``ping`` requests with fresh ids, back to back (each gets an answer);
* ``fragments``: one text message in 1-byte fragments, until ``server.max_message_size``
  closes it 1009;
* ``empty-fragments``: one text message that never ends, in empty fragments;

and two that read every answer (so each is answered in full, from an open session):

* ``invalid``: ``text`` requests whose content fails the schema (``validation_failed``);
* ``unauthenticated``: ``text`` requests from a connection without a token, on a server
  where that connection waits for ``init {token}`` (the jwt plugin, anonymous connections
  off: :data:`SETTINGS`), each answered ``unauthorized``.

Meanwhile the well-behaved client sends a ``ping`` request as soon as the previous one is
answered. Reported per kind: the server's VmRSS (``/proc/<pid>/status``) before the
attackers connect and its peak while they flood (sampled every 20 ms), the growth per
attacking connection, the well-behaved client's round trips (p50, p99, max), and whether
the server logged a traceback.

    uv run python benchmarks/floods.py [--backend asyncio|trio] [--kinds pings,unread,...]
        [--attackers 10] [--seconds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
import anyio.abc
import jwt

from backchannel.testing import RawClient, raw_connect

__all__ = ["KINDS", "SETTINGS", "Flood", "Server", "flood", "rss_kib", "serve"]

ROOT = Path(__file__).resolve().parent.parent
OP_CONT, OP_TEXT, OP_PING = 0x0, 0x1, 0x9


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame with a zero masking key (valid, and the payload stays as is)."""
    length = len(payload)
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        head = bytes([first, 0x80 | length])
    elif length < 1 << 16:
        head = bytes([first, 0x80 | 126]) + struct.pack("!H", length)
    else:
        head = bytes([first, 0x80 | 127]) + struct.pack("!Q", length)
    return head + b"\0\0\0\0" + payload


# ------------------------------------------------------------------------------ server


@dataclass
class Server:
    """A running ``backchannel serve`` process."""

    pid: int
    port: int
    log: Path

    def tracebacks(self) -> list[str]:
        """Log lines of the tracebacks the server printed (none expected)."""
        text = self.log.read_text(errors="replace")
        return [line for line in text.splitlines() if "Traceback" in line]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@contextmanager
def serve(backend: str, settings: dict[str, str] | None = None) -> Iterator[Server]:
    """``backchannel serve --backend B`` on a free port, its log in a temporary file;
    ``settings``: extra ``BACKCHANNEL_*`` variables (the caller's are dropped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKCHANNEL_")}
    env.update(settings or {})
    port = _free_port()
    script = Path(sys.executable).with_name("backchannel")
    cmd = [str(script), "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend", backend, "--log-level", "INFO"]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
            )
        try:
            deadline = time.monotonic() + 30
            while b"listening on" not in log.read_bytes():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start:\n{log.read_text()}")
                time.sleep(0.02)
            yield Server(process.pid, port, log)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ----------------------------------------------------------------------------- attacks


async def _pings(client: RawClient) -> None:
    blob = frame(OP_PING, bytes(125)) * 512
    while True:
        await client.stream.send(blob)


async def _unread(client: RawClient) -> None:
    for batch in range(1_000_000):
        requests = (
            frame(OP_TEXT, b'{"id":"a%d-%d","type":"ping","content":{}}' % (batch, i))
            for i in range(256)
        )
        await client.stream.send(b"".join(requests))


async def _fragments(client: RawClient) -> None:
    await client.stream.send(frame(OP_TEXT, b"x", fin=False))
    blob = frame(OP_CONT, b"x", fin=False) * 4096
    while True:
        await client.stream.send(blob)


async def _empty_fragments(client: RawClient) -> None:
    await client.stream.send(frame(OP_TEXT, b"", fin=False))
    blob = frame(OP_CONT, b"", fin=False) * 4096
    while True:
        await client.stream.send(blob)


async def _answered(client: RawClient, request: bytes) -> None:
    """``request`` (with ``%d-%d`` for a fresh id) back to back, in batches of 256, while
    every answer is read (and dropped): a flood the server answers in full."""

    async def drain() -> None:
        with suppress(anyio.EndOfStream):
            while True:
                await client.stream.receive(1 << 16)

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain)
        for batch in range(1_000_000):
            await client.stream.send(
                b"".join(frame(OP_TEXT, request % (batch, i)) for i in range(256))
            )
        tg.cancel_scope.cancel()


async def _invalid(client: RawClient) -> None:
    await _answered(client, b'{"id":"v%d-%d","type":"text","content":{"bogus":1}}')


async def _unauthenticated(client: RawClient) -> None:
    await _answered(client, b'{"id":"u%d-%d","type":"text","content":{"text":"hi"}}')


Attack = Callable[[RawClient], Awaitable[None]]
KINDS: dict[str, Attack] = {
    "pings": _pings,
    "unread": _unread,
    "fragments": _fragments,
    "empty-fragments": _empty_fragments,
    "invalid": _invalid,
    "unauthenticated": _unauthenticated,
}

#: the secret of the tokens the well-behaved client of an ``unauthenticated`` flood sends
_SECRET = secrets.token_urlsafe(32)
#: the server settings a kind needs (``serve(backend, SETTINGS.get(kind))``)
SETTINGS: dict[str, dict[str, str]] = {
    "unauthenticated": {
        "BACKCHANNEL_PLUGINS__ENABLED": json.dumps(
            ["jwt", "init", "text", "ping", "system", "validation", "rooms"]
        ),
        "BACKCHANNEL_AUTH__ALLOW_ANONYMOUS": "false",
        "BACKCHANNEL_PLUGINS__JWT__ISSUERS": json.dumps(
            [{"keys": [{"algorithms": ["HS256"], "secret_env": "FLOODS_JWT_SECRET"}]}]
        ),
        "FLOODS_JWT_SECRET": _SECRET,
    }
}


def _token() -> str:
    """A token the ``unauthenticated`` kind's server accepts (for the well-behaved client)."""
    claims = {"sub": "well-behaved", "exp": int(time.time()) + 600}
    return jwt.encode(claims, _SECRET, algorithm="HS256")


@dataclass
class Flood:
    """One flood's figures."""

    kind: str
    attackers: int
    seconds: float
    rss_before_kib: int
    rss_peak_kib: int
    per_attacker_kib: float
    round_trips: int
    p50_ms: float
    p99_ms: float
    max_ms: float


@asynccontextmanager
async def _attacker(port: int) -> AsyncIterator[RawClient]:
    async with raw_connect(port) as client:
        assert await client.handshake() == 101
        yield client


async def _attack(port: int, kind: str, stop: anyio.Event) -> None:
    """One attacking connection: floods until ``stop`` or until the server ends it."""
    async with _attacker(port) as client:
        with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            async with anyio.create_task_group() as tg:

                async def until_stopped() -> None:
                    await stop.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(until_stopped)
                await KINDS[kind](client)
                tg.cancel_scope.cancel()


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def flood(server: Server, kind: str, attackers: int = 10, seconds: float = 3.0) -> Flood:
    """Flood ``server`` with ``attackers`` connections of ``kind`` for ``seconds``."""
    latencies: list[float] = []
    async with raw_connect(server.port) as good:
        assert await good.handshake() == 101
        if kind in SETTINGS:  # anonymous connections are off: it sends its token in init
            init = {"id": "init", "type": "init", "content": {"token": _token()}}
            await good.stream.send(frame(OP_TEXT, json.dumps(init).encode()))
            answer = await good.next_message()
            assert isinstance(answer, dict) and answer["type"] == "init", answer
        for i in range(200):  # warm up: allocations of a served connection settle
            await good.request("ping", {}, id=f"w{i}")
        before = rss_kib(server.pid)
        peak = before
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            for _ in range(attackers):
                tg.start_soon(_attack, server.port, kind, stop)

            async def sample() -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, rss_kib(server.pid))
                    await anyio.sleep(0.02)

            tg.start_soon(sample)
            end = time.monotonic() + seconds
            n = 0
            while time.monotonic() < end:
                n += 1
                started = time.perf_counter()
                with anyio.fail_after(30):
                    await good.request("ping", {}, id=f"g{n}")
                latencies.append(time.perf_counter() - started)
            peak = max(peak, rss_kib(server.pid))
            stop.set()
    latencies.sort()
    return Flood(
        kind=kind,
        attackers=attackers,
        seconds=seconds,
        rss_before_kib=before,
        rss_peak_kib=peak,
        per_attacker_kib=round((peak - before) / attackers, 1),
        round_trips=len(latencies),
        p50_ms=round(_percentile(latencies, 0.5) * 1000, 2),
        p99_ms=round(_percentile(latencies, 0.99) * 1000, 2),
        max_ms=round(latencies[-1] * 1000, 2) if latencies else float("nan"),
    )


# -------------------------------------------------------------------------------- main


async def _main(args: argparse.Namespace) -> list[Flood]:
    results = []
    for kind in args.kinds.split(","):
        # a fresh server per kind: RSS from a clean start
        with serve(args.backend, SETTINGS.get(kind)) as server:
            result = await flood(server, kind, args.attackers, args.seconds)
            results.append(result)
            if server.tracebacks():
                print(f"{kind}: the server logged a traceback, see above", file=sys.stderr)
                print(server.log.read_text(), file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--attackers", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    results = anyio.run(_main, args)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
        return
    print(f"backend {args.backend}, {args.attackers} attackers, {args.seconds} s each")
    columns = ["flood", "RSS before MiB", "peak MiB", "KiB per attacker", "round trips"]
    print("| " + " | ".join([*columns, "p50 ms", "p99 ms"]) + " |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for r in results:
        print(
            f"| {r.kind} | {r.rss_before_kib / 1024:.1f} | {r.rss_peak_kib / 1024:.1f} "
            f"| {r.per_attacker_kib:.0f} | {r.round_trips} | {r.p50_ms} | {r.p99_ms} |"
        )


if __name__ == "__main__":
    main()
