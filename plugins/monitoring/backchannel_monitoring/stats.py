"""What the monitoring plugin counts on the hot path, and the figures of a sliding window.

The per-message cost is one wrapper around each type's handler (two clock reads, a
``bisect`` into the latency buckets, three integer/float updates), nothing else:
connection, frame and error totals are the kernel's own counters (``app.counters``),
read when someone looks. Latency is a histogram per type (Prometheus ``le``
buckets); the window's p99 interpolates inside a bucket as ``histogram_quantile``
does. Snapshots of the cumulative counters, one per evaluation tick, give every
windowed figure by subtraction.
"""

from __future__ import annotations

import inspect
import time
from bisect import bisect_left
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backchannel import Reply

if TYPE_CHECKING:
    from backchannel import App

__all__ = ["Figures", "Snapshot", "Stats", "TypeStats", "figures", "quantile"]

Handler = Callable[..., Any]
_now = time.perf_counter
_isawaitable = inspect.isawaitable
_isasyncgen = inspect.isasyncgen


class TypeStats:
    """Cumulative latency histogram and successful answers of one message type."""

    __slots__ = ("name", "counts", "sum", "ok")

    def __init__(self, name: str, buckets: int) -> None:
        self.name = name
        #: counts[i]: handler runs that took at most bounds[i] (and more than bounds[i-1]);
        #: the last one is the +Inf bucket
        self.counts = [0] * (buckets + 1)
        self.sum = 0.0
        #: requests answered with a reply or an ack (errors are counted by code)
        self.ok = 0


def _valid(result: Any) -> bool:
    """Whether the kernel will turn ``result`` into a reply or an ack (not handler_error)."""
    return (
        result is None
        or result.__class__ is dict
        or (isinstance(result, Reply) and result.content.__class__ is dict)
    )


def _record(ts: TypeStats, bounds: Sequence[float], elapsed: float, ok: bool) -> None:
    ts.counts[bisect_left(bounds, elapsed)] += 1
    ts.sum += elapsed
    if ok:
        ts.ok += 1


class _Timed:
    """An awaitable handler result, timed until it completes.

    Not a coroutine wrapper: if the kernel drops it unstarted (a request cancelled
    before it ran), ``__del__`` closes the handler's own coroutine, so no
    "never awaited" warning.
    """

    __slots__ = ("_inner", "_start", "_ts", "_bounds", "_started")

    def __init__(self, inner: Any, start: float, ts: TypeStats, bounds: Sequence[float]) -> None:
        self._inner = inner
        self._start = start
        self._ts = ts
        self._bounds = bounds
        self._started = False

    def __await__(self) -> Generator[Any, None, Any]:
        self._started = True
        try:
            result = yield from self._inner.__await__()
        except BaseException:
            _record(self._ts, self._bounds, _now() - self._start, False)
            raise
        _record(self._ts, self._bounds, _now() - self._start, _valid(result))
        return result

    def __del__(self) -> None:
        if not self._started:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()


async def _timed_stream(
    agen: Any, start: float, ts: TypeStats, stats: Stats
) -> AsyncGenerator[Any, None]:
    """A streaming handler, timed until its last chunk (the ``ack`` follows)."""
    ok = False
    try:
        async for item in agen:
            stats.chunks += 1
            yield item
        ok = True
    finally:
        _record(ts, stats.bounds, _now() - start, ok)
        await agen.aclose()


@dataclass(slots=True)
class Snapshot:
    """The cumulative counters at one moment (``t`` is ``time.monotonic()``)."""

    t: float
    wall: float
    received: int
    errors: int
    counts: list[int]
    latency_sum: float
    connections: int
    failures: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Figures:
    """What happened between two snapshots."""

    seconds: float
    received: int
    per_second: float
    handled: int
    average: float | None
    p99: float | None
    errors: int
    error_rate: float
    errors_per_second: float


class Stats:
    """The plugin's own counters for one App (the kernel's live in ``app.counters``)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds: tuple[float, ...] = tuple(sorted(set(bounds)))
        self.types: dict[str, TypeStats] = {}
        #: error frames by (request type or "unknown", code)
        self.errors: dict[tuple[str, str], int] = {}
        #: chunk frames of streaming handlers
        self.chunks = 0
        #: frames sent by (frame type, "delivered" | "queued"), when ``sent_by_type``
        self.sent: dict[tuple[str, str], int] = {}
        #: refused requests to this plugin's routes, by path
        self.unauthorized: dict[str, int] = {}

    def wrap(self, name: str, handler: Handler) -> Handler:
        """``handler`` timed until its terminal answer (sync, awaitable or streaming)."""
        ts = self.types.setdefault(name, TypeStats(name, len(self.bounds)))
        counts = ts.counts
        bounds = self.bounds
        now, bucket = _now, bisect_left  # closure cells: cheaper than global look-ups

        def timed(message: Any, connection: Any) -> Any:
            start = now()
            try:
                result = handler(message, connection)
            except BaseException:
                _record(ts, bounds, now() - start, False)
                raise
            if result is None or result.__class__ is dict:  # the common sync answer
                elapsed = now() - start
                counts[bucket(bounds, elapsed)] += 1
                ts.sum += elapsed
                ts.ok += 1
                return result
            if _isawaitable(result):
                return _Timed(result, start, ts, bounds)
            if _isasyncgen(result):
                return _timed_stream(result, start, ts, self)
            _record(ts, bounds, _now() - start, _valid(result))
            return result

        return timed

    def count_error(self, type: str, code: str) -> None:
        key = (type, code)
        self.errors[key] = self.errors.get(key, 0) + 1

    def latency_counts(self) -> list[int]:
        """Histogram counts summed over every type."""
        total = [0] * (len(self.bounds) + 1)
        for ts in self.types.values():
            for i, n in enumerate(ts.counts):
                total[i] += n
        return total

    def snapshot(self, app: App) -> Snapshot:
        counters = app.counters
        failures: dict[str, int] = {}
        for (_, plugin), n in app.hook_failures().items():
            failures[plugin] = failures.get(plugin, 0) + n
        return Snapshot(
            t=time.monotonic(),
            wall=time.time(),
            received=counters.frames_received,
            errors=sum(counters.errors.values()),
            counts=self.latency_counts(),
            latency_sum=sum(ts.sum for ts in self.types.values()),
            connections=len(app.connections()),
            failures=failures,
        )


def quantile(q: float, counts: Sequence[int], bounds: Sequence[float]) -> float | None:
    """The ``q`` quantile of a histogram (per-bucket counts), as ``histogram_quantile``:
    linear inside the bucket; the highest finite bound when it falls in +Inf."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lower = bounds[i - 1] if i else 0.0
            return float(lower + (bounds[i] - lower) * (rank - seen) / n)
        seen += n
    return float(bounds[-1])


def figures(old: Snapshot, new: Snapshot, bounds: Sequence[float]) -> Figures:
    """Rates, average and p99 latency, error rate between ``old`` and ``new``."""
    seconds = max(new.t - old.t, 1e-9)
    received = new.received - old.received
    counts = [b - a for a, b in zip(old.counts, new.counts, strict=True)]
    handled = sum(counts)
    errors = new.errors - old.errors
    return Figures(
        seconds=seconds,
        received=received,
        per_second=received / seconds,
        handled=handled,
        average=(new.latency_sum - old.latency_sum) / handled if handled else None,
        p99=quantile(0.99, counts, bounds),
        errors=errors,
        error_rate=errors / received if received else 0.0,
        errors_per_second=errors / seconds,
    )
