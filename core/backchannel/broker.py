"""The broker seam (DESIGN §8): what one process shares with the others.

A broker holds session logs (the outbox that makes resume possible, and the
answers that make retries safe), room logs (offsets, epochs, bounded history,
live fan-out) and presence. The kernel ships :class:`~backchannel.memory.MemoryBroker`
for one process; the ``broker`` hook lets a plugin (redis) supply another with the
same interface, and one contract suite (``tests/test_broker_contract.py``) runs
against every broker.

Writes on the per-message path (``SessionLog.append``, ``remember``, ``tell``) are
sync and must not block: a networked broker buffers them and flushes in the
background. Reads happen on resume, join and retry, and may wait.

Processes sharing a broker reach each other's connections through control
messages (:meth:`Broker.tell`): ``app.send`` to a connection of another process,
``app.broadcast``, and the takeover of a session resumed elsewhere. A connection
id embeds the :attr:`Broker.instance` of the process that holds it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "ANSWER_COST",
    "SESSION_COST",
    "Broker",
    "ControlListener",
    "RoomListener",
    "SessionLog",
    "SessionRecord",
]

# What session state costs in a process's memory, for ``session.outbox_max_bytes`` and
# ``session.total_max_bytes`` (measured with tracemalloc: tests/test_budget.py).
#: bytes one remembered answer costs beyond its request id's characters: the id's string
#: header, the packed int (time << 64 | seq << 32 | digest) and its dict entry (in a dict
#: whose oldest entries keep being replaced, which holds a third more slots than entries)
ANSWER_COST = 136
#: bytes every session a process keeps costs whatever it holds: the kernel's Session, the
#: broker's log, their containers and registry entries
SESSION_COST = 1500

#: Called with each message published to a room this process subscribed to.
RoomListener = Callable[[dict[str, Any]], None]
#: Called with each control message another process told this one (a dict with "op").
ControlListener = Callable[[dict[str, Any]], None]


@runtime_checkable
class SessionLog(Protocol):
    """One session's durable part: its outbox and the answers it gave."""

    def append(self, seq: int, frame: bytes, deliver: Callable[[bytes], None] | None) -> None:
        """Keep frame ``seq`` (encoded) for resume (trimmed to the configured bounds), then
        hand it to ``deliver`` (the attached connection's writer, None when detached).

        Called for every frame a session is sent, so it must not block: an in-memory log
        delivers at once; a networked one may deliver once the broker acknowledged the
        write, so that a frame never reaches a client before another process could replay
        it (in the order appended, per session)."""

    async def since(self, seq: int) -> list[bytes] | None:
        """Frames after ``seq`` in order, or None when the log no longer covers ``seq + 1``."""

    def remember(self, request_id: str, seq: int, digest: int) -> None:
        """Request ``request_id`` (whose bytes hash to ``digest``) was answered by frame ``seq``."""

    def recall(
        self, request_id: str
    ) -> tuple[bytes, int] | Awaitable[tuple[bytes, int] | None] | None:
        """The answer frame and request digest kept for ``request_id``, or None.

        None when the request is unknown or older than the dedupe window; the
        frame is ``b""`` when the answer left the outbox (the request must still
        not run again). Called for every request, so an in-memory log answers
        directly; a networked one may return an awaitable.
        """


class SessionRecord(Protocol):
    """What a broker knows of a session it was asked to find."""

    @property
    def principal_id(self) -> str: ...

    @property
    def last_seq(self) -> int: ...

    @property
    def log(self) -> SessionLog: ...


@runtime_checkable
class Broker(Protocol):
    """Sessions, rooms and presence, shared by every process using this broker."""

    #: short name for logs and metrics (``memory``, ``redis``).
    name: str

    #: this process's id among those sharing the broker (letters and digits only);
    #: connection ids embed it, so any process knows which one holds a connection.
    instance: str

    @property
    def epoch(self) -> str:
        """Changes whenever the broker lost its data (restart of an in-memory store)."""

    @property
    def ready(self) -> bool:
        """Whether requests that need the broker can be served now (``/readyz``)."""

    async def start(self) -> None:
        """Connect; called once at App start-up."""

    async def stop(self) -> None:
        """Disconnect; called once at App shutdown."""

    async def flush(self) -> None:
        """Return once every session frame appended so far was kept and handed to its
        ``deliver`` (within a bound of the broker's own; never raises). The hub calls it
        at shutdown, so that the last frames (the going-away notice, the answers of
        interrupted handlers) leave before the connections close."""

    # sessions ---------------------------------------------------------------

    def open_session(self, session_id: str, principal_id: str) -> SessionLog:
        """Create the log of a new session."""

    async def find_session(self, session_id: str) -> SessionRecord | None:
        """The live (attached or not yet expired) session ``session_id``, or None."""

    def detach_session(self, session_id: str, last_seq: int, ttl: float) -> None:
        """The session's last connection closed: keep it ``ttl`` seconds more."""

    def attach_session(self, session_id: str, last_seq: int) -> None:
        """A connection of this process resumed the session at ``last_seq``: it no longer
        expires, and this process's frames (from ``last_seq + 1``) are the session's.

        A networked broker tells the process that held the session before, if another
        one, ``{"op": "takeover", "session": session_id}`` (it closes its connection
        with 4009 and writes nothing more to the session)."""

    def drop_session(self, session_id: str) -> None:
        """Forget the session now."""

    def evicted_session(self, session_id: str) -> bool:
        """Whether session ``session_id`` was evicted to keep this process's session memory
        within ``session.total_max_bytes`` (before it would have expired): its resume is
        answered ``evicted``. A broker that never evicts a session returns False."""

    def expired_sessions(self) -> list[str]:
        """Ids of detached sessions past their ttl, and of sessions evicted since the last
        call (removed by this call: the kernel forgets them)."""

    # rooms ------------------------------------------------------------------

    async def publish(
        self,
        room: str,
        message: dict[str, Any],
        *,
        history_size: int,
        history_ttl: float,
        dedupe: str | None = None,
    ) -> dict[str, Any]:
        """Give ``message`` the room's next offset and epoch, keep it, fan it out.

        Returns the stored message (``message`` plus ``room``, ``offset``,
        ``epoch``). History keeps at most ``history_size`` messages no older than
        ``history_ttl`` seconds. Every listener subscribed to ``room``, in any
        process, is called with it, in offset order.

        ``dedupe`` names the request that publishes (session and request id): a
        second publish with the same key while the first is in the history returns
        the first's stored message and publishes nothing, so a retry on another
        process, after the one that published died before remembering its answer,
        does not post the message twice.
        """

    async def room_since(
        self, room: str, offset: int, epoch: str
    ) -> tuple[list[dict[str, Any]] | None, int, str]:
        """Messages after ``offset`` if history covers them (else None), plus the
        room's current offset and epoch (pass ``epoch=""`` to ask only for those)."""

    async def room_position(self, room: str) -> tuple[int, str]:
        """Where ``room`` stands for this process's listeners: the offset and epoch such
        that a listener subscribed to ``room`` before this call is called with every
        message after that offset, and with none up to it. A join reads it to hand over
        from history to live delivery; a networked broker may answer from the position
        its subscription delivered (no round trip), which may trail the room's latest
        offset by the messages in flight."""

    def subscribe(self, room: str, listener: RoomListener) -> None:
        """Call ``listener`` with every message published to ``room`` from now on."""

    def unsubscribe(self, room: str, listener: RoomListener) -> None:
        """Stop calling ``listener`` for ``room``."""

    # control messages -------------------------------------------------------

    def on_control(self, listener: ControlListener) -> None:
        """Call ``listener`` with every control message told to this process."""

    def tell(self, instance: str | None, message: dict[str, Any]) -> None:
        """Hand ``message`` (JSON-able, with an ``"op"``) to the control listener of
        process ``instance``, or of every *other* process when None; in the order told.

        At most once: a process that is gone or cut off from the broker misses it (a
        networked broker counts and logs that). Durable fan-out is what rooms are for.
        """

    # presence ---------------------------------------------------------------

    async def presence_add(self, room: str, member: str, key: str) -> tuple[bool, int]:
        """``member`` is present in ``room`` through ``key`` (a connection).

        Returns whether ``member`` was not present before, and how many members are
        present now (as :meth:`presence_count` counts them)."""

    async def presence_remove(self, room: str, member: str, key: str) -> tuple[bool, int]:
        """Remove one presence ``key``. Returns whether ``member`` is no longer present
        at all, and how many members are present now."""

    async def presence(self, room: str) -> list[str]:
        """Members present in ``room``, sorted (its cost grows with the room)."""

    async def presence_count(self, room: str) -> int:
        """How many members are present in ``room``, at a cost that does not grow with it.

        A networked broker may go on counting the members of a process that died
        without withdrawing them until they are swept (``presence`` sweeps a room at
        once; the redis broker also sweeps a little with each heartbeat)."""
