"""Per-request cost of the tracing plugin: off, on with the no-op tracer, on with the SDK.

The measure of ``benchmarks/pipeline_micro.py`` (a recording transport, process CPU
time over N closed-loop ``text`` requests), reused as is. Each mode runs in its own
process, since the global tracer provider can be set only once.

    uv run python plugins/tracing/benchmarks/tracing_micro.py [N]
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

MODES = ("off", "noop", "sdk")


def _measure() -> Any:
    """``benchmarks/pipeline_micro.py``'s ``measure`` (not a package: loaded by path)."""
    path = Path(__file__).resolve().parents[3] / "benchmarks" / "pipeline_micro.py"
    spec = importlib.util.spec_from_file_location("pipeline_micro", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.measure


def run(mode: str, n: int) -> float:
    """µs of CPU per request in ``mode`` (best of three runs)."""
    if mode == "sdk":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        provider = TracerProvider()
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
    measure = _measure()
    plugins = ["text"] if mode == "off" else ["text", "tracing"]
    best = min(asyncio.run(measure(plugins, n)) for _ in range(3))
    if mode == "sdk":
        assert len(exporter.get_finished_spans()) == 3 * n
    return float(best)


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] in MODES:  # a child process: one mode
        print(f"{run(args[0], int(args[1])):.2f}")
        return
    n = int(args[0]) if args else 20_000
    results: dict[str, float] = {}
    for mode in MODES:
        out = subprocess.run(
            [sys.executable, __file__, mode, str(n)], capture_output=True, text=True, check=True
        )
        results[mode] = float(out.stdout.strip().splitlines()[-1])
        print(f"tracing {mode}: {results[mode]:.2f} µs/request")
    for mode in ("noop", "sdk"):
        print(f"  {mode} - off: {results[mode] - results['off']:+.2f} µs/request")


if __name__ == "__main__":
    main()
