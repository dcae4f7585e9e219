"""The embedded in-memory broker: one process, bounded by config, nothing on disk.

Its ``epoch`` is made at start, so after a restart every ``since`` from before
is answered "not covered" instead of replaying a history that is gone.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from .broker import ControlListener, RoomListener

__all__ = ["MemoryBroker"]

log = logging.getLogger("backchannel.broker")
_monotonic = time.monotonic
_U32 = 0xFFFFFFFF


class _SessionLog:
    """Outbox (bounded by frames and bytes) and remembered answers of one session."""

    __slots__ = (
        "principal_id",
        "last_seq",
        "frames",
        "size",
        "max_frames",
        "max_bytes",
        "answers",
        "window",
        "max_answers",
        "order",
    )
    # frames[i] is frame number last_seq - len(frames) + 1 + i (seqs are consecutive)

    def __init__(
        self, principal_id: str, max_frames: int, max_bytes: int, window: float, max_answers: int
    ) -> None:
        self.principal_id = principal_id
        self.last_seq = 0
        self.frames: deque[bytes] = deque()
        self.size = 0
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        #: request id -> seconds (since start) answered << 64 | seq << 32 | digest (one
        #: int per entry: compact, and nothing for the garbage collector to scan)
        self.answers: dict[str, int] = {}
        self.window = window
        self.max_answers = max_answers
        self.order: deque[str] = deque()

    @property
    def log(self) -> _SessionLog:
        return self

    def append(self, seq: int, frame: bytes, deliver: Callable[[bytes], None] | None) -> None:
        self.keep(seq, frame)
        if deliver is not None:
            deliver(frame)

    def keep(self, seq: int, frame: bytes) -> None:
        frames = self.frames
        if seq != self.last_seq + 1:  # never happens through Session.send; keep seqs exact
            frames.clear()
            self.size = 0
        # Keep a right-sized copy: orjson's bytes hold a >= 4 KiB buffer whatever their
        # length, which would make the real outbox ~10x what outbox_max_bytes counts.
        frame = bytes(memoryview(frame))
        frames.append(frame)
        self.last_seq = seq
        self.size += len(frame)
        while len(frames) > self.max_frames or self.size > self.max_bytes:
            self.size -= len(frames.popleft())

    def _frame(self, seq: int) -> bytes | None:
        index = seq - (self.last_seq - len(self.frames) + 1)
        return self.frames[index] if 0 <= index < len(self.frames) else None

    async def since(self, seq: int) -> list[bytes] | None:
        if seq >= self.last_seq:
            return []
        frames = self.frames
        first = self.last_seq - len(frames) + 1
        if not frames or first > seq + 1:
            return None
        return list(islice(frames, seq + 1 - first, None))

    def remember(self, request_id: str, seq: int, digest: int) -> None:
        # The oldest are pushed out past max_answers (a deque keeps the order: popping
        # a dict's first key scans the holes deletions leave); recall ignores those
        # past the window.
        self.answers[request_id] = int(_monotonic()) << 64 | (seq & _U32) << 32 | digest & _U32
        order = self.order
        order.append(request_id)
        if len(order) > self.max_answers:
            self.answers.pop(order.popleft(), None)

    def recall(self, request_id: str) -> tuple[bytes, int] | None:
        entry = self.answers.get(request_id)
        if entry is None or _monotonic() - (entry >> 64) > self.window + 1:
            return None
        frame = self._frame(entry >> 32 & _U32)
        return (b"" if frame is None else frame), entry & _U32


@dataclass
class _Room:
    epoch: str
    offset: int = 0
    size: int = 1000
    ttl: float = 3600.0
    #: (when, stored message, dedupe key or None)
    history: deque[tuple[float, dict[str, Any], str | None]] = field(default_factory=deque)
    #: stored messages in the history by dedupe key (the publishing request)
    published: dict[str, dict[str, Any]] = field(default_factory=dict)
    listeners: list[RoomListener] = field(default_factory=list)


class MemoryBroker:
    """Sessions, rooms and presence in this process's memory."""

    name = "memory"

    def __init__(
        self,
        *,
        outbox_size: int = 1000,
        outbox_max_bytes: int = 1 << 20,
        dedupe_window: float = 300.0,
        dedupe_size: int = 256,
    ) -> None:
        self._epoch = os.urandom(4).hex()
        self.instance = os.urandom(6).hex()
        self.outbox_size = outbox_size
        self.outbox_max_bytes = outbox_max_bytes
        self.dedupe_window = dedupe_window
        self.dedupe_size = dedupe_size
        self.sessions: dict[str, _SessionLog] = {}
        self.detached: dict[str, float] = {}
        self.rooms: dict[str, _Room] = {}
        self.present: dict[str, dict[str, set[str]]] = {}
        self._control: ControlListener | None = None

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def flush(self) -> None:
        return None  # appended frames are delivered at once

    # sessions ---------------------------------------------------------------

    def open_session(self, session_id: str, principal_id: str) -> _SessionLog:
        entry = _SessionLog(
            principal_id,
            self.outbox_size,
            self.outbox_max_bytes,
            self.dedupe_window,
            self.dedupe_size,
        )
        self.sessions[session_id] = entry
        return entry

    async def find_session(self, session_id: str) -> _SessionLog | None:
        until = self.detached.get(session_id)
        if until is not None and until <= _monotonic():
            return None  # past its ttl: expired, even before expired_sessions() sweeps it
        return self.sessions.get(session_id)

    def detach_session(self, session_id: str, last_seq: int, ttl: float) -> None:
        if session_id in self.sessions:
            self.detached[session_id] = _monotonic() + ttl

    def attach_session(self, session_id: str, last_seq: int) -> None:
        self.detached.pop(session_id, None)

    def drop_session(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)
        self.detached.pop(session_id, None)

    def expired_sessions(self) -> list[str]:
        now = _monotonic()
        gone = [sid for sid, until in self.detached.items() if until <= now]
        for sid in gone:
            self.drop_session(sid)
        return gone

    def memory_bytes(self) -> int:
        """Bytes held by session outboxes (frames only), for budgets and metrics."""
        return sum(entry.size for entry in self.sessions.values())

    def sizes(self) -> dict[str, int]:
        """What the sessions keep: outbox frames and bytes, remembered answers, detached
        sessions (``app.metrics()["broker"]["sessions"]``)."""
        logs = list(self.sessions.values())
        return {
            "frames": sum(len(entry.frames) for entry in logs),
            "bytes": sum(entry.size for entry in logs),
            "dedupe": sum(len(entry.answers) for entry in logs),
            "detached": len(self.detached),
        }

    # control messages: one process, so only this one can be told -----------

    def on_control(self, listener: ControlListener) -> None:
        self._control = listener

    def tell(self, instance: str | None, message: dict[str, Any]) -> None:
        if instance == self.instance and self._control is not None:
            self._control(message)

    # rooms ------------------------------------------------------------------

    def _room(self, room: str) -> _Room:
        state = self.rooms.get(room)
        if state is None:
            state = self.rooms[room] = _Room(self._epoch)
        return state

    @staticmethod
    def _trim(state: _Room) -> None:
        history = state.history
        horizon = _monotonic() - state.ttl
        while history and (len(history) > state.size or history[0][0] < horizon):
            key = history.popleft()[2]
            if key is not None:
                state.published.pop(key, None)

    async def publish(
        self,
        room: str,
        message: dict[str, Any],
        *,
        history_size: int,
        history_ttl: float,
        dedupe: str | None = None,
    ) -> dict[str, Any]:
        state = self._room(room)
        if dedupe is not None:
            earlier = state.published.get(dedupe)
            if earlier is not None:  # a retry of a publish still in the history
                return earlier
        state.size, state.ttl = history_size, history_ttl
        state.offset += 1
        stored = {**message, "room": room, "offset": state.offset, "epoch": state.epoch}
        state.history.append((_monotonic(), stored, dedupe))
        if dedupe is not None:
            state.published[dedupe] = stored
        self._trim(state)
        for listener in list(state.listeners):
            try:
                listener(stored)
            except Exception:
                log.exception("room listener failed room=%s", room)
        return stored

    async def room_since(
        self, room: str, offset: int, epoch: str
    ) -> tuple[list[dict[str, Any]] | None, int, str]:
        state = self._room(room)
        self._trim(state)
        if epoch != state.epoch or offset > state.offset:
            return None, state.offset, state.epoch
        if offset == state.offset:
            return [], state.offset, state.epoch
        history = state.history
        if not history or history[0][1]["offset"] > offset + 1:
            return None, state.offset, state.epoch
        return [m for _, m, _ in history if m["offset"] > offset], state.offset, state.epoch

    async def room_position(self, room: str) -> tuple[int, str]:
        state = self._room(room)  # publish calls the listeners at once: no message in flight
        return state.offset, state.epoch

    def subscribe(self, room: str, listener: RoomListener) -> None:
        listeners = self._room(room).listeners
        if listener not in listeners:
            listeners.append(listener)

    def unsubscribe(self, room: str, listener: RoomListener) -> None:
        state = self.rooms.get(room)
        if state is not None and listener in state.listeners:
            state.listeners.remove(listener)

    # presence ---------------------------------------------------------------

    async def presence_add(self, room: str, member: str, key: str) -> tuple[bool, int]:
        members = self.present.setdefault(room, {})
        keys = members.setdefault(member, set())
        keys.add(key)
        return len(keys) == 1, len(members)

    async def presence_remove(self, room: str, member: str, key: str) -> tuple[bool, int]:
        members = self.present.get(room, {})
        keys = members.get(member)
        if keys is None or key not in keys:
            return False, len(members)
        keys.discard(key)
        if keys:
            return False, len(members)
        del members[member]
        if not members:
            self.present.pop(room, None)
        return True, len(members)

    async def presence(self, room: str) -> list[str]:
        return sorted(self.present.get(room, {}))

    async def presence_count(self, room: str) -> int:
        return len(self.present.get(room, ()))
