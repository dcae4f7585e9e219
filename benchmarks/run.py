"""Run every benchmark scenario for the peer baseline and for backchannel, same run, same loops.

Servers (each its own process, all started by this script):

* ``peer-asyncio`` / ``peer-uvloop``: the plain ``websockets`` JSON echo (peer_echo.py), on the
  stock asyncio loop / on uvloop;
* ``ours-asyncio`` / ``ours-uvloop``: ``backchannel serve`` with the default config, with
  ``BACKCHANNEL_SERVER__UVLOOP=false`` / ``=true`` in its environment;
* ``ours-uvloop+20off``: ``ours-uvloop`` with 20 installed-but-disabled dummy plugins on its
  PYTHONPATH (dummies.py, written to a temp dir at run time).

Each of ours is compared with the peer on the same event loop. Phases: start-up (spawn -> port
accepts TCP; round-robin over the servers, median of N), idle RSS per connection, then the load
scenarios (within a scenario the servers run back to back, so drift on this shared machine hits
them alike), then extra alternating closed-loop runs of ours-uvloop with/without the dummies.
Prints Markdown tables and writes benchmarks/results/<timestamp>.json and results/latest.json
(results/latest-sessions.json for a run without the echo phases).

    uv run python benchmarks/run.py            # full run, about 3.5 minutes
    uv run python benchmarks/run.py --quick    # 3 s windows, 1000 idle conns: about 1 minute
    uv run python benchmarks/run.py --report benchmarks/results/latest.json   # tables only
    uv run python benchmarks/run.py --scenarios broadcast,resume,outbox   # issue 3 (~3 minutes)
    uv run --group bench python benchmarks/run.py --scenarios scaleout    # issue 5 (~4 minutes)

``--scenarios`` picks the phases: ``echo`` (all of the above, the default) and issue 3's
``broadcast``, ``resume``, ``outbox`` (sessions_suite.py), or ``all`` (those four); issue 5's
``scaleout`` (scaleout.py: 3 instances on one Redis against python-socketio with its Redis
manager) is run only when named, since its peer needs the ``bench`` dependency group.

The peer and the load generator run on this interpreter, which needs websockets, orjson and
uvloop (the workspace venv has them). To test the harness without the real server:
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
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import dummies
import scaleout
import sessions_suite
from idle import measure_idle, raise_nofile
from loadgen import Scenario, process_tree, run_load

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
DEFAULT_OURS = "uv run backchannel serve --host 127.0.0.1 --port {port}"
PEER = "{python} benchmarks/peer_echo.py --host 127.0.0.1 --port {port}"
N_DUMMIES = 20
PLUGINS = f"ours-uvloop+{N_DUMMIES}off"
STANDARD = "init,text,ping,system,validation"  # issue 2's standard plugins
# (name, requests in flight per client, offer permessage-deflate as browsers do, servers)
ALL = ["peer-asyncio", "ours-asyncio", "peer-uvloop", "ours-uvloop"]
SCENARIOS = [
    ("closed-loop", 1, False, [*ALL, PLUGINS]),
    ("pipelined", 10, False, ALL),
    ("closed-loop deflate", 1, True, ["peer-uvloop", "ours-uvloop"]),
]


@dataclass
class Server:
    """One server under test, started in its own process group (so wrappers die with it)."""

    name: str
    template: str
    loop: str  # "asyncio" or "uvloop": checked against the process's mappings at start
    peer: str | None = None  # the peer server on the same loop, for the "vs peer" column
    env: dict[str, str] = field(default_factory=dict)  # added to a BACKCHANNEL_*-free env
    idle: bool = True  # take part in the idle-RSS phase
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def log(self) -> Path:
        return RESULTS / f"{self.name}.log"  # the server's stdout+stderr, last start only

    def start(self) -> float:
        """Spawn on a free port; return seconds until the port accepts connections."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        argv = shlex.split(self.template.format(port=self.port, python=sys.executable))
        env = {k: v for k, v in os.environ.items() if not k.startswith("BACKCHANNEL_")}
        started = time.perf_counter()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env | self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
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

    def listening(self) -> str | None:
        """The server's own "listening on ..." log line of its last start (ours only)."""
        if not self.log.exists():
            return None
        lines = self.log.read_text(errors="replace").splitlines()
        return next((ln.split(": ", 1)[-1] for ln in lines if "listening on" in ln), None)

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def uvloop_loaded(self) -> bool:
        """Whether uvloop's extension module is mapped into any process of the server."""
        for pid in process_tree(self.pid):
            try:
                if "/uvloop/loop." in Path(f"/proc/{pid}/maps").read_text():
                    return True
            except (FileNotFoundError, ProcessLookupError):
                pass
        return False

    def observed_loop(self) -> str:
        """The loop the running server is on (by uvloop's mapping); warn if not as intended."""
        loop = "uvloop" if self.uvloop_loaded() else "asyncio"
        if loop != self.loop:
            print(
                f"WARNING {self.name}: meant to run on {self.loop}, runs on {loop}", file=sys.stderr
            )
        return loop


def ours_from(template: str) -> str:
    """The project directory the ours command runs from (``uv run --project/--directory``)."""
    argv = shlex.split(template)
    for i, arg in enumerate(argv[:-1]):
        if arg in ("--project", "--directory"):
            return argv[i + 1]
        if arg.startswith(("--project=", "--directory=")):
            return arg.split("=", 1)[1]
    return str(REPO)


def make_servers(ours: str, dummy_dir: Path, plugins: str = STANDARD) -> dict[str, Server]:
    """The five servers; ``plugins`` pins ours' enabled list ("" = the config's default)."""
    pin = {"BACKCHANNEL_PLUGINS__ENABLED": json.dumps(plugins.split(","))} if plugins else {}
    servers = [
        Server("peer-asyncio", PEER, "asyncio"),
        Server("peer-uvloop", PEER + " --uvloop", "uvloop"),
        Server(
            "ours-asyncio",
            ours,
            "asyncio",
            "peer-asyncio",
            {"BACKCHANNEL_SERVER__UVLOOP": "false", **pin},
        ),
        Server(
            "ours-uvloop",
            ours,
            "uvloop",
            "peer-uvloop",
            {"BACKCHANNEL_SERVER__UVLOOP": "true", **pin},
        ),
        Server(
            PLUGINS,
            ours,
            "uvloop",
            "peer-uvloop",
            {"BACKCHANNEL_SERVER__UVLOOP": "true", **pin, **dummies.env_with(dummy_dir)},
            idle=False,
        ),
    ]
    return {s.name: s for s in servers}


# ---------------------------------------------------------------------------------------------
# Tables


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


def load_row(results: dict[str, Any], scenario: str, server: str) -> dict[str, Any] | None:
    """The main (non-repeat) load result of ``server`` in ``scenario``."""
    rows: list[dict[str, Any]] = results["load"]
    for r in rows:
        if r["scenario"] == scenario and r["server"] == server and not r.get("repeat"):
            return r
    return None


def iqr(values: list[float]) -> float:
    """Interquartile range (needs two or more values)."""
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Derived figures: the plugin-overhead comparison and the issue's targets."""
    peers = {n: s["peer"] for n, s in results["servers"].items()}
    clients = results["config"]["clients"]
    cl, pl = f"closed-loop {clients}x1", f"pipelined {clients}x10"

    def cpu(scenario: str | None, server: str) -> float | None:
        row = load_row(results, scenario, server) if scenario else None
        return row["server_cpu_us_per_msg"] if row else None

    # Plugin overhead: every closed-loop run of ours-uvloop and ours+dummies (main + repeats).
    reps: dict[str, list[float]] = {"ours-uvloop": [], PLUGINS: []}
    tput: dict[str, list[float]] = {"ours-uvloop": [], PLUGINS: []}
    for r in results["load"]:
        if r["scenario"] == cl and r["server"] in reps and r["server_cpu_us_per_msg"]:
            reps[r["server"]].append(r["server_cpu_us_per_msg"])
            tput[r["server"]].append(r["msgs_per_s"])
    st = results["startup"]
    base_cpu = statistics.mean(reps["ours-uvloop"]) if reps["ours-uvloop"] else None
    plug_cpu = statistics.mean(reps[PLUGINS]) if reps[PLUGINS] else None
    # Noise band: the spread between runs of the *same* server in this run.
    cpu_noise = max((max(v) - min(v) for v in reps.values() if len(v) > 1), default=None)
    su_base, su_plug = st["ours-uvloop"], st[PLUGINS]
    su_noise = (
        max(iqr(su_base["runs_ms"]), iqr(su_plug["runs_ms"]))
        if min(len(su_base["runs_ms"]), len(su_plug["runs_ms"])) > 1
        else None
    )
    plugins = {
        "cpu_us_per_msg": {"ours-uvloop": reps["ours-uvloop"], PLUGINS: reps[PLUGINS]},
        "msgs_per_s": tput,
        "cpu_mean": {"ours-uvloop": base_cpu, PLUGINS: plug_cpu},
        "cpu_delta_pct": 100 * (plug_cpu / base_cpu - 1) if base_cpu and plug_cpu else None,
        "cpu_noise_us": cpu_noise,
        "startup_delta_ms": su_plug["median_ms"] - su_base["median_ms"],
        "startup_noise_ms": su_noise,
        "dummy_modules_imported_by_serve": results.get("dummy_modules_imported_by_serve"),
    }
    cpu_measurable = (
        abs(plug_cpu - base_cpu) > cpu_noise
        if base_cpu and plug_cpu and cpu_noise is not None
        else None
    )
    su_measurable = abs(plugins["startup_delta_ms"]) > su_noise if su_noise is not None else None

    targets = []
    for loop in ("uvloop", "asyncio"):
        ours = f"ours-{loop}"
        if ours not in peers:
            continue
        for scen in (cl, pl):
            rt = ratio(cpu(scen, ours), cpu(scen, peers[ours]))
            targets.append(
                {
                    "target": f"full pipeline server CPU-µs/msg ≤ 1.0x peer ({scen}, {loop})",
                    "measured": f"{num(cpu(scen, ours), '.1f')} vs "
                    f"{num(cpu(scen, peers[ours]), '.1f')} µs = {num(rt, '.3f', 'x')}",
                    "met": None if rt is None else rt <= 1.0,
                }
            )
    for loop in ("uvloop", "asyncio"):
        ours = f"ours-{loop}"
        i_o, i_p = results["idle"].get(ours), results["idle"].get(peers.get(ours) or "")
        if i_o and i_p:
            rt = ratio(i_o["rss_per_conn_kib"], i_p["rss_per_conn_kib"])
            targets.append(
                {
                    "target": f"idle RSS/conn ≤ 1.2x peer ({loop})",
                    "measured": f"{num(i_o['rss_per_conn_kib'], '.1f')} vs "
                    f"{num(i_p['rss_per_conn_kib'], '.1f')} KiB = {num(rt, '.2f', 'x')}",
                    "met": None if rt is None else rt <= 1.2,
                }
            )
    for ours in ("ours-uvloop", "ours-asyncio"):
        if ours in st:
            ms = st[ours]["median_ms"]
            targets.append(
                {
                    "target": f"start-up < 1 s, all standard plugins ({ours})",
                    "measured": f"{ms:.0f} ms (median of {len(st[ours]['runs_ms'])})",
                    "met": ms < 1000,
                }
            )
    targets.append(
        {
            "target": f"{N_DUMMIES} installed-but-disabled plugins: start-up unchanged",
            "measured": f"{su_base['median_ms']:.0f} → {su_plug['median_ms']:.0f} ms "
            f"(Δ {plugins['startup_delta_ms']:+.0f} ms; same-server IQR up to "
            f"{num(su_noise, '.0f')} ms)",
            "met": None if su_measurable is None else not su_measurable,
        }
    )
    targets.append(
        {
            "target": f"{N_DUMMIES} installed-but-disabled plugins: throughput unchanged",
            "measured": f"{num(base_cpu, '.1f')} → {num(plug_cpu, '.1f')} CPU-µs/msg "
            f"(Δ {num(plugins['cpu_delta_pct'], '+.1f')} %; same-server spread up to "
            f"{num(cpu_noise, '.1f')} µs)",
            "met": None if cpu_measurable is None else not cpu_measurable,
        }
    )
    return {"plugins": plugins, "targets": targets}


def fmt_tables(results: dict[str, Any]) -> str:
    """Markdown: load rows, idle/start-up rows, plugin overhead, targets."""
    peers = {n: s["peer"] for n, s in results["servers"].items()}
    loops = {n: s.get("loop_observed", s["loop"]) for n, s in results["servers"].items()}
    load = md_table(
        [
            "scenario",
            "server",
            "msgs/s",
            "p50 ms",
            "p99 ms",
            "server CPU-µs/msg",
            "vs peer (same loop)",
            "errors",
            "deflate conns",
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
                num(
                    ratio(
                        r["server_cpu_us_per_msg"],
                        (load_row(results, r["scenario"], peers[r["server"]]) or {}).get(
                            "server_cpu_us_per_msg"
                        )
                        if peers[r["server"]]
                        else None,
                    ),
                    ".2f",
                    "x",
                ),
                str(r["errors"]),
                f"{r.get('deflate_negotiated', 0)}/{r['clients']}",
                f"{r['server_cpu_pct']:.0f}",
                f"{r['loadgen_cpu_pct']:.0f}",
            ]
            for r in results["load"]
            if not r.get("repeat")
        ],
        left=2,
    )
    idle_rows = []
    for name, s in results["startup"].items():
        i = results["idle"].get(name)
        peer_i = results["idle"].get(peers[name] or "")
        idle_rows.append(
            [
                name,
                loops[name],
                num(i and i["rss_per_conn_kib"], ".1f"),
                num(
                    ratio(i["rss_per_conn_kib"], peer_i["rss_per_conn_kib"])
                    if i and peer_i
                    else None,
                    ".2f",
                    "x",
                ),
                f"{i['connections']} ({i['failures']})" if i else "—",
                num(i and i["rss_before_kib"] / 1024, ".1f"),
                f"{s['median_ms']:.0f}",
                ", ".join(f"{ms:.0f}" for ms in s["runs_ms"]),
            ]
        )
    idle = md_table(
        [
            "server",
            "loop",
            "idle RSS/conn KiB",
            "vs peer (same loop)",
            "idle conns (failed)",
            "RSS before MiB",
            "start-up ms (median)",
            "start-up ms (all runs)",
        ],
        idle_rows,
    )
    p = results["summary"]["plugins"]
    plug = md_table(
        ["figure", "ours-uvloop", PLUGINS, "change"],
        [
            [
                "start-up ms (median)",
                f"{results['startup']['ours-uvloop']['median_ms']:.0f}",
                f"{results['startup'][PLUGINS]['median_ms']:.0f}",
                f"{p['startup_delta_ms']:+.0f} ms",
            ],
            [
                "closed-loop server CPU-µs/msg, each run (run order: A B, then B A per repeat)",
                ", ".join(f"{v:.1f}" for v in p["cpu_us_per_msg"]["ours-uvloop"]),
                ", ".join(f"{v:.1f}" for v in p["cpu_us_per_msg"][PLUGINS]),
                "",
            ],
            [
                "closed-loop server CPU-µs/msg, mean",
                num(p["cpu_mean"]["ours-uvloop"], ".1f"),
                num(p["cpu_mean"][PLUGINS], ".1f"),
                num(p["cpu_delta_pct"], "+.1f", " %"),
            ],
            [
                "closed-loop msgs/s, each run",
                ", ".join(f"{v:,.0f}" for v in p["msgs_per_s"]["ours-uvloop"]),
                ", ".join(f"{v:,.0f}" for v in p["msgs_per_s"][PLUGINS]),
                "",
            ],
        ],
    )
    imported = p["dummy_modules_imported_by_serve"]
    note = (
        f"dummy plugin modules imported by `serve`: {', '.join(imported) if imported else 'none'}"
    )
    met = {True: "yes", False: "**no**", None: "?"}
    targets = md_table(
        ["target (issue 2)", "measured (this run)", "met"],
        [[t["target"], t["measured"], met[t["met"]]] for t in results["summary"]["targets"]],
        left=2,
    )
    heard = [
        f"- {name}: {srv['listening']}"
        for name, srv in results["servers"].items()
        if srv.get("listening")
    ]
    return "\n".join([*load, "", *idle, "", *plug, "", note, "", *targets, "", *heard])


# ---------------------------------------------------------------------------------------------
# Running


def run_scenario(
    srv: Server, args: argparse.Namespace, scenario: str, inflight: int, deflate: bool
) -> dict[str, Any]:
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
    errs = f" {r['errors']} errors {r['error_samples'][:1]}" if r["errors"] else ""
    cpu = num(r["server_cpu_us_per_msg"], ".1f")
    print(
        f"{label} {srv.name}: {r['msgs_per_s']:,.0f} msg/s, {cpu} CPU-µs/msg{errs}", file=sys.stderr
    )
    return {"scenario": label, "server": srv.name, **r}


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
    parser.add_argument(
        "--plugin-reps",
        type=int,
        default=3,
        help="closed-loop runs each of ours-uvloop with/without the dummies (alternating)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short windows for developing: 3 s (+1 s warm-up), 1000 idle conns, 3 start-ups",
    )
    parser.add_argument(
        "--plugins",
        default=STANDARD,
        help="comma-separated plugins ours enable (BACKCHANNEL_PLUGINS__ENABLED); "
        "'' = the config's default list",
    )
    parser.add_argument(
        "--report", type=Path, metavar="JSON", help="only print the tables of a saved result"
    )
    parser.add_argument(
        "--scenarios",
        default="echo",
        help="comma-separated phases: echo (issue 2's, the default), broadcast, resume, "
        "outbox (issue 3's), or all",
    )
    parser.add_argument("--broadcast-members", type=int, default=1000)
    parser.add_argument("--broadcast-messages", type=int, default=200)
    parser.add_argument("--broadcast-rate", type=float, default=10.0, help="messages/s")
    parser.add_argument(
        "--broadcast-reps", type=int, default=3, help="peer/ours pairs, alternating order"
    )
    parser.add_argument("--resume-frames", type=int, default=1000)
    parser.add_argument("--resume-reps", type=int, default=5)
    parser.add_argument("--outbox-sessions", type=int, default=10_000, help="over sockets")
    parser.add_argument("--scaleout-subscribers", type=int, default=1000)
    parser.add_argument(
        "--scaleout-messages", type=int, default=200, help="latency phase (--quick: 50)"
    )
    parser.add_argument("--scaleout-rate", type=float, default=20.0, help="messages/s")
    parser.add_argument(
        "--scaleout-tput", type=int, default=500, help="throughput phase messages (--quick: 100)"
    )
    parser.add_argument(
        "--scaleout-window", type=int, default=10, help="unanswered publishes at most"
    )
    parser.add_argument(
        "--scaleout-reps", type=int, default=2, help="peer/ours pairs, alternating (--quick: 1)"
    )
    parser.add_argument(
        "--scaleout-redis",
        default="",
        help="a Redis URL to share (default: a fresh private redis-server per system and run)",
    )
    parser.add_argument(
        "--scaleout-systems",
        default="socketio,wsredis,ours",
        help="which of socketio, wsredis, ours to run",
    )
    parser.add_argument(
        "--scaleout-stores",
        default="redis",
        help="which of redis (one private redis-server), cluster (a private Redis Cluster, "
        "3 masters + 3 replicas; ours only) each system runs on",
    )
    parser.add_argument(
        "--scaleout-rooms",
        type=int,
        default=1,
        help="rooms the subscribers are spread over (publishes round-robin over them)",
    )
    parser.add_argument(
        "--peer-server",
        default="aiohttp",
        choices=["uvicorn", "aiohttp"],
        help="how the python-socketio peer is served (aiohttp: its cheaper mode here)",
    )
    parser.add_argument(
        "--peer-ws",
        default="websockets-sansio",
        choices=["websockets", "websockets-sansio", "wsproto"],
        help="uvicorn's WebSocket implementation for the python-socketio peer",
    )
    args = parser.parse_args()
    if args.report:  # the summary is derived from the raw figures: recompute it
        saved = json.loads(args.report.read_text())
        print(report(saved))
        return
    known = {"echo", *sessions_suite.SCENARIOS}
    wanted = known if args.scenarios == "all" else set(args.scenarios.split(","))
    if wanted - known - {"scaleout"}:
        parser.error(f"unknown scenarios: {', '.join(sorted(wanted - known - {'scaleout'}))}")
    if "scaleout" in wanted:
        try:
            import socketio  # type: ignore[import-untyped]  # noqa: F401
        except ImportError:
            parser.error("scaleout needs the bench group: uv run --group bench python ...")
    args.scenarios = sorted(wanted)
    if args.quick:
        args.duration, args.warmup, args.idle_conns, args.startup_runs = 3.0, 1.0, 1000, 3
    # inherited by the servers we spawn
    raise_nofile(max(args.idle_conns, args.broadcast_members, args.scaleout_subscribers) + 1024)
    RESULTS.mkdir(exist_ok=True)
    began = time.monotonic()

    echo = "echo" in wanted
    tmp = tempfile.TemporaryDirectory(prefix="backchannel-dummies-")
    dummy_dir = Path(tmp.name)
    dummies.make_dummies(dummy_dir, N_DUMMIES)
    # `backchannel plugins` (same install as ours) lists them, off
    if echo and " serve" in args.ours:
        cli = shlex.split(args.ours.split(" serve", 1)[0].format(python=sys.executable))
        dummies.verify(dummy_dir, N_DUMMIES, [*cli, "plugins"])
        print(f"{N_DUMMIES} dummy plugins in {dummy_dir}: listed, enabled false", file=sys.stderr)

    servers = make_servers(args.ours, dummy_dir, args.plugins) if echo else {}
    results: dict[str, Any] = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "servers": {
            s.name: {"command": s.template, "env": s.env, "loop": s.loop, "peer": s.peer}
            for s in servers.values()
        },
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "host": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "websockets": version("websockets"),
            "uvloop": version("uvloop"),
            "git": subprocess.run(
                ["git", "describe", "--always", "--dirty"],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip(),
            # Where ours runs from: REPO unless the command names another project. The git
            # fields describe REPO's tree (uncommitted changes: it is shared while we measure).
            "ours_from": ours_from(args.ours),
            "dirty": subprocess.run(
                ["git", "status", "--porcelain", "--", "core", "plugins", "schemas"],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=False,
            ).stdout.split("\n")[:-1],
            "loadavg_before": os.getloadavg(),
        },
        "startup": {},
        "idle": {},
        "load": [],
    }
    try:
        if echo:
            run_echo(servers, args, results)

        def make(name: str, template: str, loop: str, env: dict[str, str]) -> Server:
            return Server(name, template, loop, None, env, idle=False)

        if wanted & set(sessions_suite.SCENARIOS):
            project = ours_from(args.ours)
            sessions_suite.run_phases(args, results, make, args.ours, args.plugins, project)
        if "scaleout" in wanted:
            scaleout.run_phase(args, results, make)
    finally:
        for srv in servers.values():
            srv.stop()
    for srv in servers.values():
        results["servers"][srv.name]["listening"] = srv.listening()
    results["dummy_modules_imported_by_serve"] = dummies.imported_markers(dummy_dir)
    tmp.cleanup()
    results["host"]["loadavg_after"] = os.getloadavg()
    results["wall_s"] = time.monotonic() - began

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(results, indent=2) + "\n"
    # Issue 3's or 5's phases alone do not replace the echo run's latest.json (the README
    # cites it).
    latest = "latest.json" if echo else "latest-sessions.json"
    if wanted == {"scaleout"}:
        latest = "latest-scaleout.json"
    for path in (RESULTS / f"{stamp}.json", RESULTS / latest):
        path.write_text(text)
    print(report(results))
    print(f"\nwall time {results['wall_s']:.0f} s; results: {RESULTS / f'{stamp}.json'}")


def report(results: dict[str, Any]) -> str:
    """The tables of whichever phases ``results`` holds (summary recomputed from raw figures)."""
    parts = []
    if results.get("load"):
        results["summary"] = summarize(results)
        parts.append(fmt_tables(results))
    for more in (sessions_suite.fmt_tables(results), scaleout.fmt_tables(results)):
        if more:
            parts.append(more)
    return "\n\n".join(parts)


def run_echo(servers: dict[str, Server], args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Issue 2's phases: start-up, idle memory, load scenarios, plugin-overhead repeats."""
    # Start-up: round-robin, so that a slow spell on the machine hits every server alike.
    runs: dict[str, list[float]] = {name: [] for name in servers}
    for _ in range(args.startup_runs):
        for srv in servers.values():
            runs[srv.name].append(srv.start() * 1000)
            srv.stop()
    for name, r in runs.items():
        results["startup"][name] = {"median_ms": statistics.median(r), "runs_ms": r}
        print(f"start-up {name}: {statistics.median(r):.0f} ms {r}", file=sys.stderr)

    for srv in servers.values():
        srv.start()
    for srv in servers.values():
        results["servers"][srv.name]["loop_observed"] = srv.observed_loop()
    for srv in servers.values():
        if srv.idle:
            results["idle"][srv.name] = asyncio.run(
                measure_idle(srv.url(args.path), srv.pid, args.idle_conns)
            )
            i = results["idle"][srv.name]
            print(
                f"idle {srv.name}: {i['rss_per_conn_kib']:.1f} KiB/conn "
                f"({i['connections']} conns, {i['failures']} failed)",
                file=sys.stderr,
            )

    for scenario, inflight, deflate, names in SCENARIOS:
        for name in names:
            results["load"].append(run_scenario(servers[name], args, scenario, inflight, deflate))
    # More closed-loop runs for the plugin comparison. The main pass ran A then B;
    # these run B A, B A, ... so that the order (and any drift) is balanced.
    for _ in range(args.plugin_reps - 1):
        for name in (PLUGINS, "ours-uvloop"):
            row = run_scenario(servers[name], args, "closed-loop", 1, False)
            results["load"].append(row | {"repeat": True})


if __name__ == "__main__":
    main()
