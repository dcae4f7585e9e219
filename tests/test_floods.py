"""Bounded per-client cost (issue 11, the gate): floods against a real ``backchannel serve``.

For each flood kind of ``benchmarks/floods.py`` and each backend, 10 connections flood the
server for 2 s (without reading, or, for refused requests, reading every answer), while a
well-behaved client keeps sending ``ping`` requests. Asserted: the server's VmRSS
(``/proc/<pid>/status``) grows by less than :data:`KIB_PER_ATTACKER` per attacking
connection, the well-behaved client's p99 round trip stays under :data:`P99_MS`, and the
server logged no traceback. (How each kind of attacker is closed is asserted in
tests/test_edges.py and tests/test_server.py.) docs/security.md gives the figures these
bounds leave room for.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from floods import KINDS, SETTINGS, flood, serve

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

ATTACKERS = 10
SECONDS = 2.0
#: RSS growth allowed per attacking connection, KiB (measured: docs/security.md)
KIB_PER_ATTACKER = 512
#: the well-behaved client's p99 round trip during a flood, ms
P99_MS = 500.0


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_flooding_client_costs_a_bounded_amount(backend: str, kind: str) -> None:
    with serve(backend, SETTINGS.get(kind)) as server:
        result = anyio.run(flood, server, kind, ATTACKERS, SECONDS)
        assert result.per_attacker_kib < KIB_PER_ATTACKER, result
        assert result.round_trips >= 20 and result.p99_ms < P99_MS, result
        assert not server.tracebacks(), server.log.read_text()
