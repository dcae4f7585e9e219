"""The kernel's counters of one App (``app.counters``), read by ``app.metrics()`` and plugins.

Plain integers and small dicts bumped where things happen; nothing here runs per message
but an addition. Labels are bounded: error codes, close codes, HTTP statuses, control ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Counters"]


def _bump(table: dict[str, int], key: str) -> None:
    table[key] = table.get(key, 0) + 1


@dataclass(slots=True)
class Counters:
    """Everything the kernel counts since the App started (read-only for plugins)."""

    #: connections accepted (after authenticate and connect)
    connections_total: int = 0
    #: most live connections at once
    connections_peak: int = 0
    #: client messages received (after admission)
    frames_received: int = 0
    #: frames sent to sessions (answers, chunks, notices)
    frames_sent: int = 0
    #: error answers, by code
    errors: dict[str, int] = field(default_factory=dict)
    #: closed connections, by close code
    closes: dict[int, int] = field(default_factory=dict)
    #: refused handshakes, by HTTP status ("403") or "timeout"
    rejected: dict[str, int] = field(default_factory=dict)
    #: control messages from other processes handled here, by op
    control: dict[str, int] = field(default_factory=dict)
    #: retries of a request attached or answered again
    retries: int = 0
    #: sessions resumed on this process
    resumes: int = 0

    def error(self, code: str) -> None:
        _bump(self.errors, code)

    def close(self, code: int) -> None:
        self.closes[code] = self.closes.get(code, 0) + 1

    def reject(self, reason: str) -> None:
        _bump(self.rejected, reason)

    def control_op(self, op: str) -> None:
        _bump(self.control, op)
