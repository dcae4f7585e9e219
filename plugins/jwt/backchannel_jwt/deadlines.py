"""Every connection's next token deadline in one heap, served by one task per App.

A task per connection (sleep until the deadline, wake on refresh, end on
disconnect) costs about 40 µs of CPU per connect on asyncio, a third of the
whole budget of an authenticated connect; a heap entry costs about 1 µs. Entries
are never removed: one that was superseded (a refresh moved the deadline) or
whose connection left is skipped when it comes up, and the heap is compacted
when such entries pile up.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio

__all__ = ["Deadlines"]

log = logging.getLogger("backchannel.jwt")
T = TypeVar("T")
_IDLE = 3600.0


class Deadlines(Generic[T]):
    """``at(when, key, item)``; :meth:`run` calls ``fire(when, key, item)`` once it is due.

    ``when`` is ``time.monotonic()``-based. ``alive(item)`` tells entries worth
    keeping when the heap is compacted.
    """

    def __init__(self, fire: Callable[[float, str, T], None], alive: Callable[[T], bool]) -> None:
        self._heap: list[tuple[float, int, str, T]] = []
        self._order = itertools.count()
        self._fire = fire
        self._alive = alive
        self._wake: anyio.Event | None = None
        self._until = math.inf
        self._dead = 0

    def __len__(self) -> int:
        return len(self._heap)

    def at(self, when: float, key: str, item: T) -> None:
        """Call ``fire`` for ``item`` at ``when`` (monotonic seconds)."""
        heapq.heappush(self._heap, (when, next(self._order), key, item))
        if when < self._until and self._wake is not None:
            self._wake.set()

    def dropped(self) -> None:
        """An item died (its connection left): compact once dead entries dominate."""
        self._dead += 1
        if self._dead > 1024 and self._dead * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if self._alive(entry[3])]
            heapq.heapify(self._heap)
            self._dead = 0

    async def run(self) -> None:
        """Forever: fire what is due, sleep until the next entry (or a nearer one is added)."""
        while True:
            now = time.monotonic()
            heap = self._heap
            while heap and heap[0][0] <= now:
                when, _, key, item = heapq.heappop(heap)
                try:
                    self._fire(when, key, item)
                except Exception:  # one connection's failure must not stop the others'
                    log.exception("jwt deadline failed for conn=%s", key)
            self._until = heap[0][0] if heap else math.inf
            self._wake = wake = anyio.Event()
            with anyio.move_on_after(min(self._until - now, _IDLE)):
                await wake.wait()
            self._wake = None
