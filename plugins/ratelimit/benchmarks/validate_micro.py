"""CPU the ratelimit plugin adds per message (target: at most 2 µs).

Two measurements, no sockets:

* ``hook``: the ``validate`` hook alone, called as the pipeline calls it, for an
  authenticated connection with all three buckets (connection, principal, IP)
  active and never empty; and the same when every call is rejected (the answer's
  exception included).
* ``error``: the ``error`` observer for a refused request (``validation_failed``)
  that counts toward the abuse rule (a budget that never runs out here).
* ``pipeline``: ``Connection.on_message`` to the answer written for a ``text``
  request (as ``benchmarks/pipeline_micro.py``), with and without the plugin,
  in alternating rounds; the difference of the medians is the added cost.

    uv run python plugins/ratelimit/benchmarks/validate_micro.py [N]
"""

from __future__ import annotations

import asyncio
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from backchannel_ratelimit import Plugin as RateLimit

from backchannel import App, BackchannelError, ErrorCode, Message, Principal, hookimpl
from backchannel.testing import serve_in_memory

__all__ = ["main"]

OPEN = {"rate": 1e12, "burst": 1_000_000_000}
NEVER_EMPTY = {"connection": OPEN, "principal": OPEN, "ip": OPEN, "abuse_rejections": None}
ALWAYS_EMPTY = {
    "connection": {"rate": 1e-9, "burst": 1},
    "principal": None,
    "ip": None,
    "abuse_rejections": None,
}


def _pipeline_micro() -> Any:
    """``benchmarks/pipeline_micro.py`` (not a package: loaded by path), for its recorder."""
    path = Path(__file__).resolve().parents[3] / "benchmarks" / "pipeline_micro.py"
    spec = importlib.util.spec_from_file_location("pipeline_micro", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_micro = _pipeline_micro()


class _Alice:
    """Every connection is principal ``alice`` (so the principal bucket applies)."""

    @hookimpl
    def authenticate(self, connection: Any) -> Principal:
        return Principal("alice")


async def hook_cost(config: dict[str, Any], n: int) -> float:
    """µs per ``validate`` call, as the pipeline calls it."""
    plugin = RateLimit()  # registered as "ratelimit" (its entry point), so its config applies
    app = App(
        {"log": {"level": "ERROR"}, "plugins": {"ratelimit": config}},
        plugins=["text", plugin, _Alice()],
    )
    async with serve_in_memory(app):
        conn, _ = await _micro.open_connection(app, 1, ("192.0.2.1", 40000))
        validate = plugin.validate
        message = Message("m1", "text", {"text": "hello"})
        started = time.process_time()
        for _ in range(n):
            try:  # noqa: SIM105 (contextlib.suppress would add its own cost to the figure)
                validate(message, conn)
            except BackchannelError:
                pass
        elapsed = time.process_time() - started
    stats = plugin.stats()  # the measured calls really took the path they claim
    if config is NEVER_EMPTY:
        assert stats["principal_buckets"] == stats["ip_buckets"] == 1, stats
        assert stats["rate_limited"] == 0, stats
    else:
        assert stats["rate_limited"] == n - 1, stats  # all but the burst of 1
    return elapsed / n * 1e6


async def error_hook_cost(n: int) -> float:
    """µs per ``error`` observer call for a refusal counted toward the abuse rule."""
    config = {**NEVER_EMPTY, "abuse_rejections": 1_000_000_000, "abuse_window": 1}
    plugin = RateLimit()
    app = App(
        {"log": {"level": "ERROR"}, "plugins": {"ratelimit": config}},
        plugins=["text", plugin, _Alice()],
    )
    async with serve_in_memory(app):
        conn, _ = await _micro.open_connection(app, 1, ("192.0.2.1", 40000))
        refused = BackchannelError(ErrorCode.VALIDATION_FAILED, "content.text: must be a string")
        observe = plugin.error
        started = time.process_time()
        for _ in range(n):
            observe(conn, "m1", refused)
        elapsed = time.process_time() - started
        assert plugin.stats()["abuse_closed"] == 0 and conn.close_code is None
    return elapsed / n * 1e6


async def pipeline_cost(plugins: list[Any], n: int) -> float:
    """µs of process CPU per ``text`` request, envelope to answer."""
    app = App(
        {"log": {"level": "ERROR"}, "plugins": {"ratelimit": NEVER_EMPTY}},
        plugins=plugins,
    )
    async with serve_in_memory(app):
        conn, recorder = await _micro.open_connection(app, n, ("192.0.2.1", 40000))
        result: float = await _micro.cpu_per_request(conn, recorder, n)
    return result


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    accept = min(asyncio.run(hook_cost(NEVER_EMPTY, n)) for _ in range(5))
    reject = min(asyncio.run(hook_cost(ALWAYS_EMPTY, n)) for _ in range(5))
    print(f"validate hook, 3 buckets, accepted: {accept:.3f} µs/message (best of 5)")
    print(f"validate hook, rejected (rate_limited raised): {reject:.3f} µs/message (best of 5)")
    counted = min(asyncio.run(error_hook_cost(n)) for _ in range(5))
    print(f"error hook, a refusal counted toward abuse: {counted:.3f} µs/refusal (best of 5)")
    base, with_rl = [], []
    for _ in range(7):
        base.append(asyncio.run(pipeline_cost(["text", _Alice()], n // 4)))
        with_rl.append(asyncio.run(pipeline_cost(["text", "ratelimit", _Alice()], n // 4)))
    b, r = statistics.median(base), statistics.median(with_rl)
    print(f"pipeline text: {b:.2f} µs without, {r:.2f} µs with ratelimit: +{r - b:.2f} µs")


if __name__ == "__main__":
    main()
