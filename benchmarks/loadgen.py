"""Load generator for backchannel.v1 WebSocket echo servers.

Every client keeps ``--inflight`` requests outstanding (closed loop: a new request goes out as
soon as an answer comes back). Clients are spread over ``--procs`` worker processes. After all
clients are connected, traffic starts; the first ``--warmup`` seconds are not measured, then a
``--duration`` window is. Reported for the window:

* msgs/s: answers received in the window; latency p50/p99 (send -> answer) of those answers;
* errors: ``type == "error"`` answers, unanswered requests, and connection failures;
* deflate_negotiated: how many connections the server accepted permessage-deflate on;
* server CPU-µs per message: utime+stime of ``--server-pid`` and its descendants (so that a
  ``uv run`` wrapper or worker processes are covered) from /proc, window end minus start;
* the generator's own CPU (its worker processes), same method.

    python benchmarks/loadgen.py --url ws://127.0.0.1:8765/ --server-pid 1234
        [--clients 50] [--inflight 1] [--duration 10] [--warmup 2] [--procs 2] [--deflate]
        [--label NAME] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import time
from array import array
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

SUBPROTOCOL = Subprotocol("backchannel.v1")
TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")
DRAIN_S = 3.0  # after the window: how long to wait for outstanding answers


def _stat(pid: int) -> tuple[int, int]:
    """(ppid, utime+stime in clock ticks) of one process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def process_tree(root: int) -> list[int]:
    """``root`` and all its living descendants."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                parents[int(name)] = _stat(int(name))[0]
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree += frontier
    return tree


def cpu_us(pids: list[int]) -> float:
    """Return the user+system CPU time of ``pids`` in µs (vanished processes count 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += _stat(pid)[1]
    return total * TICK_US


@dataclass
class Tally:
    """What one worker process observed inside the measured window."""

    answers: int = 0
    errors: int = 0
    lost: int = 0
    deflate: int = 0  # connections whose handshake answer accepted permessage-deflate
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.samples) < 5:
            self.samples.append(what)


async def drive(
    ws: ClientConnection, name: str, inflight: int, window: tuple[float, float], tally: Tally
) -> None:
    """Keep ``inflight`` requests outstanding on one connection until the window closes."""
    t0, t1 = window
    sent: dict[str, float] = {}
    n = 0

    async def send_one() -> None:
        nonlocal n
        n += 1
        rid = f"{name}-{n}"
        sent[rid] = time.monotonic()
        await ws.send(f'{{"id":"{rid}","type":"text","content":{{"text":"hello"}}}}')

    for _ in range(inflight):
        await send_one()
    try:
        # One timeout for the whole loop: a per-recv wait_for would cost a task per message.
        async with asyncio.timeout(t1 + DRAIN_S - time.monotonic()):
            while sent:
                raw = await ws.recv(decode=False)
                now = time.monotonic()
                msg = orjson.loads(raw)
                started = sent.pop(msg.get("replyTo"), None)
                if started is None:
                    continue  # unsolicited frame (system, presence, ...)
                if t0 <= now < t1:
                    if msg.get("type") == "error":
                        tally.error(str(msg.get("content"))[:200])
                    else:
                        tally.answers += 1
                        tally.latencies_ms.append((now - started) * 1000)
                if now < t1:
                    await send_one()
    except TimeoutError:
        pass
    tally.lost += len(sent)  # never answered, even DRAIN_S after the window


@dataclass
class Scenario:
    """One load run: who to hit, how hard, for how long."""

    url: str
    server_pid: int
    clients: int = 50
    inflight: int = 1
    duration: float = 10.0
    warmup: float = 2.0
    procs: int = 2
    deflate: bool = False  # offer permessage-deflate, as browsers do
    label: str = ""


async def worker_main(sc: Scenario, names: list[str], pipe: Connection) -> None:
    """Connect all clients, report ready, receive the window, drive traffic, report the tally."""
    tally = Tally()
    compression = "deflate" if sc.deflate else None
    opened = await asyncio.gather(
        *(
            connect(
                sc.url,
                subprotocols=[SUBPROTOCOL],
                compression=compression,
                ping_interval=None,
                open_timeout=30,
            )
            for _ in names
        ),
        return_exceptions=True,
    )
    clients: list[tuple[ClientConnection, str]] = []
    for conn, name in zip(opened, names, strict=True):
        if isinstance(conn, ClientConnection):
            clients.append((conn, name))
            assert conn.response is not None
            extensions = conn.response.headers.get("Sec-WebSocket-Extensions", "")
            tally.deflate += "permessage-deflate" in extensions
        else:
            tally.error(f"connect: {conn!r}")
    pipe.send("ready")
    window: tuple[float, float] = pipe.recv()
    results = await asyncio.gather(
        *(drive(ws, name, sc.inflight, window, tally) for ws, name in clients),
        return_exceptions=True,
    )
    for res in results:
        if isinstance(res, BaseException):
            tally.error(f"connection: {res!r}")
    await asyncio.gather(*(ws.close() for ws, _ in clients), return_exceptions=True)
    tally.errors += tally.lost
    pipe.send(
        (
            tally.answers,
            tally.errors,
            tally.lost,
            tally.deflate,
            tally.latencies_ms.tobytes(),
            tally.samples,
        )
    )


T = TypeVar("T")


def run_fast(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when installed (every load generator's loop), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def join_all(
    names: list[str],
    start: Callable[[str, Callable[[str], None]], Coroutine[Any, Any, None]],
    batch: int,
    timeout: float,
) -> tuple[list[asyncio.Task[None]], list[str]]:
    """Start ``start(name, joined)`` for every name, ``batch`` at a time; each calls
    ``joined(name)`` once it is in the room. Waits until each joined or its task ended
    (at most ``timeout`` per batch). Returns the tasks and why the others are not in."""
    loop = asyncio.get_running_loop()
    waiting: dict[str, asyncio.Future[None]] = {}

    def joined(name: str) -> None:
        fut = waiting.pop(name, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def settled(fut: asyncio.Future[None], task: asyncio.Task[None]) -> None:
        await asyncio.wait([fut, task], timeout=timeout, return_when="FIRST_COMPLETED")

    tasks: list[asyncio.Task[None]] = []
    pairs: list[tuple[asyncio.Future[None], asyncio.Task[None]]] = []
    for i in range(0, len(names), batch):
        for name in names[i : i + batch]:
            waiting[name] = fut = loop.create_future()
            task = asyncio.create_task(start(name, joined))
            tasks.append(task)
            pairs.append((fut, task))
        await asyncio.gather(*(settled(f, t) for f, t in pairs[i:]))
    failures = []  # one entry per client not in the room: its task ended, or no join answer
    for fut, task in pairs:
        if task.done():
            exc = None if task.cancelled() else task.exception()
            failures.append(repr(exc)[:200] if exc else "connection ended")
        elif not fut.done():
            failures.append(f"not joined after {timeout:.0f} s")
    return tasks, failures


def _worker(sc: Scenario, names: list[str], pipe: Connection) -> None:
    run_fast(worker_main(sc, names, pipe))


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 when empty)."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def run_load(sc: Scenario) -> dict[str, Any]:
    """Run one scenario and return its settings and figures as a JSON-ready dict."""
    ctx = mp.get_context("fork")
    pipes, workers = [], []
    for p in range(sc.procs):
        ours, theirs = ctx.Pipe()
        names = [f"c{i}" for i in range(p, sc.clients, sc.procs)]
        proc = ctx.Process(target=_worker, args=(sc, names, theirs), daemon=True)
        proc.start()
        pipes.append(ours)
        workers.append(proc)
    for pipe in pipes:
        assert pipe.recv() == "ready"
    t0 = time.monotonic() + sc.warmup
    t1 = t0 + sc.duration
    for pipe in pipes:
        pipe.send((t0, t1))
    gen_pids = [w.pid for w in workers if w.pid is not None]

    time.sleep(max(0.0, t0 - time.monotonic()))
    srv0, gen0 = cpu_us(process_tree(sc.server_pid)), cpu_us(gen_pids)
    time.sleep(max(0.0, t1 - time.monotonic()))
    srv1, gen1 = cpu_us(process_tree(sc.server_pid)), cpu_us(gen_pids)

    answers = errors = lost = deflate = 0
    latencies = array("d")
    samples: list[str] = []
    for pipe, proc in zip(pipes, workers, strict=True):
        a, e, lo, d, lat, smp = pipe.recv()
        answers, errors, lost, deflate = answers + a, errors + e, lost + lo, deflate + d
        latencies.frombytes(lat)
        samples += smp
        proc.join()
    lat_sorted = sorted(latencies)
    return asdict(sc) | {
        "answers": answers,
        "msgs_per_s": answers / sc.duration,
        "p50_ms": percentile(lat_sorted, 0.50),
        "p99_ms": percentile(lat_sorted, 0.99),
        "errors": errors,
        "lost": lost,
        "deflate_negotiated": deflate,
        "error_samples": samples,
        "server_cpu_us_per_msg": (srv1 - srv0) / answers if answers else None,
        "server_cpu_pct": 100 * (srv1 - srv0) / (sc.duration * 1e6),
        "loadgen_cpu_us_per_msg": (gen1 - gen0) / answers if answers else None,
        "loadgen_cpu_pct": 100 * (gen1 - gen0) / (sc.duration * 1e6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--inflight", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--procs", type=int, default=2, help="generator worker processes")
    parser.add_argument("--deflate", action="store_true", help="offer permessage-deflate")
    parser.add_argument("--label", default="")
    parser.add_argument("--json", dest="json_out", help="also write the result to this file")
    args = vars(parser.parse_args())
    json_out = args.pop("json_out")
    text = json.dumps(run_load(Scenario(**args)), indent=2)
    print(text)
    if json_out:
        with open(json_out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
