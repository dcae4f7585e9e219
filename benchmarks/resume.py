"""Resume of a member that missed N room messages, against receiving the same N live (ours only).

Per repetition, in a fresh room (one process, the ``websockets`` client, uvloop when installed):

1. member A connects, ``init {}`` (session id, epoch), ``join {room}`` (at offset 0); publisher
   B connects and joins (A gets B's ``presence`` join); A notes the highest ``seq`` it has seen
   and closes;
2. once B has A's ``presence`` leave (the server saw the close), B publishes ``--frames``
   ``text {text, room}`` as fast as it can (``--window`` requests in flight) and waits for every
   answer: the room's history now holds N messages A has not seen (none is in A's outbox:
   room messages ride the room's stream, issue 13);
3. **resume**: A connects again, sends ``init {sessionId, lastSeq, epoch}`` (answered
   ``resumed: true``, ``rooms: [room]``) and then ``join {room, since: {offset: 0, epoch}}``,
   as the shipped clients do; timed from just before the init to when A had the join's answer
   and the N replayed room frames. Checked: ``resumed: true``, the join's ``missed: N``, N
   room frames replayed, offsets consecutive;
4. **live**: A (resumed, joined again) stays connected while B publishes N more as fast as it
   can; timed from the first room frame's arrival at A to the last's (as the issue defines it),
   also from B's first send to A's last arrival.

    python benchmarks/resume.py --url ws://127.0.0.1:8765/ws [--frames 1000] [--reps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson
from loadgen import SUBPROTOCOL
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

__all__ = ["run_resume"]

STEP_TIMEOUT = 60.0  # seconds any one step may take before the run fails


class Client:
    """One connection: a reader task that keeps every frame with its arrival time."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[tuple[float, dict[str, Any]]] = []
        self.changed = asyncio.Event()
        self.reader = asyncio.create_task(self._read())
        self.n = 0

    @classmethod
    async def open(cls, url: str) -> Client:
        ws = await connect(
            url, subprotocols=[SUBPROTOCOL], compression=None, ping_interval=None, max_size=None
        )
        return cls(ws)

    async def _read(self) -> None:
        try:
            while True:
                raw = await self.ws.recv(decode=False)
                self.frames.append((time.monotonic(), orjson.loads(raw)))
                self.changed.set()
        except ConnectionClosed:
            self.changed.set()

    async def send(self, type_: str, content: dict[str, Any], rid: str | None = None) -> str:
        self.n += 1
        rid = rid or f"r{self.n}"
        await self.ws.send(orjson.dumps({"id": rid, "type": type_, "content": content}), text=True)
        return rid

    async def wait_for(
        self, test: Callable[[dict[str, Any]], bool], start: int = 0
    ) -> tuple[float, dict[str, Any]]:
        """The first frame from index ``start`` on that passes ``test`` (bounded wait)."""
        async with asyncio.timeout(STEP_TIMEOUT):
            i = start
            while True:
                while i < len(self.frames):
                    if test(self.frames[i][1]):
                        return self.frames[i]
                    i += 1
                if self.reader.done():
                    raise RuntimeError(f"connection closed: {self.ws.close_code}")
                self.changed.clear()
                await self.changed.wait()

    async def request(self, type_: str, content: dict[str, Any]) -> dict[str, Any]:
        start = len(self.frames)
        rid = await self.send(type_, content)
        _, frame = await self.wait_for(lambda f: f.get("replyTo") == rid, start)
        if frame["type"] == "error":
            raise RuntimeError(f"{type_}: {frame['content']}")
        return frame

    async def close(self) -> None:
        await self.ws.close()
        await self.reader


async def publish_burst(b: Client, room: str, n: int, window: int, tag: str) -> dict[str, Any]:
    """Publish ``n`` texts to ``room`` with ``window`` in flight; wait for every answer."""
    seen = len(b.frames)
    began = time.monotonic()
    sent = answered = errors = 0
    first_error = None
    async with asyncio.timeout(STEP_TIMEOUT):
        while answered < n:
            while sent < n and sent - answered < window:
                await b.send("text", {"text": f"{tag}-{sent}", "room": room}, f"{tag}-{sent}")
                sent += 1
            b.changed.clear()
            while seen < len(b.frames):
                frame = b.frames[seen][1]
                seen += 1
                if str(frame.get("replyTo", "")).startswith(f"{tag}-"):
                    answered += 1
                    if frame["type"] == "error":
                        errors += 1
                        first_error = first_error or frame["content"]
            if answered < n:
                if b.reader.done():
                    raise RuntimeError(f"publisher closed: {b.ws.close_code}")
                await b.changed.wait()
    return {"began": began, "s": time.monotonic() - began, "errors": errors, "error": first_error}


def room_frames(frames: list[tuple[float, dict[str, Any]]], room: str) -> list[Any]:
    """The room messages (room frames of type ``text``) of ``room`` among ``frames``."""
    return [(t, f) for t, f in frames if f["type"] == "text" and f.get("room") == room]


async def one_rep(url: str, rep: int, n: int, window: int) -> dict[str, Any]:
    """One resume measurement and one live measurement; see the module docstring."""
    room = f"resume-{os.getpid()}-{rep}"
    a = await Client.open(url)
    init = (await a.request("init", {}))["content"]
    session_id, epoch, me = init["sessionId"], init["epoch"], init.get("principal")
    await a.request("join", {"room": room})
    b = await Client.open(url)
    await b.request("join", {"room": room})
    await a.wait_for(lambda f: f["type"] == "presence" and f["content"].get("event") == "join")
    last_seq = max(f["seq"] for _, f in a.frames if "seq" in f)  # room frames have none
    await a.close()
    await b.wait_for(
        lambda f: (
            f["type"] == "presence"
            and f["content"].get("event") == "leave"
            and (me is None or f["content"].get("member") == me)
        )
    )
    missed_pub = await publish_burst(b, room, n, window, f"m{rep}")

    # Resume: from sending init to having the join's answer and the replayed frames.
    a2 = await Client.open(url)
    content = {"sessionId": session_id, "lastSeq": last_seq, "epoch": epoch}
    began = time.monotonic()
    rid = await a2.send("init", content, "resume")
    _, answer = await a2.wait_for(lambda f: f.get("replyTo") == rid)
    since = {"offset": 0, "epoch": epoch}
    jid = await a2.send("join", {"room": room, "since": since}, "rejoin")
    joined_at, joined = await a2.wait_for(lambda f: f.get("replyTo") == jid)
    async with asyncio.timeout(STEP_TIMEOUT):
        while len(room_frames(a2.frames, room)) < n and not a2.reader.done():
            a2.changed.clear()
            await a2.changed.wait()
    replayed = room_frames(a2.frames, room)
    resume_s = max(joined_at, replayed[-1][0] if replayed else 0.0) - began
    at = len(a2.frames)
    offsets = [f["offset"] for _, f in replayed]
    consecutive = bool(offsets) and offsets == list(range(offsets[0], offsets[0] + len(offsets)))

    # Live: the same number of frames while A is connected.
    start = len(a2.frames)
    live_pub = await publish_burst(b, room, n, window, f"l{rep}")
    async with asyncio.timeout(STEP_TIMEOUT):
        while len(room_frames(a2.frames[start:], room)) < n and not a2.reader.done():
            a2.changed.clear()
            await a2.changed.wait()
    live = room_frames(a2.frames[start:], room)
    live_s = live[-1][0] - live[0][0] if len(live) > 1 else None
    live_total_s = live[-1][0] - live_pub["began"] if live else None
    live_offsets = [f["offset"] for _, f in live]
    await a2.close()
    await b.close()
    return {
        "room": room,
        "last_seq": last_seq,
        "resumed": answer["content"].get("resumed"),
        "reason": answer["content"].get("reason"),
        "rooms": answer["content"].get("rooms"),
        "missed": joined["content"].get("missed"),
        "replayed": len(replayed),
        "replayed_consecutive": consecutive,
        "frames_before_answer": at,
        "resume_s": resume_s,
        "publish_missed_s": missed_pub["s"],
        "publish_errors": missed_pub["errors"] + live_pub["errors"],
        "publish_error": missed_pub["error"] or live_pub["error"],
        "live_frames": len(live),
        "live_consecutive": live_offsets == list(range(offsets[-1] + 1, offsets[-1] + 1 + n))
        if offsets
        else None,
        "live_first_to_last_s": live_s,
        "live_publish_to_last_s": live_total_s,
        "publish_live_s": live_pub["s"],
    }


async def _run(url: str, n: int, reps: int, window: int) -> dict[str, Any]:
    runs = [await one_rep(url, rep, n, window) for rep in range(reps)]

    def med(key: str) -> float | None:
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.median(values) if values else None

    resume, live = med("resume_s"), med("live_first_to_last_s")
    return {
        "url": url,
        "frames": n,
        "reps": reps,
        "window": window,
        "runs": runs,
        "resume_ms_median": resume * 1000 if resume is not None else None,
        "live_first_to_last_ms_median": live * 1000 if live is not None else None,
        "live_publish_to_last_ms_median": (med("live_publish_to_last_s") or 0) * 1000,
        "ratio": resume / live if resume is not None and live else None,
        "all_resumed": all(r["resumed"] and r["missed"] == n and r["replayed"] == n for r in runs),
        "all_live": all(r["live_frames"] == n and r["live_consecutive"] for r in runs),
    }


def run_resume(url: str, frames: int = 1000, reps: int = 5, window: int = 100) -> dict[str, Any]:
    """Run ``reps`` resume + live measurements (on uvloop when available)."""
    try:
        import uvloop

        return uvloop.run(_run(url, frames, reps, window))
    except ImportError:
        return asyncio.run(_run(url, frames, reps, window))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--frames", type=int, default=1000, help="frames missed / sent live")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--window", type=int, default=100, help="publishes in flight")
    parser.add_argument("--json", dest="json_out", help="also write the result to this file")
    args = parser.parse_args()
    text = json.dumps(run_resume(args.url, args.frames, args.reps, args.window), indent=2)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
