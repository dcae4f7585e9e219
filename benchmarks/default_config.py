"""Issue 10's target: what users run, against the peer, in alternating rounds.

Three servers, all on uvloop, each its own process, started once:

* ``peer``: the plain ``websockets`` JSON echo (peer_echo.py);
* ``ours-default``: ``backchannel serve`` with no config at all: the default plugins,
  rooms included (what ``uv run backchannel serve`` starts);
* ``ours-standard``: the same with ``init, text, ping, system, validation`` only.

Each round runs the closed-loop load (50 clients, one request in flight each: ``text``
requests without a room) against the three in turn, the order rotating every round so
that drift on this shared machine hits them alike. Reported per server: server CPU-µs per
message (from /proc, the server's process tree) and msgs/s, each round and the median;
the ratios are medians of the per-round ratios against the peer of the same round.

    uv run python benchmarks/default_config.py            # 5 rounds of 10 s (~3 minutes)
    uv run python benchmarks/default_config.py --rounds 3 --duration 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import UTC, datetime
from typing import Any

from loadgen import Scenario, run_load
from run import PEER, RESULTS, Server

OURS = "uv run backchannel serve --host 127.0.0.1 --port {port}"
STANDARD = ["init", "text", "ping", "system", "validation"]


def servers() -> list[Server]:
    return [
        Server("peer", PEER + " --uvloop", "uvloop"),
        Server("ours-default", OURS, "uvloop", "peer"),
        Server(
            "ours-standard",
            OURS,
            "uvloop",
            "peer",
            {"BACKCHANNEL_PLUGINS__ENABLED": json.dumps(STANDARD)},
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    all_servers = servers()
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    try:
        for srv in all_servers:
            srv.start()
        for n in range(args.rounds):
            order = all_servers[n % 3 :] + all_servers[: n % 3]
            for srv in order:
                sc = Scenario(
                    srv.url("/ws"),
                    srv.pid,
                    args.clients,
                    1,
                    args.duration,
                    args.warmup,
                    args.procs,
                    False,
                    f"closed-loop {args.clients}x1",
                )
                r = run_load(sc)
                rows.append({"round": n, "server": srv.name, **r})
                print(
                    f"round {n} {srv.name}: {r['msgs_per_s']:,.0f} msg/s, "
                    f"{r['server_cpu_us_per_msg']:.2f} CPU-µs/msg, errors {r['errors']}",
                    file=sys.stderr,
                )
    finally:
        for srv in all_servers:
            srv.stop()
    summary: dict[str, Any] = {}
    for name in ("ours-default", "ours-standard"):
        ratios = []
        for n in range(args.rounds):
            mine = next(r for r in rows if r["round"] == n and r["server"] == name)
            peer = next(r for r in rows if r["round"] == n and r["server"] == "peer")
            ratios.append(mine["server_cpu_us_per_msg"] / peer["server_cpu_us_per_msg"])
        summary[name] = {
            "cpu_ratio_rounds": [round(x, 3) for x in ratios],
            "cpu_ratio_median": round(statistics.median(ratios), 3),
        }
    for name in ("peer", "ours-default", "ours-standard"):
        mine = [r for r in rows if r["server"] == name]
        summary.setdefault(name, {}).update(
            cpu_us_median=round(statistics.median(r["server_cpu_us_per_msg"] for r in mine), 2),
            msgs_per_s_median=round(statistics.median(r["msgs_per_s"] for r in mine)),
            p99_ms_median=round(statistics.median(r["p99_ms"] for r in mine), 2),
        )
    result = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": vars(args),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "rows": rows,
        "summary": summary,
    }
    (RESULTS / "latest-default-config.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
