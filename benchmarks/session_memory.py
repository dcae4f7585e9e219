"""Session memory under honest traffic (issue 11 item 5): what a server keeps once busy clients
have left, against the plain ``websockets`` echo server in the same run.

For each server (``ours``: ``backchannel serve`` with the standard plugins and the config's
session settings, ``session.ttl`` lowered to ``--ttl``; ``peer``: ``peer_echo.py``), on asyncio:

1. start it and let it settle 1 s: RSS ``start`` (VmRSS of the process tree, /proc);
2. round 1: ``--clients`` clients connect and send ``text`` requests at full speed (closed
   loop, one in flight each, loadgen.py) for ``--duration`` s, then close. RSS when the
   traffic ends (``busy``), 2 s after the clients left (``left``) and once the session
   lifetime passed (``expired``: ``--ttl`` + 3 s; nothing expires on the peer);
3. round 2: the same traffic again, RSS once its sessions expired too (``second``).

Also reported: answers, errors, lost requests and p99 latency of each round.

    uv run python benchmarks/session_memory.py [--clients 2000] [--duration 30] [--ttl 10]
        [--procs 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from idle import raise_nofile, rss_kib
from loadgen import Scenario, run_load
from run import PEER, STANDARD, Server

BACKCHANNEL = Path(sys.executable).with_name("backchannel")
OURS = f"{BACKCHANNEL} serve --host 127.0.0.1 --port {{port}}"


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


def measure(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """Both rounds against one server; RSS in MiB at each step."""
    server.start()
    try:
        time.sleep(1)
        rss = {"start": mib(rss_kib(server.pid))}
        rounds = []
        for n in (1, 2):
            load = run_load(
                Scenario(
                    url=server.url("/ws"),
                    server_pid=server.pid,
                    clients=args.clients,
                    duration=args.duration,
                    warmup=0.0,
                    procs=args.procs,
                    label=f"{server.name} round {n}",
                )
            )
            if n == 1:
                rss["busy"] = mib(rss_kib(server.pid))  # the clients are closing now
                time.sleep(2)
                rss["left"] = mib(rss_kib(server.pid))
            time.sleep(args.ttl + 3)
            rss["expired" if n == 1 else "second"] = mib(rss_kib(server.pid))
            rounds.append({k: load[k] for k in ("answers", "errors", "lost", "p99_ms")})
        return {"server": server.name, "rss_mib": rss, "rounds": rounds}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--ttl", type=float, default=10.0, help="ours' session.ttl, seconds")
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--json", dest="json_out", help="also write the results to this file")
    args = parser.parse_args()
    raise_nofile(args.clients + 256)
    env = {
        "BACKCHANNEL_PLUGINS__ENABLED": json.dumps(STANDARD.split(",")),
        "BACKCHANNEL_SERVER__UVLOOP": "false",
        "BACKCHANNEL_SESSION__TTL": str(args.ttl),
        "BACKCHANNEL_LOG__LEVEL": "WARNING",
        "BACKCHANNEL_SERVER__MAX_CONNECTIONS": str(args.clients + 100),
    }
    servers = [Server("ours", OURS, "asyncio", env=env), Server("peer", PEER, "asyncio")]
    results = {
        "settings": vars(args),
        "results": [measure(server, args) for server in servers],
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
