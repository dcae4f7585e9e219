"""Bounded per-client cost of two floods (issue 11, the gate): invalid requests and
unauthenticated requests, against ``backchannel serve --config backchannel.production.toml``
with the abuse rule off (``plugins.ratelimit.abuse_rejections = false``: the worst case,
every attacking connection stays and is answered in full) and the rate limits off.

Measured from outside, as an operator would: the server process's RSS (``VmRSS`` of
``/proc/<pid>/status``, sampled every 20 ms) from before the attackers connect to its peak
during the flood, divided by the attacking connections; and the request latency of a
well-behaved client (``ping``, one at a time) while the flood runs. The attackers run in
their own process (tests/flooder.py). Print the figures with ``-s``; docs/security.md
quotes them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import anyio
import pytest

from conftest import ORIGIN, ROOT, production, token_for, tracebacks, ws_connect

pytestmark = pytest.mark.anyio

ATTACKERS = 20
REQUESTS = 3000
#: the bounds docs/security.md states. Per attacking connection, most of it is answers it
#: has not read yet: the transport's write buffer (64 KiB before it pauses), then up to
#: ``connection.send_queue_size`` (1,024) frames before the slow-consumer close (1013);
#: then the connection itself (~13 KiB idle) and, with a token, its session (at most
#: ``session.outbox_max_bytes`` + ~1.5 KiB)
KIB_PER_ATTACKER = 512
P99_MS = 500.0
#: the abuse rule off: every attacker is answered in full; and the rate limits, which these
#: refusals come before anyway, off too, so the well-behaved client may ping at full speed
#: (every client here shares 127.0.0.1, the IP bucket's key)
NO_LIMITS = {
    "BACKCHANNEL_PLUGINS__RATELIMIT__ABUSE_REJECTIONS": "false",
    "BACKCHANNEL_PLUGINS__RATELIMIT__CONNECTION": "false",
    "BACKCHANNEL_PLUGINS__RATELIMIT__PRINCIPAL": "false",
    "BACKCHANNEL_PLUGINS__RATELIMIT__IP": "false",
}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def attack(
    port: int, pid: int, kind: str, token: str | None, honest_token: str
) -> tuple[dict[str, Any], int, int, list[float]]:
    """Run the flood (``token``: the attackers'); return its summary, the RSS before and
    at its peak (KiB), and the well-behaved client's latencies (ms) meanwhile."""
    cmd = [sys.executable, str(ROOT / "tests" / "flooder.py"), "--port", str(port)]
    cmd += ["--kind", kind, "--origin", ORIGIN]
    cmd += ["--connections", str(ATTACKERS), "--requests", str(REQUESTS)]
    cmd += ["--token", token] if token else []
    headers = {"Authorization": f"Bearer {honest_token}"}
    latencies: list[float] = []
    async with ws_connect(port, origin=ORIGIN, additional_headers=headers) as honest:
        for _ in range(50):  # warm up: the well-behaved client's own cost is not the flood's
            await honest.request("ping", {})
        before = peak = rss_kib(pid)
        done = anyio.Event()
        output: list[bytes] = []

        async def flood() -> None:
            with anyio.fail_after(120):
                result = await anyio.run_process(cmd, env=dict(os.environ))
            output.append(result.stdout)
            done.set()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_kib(pid))
                await anyio.sleep(0.02)

        async def behave() -> None:
            while not done.is_set():
                began = time.perf_counter()
                answer = await honest.request("ping", {}, timeout=10)
                latencies.append((time.perf_counter() - began) * 1000)
                assert answer["type"] == "pong", answer

        async with anyio.create_task_group() as tg:
            tg.start_soon(flood)
            tg.start_soon(sample)
            tg.start_soon(behave)
    return json.loads(output[0]), before, peak, latencies


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@pytest.mark.parametrize("kind", ["invalid", "unauthenticated"])
async def test_a_flood_costs_a_bounded_amount_per_attacker_and_others_are_served(
    anyio_backend: str, kind: str
) -> None:
    """20 connections send 3,000 refused requests each as fast as they can (60,000 in all):
    schema-invalid ``text`` with a token, or any request without one. The server grows by
    less than ``KIB_PER_ATTACKER`` per attacking connection, and a well-behaved client's p99
    stays under ``P99_MS``: every attacker's refusals cost it an answer each, nothing kept
    beyond the session budget (invalid) or nothing at all (unauthenticated)."""
    async with production(anyio_backend, **NO_LIMITS) as (served, secret):
        attacker = token_for(secret, "mallory") if kind == "invalid" else None
        result, before, peak, latencies = await attack(
            served.port, served.process.pid, kind, attacker, token_for(secret, "honest")
        )
        code = "validation_failed" if kind == "invalid" else "unauthorized"
        assert result["answers"] == {code: ATTACKERS * REQUESTS}, result
        per_attacker = (peak - before) / ATTACKERS
        print(
            f"\n{kind} flood ({anyio_backend}): {ATTACKERS} x {REQUESTS} refused requests; "
            f"server RSS {before / 1024:.1f} -> peak {peak / 1024:.1f} MiB "
            f"({per_attacker:.0f} KiB per attacking connection); well-behaved client: "
            f"{len(latencies)} pings, p50 {sorted(latencies)[len(latencies) // 2]:.1f} ms, "
            f"p99 {p99(latencies):.1f} ms"
        )
        assert per_attacker < KIB_PER_ATTACKER
        assert len(latencies) >= 20 and p99(latencies) < P99_MS
        assert tracebacks(served) == []
