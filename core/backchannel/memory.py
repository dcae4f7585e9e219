"""The embedded in-memory broker: one process, bounded by config, nothing on disk.

Its ``epoch`` is made at start, so after a restart every ``since`` from before
is answered "not covered" instead of replaying a history that is gone.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from .broker import ANSWER_COST, SESSION_COST, ControlListener, RoomListener

__all__ = ["EVICTED_COST", "FRAME_COST", "SESSION_COST", "MemoryBroker"]

log = logging.getLogger("backchannel.broker")
_monotonic = time.monotonic
_U32 = 0xFFFFFFFF


#: bytes one kept frame costs beyond its own: the bytes object's header and its outbox slot
FRAME_COST = 41
#: bytes the record of an evicted session costs beyond its id's characters
EVICTED_COST = 120


class _SessionLog:
    """Outbox and remembered answers of one session, within one byte budget.

    ``size`` counts what the session accumulates, at what it costs in memory: each kept
    frame (its bytes plus :data:`FRAME_COST`) and each remembered answer (its request id
    plus :data:`ANSWER_COST`). Past ``max_bytes`` (or ``max_frames`` frames, or
    ``max_answers`` answers) the oldest frames go first, then the oldest answers.
    Every change is reported to the broker, which keeps all sessions within its total.
    """

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
        "_broker",
    )
    # frames[i] is frame number last_seq - len(frames) + 1 + i (seqs are consecutive)

    def __init__(self, broker: MemoryBroker, principal_id: str) -> None:
        self.principal_id = principal_id
        self.last_seq = 0
        self.frames: deque[bytes] = deque()
        self.size = 0
        self.max_frames = broker.outbox_size
        self.max_bytes = broker.outbox_max_bytes
        #: request id -> seconds (since start) answered << 64 | seq << 32 | digest (one
        #: int per entry: compact, and nothing for the garbage collector to scan), in the
        #: order remembered
        self.answers: dict[str, int] = {}
        self.window = broker.dedupe_window
        self.max_answers = broker.dedupe_size
        #: None once evicted: the log keeps nothing more
        self._broker: MemoryBroker | None = broker

    @property
    def log(self) -> _SessionLog:
        return self

    def append(self, seq: int, frame: bytes, deliver: Callable[[bytes], None] | None) -> None:
        broker = self._broker
        if broker is not None:  # (inline: every frame a session is sent comes here)
            before = self.size
            frames = self.frames
            if seq != self.last_seq + 1:  # never happens through Session.send; keep seqs exact
                self.size -= sum(len(f) for f in frames) + FRAME_COST * len(frames)
                frames.clear()
            # Keep a right-sized copy: orjson's bytes hold a >= 4 KiB buffer whatever their
            # length, which would make the real outbox ~10x what outbox_max_bytes counts.
            kept = bytes(memoryview(frame))
            frames.append(kept)
            self.last_seq = seq
            size = self.size + len(kept) + FRAME_COST
            while len(frames) > self.max_frames or (size > self.max_bytes and frames):
                size -= len(frames.popleft()) + FRAME_COST
            self.size = size
            if size > self.max_bytes:  # remembered answers alone fill the budget
                self._fit()
            broker._barren = False
            broker.used += self.size - before
            if broker.used > broker.total_max_bytes or broker._full:
                broker._settle(self)
        if deliver is not None:
            deliver(frame)

    def _fit(self) -> None:
        """Trim to ``max_bytes``: the oldest frames, then the oldest answers."""
        frames, answers = self.frames, self.answers
        while self.size > self.max_bytes and frames:
            self.size -= len(frames.popleft()) + FRAME_COST
        while self.size > self.max_bytes and answers:
            oldest = next(iter(answers))
            del answers[oldest]
            self.size -= len(oldest) + ANSWER_COST

    def shed(self) -> bool:
        """Give up the oldest frame (the broker is over its total); False if none is left."""
        if not self.frames:
            return False
        before = self.size
        self.size -= len(self.frames.popleft()) + FRAME_COST
        if self._broker is not None:
            self._broker.used -= before - self.size
        return True

    def evict(self) -> None:
        """Keep nothing from now on (the broker evicted this session)."""
        self._broker = None
        self.frames.clear()
        self.answers.clear()
        self.size = 0

    def _frame(self, seq: int) -> bytes | None:
        index = seq - (self.last_seq - len(self.frames) + 1)
        return self.frames[index] if 0 <= index < len(self.frames) else None

    async def since(self, seq: int) -> list[bytes] | None:
        if self._broker is None:
            return None
        if seq >= self.last_seq:
            return []
        frames = self.frames
        first = self.last_seq - len(frames) + 1
        if not frames or first > seq + 1:
            return None
        return list(islice(frames, seq + 1 - first, None))

    def remember(self, request_id: str, seq: int, digest: int) -> None:
        # The oldest are pushed out past max_answers (the dict keeps insertion order, and
        # its first key is found within the few holes a dict this small keeps); recall
        # ignores those past the window.
        broker = self._broker
        if broker is None:
            return
        before = self.size
        answers = self.answers
        if request_id not in answers:
            self.size += len(request_id) + ANSWER_COST
        answers[request_id] = int(_monotonic()) << 64 | (seq & _U32) << 32 | digest & _U32
        while len(answers) > self.max_answers:
            oldest = next(iter(answers))
            del answers[oldest]
            self.size -= len(oldest) + ANSWER_COST
        if self.size > self.max_bytes:
            self._fit()
        # (inline: every answered request comes here) the process total, as in append
        broker.used += self.size - before
        if broker.used > broker.total_max_bytes or broker._full:
            broker._settle(self)

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
    """Sessions, rooms and presence in this process's memory.

    Sessions are kept within ``total_max_bytes`` all together (each within
    ``outbox_max_bytes``, plus :data:`SESSION_COST`): past it, the sessions detached
    longest ago are evicted first. Their resume is answered ``evicted``: the broker
    remembers their ids until they would have expired, at :data:`EVICTED_COST` each,
    within a 32nd of the total (the oldest records go first; the newest always fits).
    With no detached session left, those records go, then sessions give up their oldest
    frames: the growing one first, then the others in turn.
    """

    name = "memory"

    def __init__(
        self,
        *,
        outbox_size: int = 1000,
        outbox_max_bytes: int = 13 << 10,
        dedupe_window: float = 300.0,
        dedupe_size: int = 32,
        total_max_bytes: int = 64 << 20,
    ) -> None:
        self._epoch = os.urandom(4).hex()
        self.instance = os.urandom(6).hex()
        self.outbox_size = outbox_size
        self.outbox_max_bytes = outbox_max_bytes
        self.dedupe_window = dedupe_window
        self.dedupe_size = dedupe_size
        self.total_max_bytes = total_max_bytes
        self.sessions: dict[str, _SessionLog] = {}
        #: detached sessions: id -> monotonic time it expires, detached longest ago first
        self.detached: dict[str, float] = {}
        #: evicted sessions: id -> when it would have expired, evicted longest ago first
        self.evicted: dict[str, float] = {}
        #: bytes all sessions hold (as their logs count them, plus the fixed costs)
        self.used = 0
        #: sessions evicted, and frames given up for lack of room, since start
        self.evictions = 0
        self.shed_frames = 0
        self._gone: list[str] = []  # evicted since the last expired_sessions()
        self._evicted_bytes = 0  # what the records of evicted sessions cost
        self._full = False  # over the total with nothing detached to evict (warned once)
        self._turns: Iterator[_SessionLog] = iter(())  # sessions in turn to shed frames
        self._barren = False  # no session had a frame to shed (until one keeps a frame)
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
        self._forget(session_id)  # (a session upgraded to another principal starts over)
        if session_id in self.evicted:
            self._unrecord(session_id)
        entry = _SessionLog(self, principal_id)
        self.sessions[session_id] = entry
        self._grew(entry, SESSION_COST)
        return entry

    async def find_session(self, session_id: str) -> _SessionLog | None:
        until = self.detached.get(session_id)
        if until is not None and until <= _monotonic():
            return None  # past its ttl: expired, even before expired_sessions() sweeps it
        return self.sessions.get(session_id)

    def evicted_session(self, session_id: str) -> bool:
        return session_id in self.evicted

    def detach_session(self, session_id: str, last_seq: int, ttl: float) -> None:
        if session_id in self.sessions:
            self.detached.pop(session_id, None)  # (re)detached now: the newest
            self.detached[session_id] = _monotonic() + ttl

    def attach_session(self, session_id: str, last_seq: int) -> None:
        self.detached.pop(session_id, None)

    def drop_session(self, session_id: str) -> None:
        self._forget(session_id)

    def _forget(self, session_id: str) -> _SessionLog | None:
        entry = self.sessions.pop(session_id, None)
        self.detached.pop(session_id, None)
        if entry is not None:
            self.used -= entry.size + SESSION_COST
            entry.evict()
        return entry

    def expired_sessions(self) -> list[str]:
        now = _monotonic()
        gone = [sid for sid, until in self.detached.items() if until <= now]
        for sid in gone:
            self.drop_session(sid)
        evicted = self.evicted
        while evicted:  # records of evicted sessions are kept until those would expire
            sid, until = next(iter(evicted.items()))
            if until > now:
                break
            self._unrecord(sid)
        gone += self._gone
        self._gone = []
        return gone

    def _grew(self, entry: _SessionLog, delta: int) -> None:
        """``entry`` grew by ``delta`` bytes (or shrank): past the total, make room."""
        self.used += delta
        if self.used > self.total_max_bytes or self._full:
            self._settle(entry)

    def _settle(self, growing: _SessionLog) -> None:
        """Past the total, make room; back within it, warn again next time it is full."""
        if self.used > self.total_max_bytes:
            self._make_room(growing)
        else:
            self._full = False

    def _make_room(self, growing: _SessionLog) -> None:
        """Evict the sessions detached longest ago; then forget records of evicted ones;
        then shed frames: the growing session's oldest, then the others' in turn."""
        while self.used > self.total_max_bytes:
            if self.detached:
                self._evict(next(iter(self.detached)))
            elif self.evicted:
                self._unrecord(next(iter(self.evicted)))
            elif growing.shed() or self._shed_other():
                self.shed_frames += 1
                if not self._full:
                    self._full = True
                    log.warning(
                        "session memory full (session.total_max_bytes=%d) with no detached "
                        "session to evict: sessions give up their oldest frames (a later "
                        "resume may say trimmed); raise session.total_max_bytes or lower "
                        "session.outbox_max_bytes",
                        self.total_max_bytes,
                    )
            else:
                return

    def _evict(self, session_id: str) -> None:
        until = self.detached[session_id]
        self._forget(session_id)
        self.evicted[session_id] = until
        self.used += len(session_id) + EVICTED_COST
        self._evicted_bytes += len(session_id) + EVICTED_COST
        # records: a 32nd of the total at most (but the newest one, whatever the total)
        while self._evicted_bytes > self.total_max_bytes // 32 and len(self.evicted) > 1:
            self._unrecord(next(iter(self.evicted)))
        self._gone.append(session_id)
        self.evictions += 1
        if self.evictions in (1, 10, 100) or not self.evictions % 1000:
            log.warning(
                "session memory full (session.total_max_bytes=%d): evicted the session "
                "detached longest ago (%d evicted so far)",
                self.total_max_bytes,
                self.evictions,
            )

    def _unrecord(self, session_id: str) -> None:
        """Forget that session ``session_id`` was evicted (its resume: unknown_session)."""
        del self.evicted[session_id]
        self.used -= len(session_id) + EVICTED_COST
        self._evicted_bytes -= len(session_id) + EVICTED_COST

    def _shed_other(self) -> bool:
        """Shed one frame of another session, taking the sessions in turn; False when no
        session has a frame left (then not looked for again until one is kept)."""
        if self._barren:
            return False
        for _ in range(2):  # the rest of this round, then one whole round
            for entry in self._turns:
                if entry._broker is self and entry.shed():
                    return True
            self._turns = iter(list(self.sessions.values()))
        self._barren = True
        return False

    def memory_bytes(self) -> int:
        """Bytes held by sessions (frames, answers, fixed costs), as the total counts them."""
        return self.used

    def sizes(self) -> dict[str, int]:
        """What the sessions keep: outbox frames and bytes, remembered answers, detached
        and evicted sessions (``app.metrics()["broker"]["sessions"]``)."""
        logs = list(self.sessions.values())
        return {
            "frames": sum(len(entry.frames) for entry in logs),
            "bytes": self.used,
            "limit": self.total_max_bytes,
            "dedupe": sum(len(entry.answers) for entry in logs),
            "detached": len(self.detached),
            "evicted": self.evictions,
            "shedFrames": self.shed_frames,
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
