"""Scale model: per-unit costs measured on N instances and one Redis, and what they imply.

The machine this runs on shares one or two cores between the load generator, the servers and
Redis, so absolute throughput says little about a deployment. What carries over is the cost of
one unit of work, each measured here:

* bytes of server RSS per connection (each instance's VmRSS before the clients connect and after
  they all sent ``init`` and ``join``, idle), and of Redis ``used_memory`` per connection;
* server and Redis CPU per connection and second while idle (heartbeats, leases, presence);
* server CPU-µs per delivery (the instances' utime + stime from /proc over the publish window,
  summed, divided by the deliveries), and the same with the idle cost of the window taken out;
* Redis CPU-µs per message and per delivery (``INFO cpu`` used_cpu_sys + used_cpu_user) and
  Redis commands per message (``INFO commandstats``, our own ``INFO`` calls left out);
* delivery p99 latency (every message's text carries its ``time.monotonic()`` at sending, one
  clock for all processes of the machine) and lost deliveries (must be 0).

Topology: ``--instances`` ``backchannel serve`` processes (the venv's console script, no ``uv
run`` wrapper, on uvloop, plugins ``init, text, rooms, redis``) on one private ``redis-server``
(or ``--redis-url``). ``--connections`` clients in ``--procs`` generator processes; client
``g`` is member ``g % room_size`` of room ``g // room_size`` and connects to instance
``g % instances``, so every room spans every instance. Each client sends ``init {}``, then
``join {room}`` (either sent again 0.5 s after an ``overloaded`` answer, as clients do). Then:
a window with no clients (the instances' own probes and leases), an idle window with all of
them, a warm-up, and the measured window, in which every generator process publishes ``rate /
procs`` messages per second, each from a random local member into its room (``text {text,
room}``: ours lets members publish). Each message must reach each member of its room once (the
publisher included).

    uv run --group bench python benchmarks/scale_model.py [--connections 20000]
        [--instances 3] [--room-size 100] [--rate 100] [--duration 40] [--redis-url URL]
        [--json OUT]

Prints the JSON result, then the model: for ``--target-connections`` clients and
``--target-rate`` messages per second into rooms of ``--target-room-size``, the instances (one
process, so at most one core each, loaded to ``--cpu-target``), their memory, and the Redis
shards (Redis runs commands on one core: ``--redis-cpu-target`` of it per shard).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
import uuid
from array import array
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson
from idle import raise_nofile, rss_kib
from loadgen import SUBPROTOCOL, cpu_us, join_all, percentile, process_tree, run_fast
from run import Server
from scaleout import (
    OURS_PLUGINS,
    REDIS_SERVER,
    _wait_ready,
    redis_calls,
    redis_cpu_us,
    redis_info,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

BACKCHANNEL = Path(sys.executable).with_name("backchannel")  # no `uv run` in the process tree
OURS = f"{BACKCHANNEL} serve --host 127.0.0.1 --port {{port}}"
JOIN_BATCH = 100  # clients connecting and joining at once, per generator process
READY_TIMEOUT = 180.0  # seconds for one batch to be in its rooms
RETRY_S = 0.5  # an `overloaded` init or join is sent again after this, as clients do


@dataclass
class Load:
    """What to run: the topology, the load, the windows."""

    connections: int = 20000
    instances: int = 3
    room_size: int = 100
    rate: float = 100.0  # messages/s, all generator processes together
    # Both windows span one session lease period (the redis plugin renews every session's
    # lease every 40 s: 5 commands per session) and two heartbeat intervals (20 s): a shorter
    # window would catch the renewal in one and miss it in the other.
    duration: float = 40.0  # seconds of the measured publish window
    idle: float = 40.0  # seconds of the idle window
    empty: float = 10.0  # seconds of the window before any client connects (instances' base)
    warmup: float = 3.0  # seconds of publishing before the measured window
    procs: int = 4  # generator processes
    drain: float = 30.0  # seconds to wait for the last deliveries of a phase
    settle: float = 3.0  # seconds after the last join before the idle RSS is read
    redis_url: str = ""  # empty: a private redis-server on a free port


# ---------------------------------------------------------------------------------------------
# Generator processes


@dataclass
class Tally:
    """What one generator process saw."""

    proc: int
    rooms: dict[int, list[ClientConnection]] = field(default_factory=dict)  # local members
    counts: dict[str, int] = field(default_factory=dict)  # deliveries per message key
    latency_ms: dict[str, array[float]] = field(default_factory=dict)  # per phase
    delivered: dict[str, int] = field(default_factory=dict)  # per phase
    published: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # (key, room)
    answered: int = 0
    retries: int = 0  # init or join answered `overloaded` and sent again
    other: int = 0  # presence events and anything else that is not a delivery or an answer
    errors: list[str] = field(default_factory=list)
    n_errors: int = 0
    closes: list[str] = field(default_factory=list)

    def deliver(self, text: str, now: float) -> None:
        key, sent = text.split(" ", 1)
        self.counts[key] = self.counts.get(key, 0) + 1
        phase = key[0]
        self.delivered[phase] = self.delivered.get(phase, 0) + 1
        self.latency_ms.setdefault(phase, array("d")).append((now - float(sent)) * 1000)

    def error(self, what: str) -> None:
        self.n_errors += 1
        if len(self.errors) < 5:
            self.errors.append(what[:200])


async def _client(url: str, room: int, name: str, t: Tally, joined: Any) -> None:
    """One member: init, join its room, then count what arrives."""
    ws = await connect(
        f"{url}/ws",
        subprotocols=[SUBPROTOCOL],
        compression=None,
        ping_interval=None,  # the server's heartbeat pings are answered by websockets
        open_timeout=120,
        max_size=None,
    )
    init = b'{"id":"i","type":"init","content":{}}'
    join = orjson.dumps({"id": "j", "type": "join", "content": {"room": f"r{room}"}})
    retries: set[asyncio.Task[None]] = set()

    async def again(frame: bytes) -> None:
        await asyncio.sleep(RETRY_S)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(frame, text=True)

    try:
        await ws.send(init, text=True)  # join once the session exists
        while True:
            raw = await ws.recv(decode=False)
            now = time.monotonic()
            msg = orjson.loads(raw)
            reply_to = msg.get("replyTo")
            error = msg.get("type") == "error"
            if reply_to is None:
                if msg.get("type") == "text":
                    t.deliver(msg["content"]["text"], now)
                else:
                    t.other += 1
                    if error:
                        t.error(str(msg["content"]))
            elif error and reply_to in ("i", "j") and msg["content"].get("code") == "overloaded":
                t.retries += 1
                task = asyncio.create_task(again(init if reply_to == "i" else join))
                retries.add(task)
                task.add_done_callback(retries.discard)
            elif error:
                t.error(f"{reply_to}: {msg['content']}")
            elif reply_to == "i":
                await ws.send(join, text=True)
            elif reply_to == "j":
                t.rooms.setdefault(room, []).append(ws)
                joined(name)
            else:
                t.answered += 1
    except ConnectionClosed:
        pass
    finally:
        if ws.close_code is not None and ws.close_code != 1000:
            t.closes.append(f"{ws.close_code} {ws.close_reason}")


async def _publish(t: Tally, phase: str, rate: float, duration: float) -> int:
    """``rate`` messages/s for ``duration`` s, each from a random local member of a random
    room with local members; return how many were sent."""
    rng = random.Random(f"{t.proc}-{phase}")
    rooms = sorted(t.rooms)
    sent = t.published.setdefault(phase, [])
    began = time.monotonic()
    count = int(rate * duration)
    for k in range(count):
        delay = began + k / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        room = rng.choice(rooms)
        ws = rng.choice(t.rooms[room])
        key = f"{phase}{t.proc}.{k}"
        text = f"{key} {time.monotonic():.6f}"
        request = {"id": f"p{key}", "type": "text", "content": {"text": text, "room": f"r{room}"}}
        with contextlib.suppress(ConnectionClosed):
            await ws.send(orjson.dumps(request), text=True)
            sent.append((key, room))
    return len(sent)


async def _generator_main(
    proc: int, clients: list[tuple[str, str, int]], pipe: Connection, batch: int
) -> None:
    """Connect and join ``clients`` (name, url, room), then follow the parent's commands."""
    t = Tally(proc)
    loop = asyncio.get_running_loop()
    where = {name: (url, room) for name, url, room in clients}
    began = time.monotonic()
    tasks, failures = await join_all(
        list(where),
        lambda name, joined: _client(*where[name], name, t, joined),
        batch,
        READY_TIMEOUT,
    )
    pipe.send(("ready", len(clients) - len(failures), failures[:5], time.monotonic() - began))
    while True:
        cmd = await loop.run_in_executor(None, pipe.recv)
        if cmd[0] == "publish":
            pipe.send(("published", await _publish(t, cmd[1], cmd[2], cmd[3])))
        elif cmd[0] == "count":
            pipe.send(dict(t.delivered))
        elif cmd[0] == "report":
            pipe.send(
                {
                    "counts": t.counts,
                    "published": t.published,
                    "latency_ms": {k: v.tobytes() for k, v in t.latency_ms.items()},
                    "answered": t.answered,
                    "retries": t.retries,
                    "other": t.other,
                    "errors": t.errors,
                    "n_errors": t.n_errors,
                    "closes": t.closes[:5],
                    "n_closes": len(t.closes),
                    "ended": sum(task.done() for task in tasks),
                }
            )
            return


def _generator(proc: int, clients: list[tuple[str, str, int]], pipe: Connection) -> None:
    raise_nofile(len(clients) + 256)
    run_fast(_generator_main(proc, clients, pipe, JOIN_BATCH))


# ---------------------------------------------------------------------------------------------
# Meters


def redis_memory(url: str) -> int:
    """Redis ``used_memory`` in bytes."""
    return int(redis_info(url, "memory")["used_memory"][""])


def meter(server_pids: list[int], gen_pids: list[int], url: str) -> dict[str, Any]:
    """One reading of every counter the model uses."""
    return {
        "t": time.monotonic(),
        "servers": [cpu_us(process_tree(pid)) for pid in server_pids],
        "generators": cpu_us(gen_pids),
        "redis": redis_cpu_us(url),
        "calls": redis_calls(url),
    }


def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """CPU (µs) and Redis calls between two readings."""
    calls = {k: v - a["calls"].get(k, 0) for k, v in b["calls"].items()}
    return {
        "wall_s": b["t"] - a["t"],
        "server_cpu_us_each": [y - x for x, y in zip(a["servers"], b["servers"], strict=True)],
        "server_cpu_us": sum(b["servers"]) - sum(a["servers"]),
        "generators_cpu_us": b["generators"] - a["generators"],
        "redis_cpu_us": b["redis"] - a["redis"],
        "redis_calls": {k: v for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v > 0},
        "redis_commands": sum(v for v in calls.values() if v > 0),
    }


# ---------------------------------------------------------------------------------------------
# One run


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _ask(pipes: list[Connection], cmd: tuple[Any, ...]) -> list[Any]:
    for pipe in pipes:
        pipe.send(cmd)
    return [pipe.recv() for pipe in pipes]


def measure(load: Load) -> dict[str, Any]:
    """Start the instances (and a private Redis), connect, idle, publish; the figures."""
    raise_nofile(load.connections // max(1, load.instances) + 4096)
    redis_srv = None
    url = load.redis_url
    servers: list[Server] = []
    workers: list[mp.process.BaseProcess] = []
    try:
        if not url:
            redis_srv = Server("scale-redis", REDIS_SERVER, "asyncio", None, {}, idle=False)
            redis_srv.start()
            url = f"redis://127.0.0.1:{redis_srv.port}/0"
        tag = uuid.uuid4().hex[:8]
        env = {
            "BACKCHANNEL_SERVER__UVLOOP": "true",
            "BACKCHANNEL_SERVER__MAX_CONNECTIONS": str(load.connections + 1000),
            "BACKCHANNEL_PLUGINS__ENABLED": json.dumps(OURS_PLUGINS),
            "BACKCHANNEL_PLUGINS__REDIS__URL": url,
            "BACKCHANNEL_PLUGINS__REDIS__KEY_PREFIX": f"bench-scale-{tag}",
        }
        for k in range(load.instances):
            srv = Server(f"scale-{k + 1}", OURS, "uvloop", None, env, idle=False)
            servers.append(srv)
            srv.start()
            _wait_ready(srv.port)
        loops = [srv.observed_loop() for srv in servers]
        pids = [srv.pid for srv in servers]
        urls = [f"ws://127.0.0.1:{srv.port}" for srv in servers]
        time.sleep(1.0)
        rss_before = [rss_kib(pid) for pid in pids]
        redis_mem_before = redis_memory(url)
        _log(f"empty window {load.empty:g} s (no clients)")
        m_empty0 = meter(pids, [], url)
        time.sleep(load.empty)
        empty = delta(m_empty0, meter(pids, [], url))

        # clients: g is member g % room_size of room g // room_size, on instance g % instances
        n_rooms = load.connections // load.room_size
        total = n_rooms * load.room_size
        per_instance = [0] * load.instances
        plan: list[list[tuple[str, str, int]]] = [[] for _ in range(load.procs)]
        for g in range(total):
            inst = g % load.instances
            per_instance[inst] += 1
            plan[g % load.procs].append((f"c{g}", urls[inst], g // load.room_size))
        ctx = mp.get_context("fork")
        pipes: list[Connection] = []
        _log(f"connecting {total:,} clients ({n_rooms:,} rooms of {load.room_size})")
        began = time.monotonic()
        for p in range(load.procs):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_generator, args=(p, plan[p], theirs), daemon=True)
            proc.start()
            pipes.append(ours)
            workers.append(proc)
        ready = [pipe.recv() for pipe in pipes]
        setup_s = time.monotonic() - began
        joined = sum(r[1] for r in ready)
        failures = [f for r in ready for f in r[2]]
        _log(f"{joined:,} of {total:,} joined in {setup_s:.1f} s; failures {failures[:3]}")
        gen_pids = [w.pid for w in workers if w.pid is not None]
        time.sleep(load.settle)
        rss_after = [rss_kib(pid) for pid in pids]
        redis_mem_after = redis_memory(url)

        # idle window
        _log(f"idle window {load.idle:g} s")
        m_idle0 = meter(pids, gen_pids, url)
        time.sleep(load.idle)
        m_idle1 = meter(pids, gen_pids, url)
        idle = delta(m_idle0, m_idle1)

        per_proc = load.rate / load.procs

        def phase(name: str, seconds: float) -> tuple[dict[str, Any], int, float]:
            """Publish for ``seconds``, wait for every delivery (bounded); the deltas."""
            m0 = meter(pids, gen_pids, url)
            sent = sum(r[1] for r in _ask(pipes, ("publish", name, per_proc, seconds)))
            expected = sent * load.room_size
            deadline = time.monotonic() + load.drain
            got = 0
            while time.monotonic() < deadline:
                got = sum(c.get(name, 0) for c in _ask(pipes, ("count",)))
                if got >= expected:
                    break
                time.sleep(0.05)
            drained = time.monotonic()
            m1 = meter(pids, gen_pids, url)
            return delta(m0, m1), sent, drained - m0["t"]

        _log(f"warm-up {load.warmup:g} s at {load.rate:g} msg/s")
        phase("w", load.warmup)
        _log(f"measured window {load.duration:g} s at {load.rate:g} msg/s")
        window, _, span = phase("m", load.duration)
        rss_loaded = [rss_kib(pid) for pid in pids]
        redis_mem_loaded = redis_memory(url)
        reports = _ask(pipes, ("report",))
    finally:
        for w in workers:
            w.join(10 if sys.exc_info()[0] is None else 0)
            if w.is_alive():
                w.kill()
        for srv in servers:
            srv.stop()
        if redis_srv is not None:
            redis_srv.stop()

    # deliveries: each published message must reach each member of its room once
    counts: dict[str, int] = {}
    for r in reports:
        for key, n in r["counts"].items():
            counts[key] = counts.get(key, 0) + n
    published = {ph: [kr for r in reports for kr in r["published"].get(ph, [])] for ph in "wm"}
    lost = {
        ph: sum(max(0, load.room_size - counts.get(key, 0)) for key, _ in keys)
        for ph, keys in published.items()
    }
    extra = {
        ph: sum(max(0, counts.get(key, 0) - load.room_size) for key, _ in keys)
        for ph, keys in published.items()
    }
    latencies = array("d")
    for r in reports:
        latencies.frombytes(r["latency_ms"].get("m", b""))
    lat = sorted(latencies)
    deliveries = len(lat)
    messages = len(published["m"])

    def per(value: float, unit: float) -> float | None:
        return value / unit if unit else None

    idle_conn_s = joined * idle["wall_s"]
    # the window's share of the idle cost (heartbeats, leases, presence), taken out
    server_idle_rate = idle["server_cpu_us"] / idle["wall_s"]
    redis_idle_rate = idle["redis_cpu_us"] / idle["wall_s"]
    # what connections add to it (the instances' own probes and timers left out)
    server_empty_rate = empty["server_cpu_us"] / empty["wall_s"]
    redis_empty_rate = empty["redis_cpu_us"] / empty["wall_s"]
    empty_cmds_rate = empty["redis_commands"] / empty["wall_s"]
    idle_cmds_rate = idle["redis_commands"] / idle["wall_s"]
    server_net = window["server_cpu_us"] - server_idle_rate * window["wall_s"]
    redis_net = window["redis_cpu_us"] - redis_idle_rate * window["wall_s"]
    calls_per_msg = {k: v / messages for k, v in window["redis_calls"].items()} if messages else {}
    rss_per_conn = [
        (a - b) * 1024 / n if n else None
        for a, b, n in zip(rss_after, rss_before, per_instance, strict=True)
    ]
    return {
        "load": asdict(load) | {"redis_url": url if load.redis_url else "private"},
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": {"cpus": os.cpu_count(), "loadavg_end": os.getloadavg()},
        "loops": loops,
        "rooms": n_rooms,
        "connections_per_instance": per_instance,
        "joined": joined,
        "setup_failures": failures[:5],
        "setup_s": setup_s,
        "setup_retries": sum(r["retries"] for r in reports),
        "memory": {
            "rss_before_kib": rss_before,
            "rss_idle_kib": rss_after,
            "rss_after_load_kib": rss_loaded,
            "rss_bytes_per_connection_each": rss_per_conn,
            "rss_bytes_per_connection": per(
                1024 * (sum(rss_after) - sum(rss_before)), sum(per_instance)
            ),
            "rss_bytes_per_connection_after_load": per(
                1024 * (sum(rss_loaded) - sum(rss_before)), sum(per_instance)
            ),
            "redis_used_memory_before": redis_mem_before,
            "redis_used_memory_idle": redis_mem_after,
            "redis_used_memory_after_load": redis_mem_loaded,
            "redis_bytes_per_connection": per(redis_mem_after - redis_mem_before, joined),
        },
        "empty": empty
        | {
            "server_cpu_us_per_instance_s": server_empty_rate / load.instances,
            "redis_cpu_us_per_instance_s": redis_empty_rate / load.instances,
            "redis_commands_per_instance_s": empty_cmds_rate / load.instances,
        },
        "idle": idle
        | {
            "server_cpu_us_per_connection_s": per(
                (server_idle_rate - server_empty_rate) * idle["wall_s"], idle_conn_s
            ),
            "redis_cpu_us_per_connection_s": per(
                (redis_idle_rate - redis_empty_rate) * idle["wall_s"], idle_conn_s
            ),
            "server_cpu_pct": 100 * server_idle_rate / 1e6,
            "redis_cpu_pct": 100 * redis_idle_rate / 1e6,
            "redis_commands_per_connection_s": per(
                idle["redis_commands"] - empty_cmds_rate * idle["wall_s"], idle_conn_s
            ),
        },
        "window": window
        | {
            "messages": messages,
            "messages_per_s": messages / load.duration,
            "deliveries": deliveries,
            "expected_deliveries": messages * load.room_size,
            "span_s": span,
            "lost": lost,
            "extra": extra,
            "answered": sum(r["answered"] for r in reports),
            "published_all": sum(len(v) for v in published.values()),
            "errors": sum(r["n_errors"] for r in reports),
            "error_samples": [e for r in reports for e in r["errors"]][:5],
            "closes": sum(r["n_closes"] for r in reports),
            "close_samples": [c for r in reports for c in r["closes"]][:5],
            "ended_connections": sum(r["ended"] for r in reports),
            "other_frames": sum(r["other"] for r in reports),
            "delivery_p50_ms": percentile(lat, 0.50),
            "delivery_p99_ms": percentile(lat, 0.99),
            "delivery_max_ms": lat[-1] if lat else None,
            "server_cpu_pct": 100 * window["server_cpu_us"] / (window["wall_s"] * 1e6),
            "redis_cpu_pct": 100 * window["redis_cpu_us"] / (window["wall_s"] * 1e6),
            "generators_cpu_pct": 100 * window["generators_cpu_us"] / (window["wall_s"] * 1e6),
            "server_cpu_us_per_delivery": per(window["server_cpu_us"], deliveries),
            "server_cpu_us_per_delivery_net": per(server_net, deliveries),
            "redis_cpu_us_per_message": per(window["redis_cpu_us"], messages),
            "redis_cpu_us_per_message_net": per(redis_net, messages),
            "redis_cpu_us_per_delivery": per(window["redis_cpu_us"], deliveries),
            "redis_commands_per_message": per(window["redis_commands"], messages),
            "redis_commands_per_message_net": per(
                window["redis_commands"] - idle_cmds_rate * window["wall_s"], messages
            ),
            "redis_calls_per_message": calls_per_msg,
            "generators_cpu_us_per_delivery": per(window["generators_cpu_us"], deliveries),
        },
    }


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class Target:
    """The deployment to size, and how hard each process may be loaded."""

    connections: int = 1_000_000
    rate: float = 100_000.0  # messages/s
    room_size: int = 100
    cores_per_instance: float = 1.0  # one instance is one process: one event loop, <= 1 core
    cpu_target: float = 0.7  # of each instance's cores
    redis_cpu_target: float = 0.7  # of one core per Redis shard (commands run on one thread)


def model(result: dict[str, Any], target: Target) -> dict[str, Any]:
    """Instances, memory and Redis shards for ``target`` from the measured per-unit costs."""
    mem, idle, win = result["memory"], result["idle"], result["window"]
    empty = result["empty"]
    deliveries = target.rate * target.room_size
    srv_idle = idle["server_cpu_us_per_connection_s"] * target.connections
    srv_load = win["server_cpu_us_per_delivery_net"] * deliveries
    budget = target.cores_per_instance * target.cpu_target * 1e6  # µs/s one instance may use
    # each instance also spends its base (probes, leases) whatever its load
    instances = math.ceil((srv_idle + srv_load) / (budget - empty["server_cpu_us_per_instance_s"]))
    srv_base = empty["server_cpu_us_per_instance_s"] * instances
    server_cores = (srv_idle + srv_load + srv_base) / 1e6
    conns_per_instance = target.connections / instances
    base_kib = statistics.mean(mem["rss_before_kib"])
    per_conn = mem["rss_bytes_per_connection"]
    per_conn_loaded = mem["rss_bytes_per_connection_after_load"]
    redis_idle = idle["redis_cpu_us_per_connection_s"] * target.connections
    redis_load = win["redis_cpu_us_per_message_net"] * target.rate
    redis_base = empty["redis_cpu_us_per_instance_s"] * instances  # probes, leases, heartbeats
    redis_cores = (redis_idle + redis_load + redis_base) / 1e6
    shards = math.ceil(redis_cores / target.redis_cpu_target)
    commands = (
        win["redis_commands_per_message_net"] * target.rate
        + idle["redis_commands_per_connection_s"] * target.connections
        + empty["redis_commands_per_instance_s"] * instances
    )
    redis_mem = mem["redis_bytes_per_connection"] * target.connections
    return {
        "target": asdict(target),
        "deliveries_per_s": deliveries,
        "server_cpu_cores": server_cores,
        "server_cpu_cores_idle_part": srv_idle / 1e6,
        "server_cpu_cores_delivery_part": srv_load / 1e6,
        "server_cpu_cores_instance_base_part": srv_base / 1e6,
        "instances": instances,
        "connections_per_instance": conns_per_instance,
        "deliveries_per_s_per_instance": deliveries / instances,
        "rss_per_instance_mib": (base_kib * 1024 + conns_per_instance * per_conn) / 2**20,
        "rss_per_instance_after_load_mib": (base_kib * 1024 + conns_per_instance * per_conn_loaded)
        / 2**20,
        "rss_total_gib": instances * (base_kib * 1024 + conns_per_instance * per_conn) / 2**30,
        "redis_cpu_cores": redis_cores,
        "redis_cpu_cores_idle_part": redis_idle / 1e6,
        "redis_cpu_cores_message_part": redis_load / 1e6,
        "redis_cpu_cores_instance_base_part": redis_base / 1e6,
        "redis_shards": shards,
        "redis_commands_per_s": commands,
        "redis_commands_per_s_per_shard": commands / shards,
        "redis_messages_per_s_per_shard": target.rate / shards,
        "redis_cpu_pct_per_shard": 100 * redis_cores / shards,
        "redis_used_memory_gib": redis_mem / 2**30,
        "redis_used_memory_per_shard_gib": redis_mem / shards / 2**30,
    }


def fmt_model(result: dict[str, Any], m: dict[str, Any]) -> str:
    """The derivation as Markdown: measured per-unit costs, then what they imply."""
    mem, idle, win, t = result["memory"], result["idle"], result["window"], m["target"]
    empty, load = result["empty"], result["load"]
    each = ", ".join(f"{n:,}" for n in result["connections_per_instance"])
    measured = [
        (
            "server RSS per idle connection (init + join)",
            f"{mem['rss_bytes_per_connection'] / 1024:.1f} KiB",
        ),
        (
            "server RSS per connection after the load",
            f"{mem['rss_bytes_per_connection_after_load'] / 1024:.1f} KiB",
        ),
        ("Redis used_memory per connection", f"{mem['redis_bytes_per_connection'] / 1024:.1f} KiB"),
        (
            "server CPU per instance-second, no clients",
            f"{empty['server_cpu_us_per_instance_s']:,.0f} µs",
        ),
        (
            "Redis CPU per instance-second, no clients",
            f"{empty['redis_cpu_us_per_instance_s']:,.0f} µs",
        ),
        (
            "server CPU per connection-second, idle (no-client cost taken out)",
            f"{idle['server_cpu_us_per_connection_s']:.3f} µs",
        ),
        (
            "Redis CPU per connection-second, idle (no-client cost taken out)",
            f"{idle['redis_cpu_us_per_connection_s']:.4f} µs",
        ),
        ("server CPU per delivery (window, all)", f"{win['server_cpu_us_per_delivery']:.2f} µs"),
        (
            "server CPU per delivery (idle cost taken out)",
            f"{win['server_cpu_us_per_delivery_net']:.2f} µs",
        ),
        ("Redis CPU per message (window, all)", f"{win['redis_cpu_us_per_message']:.1f} µs"),
        (
            "Redis CPU per message (idle cost taken out)",
            f"{win['redis_cpu_us_per_message_net']:.1f} µs",
        ),
        ("Redis CPU per delivery (window, all)", f"{win['redis_cpu_us_per_delivery']:.3f} µs"),
        (
            "Redis commands per message (all / idle rate taken out)",
            f"{win['redis_commands_per_message']:.1f} / "
            f"{win['redis_commands_per_message_net']:.1f}",
        ),
        ("delivery p50 / p99", f"{win['delivery_p50_ms']:.1f} / {win['delivery_p99_ms']:.1f} ms"),
        ("lost deliveries (warm-up, window)", f"{win['lost']['w']}, {win['lost']['m']}"),
    ]
    derived = [
        (
            "server CPU",
            f"{m['server_cpu_cores']:,.1f} cores "
            f"({m['server_cpu_cores_delivery_part']:,.1f} deliveries + "
            f"{m['server_cpu_cores_idle_part']:,.1f} idle connections + "
            f"{m['server_cpu_cores_instance_base_part']:,.1f} instances' base)",
        ),
        ("instances", f"**{m['instances']:,}**"),
        ("connections per instance", f"{m['connections_per_instance']:,.0f}"),
        ("deliveries/s per instance", f"{m['deliveries_per_s_per_instance']:,.0f}"),
        (
            "RSS per instance (idle / after load)",
            f"{m['rss_per_instance_mib']:,.0f} / {m['rss_per_instance_after_load_mib']:,.0f} MiB",
        ),
        (
            "Redis CPU",
            f"{m['redis_cpu_cores']:,.2f} cores "
            f"({m['redis_cpu_cores_message_part']:,.2f} messages + "
            f"{m['redis_cpu_cores_idle_part']:,.2f} idle connections + "
            f"{m['redis_cpu_cores_instance_base_part']:,.2f} instances' base)",
        ),
        ("Redis shards", f"**{m['redis_shards']:,}**"),
        (
            "per shard: msg/s, commands/s, CPU",
            f"{m['redis_messages_per_s_per_shard']:,.0f}, "
            f"{m['redis_commands_per_s_per_shard']:,.0f}, {m['redis_cpu_pct_per_shard']:.0f} %",
        ),
        (
            "Redis used_memory (all / per shard)",
            f"{m['redis_used_memory_gib']:,.1f} / {m['redis_used_memory_per_shard_gib']:,.1f} GiB",
        ),
    ]
    lines = [
        f"measured: {result['joined']:,} connections on {load['instances']} instances ({each}), "
        f"rooms of {load['room_size']}, {win['messages_per_s']:,.1f} msg/s for "
        f"{load['duration']:g} s ({win['deliveries']:,} deliveries), {result['date']}",
        "",
        "| per-unit cost (measured) | value |",
        "|---|--:|",
        *(f"| {k} | {v} |" for k, v in measured),
        "",
        f"target: {t['connections']:,} connections, {t['rate']:,.0f} msg/s into rooms of "
        f"{t['room_size']} = {m['deliveries_per_s']:,.0f} deliveries/s; an instance is one "
        f"process ({t['cores_per_instance']:g} core) at {t['cpu_target']:.0%}; a Redis shard "
        f"at {t['redis_cpu_target']:.0%} of one core",
        "",
        "| derived | value |",
        "|---|--:|",
        *(f"| {k} | {v} |" for k, v in derived),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Load()
    parser.add_argument("--connections", type=int, default=d.connections)
    parser.add_argument("--instances", type=int, default=d.instances)
    parser.add_argument("--room-size", type=int, default=d.room_size)
    parser.add_argument("--rate", type=float, default=d.rate, help="messages/s, all together")
    parser.add_argument("--duration", type=float, default=d.duration, help="measured window, s")
    parser.add_argument("--idle", type=float, default=d.idle, help="idle window, s")
    parser.add_argument("--empty", type=float, default=d.empty, help="no-client window, s")
    parser.add_argument("--warmup", type=float, default=d.warmup)
    parser.add_argument("--procs", type=int, default=d.procs, help="generator processes")
    parser.add_argument("--drain", type=float, default=d.drain)
    parser.add_argument("--redis-url", default="", help="default: a private redis-server")
    t = Target()
    parser.add_argument("--target-connections", type=int, default=t.connections)
    parser.add_argument("--target-rate", type=float, default=t.rate)
    parser.add_argument("--target-room-size", type=int, default=t.room_size)
    parser.add_argument("--cores-per-instance", type=float, default=t.cores_per_instance)
    parser.add_argument("--cpu-target", type=float, default=t.cpu_target)
    parser.add_argument("--redis-cpu-target", type=float, default=t.redis_cpu_target)
    parser.add_argument("--json", dest="json_out", help="also write the result to this file")
    parser.add_argument("--report", help="print the model of a saved result instead of running")
    a = parser.parse_args()
    target = Target(
        a.target_connections,
        a.target_rate,
        a.target_room_size,
        a.cores_per_instance,
        a.cpu_target,
        a.redis_cpu_target,
    )
    if a.report:
        result = json.loads(Path(a.report).read_text())
    else:
        load = Load(
            connections=a.connections,
            instances=a.instances,
            room_size=a.room_size,
            rate=a.rate,
            duration=a.duration,
            idle=a.idle,
            empty=a.empty,
            warmup=a.warmup,
            procs=a.procs,
            drain=a.drain,
            redis_url=a.redis_url,
        )
        result = measure(load)
    result["model"] = model(result, target)
    text = json.dumps(result, indent=2)
    if a.json_out:
        Path(a.json_out).write_text(text + "\n")
    print(text)
    print()
    print(fmt_model(result, result["model"]))


if __name__ == "__main__":
    main()
