"""Scale-out: room fan-out across 3 server instances that share one Redis.

The same load generator drives both systems with raw ``websockets`` clients, so the client-side
cost is the same:

* ``ours``: backchannel.v1 at ``<url>/ws``; a subscriber sends ``init {}`` and
  ``join {room}``; the publisher (also a member: ours wants one to publish) sends
  ``text {text, room}``, answered once the instance has published it;
* ``wsredis``: the hand-rolled ``websockets`` + Redis pub/sub fan-out of
  peer_redis_fanout.py, spoken to exactly as ours (it answers the same requests);
* ``socketio``: Engine.IO v4 / Socket.IO v5 over a plain WebSocket,
  ``<url>/socket.io/?EIO=4&transport=websocket``: ``40`` connects the namespace, a subscriber
  emits ``join`` (with an ack), the publisher emits ``pub {room, text}`` (with an ack),
  members get ``42["msg", {room, from, text}]``; every ``2`` (Engine.IO ping) is answered
  ``3``. The peer is peer_socketio.py.

``--subscribers`` connections are split evenly over instances 2 and 3, one receiver process
each (uvloop). The publisher, in this process, is on instance 1. Every message's text is
``"<index> <time.monotonic() at sending>"``: CLOCK_MONOTONIC is one clock for every process of
the machine, so a subscriber computes ``arrival - sent`` itself. Phases, one after the other:

1. warm-up: ``--warmup`` messages at ``--rate``, waited for, not measured;
2. latency: ``--messages`` at ``--rate``: per delivery p50/p99, and per message the time until
   its last subscriber had it, p50/p99;
3. throughput: ``--tput-messages`` sent as fast as the instance answers, at most ``--window``
   unanswered; delivered messages/s at the subscribers = deliveries / (last delivery - first
   send); accepted/s at the publisher = messages / (last answer - first send).

A fourth figure set, ``with_joins``, spans the room's filling too: from before the first
subscriber connects to the end of the latency phase (joins, warm-up and latency messages).

Per phase: the CPU (utime + stime, /proc) of the three server process trees, each and summed,
per delivered message; the receivers' CPU; a private ``redis-server``'s CPU when its pid is
given (run.py: from ``INFO cpu``, and for a Redis Cluster summed over its masters, each master
and the replicas shown apart); and the Redis commands run per published message
(``INFO commandstats`` deltas, our own ``INFO`` calls left out; commands that scripts run count
too, as Redis counts them). Every
subscriber must get every message (warm-up included) exactly once, in order: lost, duplicates
and out-of-order arrivals are counted, as are error frames and closes.

    python benchmarks/scaleout.py --system ours --url ws://127.0.0.1:8771 --url ... --url ...
        --server-pid P1 --server-pid P2 --server-pid P3 --redis redis://127.0.0.1:6379/0
        [--redis-pid PID] [--subscribers 1000] [--messages 200] [--rate 20] [--json OUT]

run.py's ``scaleout`` scenario (``run_phase`` below) starts the three servers of each system,
and a fresh private ``redis-server`` for each system's run, and calls this.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from array import array
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from idle import raise_nofile
from loadgen import SUBPROTOCOL, cpu_us, join_all, percentile, process_tree, run_fast
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

__all__ = [
    "SYSTEMS",
    "Scaleout",
    "fmt_tables",
    "redis_calls",
    "redis_cpu_us",
    "redis_info",
    "run_phase",
    "run_scaleout",
]

SYSTEMS = ("ours", "socketio", "wsredis")
#: systems spoken to in backchannel.v1 (init, join, text with a room)
BACKCHANNEL = frozenset({"ours", "wsredis"})
#: the peers, in the order of the summary's columns
PEERS = ("socketio", "wsredis")
JOIN_BATCH = 50  # subscribers joining at once, per receiver process
READY_TIMEOUT = 300.0  # seconds for all subscribers to connect and join
EIO_PATH = "/socket.io/?EIO=4&transport=websocket"


@dataclass
class Scaleout:
    """One scale-out run: which system, its 3 instances, the load."""

    system: str  # "ours" or "socketio"
    urls: list[str]  # ws://host:port of instances 1, 2, 3 (publisher on 1)
    server_pids: list[int]
    redis: str  # redis://host:port/db, for INFO commandstats
    redis_pid: int | None = None  # a private redis-server: its CPU is reported too
    subscribers: int = 1000
    messages: int = 200
    rate: float = 20.0
    warmup: int = 10
    tput_messages: int = 500
    window: int = 10
    drain: float = 30.0  # seconds to wait for missing deliveries after a phase
    room: str = "bench"
    label: str = ""
    #: subscriber i joins room ``i % rooms``, message n goes to room ``n % rooms`` (the
    #: publisher joins them all); with more than one, room k is named ``<room>-<k>``
    rooms: int = 1
    store: str = "redis"  # "redis" (one server) or "cluster" (a Redis Cluster)
    #: the Redis nodes that serve (a cluster's masters, or the one Redis): their INFO
    #: commandstats and their CPU from ``INFO cpu`` (getrusage, µs; /proc counts 10 ms ticks,
    #: too coarse for one shard's share) are summed, and reported each; empty: ``redis``'s
    #: commands and ``redis_pid``'s CPU from /proc
    redis_shards: list[str] = field(default_factory=list)
    #: a cluster's replicas: their CPU (replication), apart from the masters'
    redis_replicas: list[str] = field(default_factory=list)

    def room_name(self, k: int) -> str:
        return self.room if self.rooms == 1 else f"{self.room}-{k}"


def expected(members: int, rooms: int, lo: int, hi: int) -> int:
    """Deliveries of messages ``lo..hi-1`` to ``members`` subscribers spread over ``rooms``."""
    return sum(
        len(range(r, members, rooms)) * len(range(lo + (r - lo) % rooms, hi, rooms))
        for r in range(rooms)
    )


def redis_info(url: str, section: str) -> dict[str, dict[str, str]]:
    """``INFO <section>`` of the Redis at ``url`` as {name: {field: value}} (plain RESP)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 10) as s:
        s.sendall(f"INFO {section}\r\n".encode())
        f = s.makefile("rb")
        head = f.readline()
        if not head.startswith(b"$"):
            raise RuntimeError(f"INFO {section}: {head!r}")
        body = f.read(int(head[1:]) + 2).decode()
    out: dict[str, dict[str, str]] = {}
    for line in body.splitlines():
        if ":" not in line or line.startswith("#"):
            continue
        name, value = line.split(":", 1)
        out[name] = dict(kv.split("=", 1) for kv in value.split(",") if "=" in kv) or {"": value}
    return out


def redis_cpu_us(url: str) -> float:
    """The Redis's own CPU so far (``INFO cpu``: used_cpu_sys + used_cpu_user), in µs."""
    cpu = redis_info(url, "cpu")
    return (float(cpu["used_cpu_sys"][""]) + float(cpu["used_cpu_user"][""])) * 1e6


def redis_calls(url: str) -> dict[str, int]:
    """Calls so far of each command (``cmdstat_`` dropped; INFO, our own probe, left out)."""
    stats = redis_info(url, "commandstats")
    return {
        k.removeprefix("cmdstat_"): int(v["calls"])
        for k, v in stats.items()
        if k.startswith("cmdstat_") and k != "cmdstat_info"
    }


# ---------------------------------------------------------------------------------------------
# Receivers: one process per subscribed instance


@dataclass
class Receiver:
    """What one receiver process saw (all its subscribers)."""

    total: int  # messages that will be published (warm-up + latency + throughput)
    flood_from: int  # the first message of the throughput phase
    rooms: list[str] = field(default_factory=list)  # message n goes to rooms[n % len(rooms)]
    room_of: array[int] = field(default_factory=lambda: array("i"))  # per subscriber
    seen: list[bytearray] = field(default_factory=list)  # per subscriber: message i arrived
    last: array[int] = field(default_factory=lambda: array("i"))  # per subscriber: highest i
    unique: int = 0  # first arrivals of a message at a subscriber
    index: array[int] = field(default_factory=lambda: array("i"))  # per delivery
    latency_ms: array[float] = field(default_factory=lambda: array("d"))
    arrived: array[float] = field(default_factory=lambda: array("d"))  # time.monotonic()
    duplicates: int = 0
    out_of_order: int = 0
    out_of_order_flood: int = 0  # of those, in the throughput phase
    other: int = 0  # frames that are neither deliveries nor answers (presence, pings, ...)
    pongs: int = 0  # Engine.IO pings answered
    errors: list[str] = field(default_factory=list)
    closes: list[str] = field(default_factory=list)
    target: int = 0
    reached: asyncio.Event = field(default_factory=asyncio.Event)

    def slot(self, room: str) -> int:
        self.seen.append(bytearray(self.total))
        self.last.append(-1)
        self.room_of.append(self.rooms.index(room))
        return len(self.seen) - 1

    def lost(self, rooms_of_all: list[int]) -> int:
        """Messages of its room a subscriber never got (all of them for one never joined)."""
        n = len(self.rooms)
        due = sum(len(range(r, self.total, n)) for r in rooms_of_all)
        got = sum(
            self.seen[slot][i]
            for slot, r in enumerate(self.room_of)
            for i in range(r, self.total, n)
        )
        return due - got

    def deliver(self, slot: int, text: str, now: float) -> None:
        i, sent = text.split(" ", 1)
        n = int(i)
        seen = self.seen[slot]
        if seen[n]:
            self.duplicates += 1
        else:
            seen[n] = 1
            self.unique += 1
        if n < self.last[slot]:
            self.out_of_order += 1
            self.out_of_order_flood += n >= self.flood_from
        else:
            self.last[slot] = n
        self.index.append(n)
        self.latency_ms.append((now - float(sent)) * 1000)
        self.arrived.append(now)
        if self.unique >= self.target > 0:
            self.reached.set()

    def error(self, what: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(what[:200])


Joined = Callable[[str], None]


async def _ours(url: str, room: str, name: str, rx: Receiver, joined: Joined) -> None:
    """A backchannel subscriber: init, join, then record every room frame."""
    ws = await connect(
        f"{url}/ws",
        subprotocols=[SUBPROTOCOL],
        compression=None,
        ping_interval=None,
        open_timeout=60,
        max_size=None,
    )
    slot = rx.slot(room)
    try:
        await ws.send(b'{"id":"i","type":"init","content":{}}', text=True)
        join = {"id": "j", "type": "join", "content": {"room": room}}
        await ws.send(orjson.dumps(join), text=True)
        while True:
            raw = await ws.recv(decode=False)  # bytes: no UTF-8 decode before orjson
            now = time.monotonic()
            msg = orjson.loads(raw)
            kind = msg.get("type")
            reply_to = msg.get("replyTo")
            if reply_to is None and kind == "text":
                rx.deliver(slot, msg["content"]["text"], now)
            elif reply_to is not None:
                if kind == "error":
                    rx.error(f"{reply_to}: {msg['content']}")
                if reply_to == "j":
                    joined(name)
            else:
                rx.other += 1
                if kind == "error":
                    rx.error(str(msg["content"]))
    except ConnectionClosed:
        pass
    finally:
        if ws.close_code is not None and ws.close_code != 1000:
            rx.closes.append(f"{ws.close_code} {ws.close_reason}")


async def _socketio(url: str, room: str, name: str, rx: Receiver, joined: Joined) -> None:
    """A Socket.IO subscriber over a plain WebSocket: 40, join (ack 1), then record msgs."""
    ws = await connect(
        f"{url}{EIO_PATH}", compression=None, ping_interval=None, open_timeout=60, max_size=None
    )
    slot = rx.slot(room)
    try:
        while True:
            raw = await ws.recv(decode=False)
            if raw.startswith(b"42"):
                now = time.monotonic()
                event = orjson.loads(raw[2:])
                if event[0] == "msg":
                    rx.deliver(slot, event[1]["text"], now)
                else:
                    rx.other += 1
            elif raw == b"2":
                await ws.send(b"3", text=True)
                rx.pongs += 1
            elif raw.startswith(b"0{"):  # Engine.IO open: connect the default namespace
                await ws.send(b"40", text=True)
            elif raw.startswith(b"40"):  # namespace connected
                await ws.send(b'421["join",' + orjson.dumps(room) + b"]", text=True)
            elif raw.startswith(b"431"):
                joined(name)
            else:  # 44 connect error, 41 disconnect, anything else
                rx.other += 1
                if raw.startswith((b"44", b"41", b"1")):
                    rx.error(raw.decode(errors="replace"))
    except ConnectionClosed:
        pass
    finally:
        if ws.close_code is not None and ws.close_code != 1000:
            rx.closes.append(f"{ws.close_code} {ws.close_reason}")


SUBSCRIBE: dict[str, Callable[[str, str, str, Receiver, Joined], Coroutine[Any, Any, None]]] = {
    "ours": _ours,
    "socketio": _socketio,
    "wsredis": _ours,
}


async def _receiver_main(sc: Scaleout, url: str, names: list[str], pipe: Connection) -> None:
    """Connect and join all subscribers, then follow the parent's commands (wait/report)."""
    rooms = [sc.room_name(k) for k in range(sc.rooms)]
    rx = Receiver(sc.warmup + sc.messages + sc.tput_messages, sc.warmup + sc.messages, rooms)
    room_of = {name: i % sc.rooms for i, name in enumerate(names)}
    loop = asyncio.get_running_loop()
    subscribe = SUBSCRIBE[sc.system]
    began = time.monotonic()
    tasks, failures = await join_all(
        names,
        lambda name, joined: subscribe(url, rooms[room_of[name]], name, rx, joined),
        JOIN_BATCH,
        READY_TIMEOUT,
    )
    pipe.send(("ready", len(names) - len(failures), failures[:5], time.monotonic() - began))
    while True:
        cmd = await loop.run_in_executor(None, pipe.recv)
        if cmd[0] == "wait":  # until this many first arrivals (or the timeout)
            rx.target, timeout = cmd[1], cmd[2]
            rx.reached.clear()
            if rx.unique < rx.target:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(rx.reached.wait(), timeout)
            pipe.send(("reached", rx.unique, time.monotonic()))
        elif cmd[0] == "report":
            lost = rx.lost(list(room_of.values()))
            pipe.send(
                {
                    "subscribers": len(names),
                    "unique": rx.unique,
                    "lost": lost,
                    "index": rx.index.tobytes(),
                    "latency_ms": rx.latency_ms.tobytes(),
                    "arrived": rx.arrived.tobytes(),
                    "duplicates": rx.duplicates,
                    "out_of_order": rx.out_of_order,
                    "out_of_order_flood": rx.out_of_order_flood,
                    "other": rx.other,
                    "pongs": rx.pongs,
                    "errors": rx.errors,
                    "closes": rx.closes[:5],
                    "n_closes": len(rx.closes),
                    "ended_connections": sum(t.done() for t in tasks),
                }
            )
            return  # the process exits; the OS closes the sockets


def _receiver(sc: Scaleout, url: str, names: list[str], pipe: Connection) -> None:
    raise_nofile(len(names) + 256)
    run_fast(_receiver_main(sc, url, names, pipe))


# ---------------------------------------------------------------------------------------------
# Publisher, on instance 1


class Publisher:
    """Sends room messages and counts their answers; ``window`` bounds the unanswered ones."""

    def __init__(self, sc: Scaleout, ws: ClientConnection) -> None:
        self.sc = sc
        self.ws = ws
        self.sent: dict[int, float] = {}
        self.answered: dict[int, float] = {}
        self.errors: list[str] = []
        self.ready = asyncio.Event()
        self.window = asyncio.Semaphore(sc.window)
        self.windowed: set[int] = set()
        self.pongs = 0
        self.joins = 0
        self.reader = asyncio.create_task(self._read())

    async def start(self) -> None:
        """Ours: init and join every room (members publish); Socket.IO: connect the
        namespace."""
        if self.sc.system in BACKCHANNEL:
            await self.ws.send(b'{"id":"pi","type":"init","content":{}}', text=True)
            for k in range(self.sc.rooms):
                join = {"id": f"pj{k}", "type": "join", "content": {"room": self.sc.room_name(k)}}
                await self.ws.send(orjson.dumps(join), text=True)
        await asyncio.wait_for(self.ready.wait(), 60)

    def _answer(self, n: int, error: str | None) -> None:
        self.answered[n] = time.monotonic()
        if error is not None and len(self.errors) < 5:
            self.errors.append(error[:200])
        if n in self.windowed:
            self.windowed.discard(n)
            self.window.release()

    async def _read(self) -> None:
        ours = self.sc.system in BACKCHANNEL
        try:
            async for raw in self.ws:
                if ours:
                    msg = orjson.loads(raw)
                    reply_to = msg.get("replyTo")
                    error = str(msg["content"]) if msg.get("type") == "error" else None
                    if isinstance(reply_to, str) and reply_to.startswith("pj"):
                        if error:
                            self.errors.append(f"join: {error}")
                        self.joins += 1
                        if self.joins == self.sc.rooms:
                            self.ready.set()
                    elif isinstance(reply_to, str) and reply_to.startswith("p-"):
                        self._answer(int(reply_to[2:]), error)
                    elif error and len(self.errors) < 5:
                        self.errors.append(error)
                    continue
                assert isinstance(raw, str)
                if raw.startswith("43"):  # ack: 43<id>[...]
                    ack = raw[2:]
                    n = int(ack[: ack.index("[")])
                    self._answer(n, None if ack.endswith("[true]") else ack)
                elif raw == "2":
                    await self.ws.send("3")
                    self.pongs += 1
                elif raw.startswith("0{"):
                    await self.ws.send("40")
                elif raw.startswith("40"):
                    self.ready.set()
                elif raw.startswith(("44", "41")) and len(self.errors) < 5:
                    self.errors.append(raw[:200])
        except ConnectionClosed:
            pass

    async def publish(self, n: int, windowed: bool = False) -> None:
        if windowed:
            await self.window.acquire()
            self.windowed.add(n)
        now = time.monotonic()
        text = f"{n} {now:.6f}"
        self.sent[n] = now
        room = self.sc.room_name(n % self.sc.rooms)
        if self.sc.system in BACKCHANNEL:
            request = {"id": f"p-{n}", "type": "text", "content": {"text": text, "room": room}}
            await self.ws.send(orjson.dumps(request), text=True)
        else:
            event = ["pub", {"room": room, "text": text}]
            await self.ws.send(f"42{n}".encode() + orjson.dumps(event), text=True)

    async def paced(self, first: int, count: int, rate: float) -> float:
        """Publish ``first .. first+count-1`` at ``rate``; return the send duration."""
        began = time.monotonic()
        for k in range(count):
            delay = began + k / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.publish(first + k)
        return time.monotonic() - began

    async def flood(self, first: int, count: int) -> float:
        """Publish ``count`` messages, at most ``window`` unanswered; return the send time."""
        began = time.monotonic()
        for k in range(count):
            await self.publish(first + k, windowed=True)
        return time.monotonic() - began


# ---------------------------------------------------------------------------------------------
# One run


class Meter:
    """CPU of the servers (each), the receiver processes and Redis (each master, the
    replicas); Redis command calls (each master)."""

    def __init__(self, sc: Scaleout, gen_pids: list[int]) -> None:
        self.sc = sc
        self.gen_pids = gen_pids
        self.redis_urls = sc.redis_shards or [sc.redis]

    def read(self) -> dict[str, Any]:
        sc = self.sc
        if sc.redis_shards:
            each = [redis_cpu_us(url) for url in sc.redis_shards]
        else:
            each = [cpu_us([sc.redis_pid])] if sc.redis_pid else []
        calls_each = [redis_calls(url) for url in self.redis_urls]
        calls: dict[str, int] = {}
        for shard in calls_each:
            for k, v in shard.items():
                calls[k] = calls.get(k, 0) + v
        return {
            "t": time.monotonic(),
            "servers": [cpu_us(process_tree(pid)) for pid in sc.server_pids],
            "receivers": cpu_us(self.gen_pids),
            "redis": sum(each) if each else None,
            "redis_each": each,
            "replicas": sum(redis_cpu_us(url) for url in sc.redis_replicas)
            if sc.redis_replicas
            else None,
            # the one Redis's CPU from /proc too, to compare with INFO cpu's
            "redis_proc": cpu_us([sc.redis_pid]) if sc.redis_pid else None,
            "calls": calls,
            "calls_each": [sum(shard.values()) for shard in calls_each],
        }


def _delta(a: dict[str, Any], b: dict[str, Any], published: int, deliveries: int) -> dict[str, Any]:
    """CPU and Redis figures between two meter readings."""
    servers = [y - x for x, y in zip(a["servers"], b["servers"], strict=True)]
    calls = {k: v - a["calls"].get(k, 0) for k, v in b["calls"].items()}
    calls = {k: v for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v > 0}
    redis_us = b["redis"] - a["redis"] if a["redis"] is not None else None
    redis_each = [y - x for x, y in zip(a["redis_each"], b["redis_each"], strict=True)]
    calls_each = [y - x for x, y in zip(a["calls_each"], b["calls_each"], strict=True)]
    replicas_us = b["replicas"] - a["replicas"] if a["replicas"] is not None else None
    proc_us = b["redis_proc"] - a["redis_proc"] if a["redis_proc"] is not None else None
    wall = b["t"] - a["t"]
    return {
        "wall_s": wall,
        "server_cpu_us": servers,
        "server_cpu_us_per_delivery": sum(servers) / deliveries if deliveries else None,
        "server_cpu_us_per_delivery_each": [s / deliveries for s in servers]
        if deliveries
        else None,
        "server_cpu_pct": 100 * sum(servers) / (wall * 1e6) if wall > 0 else None,
        "receivers_cpu_pct": 100 * (b["receivers"] - a["receivers"]) / (wall * 1e6)
        if wall > 0
        else None,
        "receivers_cpu_us_per_delivery": (b["receivers"] - a["receivers"]) / deliveries
        if deliveries
        else None,
        "redis_cpu_us_per_delivery": redis_us / deliveries
        if redis_us is not None and deliveries
        else None,
        "redis_cpu_pct": 100 * redis_us / (wall * 1e6) if redis_us is not None and wall else None,
        "redis_calls": calls,
        "redis_calls_per_message": {k: v / published for k, v in calls.items()}
        if published
        else {},
        "redis_calls_per_message_total": sum(calls.values()) / published if published else None,
        # per master of a cluster (one entry for one Redis): how the load divides
        "redis_cpu_us_per_message": redis_us / published
        if redis_us is not None and published
        else None,
        "redis_cpu_us_per_message_each": [v / published for v in redis_each] if published else [],
        "redis_calls_per_message_each": [v / published for v in calls_each] if published else [],
        "redis_cpu_us_per_delivery_proc": proc_us / deliveries
        if proc_us is not None and deliveries
        else None,
        "redis_replicas_cpu_us_per_delivery": replicas_us / deliveries
        if replicas_us is not None and deliveries
        else None,
        "redis_replicas_cpu_us_per_message": replicas_us / published
        if replicas_us is not None and published
        else None,
    }


async def _ask_all(pipes: list[Connection], cmd: tuple[Any, ...]) -> list[Any]:
    for pipe in pipes:
        pipe.send(cmd)
    return [await asyncio.to_thread(pipe.recv) for pipe in pipes]


async def _run(sc: Scaleout) -> dict[str, Any]:
    if sc.system not in SYSTEMS:
        raise ValueError(f"system must be one of {SYSTEMS}, not {sc.system!r}")
    if len(sc.urls) != 3 or len(sc.server_pids) != 3:
        raise ValueError("three instances: --url and --server-pid three times each")
    ctx = mp.get_context("fork")
    pipes: list[Connection] = []
    workers = []
    split = [sc.subscribers // 2, sc.subscribers - sc.subscribers // 2]
    m_empty = Meter(sc, []).read()  # before the first subscriber connects (joins included)
    for k, url in enumerate(sc.urls[1:]):  # instances 2 and 3
        ours, theirs = ctx.Pipe()
        names = [f"s{k}-{i}" for i in range(split[k])]
        proc = ctx.Process(target=_receiver, args=(sc, url, names, theirs), daemon=True)
        proc.start()
        pipes.append(ours)
        workers.append(proc)
    began = time.monotonic()
    ready = [await asyncio.to_thread(pipe.recv) for pipe in pipes]
    joined = sum(r[1] for r in ready)
    setup_failures = [f for r in ready for f in r[2]]
    meter = Meter(sc, [w.pid for w in workers if w.pid is not None])

    bc = sc.system in BACKCHANNEL
    url = f"{sc.urls[0]}/ws" if bc else f"{sc.urls[0]}{EIO_PATH}"
    ws = await connect(
        url,
        subprotocols=[SUBPROTOCOL] if bc else None,
        compression=None,
        ping_interval=None,
        max_size=None,
    )
    pub = Publisher(sc, ws)
    await pub.start()
    setup_s = time.monotonic() - began

    async def wait_all(upto: int, timeout: float) -> float:
        """Until every subscriber had messages 0..upto-1; the time the last one arrived."""
        for pipe, n in zip(pipes, split, strict=True):
            pipe.send(("wait", expected(n, sc.rooms, 0, upto), timeout))
        reached = [await asyncio.to_thread(pipe.recv) for pipe in pipes]
        return float(max(r[2] for r in reached))

    # 1. warm-up
    await pub.paced(0, sc.warmup, sc.rate)
    await wait_all(sc.warmup, sc.drain)
    # 2. latency at a fixed rate
    first, last = sc.warmup, sc.warmup + sc.messages
    m0 = meter.read()
    send_s = await pub.paced(first, sc.messages, sc.rate)
    await wait_all(last, sc.drain)
    m1 = meter.read()
    # 3. throughput: as fast as instance 1 answers, ``window`` unanswered at most
    t_first, t_last = last, last + sc.tput_messages
    tput_sent = time.monotonic()
    flood_s = await pub.flood(t_first, sc.tput_messages)
    done_at = await wait_all(t_last, sc.drain)
    m2 = meter.read()
    with contextlib.suppress(TimeoutError):  # the last answers (normally long in)
        async with asyncio.timeout(10):
            while len(pub.answered) < t_last:
                await asyncio.sleep(0.01)
    reports = await _ask_all(pipes, ("report",))
    for proc in workers:
        proc.join(10)
    pub.reader.cancel()
    await ws.close()

    index, latency, arrived = array("i"), array("d"), array("d")
    for r in reports:
        index.frombytes(r["index"])
        latency.frombytes(r["latency_ms"])
        arrived.frombytes(r["arrived"])

    def phase(lo: int, hi: int) -> dict[str, Any]:
        lat: list[float] = []
        last_of: dict[int, float] = {}
        latest = 0.0
        for i, ms, at in zip(index, latency, arrived, strict=True):
            if lo <= i < hi:
                lat.append(ms)
                if ms > last_of.get(i, -1.0):
                    last_of[i] = ms
                latest = max(latest, at)
        lat.sort()
        last_sorted = sorted(last_of.values())
        return {
            "deliveries": len(lat),
            "expected": sum(expected(n, sc.rooms, lo, hi) for n in split),
            "delivery_p50_ms": percentile(lat, 0.50) if lat else None,
            "delivery_p99_ms": percentile(lat, 0.99) if lat else None,
            "delivery_max_ms": lat[-1] if lat else None,
            "last_subscriber_p50_ms": percentile(last_sorted, 0.50) if lat else None,
            "last_subscriber_p99_ms": percentile(last_sorted, 0.99) if lat else None,
            "last_subscriber_max_ms": last_sorted[-1] if lat else None,
            "latest_arrival": latest,
        }

    lat_phase = phase(first, last) | {"send_s": send_s}
    lat_phase |= _delta(m0, m1, sc.messages, lat_phase["deliveries"])
    filled = phase(0, last)
    with_joins = {"deliveries": filled["deliveries"], "expected": filled["expected"]}
    with_joins |= _delta(m_empty, m1, last, filled["deliveries"])
    tput = phase(t_first, t_last)
    answered_at = [pub.answered[n] for n in range(t_first, t_last) if n in pub.answered]
    span = (tput["latest_arrival"] or done_at) - tput_sent
    tput |= {
        "send_s": flood_s,
        "delivered_msgs_per_s": tput["deliveries"] / span if span > 0 else None,
        "published_msgs_per_s": sc.tput_messages / span if span > 0 else None,
        "accepted_msgs_per_s": len(answered_at) / (max(answered_at) - tput_sent)
        if answered_at
        else None,
        "span_s": span,
    }
    tput |= _delta(m1, m2, sc.tput_messages, tput["deliveries"])
    total = sc.warmup + sc.messages + sc.tput_messages
    unanswered = total - len(pub.answered)
    return asdict(sc) | {
        "subscribers_joined": joined,
        "setup_failed": sc.subscribers - joined,
        "setup_failures": setup_failures,
        "setup_s": setup_s,
        "published": total,
        "lost": sum(r["lost"] for r in reports),
        "duplicates": sum(r["duplicates"] for r in reports),
        "out_of_order": sum(r["out_of_order"] for r in reports),
        "out_of_order_throughput_phase": sum(r["out_of_order_flood"] for r in reports),
        "other_frames": sum(r["other"] for r in reports),
        "pongs": sum(r["pongs"] for r in reports) + pub.pongs,
        "client_errors": [e for r in reports for e in r["errors"]][:5] + pub.errors[:5],
        "closes": sum(r["n_closes"] for r in reports),
        "close_samples": [c for r in reports for c in r["closes"]][:5],
        "ended_connections": sum(r["ended_connections"] for r in reports),
        "unanswered": unanswered,
        "latency": lat_phase,
        "throughput": tput,
        "with_joins": with_joins,
    }


def run_scaleout(sc: Scaleout) -> dict[str, Any]:
    """Run one scale-out measurement (publisher on uvloop when available)."""
    raise_nofile(sc.subscribers + 1024)
    return run_fast(_run(sc))


# ---------------------------------------------------------------------------------------------
# run.py's ``scaleout`` scenario: servers, a private Redis, the runs

OURS_PLUGINS = ["init", "text", "rooms", "redis"]
PEER = (
    "{{python}} benchmarks/peer_socketio.py --host 127.0.0.1 --port {{port}} "
    "--redis {redis} --channel {channel} --server {server} --ws {ws}"
)
WSREDIS = (
    "{{python}} benchmarks/peer_redis_fanout.py --host 127.0.0.1 --port {{port}} "
    "--redis {redis} --channel {channel} --uvloop"
)
REDIS_SERVER = "redis-server --port {port} --bind 127.0.0.1 --save '' --appendonly no"


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _wait_ready(port: int, timeout: float = 60.0) -> None:
    """Until ours answers /readyz with 200 (its broker reached Redis)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"ours on port {port} not ready after {timeout:.0f} s")
        time.sleep(0.05)


STORES = ("redis", "cluster")


def _start_cluster() -> tuple[Any, dict[str, Any]]:
    """A private Redis Cluster (the plugin's test harness: 3 masters + 3 replicas) and its
    layout: masters' URLs and pids, replicas' pids."""
    from backchannel_redis.testing import RedisCluster  # the workspace's redis plugin

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("--scaleout-stores cluster needs redis-server on PATH")
    cluster = RedisCluster(binary, Path(tempfile.mkdtemp(prefix="bench-cluster-")))
    try:
        cluster.start()
        # Until every node shows 3 masters with slots and 3 replicas. Not cluster.masters():
        # it raises IndexError while a node still lists a master without slots (a replica
        # not yet attached), its sort key reading slots before its filter drops those.
        deadline = time.monotonic() + 30
        while True:
            nodes = cluster.nodes()
            serving = [n for n in nodes if "master" in n["flags"] and n["slots"]]
            masters = [n["port"] for n in sorted(serving, key=lambda n: n["slots"][0][0])]
            ids = {n["id"] for n in serving}
            replicas = [n["port"] for n in nodes if n["master"] in ids]
            if len(masters) == 3 and len(replicas) == 3:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster layout not settled: {nodes}")
            time.sleep(0.05)
    except BaseException:
        cluster.stop()
        shutil.rmtree(cluster.workdir, ignore_errors=True)
        raise
    return cluster, {
        "redis_shards": [f"redis://127.0.0.1:{p}" for p in masters],
        "redis_replicas": [f"redis://127.0.0.1:{p}" for p in replicas],
        "ports": {"masters": masters, "replicas": replicas},
    }


def _rooms_per_shard(cluster: Any, masters: list[int], rooms: list[str]) -> list[list[str]]:
    """Which master serves each room (its keys and its channel carry the room's hash tag)."""
    out: list[list[str]] = [[] for _ in masters]
    for room in rooms:
        slot = int(cluster.call(masters[0], "CLUSTER", "KEYSLOT", room))
        out[masters.index(cluster.slot_owner(slot))].append(room)
    return out


def run_phase(args: Any, results: dict[str, Any], make: Callable[..., Any]) -> None:
    """``--scaleout-reps`` rounds of runs (systems x stores, order reversed every other
    round), each on fresh servers.

    Each run gets its own fresh ``redis-server`` on a free port (unless ``--scaleout-redis``
    names one), or for the store ``cluster`` its own private Redis Cluster (ours only): the
    commands counted and the CPU measured are then that run's alone, and 1,000 outboxes do not
    land in the Redis others test against.
    """
    rows: list[dict[str, Any]] = results.setdefault("scaleout", [])
    quick = args.quick
    order = [s for s in (*PEERS, "ours") if s in args.scaleout_systems.split(",")]
    stores = [s for s in STORES if s in getattr(args, "scaleout_stores", "redis").split(",")]
    runs = [(system, store) for system in order for store in stores]
    runs = [(sy, st) for sy, st in runs if st == "redis" or sy == "ours"]  # peers: one Redis
    if "cluster" in stores and args.scaleout_redis:
        raise SystemExit("--scaleout-stores cluster starts its own cluster: no --scaleout-redis")
    rooms = getattr(args, "scaleout_rooms", 1)
    for rep in range(1 if quick else args.scaleout_reps):
        for system, store in runs if rep % 2 == 0 else runs[::-1]:
            redis_srv = cluster = None
            layout: dict[str, Any] = {}
            redis_url = args.scaleout_redis
            if store == "cluster":
                cluster, layout = _start_cluster()
                redis_url = cluster.url
            elif not redis_url:
                redis_srv = make("scaleout-redis", REDIS_SERVER, "asyncio", {})
                redis_srv.start()
                redis_url = f"redis://127.0.0.1:{redis_srv.port}/0"
            tag = uuid.uuid4().hex[:8]
            servers = []
            try:
                for k in range(1, 4):
                    if system == "ours":
                        env = {
                            "BACKCHANNEL_SERVER__UVLOOP": "true",
                            "BACKCHANNEL_PLUGINS__ENABLED": json.dumps(OURS_PLUGINS),
                            "BACKCHANNEL_PLUGINS__REDIS__URL": redis_url,
                            "BACKCHANNEL_PLUGINS__REDIS__KEY_PREFIX": f"bench-scaleout-{tag}",
                        }
                        if store == "cluster":
                            env["BACKCHANNEL_PLUGINS__REDIS__CLUSTER"] = "true"
                        srv = make(f"ours-scaleout-{k}", args.ours, "uvloop", env)
                    elif system == "wsredis":
                        env = {}
                        template = WSREDIS.format(redis=redis_url, channel=f"bench-wsredis-{tag}")
                        srv = make(f"wsredis-{k}", template, "uvloop", env)
                    else:
                        env = {}
                        template = PEER.format(
                            redis=redis_url,
                            channel=f"bench-socketio-{tag}",
                            server=args.peer_server,
                            ws=args.peer_ws,
                        )
                        srv = make(f"socketio-{k}", template, "uvloop", env)
                    servers.append(srv)
                    srv.start()
                    results["servers"][srv.name] = {
                        "command": srv.template,
                        "env": env,
                        "loop": "uvloop",
                        "peer": None,
                        "loop_observed": srv.observed_loop(),
                    }
                    if system == "ours":
                        _wait_ready(srv.port)
                sc = Scaleout(
                    system,
                    [f"ws://127.0.0.1:{s.port}" for s in servers],
                    [s.pid for s in servers],
                    redis_url,
                    redis_srv.pid if redis_srv is not None else None,
                    subscribers=args.scaleout_subscribers,
                    messages=50 if quick else args.scaleout_messages,
                    rate=args.scaleout_rate,
                    tput_messages=100 if quick else args.scaleout_tput,
                    window=args.scaleout_window,
                    label=system if store == "redis" else f"{system}@{store}",
                    rooms=rooms,
                    store=store,
                    # one Redis: its CPU from INFO cpu as well (as a cluster's nodes')
                    redis_shards=layout.get("redis_shards", [redis_url] if redis_srv else []),
                    redis_replicas=layout.get("redis_replicas", []),
                )
                row = run_scaleout(sc) | {"server": system, "rep": rep, "redis_url": redis_url}
                if cluster is not None:
                    masters = layout["ports"]["masters"]
                    names = [sc.room_name(k) for k in range(rooms)]
                    row["cluster"] = layout["ports"] | {
                        "rooms_per_master": _rooms_per_shard(cluster, masters, names)
                    }
            finally:
                for srv in servers:
                    srv.stop()
                if redis_srv is not None:
                    redis_srv.stop()
                if cluster is not None:
                    cluster.stop()
                    shutil.rmtree(cluster.workdir, ignore_errors=True)
            for srv in servers:
                results["servers"][srv.name]["listening"] = srv.listening()
            rows.append(row)
            lp, tp = row["latency"], row["throughput"]
            _log(
                f"scaleout {sc.label} rep {rep}, {rooms} room(s): p99 {lp['delivery_p99_ms']} "
                f"ms, last-subscriber p99 {lp['last_subscriber_p99_ms']} ms, "
                f"{lp['server_cpu_us_per_delivery']} server + {lp['redis_cpu_us_per_delivery']} "
                f"Redis CPU-µs/delivery; throughput {tp['delivered_msgs_per_s']} deliveries/s; "
                f"lost {row['lost']}, closes {row['closes']}, errors {row['client_errors'][:2]}"
            )


# ---------------------------------------------------------------------------------------------
# Tables (for run.py)


def _f(value: float | None, spec: str) -> str:
    return "—" if value is None else f"{value:{spec}}"


def _calls_text(per_message: dict[str, float], top: int = 6) -> str:
    items = list(per_message.items())[:top]
    text = ", ".join(f"{k} {v:,.1f}" for k, v in items)
    return text + (", …" if len(per_message) > top else "")


def _name(row: dict[str, Any]) -> str:
    """The system, and its store unless one Redis: ``ours``, ``ours@cluster``."""
    store = row.get("store", "redis")
    return str(row["server"]) if store == "redis" else f"{row['server']}@{store}"


def fmt_tables(results: dict[str, Any]) -> str:
    """Markdown for the ``scaleout`` rows of ``results`` (empty when there are none)."""
    rows = results.get("scaleout")
    if not rows:
        return ""

    def md(header: list[str], body: list[list[str]], left: int = 1) -> list[str]:
        rule = "|---" * left + "|--:" * (len(header) - left) + "|"
        return ["| " + " | ".join(header) + " |", rule] + [
            "| " + " | ".join(r) + " |" for r in body
        ]

    lines = md(
        [
            "server",
            "rep",
            "subscribers",
            "messages @ rate",
            "delivery p50 ms",
            "delivery p99 ms",
            "last subscriber p50 ms",
            "last subscriber p99 ms",
            "server CPU-µs/delivery (1+2+3)",
            "Redis CPU-µs/delivery",
            "receivers CPU-µs/delivery",
            "server CPU %",
            "Redis commands/message",
        ],
        [
            [
                _name(r),
                str(r["rep"]),
                f"{r['subscribers_joined']:,}",
                f"{r['messages']} @ {r['rate']:g}/s",
                _f(lp["delivery_p50_ms"], ".1f"),
                _f(lp["delivery_p99_ms"], ".1f"),
                _f(lp["last_subscriber_p50_ms"], ".1f"),
                _f(lp["last_subscriber_p99_ms"], ".1f"),
                f"{_f(lp['server_cpu_us_per_delivery'], '.1f')} ("
                + " + ".join(_f(v, ".1f") for v in lp["server_cpu_us_per_delivery_each"] or [])
                + ")",
                _f(lp["redis_cpu_us_per_delivery"], ".1f"),
                _f(lp["receivers_cpu_us_per_delivery"], ".1f"),
                _f(lp["server_cpu_pct"], ".0f"),
                _f(lp["redis_calls_per_message_total"], ",.1f"),
            ]
            for r in rows
            for lp in [r["latency"]]
        ],
    )
    lines.append("")
    lines += md(
        [
            "server",
            "rep",
            "messages (window)",
            "delivered msgs/s",
            "published msgs/s",
            "accepted msgs/s",
            "delivery p50 ms",
            "delivery p99 ms",
            "server CPU-µs/delivery (1+2+3)",
            "Redis CPU-µs/delivery",
            "server CPU %",
            "receivers CPU %",
            "Redis CPU %",
            "Redis commands/message",
        ],
        [
            [
                _name(r),
                str(r["rep"]),
                f"{r['tput_messages']} ({r['window']})",
                _f(tp["delivered_msgs_per_s"], ",.0f"),
                _f(tp["published_msgs_per_s"], ",.1f"),
                _f(tp["accepted_msgs_per_s"], ",.0f"),
                _f(tp["delivery_p50_ms"], ".0f"),
                _f(tp["delivery_p99_ms"], ".0f"),
                f"{_f(tp['server_cpu_us_per_delivery'], '.1f')} ("
                + " + ".join(_f(v, ".1f") for v in tp["server_cpu_us_per_delivery_each"] or [])
                + ")",
                _f(tp["redis_cpu_us_per_delivery"], ".1f"),
                _f(tp["server_cpu_pct"], ".0f"),
                _f(tp["receivers_cpu_pct"], ".0f"),
                _f(tp["redis_cpu_pct"], ".0f"),
                _f(tp["redis_calls_per_message_total"], ",.1f"),
            ]
            for r in rows
            for tp in [r["throughput"]]
        ],
    )
    lines.append("")
    lines += md(
        [
            "server",
            "rep",
            "published",
            "lost",
            "dup / out of order",
            "closes",
            "unanswered",
            "client errors",
            "set-up s",
            "Redis commands per message (latency phase)",
        ],
        [
            [
                _name(r),
                str(r["rep"]),
                f"{r['published']:,} x {r['subscribers_joined']:,}",
                f"{r['lost']:,}",
                f"{r['duplicates']} / {r['out_of_order']}",
                str(r["closes"]),
                str(r["unanswered"]),
                str(len(r["client_errors"])),
                f"{r['setup_s']:.1f}",
                _calls_text(r["latency"]["redis_calls_per_message"]),
            ]
            for r in rows
        ],
    )
    peers = [p for p in PEERS if any(_name(r) == p for r in rows)]
    if peers or all(r.get("store", "redis") == "redis" for r in rows):
        lines.append("")
        header = ["figure (median of the runs)", "ours"]
        for peer in peers:
            header += [peer, f"ours / {peer}"]
        lines += md(header, summary(rows, peers))
    stores = [_name(r) for r in rows if r["server"] == "ours" and r.get("store") == "cluster"]
    if stores and any(_name(r) == "ours" for r in rows):
        other = stores[0]
        lines.append("")
        header = ["figure (median of the runs)", other, "ours", f"{other} / ours"]
        lines += md(header, summary(rows, ["ours"], base=other, redis_ratios=True))
    sharded = [r for r in rows if len(r["latency"].get("redis_cpu_us_per_message_each", [])) > 1]
    if sharded:
        lines.append("")
        lines += md(
            [
                "server",
                "rep",
                "rooms per master",
                "latency: Redis CPU-µs/message, masters (each)",
                "latency: replicas CPU-µs/message",
                "latency: commands/message (each master)",
                "throughput: Redis CPU-µs/message, masters (each)",
                "throughput: replicas CPU-µs/message",
                "joins + latency: Redis CPU-µs/message, masters (each)",
                "joins + latency: replicas CPU-µs/message",
            ],
            [
                [
                    _name(r),
                    str(r["rep"]),
                    " / ".join(
                        str(len(x)) for x in r.get("cluster", {}).get("rooms_per_master", [])
                    )
                    or "—",
                    _each(r["latency"], "redis_cpu_us_per_message", ".0f"),
                    _f(r["latency"].get("redis_replicas_cpu_us_per_message"), ".0f"),
                    _each(r["latency"], "redis_calls_per_message", ".1f"),
                    _each(r["throughput"], "redis_cpu_us_per_message", ".0f"),
                    _f(r["throughput"].get("redis_replicas_cpu_us_per_message"), ".0f"),
                    _each(r["with_joins"], "redis_cpu_us_per_message", ".0f"),
                    _f(r["with_joins"].get("redis_replicas_cpu_us_per_message"), ".0f"),
                ]
                for r in rows
                if r in sharded or r["server"] == "ours"
            ],
        )
    return "\n".join(lines)


def _each(phase: dict[str, Any], key: str, spec: str) -> str:
    """``total (shard + shard + ...)`` of a per-shard figure (``total`` alone for one Redis)."""
    each = phase.get(f"{key}_each") or []
    total = phase.get(key) if key != "redis_calls_per_message" else phase.get(f"{key}_total")
    if total is None:
        return "—"
    text = _f(total, spec)
    return text + (" (" + " + ".join(_f(v, spec) for v in each) + ")" if len(each) > 1 else "")


# (label, phase, key, format)
SUMMARY = [
    ("latency phase: delivery p99 ms", "latency", "delivery_p99_ms", ".1f"),
    ("latency phase: last subscriber p99 ms", "latency", "last_subscriber_p99_ms", ".1f"),
    ("latency phase: server CPU-µs/delivery", "latency", "server_cpu_us_per_delivery", ".1f"),
    ("latency phase: Redis CPU-µs/delivery", "latency", "redis_cpu_us_per_delivery", ".1f"),
    ("latency phase: server + Redis CPU-µs/delivery", "latency", "+redis", ".1f"),
    ("latency phase: Redis commands/message", "latency", "redis_calls_per_message_total", ",.1f"),
    ("throughput phase: delivered msgs/s", "throughput", "delivered_msgs_per_s", ",.0f"),
    ("throughput phase: server CPU-µs/delivery", "throughput", "server_cpu_us_per_delivery", ".1f"),
    ("throughput phase: Redis CPU-µs/delivery", "throughput", "redis_cpu_us_per_delivery", ".1f"),
    ("throughput phase: server + Redis CPU-µs/delivery", "throughput", "+redis", ".1f"),
    (
        "throughput phase: Redis commands/message",
        "throughput",
        "redis_calls_per_message_total",
        ",.1f",
    ),
    (
        "joins + warm-up + latency: server CPU-µs/delivery",
        "with_joins",
        "server_cpu_us_per_delivery",
        ".1f",
    ),
    (
        "joins + warm-up + latency: Redis CPU-µs/delivery",
        "with_joins",
        "redis_cpu_us_per_delivery",
        ".2f",
    ),
    ("joins + warm-up + latency: server + Redis CPU-µs/delivery", "with_joins", "+redis", ".1f"),
    (
        "joins + warm-up + latency: Redis commands/message",
        "with_joins",
        "redis_calls_per_message_total",
        ",.1f",
    ),
]


def summary(
    rows: list[dict[str, Any]], peers: list[str], base: str = "ours", redis_ratios: bool = False
) -> list[list[str]]:
    """Medians per system (``_name``) over the runs of ``rows``, and ``base`` / each peer's
    (Redis-only figures get a ratio with ``redis_ratios``: when both sides use Redis alike)."""

    def value(row: dict[str, Any], key: str) -> float | None:
        if key == "+redis":  # what the deployment spends: the servers and the Redis
            server, redis = row["server_cpu_us_per_delivery"], row["redis_cpu_us_per_delivery"]
            return server + redis if server is not None and redis is not None else None
        v: float | None = row.get(key)
        return v

    def median(system: str, phase: str, key: str) -> float | None:
        values = [
            v for r in rows if _name(r) == system and phase in r for v in [value(r[phase], key)]
        ]
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    out = []
    for label, phase, key, spec in SUMMARY:
        ours = median(base, phase, key)
        row = [label, _f(ours, spec)]
        for peer in peers:
            theirs = median(peer, phase, key)
            # the peers' Redis figures are near zero (within a tick): no ratio for those
            plain = redis_ratios or ("Redis CPU" not in label and "Redis commands" not in label)
            rt = ours / theirs if ours is not None and theirs and (plain or "+" in label) else None
            row += [_f(theirs, spec), _f(rt, ".2f") + ("x" if rt else "")]
        out.append(row)
    for label, key in (("lost deliveries", "lost"), ("out-of-order deliveries", "out_of_order")):
        row = [f"{label} (all runs)", f"{sum(r[key] for r in rows if _name(r) == base):,}"]
        for peer in peers:
            row += [f"{sum(r[key] for r in rows if _name(r) == peer):,}", ""]
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=SYSTEMS, required=True)
    parser.add_argument("--url", action="append", required=True, help="3 times: ws://host:port")
    parser.add_argument("--server-pid", type=int, action="append", required=True, help="3 times")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--redis-pid", type=int, help="a private redis-server, for its CPU")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="messages/s, latency phase")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--tput-messages", type=int, default=500)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--drain", type=float, default=30.0)
    parser.add_argument("--room", default="bench")
    parser.add_argument("--json", dest="json_out", help="also write the result to this file")
    args = vars(parser.parse_args())
    json_out = args.pop("json_out")
    args["urls"] = args.pop("url")
    args["server_pids"] = args.pop("server_pid")
    result = run_scaleout(Scaleout(**args))
    text = json.dumps(result, indent=2)
    print(text)
    if json_out:
        with open(json_out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
