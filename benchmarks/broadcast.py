"""Room broadcast: delivery time of each published message to every member of a large room.

``--members`` connections (spread over ``--procs`` receiver processes, on uvloop, the
``websockets`` client) each ``join`` one room; then one more connection (the publisher, in this
process) joins and publishes ``--warmup`` + ``--messages`` ``text {text, room}`` requests at a
fixed ``--rate``. Each text carries its index and its send time (``time.monotonic()``, one clock
for every process of the machine); a member computes ``arrival - sent`` for every room frame it
gets (``type: text`` without ``replyTo``). Warm-up messages are delivered and waited for, not
measured. Reported for the measured messages:

* per delivery (message x member): p50 / p99 / max ms;
* per message, the time until its *last* member had it (fan-out complete): p50 / p99 / max ms;
* lost (deliveries still missing ``--drain`` s after the last publish), duplicates and
  out-of-order arrivals per member, error frames and closes seen by the clients;
* server CPU-µs per delivered frame: utime+stime of ``--server-pid`` and its descendants
  (/proc) from just before the first measured publish until every member had the last one
  (or the drain ran out), divided by the deliveries; the receivers' own CPU likewise.

Presence and other frames (e.g. ours' ``presence`` join events while the room fills) are counted
and otherwise ignored.

    python benchmarks/broadcast.py --url ws://127.0.0.1:8765/ws --server-pid PID
        [--members 1000] [--messages 200] [--rate 10] [--warmup 10] [--procs 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import statistics
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import orjson
from idle import raise_nofile
from loadgen import SUBPROTOCOL, cpu_us, join_all, percentile, process_tree, run_fast
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

__all__ = ["Broadcast", "run_broadcast"]

JOIN_BATCH = 50  # members joining at once, per receiver process
READY_TIMEOUT = 300.0  # seconds for all members to connect and join


@dataclass
class Broadcast:
    """One broadcast run: where, how many members, how many messages and how fast."""

    url: str
    server_pid: int
    members: int = 1000
    messages: int = 200
    rate: float = 10.0  # messages per second
    warmup: int = 10
    procs: int = 2
    drain: float = 10.0  # seconds after the last publish to wait for missing deliveries
    room: str = "bench"
    label: str = ""


@dataclass
class Receiver:
    """What one receiver process saw (all its members)."""

    deliveries: int = 0  # room frames of any published message, warm-up included
    index: array[int] = field(default_factory=lambda: array("i"))  # measured: message index
    latency_ms: array[float] = field(default_factory=lambda: array("d"))  # measured: latency
    duplicates: int = 0
    out_of_order: int = 0
    presence: int = 0
    other: int = 0
    errors: list[str] = field(default_factory=list)
    closes: list[str] = field(default_factory=list)
    target: int = 0
    reached: asyncio.Event = field(default_factory=asyncio.Event)


async def _member(
    url: str, room: str, name: str, warmup: int, rx: Receiver, joined: Callable[[str], None]
) -> None:
    """Join ``room`` and record every room frame until the connection closes."""
    ws = await connect(
        url,
        subprotocols=[SUBPROTOCOL],
        compression=None,
        ping_interval=None,
        open_timeout=60,
        max_size=None,
    )
    try:
        join = {"id": name, "type": "join", "content": {"room": room}}
        await ws.send(orjson.dumps(join), text=True)
        last = -1
        while True:
            raw = await ws.recv(decode=False)  # bytes: no UTF-8 decode before orjson
            now = time.monotonic()
            msg = orjson.loads(raw)
            kind = msg.get("type")
            if kind == "text" and "replyTo" not in msg:
                i, sent = msg["content"]["text"].split(" ", 1)
                n = int(i)
                if n <= last:
                    rx.duplicates += n == last
                    rx.out_of_order += n < last
                last = max(last, n)
                if n >= warmup:
                    rx.index.append(n)
                    rx.latency_ms.append((now - float(sent)) * 1000)
                rx.deliveries += 1
                if rx.deliveries >= rx.target > 0:
                    rx.reached.set()
            elif msg.get("replyTo") == name:
                if kind == "error":
                    rx.errors.append(f"join: {msg['content']}"[:200])
                joined(name)
            elif kind == "presence":
                rx.presence += 1
            else:
                rx.other += 1
                if kind == "error" and len(rx.errors) < 5:
                    rx.errors.append(str(msg["content"])[:200])
    except ConnectionClosed:
        pass
    finally:
        if ws.close_code is not None and ws.close_code != 1000:
            rx.closes.append(f"{ws.close_code} {ws.close_reason}")


async def _receiver_main(bc: Broadcast, names: list[str], pipe: Connection) -> None:
    """Connect and join all members, then follow the parent's commands (wait/report)."""
    rx = Receiver()
    loop = asyncio.get_running_loop()
    began = time.monotonic()
    tasks, failures = await join_all(
        names,
        lambda name, joined: _member(bc.url, bc.room, name, bc.warmup, rx, joined),
        JOIN_BATCH,
        READY_TIMEOUT,
    )
    ok = len(names) - len(failures)
    pipe.send(("ready", ok, len(failures), failures[:5], time.monotonic() - began))
    while True:
        cmd = await loop.run_in_executor(None, pipe.recv)
        if cmd[0] == "wait":  # tell the parent when this many deliveries arrived (or timeout)
            rx.target, timeout = cmd[1], cmd[2]
            rx.reached.clear()
            if rx.deliveries < rx.target:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(rx.reached.wait(), timeout)
            pipe.send(("reached", rx.deliveries, time.monotonic()))
        elif cmd[0] == "report":
            lost_tasks = sum(t.done() for t in tasks)
            pipe.send(
                {
                    "deliveries": rx.deliveries,
                    "index": rx.index.tobytes(),
                    "latency_ms": rx.latency_ms.tobytes(),
                    "duplicates": rx.duplicates,
                    "out_of_order": rx.out_of_order,
                    "presence": rx.presence,
                    "other": rx.other,
                    "errors": rx.errors[:5],
                    "closes": rx.closes[:5],
                    "n_closes": len(rx.closes),
                    "ended_connections": lost_tasks,
                }
            )
            return  # the process exits; the OS closes the sockets


def _receiver(bc: Broadcast, names: list[str], pipe: Connection) -> None:
    raise_nofile(len(names) + 256)
    run_fast(_receiver_main(bc, names, pipe))


class Publisher:
    """The publishing member: sends ``text`` requests, counts their answers."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.answers = 0
        self.errors: list[str] = []
        self.joined = asyncio.Event()
        self.frames = 0
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = orjson.loads(raw)
                self.frames += 1
                reply_to = msg.get("replyTo")
                if reply_to == "pub-join":
                    self.joined.set()
                elif reply_to is not None:
                    self.answers += 1
                if msg.get("type") == "error":
                    self.errors.append(str(msg.get("content"))[:200])
        except ConnectionClosed:
            pass

    async def publish(self, room: str, n: int) -> None:
        text = f"{n} {time.monotonic():.6f}"
        request = {"id": f"pub-{n}", "type": "text", "content": {"text": text, "room": room}}
        await self.ws.send(orjson.dumps(request), text=True)


async def _paced(pub: Publisher, room: str, first: int, count: int, rate: float) -> float:
    """Publish messages ``first .. first+count-1`` at ``rate``; return the send duration."""
    began = time.monotonic()
    for k in range(count):
        delay = began + k / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await pub.publish(room, first + k)
    return time.monotonic() - began


async def _ask_all(pipes: list[Connection], cmd: tuple[Any, ...]) -> list[Any]:
    for pipe in pipes:
        pipe.send(cmd)
    return [await asyncio.to_thread(pipe.recv) for pipe in pipes]


async def _run(bc: Broadcast) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    pipes: list[Connection] = []
    workers = []
    for p in range(bc.procs):
        ours, theirs = ctx.Pipe()
        names = [f"m{i}" for i in range(p, bc.members, bc.procs)]
        proc = ctx.Process(target=_receiver, args=(bc, names, theirs), daemon=True)
        proc.start()
        pipes.append(ours)
        workers.append(proc)
    began = time.monotonic()
    ready = [await asyncio.to_thread(pipe.recv) for pipe in pipes]
    members = sum(r[1] for r in ready)
    setup_failed = sum(r[2] for r in ready)
    setup_failures = [f for r in ready for f in r[3]]
    gen_pids = [w.pid for w in workers if w.pid is not None]

    ws = await connect(
        bc.url, subprotocols=[SUBPROTOCOL], compression=None, ping_interval=None, max_size=None
    )
    pub = Publisher(ws)
    join = {"id": "pub-join", "type": "join", "content": {"room": bc.room}}
    await ws.send(orjson.dumps(join), text=True)
    await asyncio.wait_for(pub.joined.wait(), 60)
    setup_s = time.monotonic() - began

    # Warm-up: delivered and waited for, not measured.
    await _paced(pub, bc.room, 0, bc.warmup, bc.rate)
    per_proc = [len(range(p, bc.members, bc.procs)) for p in range(bc.procs)]
    for pipe, n in zip(pipes, per_proc, strict=True):
        pipe.send(("wait", n * bc.warmup, 30.0))
    for pipe in pipes:
        await asyncio.to_thread(pipe.recv)
    srv0, gen0, t0 = cpu_us(process_tree(bc.server_pid)), cpu_us(gen_pids), time.monotonic()
    send_s = await _paced(pub, bc.room, bc.warmup, bc.messages, bc.rate)
    total = bc.warmup + bc.messages
    for pipe, n in zip(pipes, per_proc, strict=True):
        pipe.send(("wait", n * total, bc.drain))
    reached = [await asyncio.to_thread(pipe.recv) for pipe in pipes]
    srv1, gen1 = cpu_us(process_tree(bc.server_pid)), cpu_us(gen_pids)
    window = max(r[2] for r in reached) - t0
    reports = await _ask_all(pipes, ("report",))
    for proc in workers:
        proc.join(10)
    pub.reader.cancel()
    await ws.close()

    index, latency = array("i"), array("d")
    for r in reports:
        index.frombytes(r["index"])
        latency.frombytes(r["latency_ms"])
    deliveries = len(latency)
    expected = members * bc.messages
    by_message: dict[int, float] = {}
    for i, lat in zip(index, latency, strict=True):
        if lat > by_message.get(i, -1.0):
            by_message[i] = lat
    lat_sorted = sorted(latency)
    last_sorted = sorted(by_message.values())
    return asdict(bc) | {
        "members_joined": members,
        "setup_failed": setup_failed,
        "setup_failures": setup_failures,
        "setup_s": setup_s,
        "send_s": send_s,
        "window_s": window,
        "deliveries": deliveries,
        "expected": expected,
        "lost": expected - deliveries,
        "duplicates": sum(r["duplicates"] for r in reports),
        "out_of_order": sum(r["out_of_order"] for r in reports),
        "presence_frames": sum(r["presence"] for r in reports),
        "other_frames": sum(r["other"] for r in reports),
        "client_errors": [e for r in reports for e in r["errors"]][:5] + pub.errors[:5],
        "closes": sum(r["n_closes"] for r in reports),
        "close_samples": [c for r in reports for c in r["closes"]][:5],
        "publisher_answers": pub.answers,
        "delivery_p50_ms": percentile(lat_sorted, 0.50),
        "delivery_p99_ms": percentile(lat_sorted, 0.99),
        "delivery_max_ms": lat_sorted[-1] if lat_sorted else None,
        "last_member_p50_ms": percentile(last_sorted, 0.50),
        "last_member_p99_ms": percentile(last_sorted, 0.99),
        "last_member_max_ms": last_sorted[-1] if last_sorted else None,
        "last_member_mean_ms": statistics.fmean(last_sorted) if last_sorted else None,
        "server_cpu_us_per_delivery": (srv1 - srv0) / deliveries if deliveries else None,
        "server_cpu_pct": 100 * (srv1 - srv0) / (window * 1e6) if window > 0 else None,
        "receivers_cpu_pct": 100 * (gen1 - gen0) / (window * 1e6) if window > 0 else None,
    }


def run_broadcast(bc: Broadcast) -> dict[str, Any]:
    """Run one broadcast measurement (publisher on uvloop when available)."""
    raise_nofile(bc.members + 1024)
    return run_fast(_run(bc))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--rate", type=float, default=10.0, help="published messages per second")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured messages first")
    parser.add_argument("--procs", type=int, default=2, help="receiver processes")
    parser.add_argument("--drain", type=float, default=10.0)
    parser.add_argument("--room", default="bench")
    parser.add_argument("--label", default="")
    parser.add_argument("--json", dest="json_out", help="also write the result to this file")
    args = vars(parser.parse_args())
    json_out = args.pop("json_out")
    text = json.dumps(run_broadcast(Broadcast(**args)), indent=2)
    print(text)
    if json_out:
        with open(json_out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
