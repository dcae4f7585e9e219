"""Run every benchmark scenario against the peer baseline and against backchannel, same run.

Per server: start-up time (spawn -> port accepts TCP, median of N fresh spawns), idle RSS per
connection, then each load scenario (alternating servers so that drift on this shared machine
hits both alike). Prints Markdown tables and writes benchmarks/results/<timestamp>.json (plus
results/latest.json).

    python benchmarks/run.py [--ours "uv run backchannel serve --host 127.0.0.1 --port {port}"]

The peer is started as ``{python} benchmarks/peer_echo.py`` with this interpreter, which needs
websockets, orjson (and ideally uvloop). To test the harness before the real server exists:
``--ours "{python} benchmarks/peer_echo.py --host 127.0.0.1 --port {port}"``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from idle import measure_idle, raise_nofile
from loadgen import Scenario, run_load

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
DEFAULT_OURS = "uv run backchannel serve --host 127.0.0.1 --port {port}"
PEER = "{python} benchmarks/peer_echo.py --host 127.0.0.1 --port {port}"
# (name, requests in flight per client, offer permessage-deflate as browsers do)
SCENARIOS = [("closed-loop", 1, False), ("pipelined", 10, False), ("closed-loop deflate", 1, True)]


class Server:
    """One server under test, started in its own process group (so wrappers die with it)."""

    def __init__(self, name: str, template: str) -> None:
        self.name, self.template = name, template
        self.log = RESULTS / f"{name}.log"  # the server's stdout+stderr, last start only
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> float:
        """Spawn on a free port; return seconds until the port accepts connections."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        argv = shlex.split(self.template.format(port=self.port, python=sys.executable))
        started = time.perf_counter()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        while True:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return time.perf_counter() - started
            except OSError:
                if time.perf_counter() - started > 60:
                    raise SystemExit(f"{self.name} did not open port {self.port} in 60 s") from None
                time.sleep(0.005)

    def stop(self) -> None:
        """SIGTERM our process group, SIGKILL it if still alive after 5 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def md_table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Markdown table lines; the first ``left`` columns are left-aligned, the rest right."""
    rule = "|---" * left + "|--:" * (len(header) - left) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def num(value: float | None, spec: str, suffix: str = "") -> str:
    """Format a figure, or a dash when there is none (e.g. no answers at all)."""
    return "—" if value is None else f"{value:{spec}}{suffix}"


def ratio(ours: float | None, peer: float | None) -> float | None:
    """``ours / peer``, or None when either figure is missing."""
    return ours / peer if ours is not None and peer else None


def fmt_tables(results: dict[str, Any]) -> str:
    """Markdown: one row per (scenario, server), then one row per server for idle/start-up."""
    peer_cpu = {
        r["scenario"]: r["server_cpu_us_per_msg"] for r in results["load"] if r["server"] == "peer"
    }
    load = md_table(
        [
            "scenario",
            "server",
            "msgs/s",
            "p50 ms",
            "p99 ms",
            "server CPU-µs/msg",
            "vs peer",
            "errors",
            "server CPU %",
            "loadgen CPU %",
        ],
        [
            [
                r["scenario"],
                r["server"],
                f"{r['msgs_per_s']:,.0f}",
                f"{r['p50_ms']:.2f}",
                f"{r['p99_ms']:.2f}",
                num(r["server_cpu_us_per_msg"], ".1f"),
                num(ratio(r["server_cpu_us_per_msg"], peer_cpu[r["scenario"]]), ".2f", "x"),
                str(r["errors"]),
                f"{r['server_cpu_pct']:.0f}",
                f"{r['loadgen_cpu_pct']:.0f}",
            ]
            for r in results["load"]
        ],
        left=2,
    )
    idle = md_table(
        [
            "server",
            "idle RSS/conn KiB",
            "idle conns (failed)",
            "RSS before MiB",
            "start-up ms (median)",
            "start-up ms (all runs)",
        ],
        [
            [
                name,
                num(i["rss_per_conn_kib"], ".1f"),
                f"{i['connections']} ({i['failures']})",
                f"{i['rss_before_kib'] / 1024:.1f}",
                f"{results['startup'][name]['median_ms']:.0f}",
                ", ".join(f"{ms:.0f}" for ms in results["startup"][name]["runs_ms"]),
            ]
            for name, i in results["idle"].items()
        ],
    )
    return "\n".join([*load, "", *idle])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ours",
        default=DEFAULT_OURS,
        help="command template; {port} and {python} (this interpreter) are filled in",
    )
    parser.add_argument("--path", default="/ws", help="WebSocket path (the peer accepts any)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--idle-conns", type=int, default=5000)
    parser.add_argument("--startup-runs", type=int, default=5)
    args = parser.parse_args()
    raise_nofile(args.idle_conns + 1024)  # inherited by the servers we spawn
    RESULTS.mkdir(exist_ok=True)

    servers = [Server("peer", PEER), Server("ours", args.ours)]
    results: dict[str, Any] = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "commands": {s.name: s.template for s in servers},
        "config": vars(args),
        "host": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "websockets": version("websockets"),
        },
        "startup": {},
        "idle": {},
        "load": [],
    }
    try:
        for srv in servers:
            runs = []
            for _ in range(args.startup_runs):
                runs.append(srv.start() * 1000)
                srv.stop()
            results["startup"][srv.name] = {"median_ms": statistics.median(runs), "runs_ms": runs}
            print(f"start-up {srv.name}: {statistics.median(runs):.0f} ms", file=sys.stderr)
        for srv in servers:
            srv.start()
        for srv in servers:
            results["idle"][srv.name] = asyncio.run(
                measure_idle(srv.url(args.path), srv.pid, args.idle_conns)
            )
            print(f"idle {srv.name}: {results['idle'][srv.name]}", file=sys.stderr)
        for scenario, inflight, deflate in SCENARIOS:
            for srv in servers:
                label = f"{scenario} {args.clients}x{inflight}"
                sc = Scenario(
                    srv.url(args.path),
                    srv.pid,
                    args.clients,
                    inflight,
                    args.duration,
                    args.warmup,
                    args.procs,
                    deflate,
                    label,
                )
                r = run_load(sc)
                results["load"].append({"scenario": label, "server": srv.name, **r})
                errs = f"{r['errors']} errors {r['error_samples'][:1]}" if r["errors"] else ""
                print(f"{label} {srv.name}: {r['msgs_per_s']:,.0f} msg/s {errs}", file=sys.stderr)
    finally:
        for srv in servers:
            srv.stop()

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(results, indent=2) + "\n"
    for path in (RESULTS / f"{stamp}.json", RESULTS / "latest.json"):
        path.write_text(text)
    print(fmt_tables(results))
    print(f"\nresults: {RESULTS / f'{stamp}.json'}")


if __name__ == "__main__":
    main()
