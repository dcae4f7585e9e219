"""Idle-connection memory: server RSS growth per open, idle WebSocket connection.

Reads the server's VmRSS (the PID and its descendants, from /proc/<pid>/status), opens ``-n``
connections in batches (offering backchannel.v1, no compression, no client pings), waits until
they are all established and a settle delay has passed, reads VmRSS again and reports
(after - before) / n in KiB. Then closes everything.

    python benchmarks/idle.py --url ws://127.0.0.1:8765/ --server-pid 1234 [-n 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from typing import Any

from loadgen import SUBPROTOCOL, process_tree
from websockets.asyncio.client import ClientConnection, connect


def raise_nofile(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to at least ``needed`` (capped by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def rss_kib(root: int) -> int:
    """Return the summed VmRSS in KiB of ``root`` and its descendants."""
    total = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next((int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")), 0)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


async def measure_idle(
    url: str, server_pid: int, n: int = 5000, batch: int = 100, settle: float = 1.0
) -> dict[str, Any]:
    """Open ``n`` idle connections and return the server's RSS growth per connection."""
    if raise_nofile(n + 256) < n + 256:
        raise SystemExit(f"RLIMIT_NOFILE hard limit too low for {n} connections")
    before = rss_kib(server_pid)
    conns: list[ClientConnection] = []
    failures: list[str] = []
    started = time.monotonic()
    for i in range(0, n, batch):
        opened = await asyncio.gather(
            *(
                connect(url, subprotocols=[SUBPROTOCOL], compression=None, ping_interval=None)
                for _ in range(min(batch, n - i))
            ),
            return_exceptions=True,
        )
        conns += [c for c in opened if isinstance(c, ClientConnection)]
        failures += [repr(c) for c in opened if not isinstance(c, ClientConnection)]
    open_s = time.monotonic() - started
    await asyncio.sleep(settle)
    after = rss_kib(server_pid)
    for i in range(0, len(conns), batch * 5):
        await asyncio.gather(*(ws.close() for ws in conns[i : i + batch * 5]))
    return {
        "connections": len(conns),
        "failures": len(failures),
        "failure_sample": failures[0] if failures else None,
        "open_s": open_s,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "rss_per_conn_kib": (after - before) / len(conns) if conns else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("-n", "--connections", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    result = asyncio.run(measure_idle(args.url, args.server_pid, args.connections, args.batch))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
