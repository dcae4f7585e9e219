"""Server instructions per message, counted by valgrind: a figure the machine's load cannot move.

On this shared 2-vCPU machine, CPU time per message drifts with whatever else runs;
instructions executed do not (``valgrind --tool=callgrind`` counts them, user space of the
server process: Python, uvloop, orjson, websockets; the kernel's syscall work is not
counted, and both servers make the same syscalls per message). Each server runs under
callgrind twice, answering 10 clients x N1 and then 10 clients x N2 ``text`` requests
(closed loop); the difference divided by the extra messages is its cost per message,
start-up and connection set-up cancelled out. Servers, as in ``default_config.py``:

* ``peer``: the plain ``websockets`` JSON echo (peer_echo.py) on uvloop;
* ``ours-default``: ``backchannel serve`` with no config (the default plugins, rooms
  included: what ``uv run backchannel serve`` starts);
* ``ours-standard``: the same with ``init, text, ping, system, validation``.

    uv run python benchmarks/instructions.py            # N1=200, N2=1200 (~8 minutes)
    uv run python benchmarks/instructions.py --n1 100 --n2 600
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.client import connect

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLIENTS = 10
SERVERS = {
    "peer": ("{python} benchmarks/peer_echo.py --host 127.0.0.1 --port {port} --uvloop", {}),
    "ours-default": ("{python} -m backchannel.cli serve --host 127.0.0.1 --port {port}", {}),
    "ours-standard": (
        "{python} -m backchannel.cli serve --host 127.0.0.1 --port {port}",
        {"BACKCHANNEL_PLUGINS__ENABLED": '["init","text","ping","system","validation"]'},
    ),
}


async def _client(url: str, n: int, cid: int) -> None:
    async with connect(url, subprotocols=["backchannel.v1"], max_size=None) as ws:  # type: ignore[list-item]
        for i in range(n):
            ident = f"{cid}-{i}"
            request = {"id": ident, "type": "text", "content": {"text": "hello"}}
            await ws.send(orjson.dumps(request).decode())
            while orjson.loads(await ws.recv()).get("replyTo") != ident:
                pass


async def drive(port: int, n: int) -> None:
    """``CLIENTS`` clients, ``n`` requests each, one at a time, every answer awaited."""
    url = f"ws://127.0.0.1:{port}/ws"
    await asyncio.gather(*(_client(url, n, c) for c in range(CLIENTS)))


def count(template: str, env: dict[str, str], n: int) -> int:
    """Instructions the server executed, from start to SIGTERM, answering ``CLIENTS * n``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = shlex.split(template.format(python=sys.executable, port=port))
    base = {k: v for k, v in os.environ.items() if not k.startswith("BACKCHANNEL_")}
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
        cwd=REPO,
        env=base | {"BACKCHANNEL_LOG__LEVEL": "WARNING"} | env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    began = time.monotonic()
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() - began > 300:
                tail = proc.stderr.read()[-2000:] if proc.stderr else ""
                raise SystemExit(f"server did not listen: {tail}") from None
            time.sleep(0.2)
    asyncio.run(drive(port, n))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    found = re.search(r"Collected : (\d+)", err)
    if found is None:
        raise SystemExit(f"no instruction count from callgrind:\n{err[-2000:]}")
    return int(found[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n1", type=int, default=200)
    parser.add_argument("--n2", type=int, default=1200)
    args = parser.parse_args()
    counts: dict[str, dict[int, int]] = {}
    for name, (template, env) in SERVERS.items():
        counts[name] = {n: count(template, env, n) for n in (args.n1, args.n2)}
        print(f"{name}: {counts[name]}", file=sys.stderr)
    extra = CLIENTS * (args.n2 - args.n1)
    per: dict[str, float] = {name: (c[args.n2] - c[args.n1]) / extra for name, c in counts.items()}
    summary: dict[str, Any] = {
        name: {"instructions_per_message": round(v), "vs_peer": round(v / per["peer"], 3)}
        for name, v in per.items()
    }
    result = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": vars(args) | {"clients": CLIENTS},
        "counts": counts,
        "summary": summary,
    }
    (HERE / "results" / "latest-instructions.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
