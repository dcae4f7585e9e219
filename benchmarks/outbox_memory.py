"""Outbox and dedupe memory of many sessions with full outboxes.

Two ways, because filling 10,000 outboxes of 1,000 frames over sockets (10 million frames) is
far too slow on this machine:

* ``in-process``: an ``App`` with the given ``session.*`` limits (no server), ``--sessions``
  ``Session`` objects, each sent ``--frames`` room-message-shaped frames through
  ``Session.send`` (numbering, encoding and the ``MemoryBroker`` outbox exactly as a served
  session; no connection attached) and ``dedupe_size`` remembered answers (``log.remember``).
  Reported: the frame bytes the broker counts (``memory_bytes()``), the configured budget
  (sessions x ``outbox_max_bytes``), this process's RSS growth (everything the sessions really
  hold: frames with their object headers, deques, dedupe records, Session objects), and a check
  that every outbox sits at one of its bounds.
* ``sockets``: against a running server (started with the limits to test and a ``session.ttl``
  longer than the run), ``--sessions`` clients connect, send ``--requests`` ``text`` requests
  of ``--text-len`` characters, wait for every answer and close, ``--concurrency`` at a time in
  ``--procs`` processes. Every session stays detached with its outbox and dedupe records; the
  server's RSS growth (process tree, /proc) is reported once ``/healthz`` shows no connection
  left. RSS growth is an upper bound: it also holds what the allocator kept from the closed
  connections.

    python benchmarks/outbox_memory.py in-process [--sessions 10000] [--outbox-size 1000]
        [--outbox-max-bytes 1048576] [--dedupe-size 256] [--text-len 5] [--frames N]
    python benchmarks/outbox_memory.py sockets --url ws://127.0.0.1:8765/ws --server-pid PID
        [--sessions 10000] [--requests 16] [--text-len 1000] [--concurrency 100] [--procs 2]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import os
import time
import urllib.request
from multiprocessing.connection import Connection
from typing import Any

import orjson
from idle import raise_nofile, rss_kib
from loadgen import SUBPROTOCOL, run_fast
from websockets.asyncio.client import connect

__all__ = ["in_process", "over_sockets"]


def in_process(
    sessions: int = 10_000,
    outbox_size: int = 1000,
    outbox_max_bytes: int = 1 << 20,
    dedupe_size: int = 256,
    text_len: int = 5,
    frames: int | None = None,
) -> dict[str, Any]:
    """Fill ``sessions`` outboxes in this process; return bytes counted and RSS grown."""
    from backchannel import App, Session
    from backchannel.memory import MemoryBroker

    limits = {
        "outbox_size": outbox_size,
        "outbox_max_bytes": outbox_max_bytes,
        "dedupe_size": dedupe_size,
    }
    app = App({"session": limits, "log": {"level": "WARNING"}}, plugins=["init", "text"])
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    sent = frames if frames is not None else outbox_size + outbox_size // 10
    text = "x" * text_len
    gc.collect()
    before = rss_kib(os.getpid())
    began = time.perf_counter()
    kept: list[Session] = []
    for n in range(sessions):
        session = Session(app._hub, f"anonymous:{n:08x}")
        member = session.principal_id
        session.log = broker.open_session(session.id, member)
        for i in range(sent):
            content = {"room": "lobby", "offset": i + 1, "epoch": broker.epoch}
            session.send("text", content | {"from": member, "text": text})
        kept.append(session)
    gc.collect()
    outboxes = rss_kib(os.getpid())
    for session in kept:  # answered request ids, as safe retries keep them
        log = session.log
        for k in range(dedupe_size):
            log.remember(f"c-{k}", session.seq - k, k)
    fill_s = time.perf_counter() - began
    gc.collect()
    after = rss_kib(os.getpid())
    logs = list(broker.sessions.values())
    frame_bytes = broker.memory_bytes()
    # Full: at the frame bound, or one more frame of the same size would pass the byte bound.
    at_bound = sum(
        len(log.frames) == outbox_size or log.size + len(log.frames[-1]) > outbox_max_bytes
        for log in logs
    )
    sizes = [len(f) for f in logs[0].frames]
    return {
        "mode": "in-process",
        "sessions": sessions,
        "outbox_size": outbox_size,
        "outbox_max_bytes": outbox_max_bytes,
        "dedupe_size": dedupe_size,
        "text_len": text_len,
        "frames_sent_per_session": sent,
        "frame_bytes_each": sum(sizes) / len(sizes) if sizes else None,
        "frames_kept_per_session": sum(len(log.frames) for log in logs) / len(logs),
        "bytes_kept_per_session": frame_bytes / len(logs),
        "max_frames_kept": max(len(log.frames) for log in logs),
        "max_bytes_kept": max(log.size for log in logs),
        "dedupe_entries_per_session": sum(len(log.answers) for log in logs) / len(logs),
        "sessions_at_a_bound": at_bound,
        "frame_bytes_mb": frame_bytes / 1e6,
        "budget_mb": sessions * outbox_max_bytes / 1e6,
        "rss_outboxes_mb": (outboxes - before) * 1024 / 1e6,
        "rss_dedupe_mb": (after - outboxes) * 1024 / 1e6,
        "rss_growth_mb": (after - before) * 1024 / 1e6,
        "rss_per_session_kb": (after - before) * 1024 / sessions / 1e3,
        "fill_s": fill_s,
    }


async def _client_batch(url: str, ids: list[int], requests: int, text: str, conc: int) -> Any:
    """Run sessions ``ids``: connect, ``requests`` answered texts, close; ``conc`` at once."""
    gate = asyncio.Semaphore(conc)
    counts = {"sessions": 0, "answers": 0, "errors": 0, "answer_bytes": 0}
    samples: list[str] = []

    async def one(n: int) -> None:
        async with gate:
            try:
                async with connect(
                    url, subprotocols=[SUBPROTOCOL], compression=None, ping_interval=None
                ) as ws:
                    for k in range(requests):
                        req = {"id": f"s{n}-{k}", "type": "text", "content": {"text": text}}
                        await ws.send(orjson.dumps(req), text=True)
                    got = 0
                    while got < requests:
                        raw = await asyncio.wait_for(ws.recv(decode=False), 30)
                        frame = orjson.loads(raw)
                        if frame.get("replyTo"):
                            got += 1
                            counts["answer_bytes"] += len(raw)
                            if frame["type"] == "error":
                                counts["errors"] += 1
                                if len(samples) < 3:
                                    samples.append(str(frame["content"])[:200])
                    counts["answers"] += got
                counts["sessions"] += 1
            except Exception as exc:
                counts["errors"] += 1
                if len(samples) < 3:
                    samples.append(repr(exc)[:200])

    await asyncio.gather(*(one(n) for n in ids))
    return counts, samples


def _sockets_worker(args: tuple[Any, ...], pipe: Connection) -> None:
    pipe.send(run_fast(_client_batch(*args)))


def _connections(url: str) -> int | None:
    """Open connections according to the server's ``/healthz`` (None when unreachable)."""
    health = url.replace("ws://", "http://", 1).rsplit("/", 1)[0] + "/healthz"
    try:
        with urllib.request.urlopen(health, timeout=5) as resp:
            return int(json.loads(resp.read())["connections"])
    except (OSError, ValueError, KeyError):
        return None


def over_sockets(
    url: str,
    server_pid: int,
    sessions: int = 10_000,
    requests: int = 16,
    text_len: int = 1000,
    concurrency: int = 100,
    procs: int = 2,
    settle: float = 2.0,
) -> dict[str, Any]:
    """Leave ``sessions`` detached sessions on the server; return its RSS growth."""
    raise_nofile(concurrency + 256)
    before = rss_kib(server_pid)
    began = time.monotonic()
    ctx = mp.get_context("fork")
    pipes, workers = [], []
    text = "x" * text_len
    for p in range(procs):
        ours, theirs = ctx.Pipe()
        ids = list(range(p, sessions, procs))
        args = (url, ids, requests, text, max(1, concurrency // procs))
        proc = ctx.Process(target=_sockets_worker, args=(args, theirs), daemon=True)
        proc.start()
        pipes.append(ours)
        workers.append(proc)
    totals = {"sessions": 0, "answers": 0, "errors": 0, "answer_bytes": 0}
    samples: list[str] = []
    for pipe, proc in zip(pipes, workers, strict=True):
        counts, smp = pipe.recv()
        for key in totals:
            totals[key] += counts[key]
        samples += smp
        proc.join()
    run_s = time.monotonic() - began
    deadline = time.monotonic() + 60
    while (_connections(url) or 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(settle)
    after = rss_kib(server_pid)
    return {
        "mode": "sockets",
        "sessions": sessions,
        "requests_per_session": requests,
        "text_len": text_len,
        "answer_bytes_each": totals["answer_bytes"] / totals["answers"] if totals["answers"] else 0,
        **totals,
        "error_samples": samples,
        "connections_left": _connections(url),
        "run_s": run_s,
        "rss_before_mb": before * 1024 / 1e6,
        "rss_growth_mb": (after - before) * 1024 / 1e6,
        "rss_per_session_kb": (after - before) * 1024 / sessions / 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    inp = sub.add_parser("in-process", help="fill outboxes in this process (no server)")
    inp.add_argument("--sessions", type=int, default=10_000)
    inp.add_argument("--outbox-size", type=int, default=1000)
    inp.add_argument("--outbox-max-bytes", type=int, default=1 << 20)
    inp.add_argument("--dedupe-size", type=int, default=256)
    inp.add_argument("--text-len", type=int, default=5)
    inp.add_argument("--frames", type=int, help="frames sent per session (default: size + 10%%)")
    sock = sub.add_parser("sockets", help="leave detached sessions on a running server")
    sock.add_argument("--url", required=True)
    sock.add_argument("--server-pid", type=int, required=True)
    sock.add_argument("--sessions", type=int, default=10_000)
    sock.add_argument("--requests", type=int, default=16)
    sock.add_argument("--text-len", type=int, default=1000)
    sock.add_argument("--concurrency", type=int, default=100)
    sock.add_argument("--procs", type=int, default=2)
    args = vars(parser.parse_args())
    mode = args.pop("mode")
    result = in_process(**args) if mode == "in-process" else over_sockets(**args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
