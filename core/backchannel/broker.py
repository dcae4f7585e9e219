"""The broker seam (DESIGN §8): what one process shares with the others.

A broker carries room publish/subscribe with offsets and history, session
outboxes, presence and the idempotency cache. The ``broker`` hook returns one;
with none, the App runs on its own (one process). This module defines the
interface; implementations live with the features that use them (the embedded
in-memory broker, the ``redis`` plugin).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Broker"]


@runtime_checkable
class Broker(Protocol):
    """Lifecycle and readiness every broker shares; feature methods are added per feature."""

    #: short name for logs and metrics (``memory``, ``redis``).
    name: str

    async def start(self) -> None:
        """Connect; called once at App start-up."""

    async def stop(self) -> None:
        """Disconnect; called once at App shutdown."""

    @property
    def ready(self) -> bool:
        """Whether requests that need the broker can be served now (``/readyz``)."""
