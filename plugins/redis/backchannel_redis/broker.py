"""The Redis broker: sessions, rooms and presence shared by every instance.

Design (docs/design.md, "Redis broker"): one Lua script per operation (atomic, one
round trip); room history on a stream per room with a counter for offsets and an
epoch beside it; live fan-out over pub/sub, on one connection per instance that
subscribes only to rooms with local listeners, with gaps filled from the stream;
session writes (outbox frames, answers, expiry) queued and flushed pipelined by a
background task, because the kernel makes them on the per-message path and they
must not block, and each session frame handed to its client once its write is
acknowledged (write-through); presence as a hash per room whose entries count only
while their instance beats.

On a Redis Cluster (``cluster=True``, issue 15) every call touches one slot (the
session writes of a batch are grouped by slot), room messages travel on sharded
pub/sub (``SSUBSCRIBE`` on each room's node) while control messages stay on classic
pub/sub, a health probe pings every primary, and the client's view of the cluster is
refreshed whenever a call or the subscriber fails (a failover moves slots).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
import warnings
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
import coredis
import orjson
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from coredis._utils import hash_slot
from coredis.commands.script import Script
from coredis.exceptions import (
    ClusterDownError,
    ClusterError,
    ClusterRoutingError,
    RedisClusterError,
    ResponseError,
    TryAgainError,
)
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.retry import ConstantRetryPolicy, NoRetryPolicy

from backchannel import BackchannelError, ErrorCode
from backchannel.broker import ANSWER_COST, SESSION_COST, ControlListener, RoomListener

from . import scripts

__all__ = ["RedisBroker", "StateCallback"]

log = logging.getLogger("backchannel.broker.redis")

#: ``on_state(ready, why)``: called on every readiness transition.
StateCallback = Callable[[bool, str], None]
#: a client of one Redis, or of a Redis Cluster (``cluster=True``)
Client = coredis.Redis[bytes] | coredis.RedisCluster[bytes]

#: errors that mean "Redis is not reachable now" (not a bug in a script); on a cluster,
#: also a cluster that cannot serve a slot now (a master failed, its replica not promoted)
_UNREACHABLE = (
    RedisConnectionError,
    TimeoutError,
    OSError,
    ClusterDownError,
    ClusterError,
    ClusterRoutingError,
    TryAgainError,
)
#: most stream entries one catch-up reads
_CATCH_UP_MAX = 10_000
#: most buffered writes one flush sends
_BATCH = 1024
#: most sessions one SESSIONS call writes to (bounds the time Redis spends in one script)
_CALL_SESSIONS = 256
#: seconds a small batch of session writes waits for more before it is sent
_LINGER = 0.001
#: presence entries a heartbeat sweeps per room (HSCAN COUNT)
_SWEEP = 100

_OPEN, _APPEND, _REMEMBER, _DETACH, _ATTACH, _DROP = range(6)
_U32 = 0xFFFFFFFF
#: sessions looked up for a resume, held until attached (most kept)
_FOUND_MAX = 1024
#: the SESSIONS script's name of each kind of session write
_KINDS = {_OPEN: "o", _APPEND: "f", _REMEMBER: "r", _DETACH: "d", _ATTACH: "a", _DROP: "x"}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _reason(exc: BaseException) -> str:
    """What went wrong, said plainly: ``Type: message`` of the exception itself, not of
    the exception group a task group wrapped it in (issue 11: "unhandled errors in a
    TaskGroup (1 sub-exception)" told an operator nothing)."""
    while isinstance(exc, BaseExceptionGroup):
        others = len(exc.exceptions) - 1
        exc = exc.exceptions[0]
        if others:
            return f"{_reason(exc)} (and {others} more)"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Unavailable(BackchannelError):
    #: True when the request was sent but not confirmed (callers such as the rooms plugin
    #: read it with ``getattr(exc, "maybe_done", False)``)
    maybe_done: bool

    def __init__(self, why: str, *, maybe_done: bool = False) -> None:
        self.maybe_done = maybe_done
        if maybe_done:  # sent, not confirmed: a room message then reaches its sender too
            text = f"the broker did not confirm in time ({why}); it may still take effect"
        else:
            text = f"the broker is unavailable ({why})"
        super().__init__(ErrorCode.OVERLOADED, f"{text}; retry later")


T = TypeVar("T")


class _Backlog(Generic[T]):
    """What the per-message path hands a background sender: ``put`` is sync and
    bounded (the oldest item makes room), the sender waits for items."""

    __slots__ = ("items", "limit", "_more")

    def __init__(self, limit: int) -> None:
        self.items: deque[T] = deque()
        self.limit = limit
        self._more: anyio.Event | None = None

    def put(self, item: T) -> T | None:
        """Queue ``item``; returns the oldest item if it was dropped to make room."""
        dropped = self.items.popleft() if len(self.items) >= self.limit else None
        self.items.append(item)
        if self._more is not None:
            self._more.set()
        return dropped

    async def wait(self) -> None:
        while not self.items:
            self._more = anyio.Event()
            await self._more.wait()


@dataclass(eq=False)
class _Room:
    """This instance's subscription to one room."""

    name: str
    listeners: list[RoomListener] = field(default_factory=list)
    #: last offset delivered to the listeners (None until the base is read)
    last: int | None = None
    epoch: str | None = None
    based: anyio.Event = field(default_factory=anyio.Event)


@dataclass(eq=False)
class _Arrival:
    """A ``presence_add`` waiting for its room's next ``PRESENCE_ADD`` call."""

    member: str
    key: str
    done: anyio.Event = field(default_factory=anyio.Event)
    #: (member new in the room, members counted), or why it failed
    result: tuple[bool, int] | None = None
    failure: str = ""


@dataclass(frozen=True, slots=True)
class _Record:
    principal_id: str
    last_seq: int
    log: _SessionLog


class _SessionLog:
    """One session's outbox and answers in Redis.

    The answers it remembered are also cached here, so ``recall`` of a request never
    answered costs no round trip. The cache is bounded like the in-memory broker's logs
    (``session.outbox_max_bytes`` and ``session.dedupe_size`` per session, at
    ``ANSWER_COST`` per answer; ``session.total_max_bytes`` for the process) and emptied
    while the session is detached (a resume fills it again from Redis). What it lets go
    of is still in Redis: a ``cold`` log asks Redis when its cache misses, until it has
    remembered ``dedupe_size`` answers since (Redis keeps no more than those).
    """

    __slots__ = ("broker", "id", "answers", "size", "cold", "__weakref__")

    def __init__(self, broker: RedisBroker, session_id: str) -> None:
        self.broker = broker
        self.id = session_id
        #: request id -> unix ms answered << 64 | seq << 32 | digest, oldest first
        self.answers: dict[str, int] = {}
        #: bytes the cached answers cost
        self.size = 0
        #: answers still to remember before the cache holds all Redis does (0: it does)
        self.cold = 0

    def append(self, seq: int, frame: bytes, deliver: Callable[[bytes], None] | None) -> None:
        # a right-sized copy: orjson's bytes keep a >= 4 KiB buffer (see memory.py)
        broker = self.broker
        broker._write(self.id, _APPEND, seq, bytes(memoryview(frame)))
        if deliver is not None:
            broker._deliver_when_kept(deliver, frame)

    async def since(self, seq: int) -> list[bytes] | None:
        return await self.broker._since(self.id, seq)

    def _keep(self, request_id: str, answered_ms: int, seq: int, digest: int) -> None:
        broker = self.broker
        answers = self.answers
        before = self.size
        if request_id not in answers:
            self.size += len(request_id) + ANSWER_COST
            if self.cold:
                self.cold -= 1
        answers[request_id] = answered_ms << 64 | (seq & _U32) << 32 | digest & _U32
        while len(answers) > broker.dedupe_size:  # Redis lets go of these too
            self._drop_oldest()
        while self.size > broker.outbox_max_bytes and answers:
            self.cold = broker.dedupe_size
            self._drop_oldest()
        broker._cached(self, self.size - before)

    def _drop_oldest(self) -> None:
        oldest = next(iter(self.answers))
        del self.answers[oldest]
        self.size -= len(oldest) + ANSWER_COST

    def shed(self) -> bool:
        """Let go of the oldest cached answer (the process is over its total); False if none."""
        if not self.answers:
            return False
        before = self.size
        self.cold = self.broker.dedupe_size
        self._drop_oldest()
        self.broker._cached(self, self.size - before)
        return True

    def clear(self) -> None:
        """Let go of every cached answer (the session is detached: nobody asks)."""
        if self.answers:
            self.cold = self.broker.dedupe_size
            self.answers.clear()
            self.broker._cached(self, -self.size)
            self.size = 0

    def fill(self, answers: dict[bytes, bytes]) -> None:
        """Cache the answer records read from Redis (``ms:seq:digest`` by request id)."""
        self.clear()
        self.cold = 0
        records: list[tuple[int, str, int, int]] = []
        for key, value in answers.items():
            answered, seq, digest = _text(value).split(":")
            records.append((int(answered), _text(key), int(seq), int(digest)))
        for record in sorted(records):  # oldest first, as remembered
            self._keep(record[1], record[0], record[2], record[3])

    def remember(self, request_id: str, seq: int, digest: int) -> None:
        now = math.ceil(time.time() * 1000)  # (rounded up: never out of the window early)
        self._keep(request_id, now, seq, digest)
        self.broker._write(self.id, _REMEMBER, request_id, f"{now}:{seq}:{digest}".encode())

    def recall(self, request_id: str) -> Coroutine[Any, Any, tuple[bytes, int] | None] | None:
        entry = self.answers.get(request_id)
        if entry is None:
            return self.broker._recall(self.id, request_id) if self.cold else None
        if time.time() * 1000 - (entry >> 64) > self.broker.dedupe_window * 1000:
            return None
        return self.broker._answer(self.id, entry >> 32 & _U32, entry & _U32)


class RedisBroker:
    """A :class:`backchannel.broker.Broker` on Redis (7.x), for asyncio and Trio."""

    name = "redis"

    def __init__(
        self,
        *,
        url: str = "redis://127.0.0.1:6379/0",
        key_prefix: str = "backchannel",
        timeout: float = 1.0,
        health_interval: float = 1.0,
        reconnect_min_delay: float = 0.05,
        reconnect_max_delay: float = 5.0,
        presence_ttl: float = 15.0,
        room_ttl: float = 86400.0,
        max_buffered_writes: int = 100_000,
        outbox_size: int = 1000,
        outbox_max_bytes: int = 13 << 10,
        dedupe_window: float = 300.0,
        dedupe_size: int = 32,
        total_max_bytes: int = 64 << 20,
        session_lease: float = 120.0,
        cluster: bool = False,
        on_state: StateCallback | None = None,
    ) -> None:
        self.url = url
        #: ``url`` names a node of a Redis Cluster (the others are discovered)
        self.cluster = cluster
        self.prefix = key_prefix
        self._room_channels = f"{key_prefix}:r:"
        self.timeout = timeout
        self.health_interval = health_interval
        self.reconnect_min_delay = reconnect_min_delay
        self.reconnect_max_delay = reconnect_max_delay
        self.presence_ttl = presence_ttl
        self.room_ttl = room_ttl
        self.max_buffered_writes = max_buffered_writes
        self.outbox_size = outbox_size
        self.outbox_max_bytes = outbox_max_bytes
        self.dedupe_window = dedupe_window
        self.dedupe_size = dedupe_size
        self.total_max_bytes = total_max_bytes
        self.session_lease = max(session_lease, 1.0)
        self.on_state = on_state
        #: this process's id in Redis (presence entries, session ownership, publish ids)
        self.instance = os.urandom(6).hex()
        #: events by name (transitions, gaps, dropped writes, failures), for metrics and tests
        self.counters: dict[str, int] = {}
        self._epoch = os.urandom(8).hex()  # provisional until Redis answers
        self._ready = False
        self._started = False
        self._stopping = False
        self._client: Client | None = None  # while open (see _keep_open)
        self._unopened = "not started"  # why there is no open client
        self._stack: AsyncExitStack | None = None
        self._tasks: TaskGroup | None = None
        self._s: dict[str, Script[bytes]] = {}
        # made in start() (they belong to the running event loop)
        self._up: anyio.Event  # set while ready
        self._flush_done: anyio.Event  # a flush finished
        self._publish_ids = count(1)
        # sessions
        self._logs: dict[str, _SessionLog] = {}  # held by this instance
        self._attached: set[str] = set()
        self._detached: dict[str, int] = {}  # session id -> expiry (unix ms), oldest first
        self._found: dict[str, _SessionLog] = {}  # read by find_session, not attached yet
        #: bytes the sessions held here cost this process (SESSION_COST each, cached answers)
        self.used = 0
        self._gone: list[str] = []  # let go of for memory since the last expired_sessions()
        self._turns: Iterator[_SessionLog] = iter(())  # held sessions in turn to shed answers
        # buffered writes: (write id, session id, kind, a, b)
        self._writes: _Backlog[tuple[int, str, int, Any, Any]] = _Backlog(max_buffered_writes)
        self._queued = 0
        self._flushed = 0
        #: session frames kept back until Redis acknowledged their write (write id,
        #: deliver, frame), in append order
        self._held: deque[tuple[int, Callable[[bytes], None], bytes]] = deque()
        # rooms and presence
        self._rooms: dict[str, _Room] = {}
        self._present: dict[str, set[tuple[str, str]]] = {}
        #: presence removed while Redis was away: (room, member, key), removed once it is back
        self._absent: set[tuple[str, str, str]] = set()
        #: presence adds waiting for their room's next call, by room
        self._arrivals: dict[str, list[_Arrival]] = {}
        #: session id -> write id of this instance's latest ATTACH of it
        self._attaching: dict[str, int] = {}
        # control messages: (instance or None for all, encoded message), published in order
        self._tells: _Backlog[tuple[str | None, bytes]] = _Backlog(max_buffered_writes)
        self._control: ControlListener | None = None

    # ----------------------------------------------------------------- keys

    def _session_keys(self, session_id: str) -> list[str]:
        base = f"{self.prefix}:s:{{{session_id}}}"
        return [f"{base}:m", f"{base}:o", f"{base}:a", f"{base}:q"]

    def _room_keys(self, room: str) -> list[str]:
        base = f"{self.prefix}:r:{{{room}}}"
        return [f"{base}:m", f"{base}:l", f"{base}:d"]

    def _presence_keys(self, room: str) -> list[str]:
        base = f"{self.prefix}:p:{{{room}}}"
        return [f"{base}:h", f"{base}:i", f"{base}:c"]

    def _channel(self, room: str) -> str:
        """The room's channel: its keys' hash tag, so a cluster publishes it on their node."""
        return f"{self._room_channels}{{{room}}}"

    def _slot(self, session_id: str) -> int:
        """The cluster slot of a session's keys."""
        return hash_slot(self._session_keys(session_id)[0].encode())

    def _control_channel(self, instance: str | None) -> str:
        """Where control messages for ``instance`` (every instance when None) go."""
        return f"{self.prefix}:all" if instance is None else f"{self.prefix}:i:{instance}"

    # ---------------------------------------------------------------- state

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def ready(self) -> bool:
        return self._ready

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _set_ready(self, ready: bool, why: str) -> None:
        if ready == self._ready:
            return
        self._ready = ready
        if ready:
            self._count("recovered")
            log.info("redis broker ready (%s) url=%s", why, self.url)
            self._up.set()
        else:
            self._count("unavailable")
            log.warning("redis broker NOT ready: %s url=%s", why, self.url)
            self._up = anyio.Event()
            self._release(self._queued)  # writes wait for Redis; clients need not
        if self._started:
            self._notify(ready, why)

    def _notify(self, ready: bool, why: str) -> None:
        if self.on_state is not None:
            try:
                self.on_state(ready, why)
            except Exception:
                log.exception("redis broker state callback failed")

    def _set_epoch(self, epoch: str) -> None:
        if epoch != self._epoch:
            if self._started:
                self._count("epoch_changed")
                log.warning(
                    "redis broker epoch changed %s -> %s: Redis lost its data", self._epoch, epoch
                )
            self._epoch = epoch

    def _need_ready(self) -> None:
        if not self._ready:
            self._count("refused")
            raise _Unavailable("Redis is not reachable")

    @property
    def _redis(self) -> Client:
        if self._client is None:
            raise _Unavailable(self._unopened)
        return self._client

    async def _call(self, request: Awaitable[Any], *, write: bool = False) -> Any:
        """Await one Redis request within the timeout; unreachable Redis → ``overloaded``
        (for a ``write``, one that may still take effect: it was sent, not confirmed)."""
        try:
            with anyio.fail_after(self.timeout * 2):
                return await request
        except _UNREACHABLE as exc:
            self._set_ready(False, _reason(exc))
            raise _Unavailable(type(exc).__name__, maybe_done=write) from exc

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect and start the background tasks; not ready (not failing) if Redis is away.

        The client and the task group opened here stay open until :meth:`stop`, which
        must be called from the same task (the kernel's ``App.run`` does).
        """
        self._up = anyio.Event()
        self._flush_done = anyio.Event()
        self._listening = anyio.Event()  # control channels subscribed (once)
        self._arriving = anyio.Event()  # presence adds are waiting
        events = anyio.create_memory_object_stream[tuple[str, Any]](math.inf)
        self._events_in: MemoryObjectSendStream[tuple[str, Any]] = events[0]
        self._events: MemoryObjectReceiveStream[tuple[str, Any]] = events[1]
        stack = AsyncExitStack()
        self._stack = stack
        kind = coredis.RedisCluster if self.cluster else coredis.Redis
        with warnings.catch_warnings():  # coredis 6.9's own from_url trips its deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            client: Client = kind.from_url(
                self.url,
                stream_timeout=self.timeout,
                connect_timeout=self.timeout,
                # a lost connection is retried once; a timeout never (the script may have run)
                retry_policy=ConstantRetryPolicy((RedisConnectionError,), retries=1, delay=0),
            )
        self._s = {name: client.register_script(getattr(scripts, name)) for name in scripts.__all__}
        # the client's own task group closes after the workers' (LIFO): they never see it
        # closed under them
        opener = await stack.enter_async_context(anyio.create_task_group())
        await opener.start(self._keep_open, client)
        stack.callback(opener.cancel_scope.cancel)
        stack.push_async_callback(self._settle)
        self._tasks = await stack.enter_async_context(anyio.create_task_group())
        try:
            with anyio.fail_after(self.timeout * 2):
                await self._check()
        except Exception as exc:
            why = _reason(exc)
            self._count("unavailable")
            log.warning("redis broker starts NOT ready: %s url=%s", why, self.url)
            self._notify(False, why)
        self._started = True
        self._tasks.start_soon(self._health)
        self._tasks.start_soon(self._flusher)
        self._tasks.start_soon(self._reader)
        self._tasks.start_soon(self._teller)
        self._tasks.start_soon(self._greeter)
        if self._ready:  # from now on, messages told to this instance reach it (bounded)
            with anyio.move_on_after(self.timeout * 2):
                await self._listening.wait()

    async def _keep_open(
        self, client: Client, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the client open until :meth:`stop` (which cancels this task). Opening a
        cluster client reads the cluster's layout, so it fails while no node answers:
        then try again with backoff, the broker not ready meanwhile (as for one Redis,
        whose client connects on first use). Started after the first attempt."""
        delay = self.reconnect_min_delay
        started = False
        while True:
            try:
                async with client:
                    self._client = client
                    if not started:
                        started = True
                        task_status.started()
                    await anyio.sleep_forever()
            except Exception as exc:
                self._client, self._unopened = None, _reason(exc)
                if not started:
                    started = True
                    task_status.started()
            await anyio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self.reconnect_max_delay)

    @staticmethod
    async def _settle() -> None:
        """A few loop turns between the workers' end and the client's: coredis's sharded
        pub/sub leaves its connections to garbage collection, and their finalizers must
        run while the client is still open (else each logs a KeyError traceback)."""
        for _ in range(3):
            await anyio.lowlevel.checkpoint()

    async def stop(self) -> None:
        """Flush what is buffered (bounded), withdraw this instance's presence, disconnect."""
        if self._stack is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout * 2):
            if self._ready:
                try:
                    await self._barrier()
                    # withdraw this instance's presence (its entries too, so that no
                    # room's count includes them)
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for room, entries in self._present.items():
                            keys = self._presence_keys(room)
                            for member, key in entries:
                                args = [self.instance, member, key]
                                self._s["PRESENCE_REMOVE"](keys, args, client=pipe)
                            pipe.zrem(keys[1], [self.instance])
                except Exception as exc:
                    log.warning("redis broker stopped without flushing: %s", exc)
        self._ready = False
        self._stopping = True  # what fails from now on is the stop, not Redis
        assert self._tasks is not None
        self._tasks.cancel_scope.cancel()
        stack, self._stack = self._stack, None
        await stack.aclose()  # the workers' task group, then the client's (_keep_open)
        self._client = None

    async def flush(self) -> None:
        """Wait (bounded) until every queued write reached Redis, so its held frames are
        delivered; while Redis is away they were delivered already."""
        if self._ready:
            with contextlib.suppress(BackchannelError):
                await self._barrier()

    async def _check(self) -> None:
        """One health probe: read (or make) the epoch; on a cluster, every primary must
        answer too (a failed master's slots cannot be served until its replica is
        promoted). Marks the broker ready."""
        if isinstance(self._redis, coredis.RedisCluster):
            await self._redis.ping()  # coredis sends it to every primary
        key = f"{self.prefix}:epoch"
        epoch = await self._redis.get(key)  # a command costs Redis less than a script
        if epoch is None:
            epoch = await self._s["EPOCH"]([key], [os.urandom(8).hex()])
        self._set_epoch(_text(epoch))
        if not self._ready:
            await self._reassert_presence()
        self._set_ready(True, "connected")

    async def _health(self) -> None:
        """Forever: probe Redis, renew leases and presence; back off while it is away."""
        delay = self.reconnect_min_delay
        next_beat = next_lease = 0.0
        tick = min(self.health_interval, self.presence_ttl / 3, self.session_lease / 3)
        while True:
            try:
                with anyio.fail_after(self.timeout * 2):
                    await self._check()
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.presence_ttl / 3
                    await self._beat()
                if now >= next_lease:
                    next_lease = now + self.session_lease / 3
                    await self._renew_leases()
                delay = self.reconnect_min_delay
                await anyio.sleep(tick)
            except Exception as exc:
                self._set_ready(False, _reason(exc))
                await self._rediscover()
                await anyio.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, self.reconnect_max_delay)

    async def _rediscover(self) -> None:
        """On a cluster, read its layout again after a failure: a failover gives a failed
        master's slots to its replica, and coredis would otherwise keep asking the dead
        node. Best effort, bounded: the next failure tries again."""
        client = self._client
        if isinstance(client, coredis.RedisCluster):
            with contextlib.suppress(Exception), anyio.move_on_after(self.timeout * 2):
                await client.connection_pool.cluster_layout.initialize()
                self._count("cluster_layout_refreshed")

    # ------------------------------------------------------- buffered writes

    def _count_loudly(self, name: str, message: str, *args: Any) -> None:
        """Count an event that may repeat fast; log its 1st, 10th, 100th, then every 1000th."""
        self._count(name)
        n = self.counters[name]
        if n in (1, 10, 100) or not n % 1000:
            log.warning(message + " (%d so far)", *args, n)

    def _write(self, session_id: str, kind: int, a: Any = None, b: Any = None) -> None:
        """Queue one session write for the flusher (sync: the per-message path)."""
        self._queued += 1
        dropped = self._writes.put((self._queued, session_id, kind, a, b))
        if dropped is not None:
            self._count_loudly(
                "dropped_writes",
                "redis broker write buffer full (%d): dropped a write of session %s "
                "(its resume will report trimmed)",
                self.max_buffered_writes,
                dropped[1],
            )

    def _deliver_when_kept(self, deliver: Callable[[bytes], None], frame: bytes) -> None:
        """Write-through (issue 13): a session frame reaches its client once Redis holds
        it, so that an instance that dies never leaves a client ahead of what another
        instance can replay. Frames wait for the flush of their write, in append order
        (one pipeline per batch: per loop tick under load). While Redis is not reachable
        they go out at once, written when it is back (a crash then may leave a client
        ahead: its resume says so)."""
        if self._ready:
            self._held.append((self._queued, deliver, frame))
        else:
            deliver(frame)

    def _release(self, upto: int) -> None:
        """Deliver the held frames whose writes up to ``upto`` were flushed, in order."""
        held = self._held
        while held and held[0][0] <= upto:
            _, deliver, frame = held.popleft()
            try:
                deliver(frame)
            except Exception:
                self._count("deliver_errors")
                log.exception("redis broker: delivering a session frame failed")

    async def _barrier(self) -> None:
        """Wait until every write queued so far reached Redis (read your writes)."""
        target = self._queued
        if self._flushed >= target:
            return
        with anyio.move_on_after(self.timeout * 2):
            while self._flushed < target:
                await self._flush_done.wait()
        if self._flushed < target:
            raise _Unavailable("writes are not reaching Redis")

    async def _flusher(self) -> None:
        """Forever: send buffered writes in pipelined batches, in order per session.

        A small batch lingers ``_LINGER`` seconds first, for the writes of other sessions
        on their way (a crowd joining, answers of one fan-out): a call costs Redis more
        than the writes in it (issue 13)."""
        while True:
            await self._writes.wait()
            if len(self._writes.items) < _BATCH // 16:
                await anyio.sleep(_LINGER)
            batch = await self._next_batch(self._writes)
            try:
                with anyio.fail_after(self.timeout * 2):
                    await self._send(batch)
            except _UNREACHABLE as exc:
                # idempotent: sent again once Redis is back
                self._writes.items.extendleft(reversed(batch))
                self._set_ready(False, f"flush failed: {_reason(exc)}")
                continue
            except Exception:
                self._count("write_errors")
                log.exception("redis broker dropped %d writes that Redis refused", len(batch))
            self._flushed = max(self._flushed, batch[-1][0])
            self._release(self._flushed)
            done, self._flush_done = self._flush_done, anyio.Event()
            done.set()

    async def _next_batch(self, backlog: _Backlog[T]) -> list[T]:
        """Wait for queued items and a reachable Redis; take up to ``_BATCH`` of them."""
        await backlog.wait()
        if not self._ready:
            await self._up.wait()
        items = backlog.items
        return [items.popleft() for _ in range(min(len(items), _BATCH))]

    async def _send(self, batch: list[tuple[int, str, int, Any, Any]]) -> None:
        """A batch in as few calls as it takes: one ``SESSIONS`` script call per 256
        sessions, each session's writes as runs of one kind, in the order queued."""
        runs: dict[str, list[tuple[int, list[Any]]]] = {}
        for _, session_id, kind, a, b in batch:
            session_runs = runs.setdefault(session_id, [])
            if kind in (_APPEND, _REMEMBER):
                if session_runs and session_runs[-1][0] == kind:
                    session_runs[-1][1].extend((a, b))
                else:
                    session_runs.append((kind, [a, b]))
            else:
                session_runs.append((kind, [] if a is None else [a]))
        head: list[Any] = [
            self.outbox_size,
            self.outbox_max_bytes,
            self.instance,
            self.dedupe_size,
            int(self.session_lease * 1000),
            self._control_channel(""),
        ]
        calls: list[tuple[list[str], list[Any]]] = []
        for group in self._groups(runs):
            keys = [k for session_id in group for k in self._session_keys(session_id)]
            args = [*head, len(keys), *keys]
            for session_id in group:
                args += (session_id, len(runs[session_id]))
                for kind, values in runs[session_id]:
                    args += (_KINDS[kind], len(values), *values)
            calls.append((keys[:4], args))
        await self._run("SESSIONS", calls)

    def _groups(self, session_ids: Iterable[str]) -> list[list[str]]:
        """Sessions in groups that one call may write: up to ``_CALL_SESSIONS`` each, and
        on a cluster only sessions whose keys are on one node (a script runs on one)."""
        groups: list[list[str]] = []
        filling: dict[str, list[str]] = {}
        for session_id in session_ids:
            node = self._node_of(session_id)
            group = filling.get(node)
            if group is None:
                group = filling[node] = []
                groups.append(group)
            group.append(session_id)
            if len(group) >= _CALL_SESSIONS:
                del filling[node]
        return groups

    def _node_of(self, session_id: str) -> str:
        """The node holding a session's keys, as this instance last read the layout
        ("" on one Redis)."""
        client = self._client
        if not isinstance(client, coredis.RedisCluster):
            return ""
        try:
            node = client.connection_pool.cluster_layout.node_for_slot(self._slot(session_id))
        except RedisClusterError as exc:  # a slot no node serves now: the batch waits
            raise ClusterError(str(exc)) from exc
        return node.name

    async def _run(self, script: str, calls: list[tuple[list[str], list[Any]]]) -> None:
        """Run ``script`` once per (keys, args), one call after another: a batch is one
        call per node (each a Redis round trip: ~18 µs of Redis CPU here, as much as the
        writes themselves; a pipeline of scripts would cost coredis a SCRIPT EXISTS round
        trip first). A call that meets a key its node no longer holds (the layout changed
        since it was read) may have written part of its sessions: the layout is read
        again and the caller sends the whole batch again (its writes are idempotent)."""
        for keys, args in calls:
            try:
                await self._s[script](keys, args)
            except ResponseError as exc:
                if "non local key" not in str(exc):
                    raise
                await self._rediscover()
                raise ClusterError(f"the cluster layout changed: {exc}") from exc

    async def _for_each(
        self, script: str, items: list[str], keys_of: Callable[[str], list[str]], args: list[Any]
    ) -> None:
        """Run ``script`` once per item, pipelined: one round trip per batch of items."""
        for start in range(0, len(items), _BATCH):
            async with self._redis.pipeline(transaction=False, timeout=self.timeout) as pipe:
                for item in items[start : start + _BATCH]:
                    self._s[script](keys_of(item), args, client=pipe)

    async def _renew_leases(self) -> None:
        """Held sessions keep their keys while this instance lives (it may die holding them)."""
        lease = int(self.session_lease * 1000)
        calls = []
        for group in self._groups(list(self._attached)):
            keys = [k for session_id in group for k in self._session_keys(session_id)]
            calls.append((keys[:4], [self.instance, lease, *keys]))
        await self._run("LEASE", calls)

    # -------------------------------------------------------------- sessions

    def open_session(self, session_id: str, principal_id: str) -> _SessionLog:
        entry = self._hold(session_id, _SessionLog(self, session_id))
        self._attached.add(session_id)
        self._write(session_id, _OPEN, principal_id)
        return entry

    async def find_session(self, session_id: str) -> _Record | None:
        self._need_ready()
        await self._barrier()
        meta_key, _, answers_key, _ = self._session_keys(session_id)

        async def read() -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
            async with self._redis.pipeline(transaction=False, timeout=self.timeout) as pipe:
                meta = pipe.hgetall(meta_key)
                answers = pipe.hgetall(answers_key)
            return await meta, await answers

        meta, answers = await self._call(read())
        if not meta or b"p" not in meta:
            return None
        entry = self._logs.get(session_id)
        if entry is not None and meta.get(b"o") != self.instance.encode():
            entry = None  # another instance took it over (the takeover message was lost)
            self._let_go_here(session_id)
        if entry is None:  # held by another instance (or by none, after a crash)
            entry = _SessionLog(self, session_id)
            self._found.pop(session_id, None)
            self._found[session_id] = entry  # held here once attached
            if len(self._found) > _FOUND_MAX:
                del self._found[next(iter(self._found))]
        if entry.cold or entry is not self._logs.get(session_id):
            entry.fill(answers)  # a detached session's cache was let go of
        return _Record(_text(meta[b"p"]), int(meta.get(b"l", 0)), entry)

    def evicted_session(self, session_id: str) -> bool:
        return False  # sessions live in Redis: a process only lets go of its copy

    def detach_session(self, session_id: str, last_seq: int, ttl: float) -> None:
        entry = self._logs.get(session_id)
        if entry is None:
            return
        expiry = math.ceil((time.time() + ttl) * 1000)
        self._attached.discard(session_id)
        self._attaching.pop(session_id, None)
        self._detached.pop(session_id, None)
        self._detached[session_id] = expiry  # the newest detached
        entry.clear()  # nobody recalls answers of a detached session; a resume reads them
        self._write(session_id, _DETACH, expiry)

    def attach_session(self, session_id: str, last_seq: int) -> None:
        self._detached.pop(session_id, None)
        if session_id not in self._logs:  # resumed here from another instance
            found = self._found.pop(session_id, None)
            self._hold(session_id, found or _SessionLog(self, session_id))
        self._attached.add(session_id)
        self._write(session_id, _ATTACH, last_seq)
        self._attaching[session_id] = self._queued

    def drop_session(self, session_id: str) -> None:
        self._let_go_here(session_id)
        self._write(session_id, _DROP)

    def expired_sessions(self) -> list[str]:
        """Sessions this instance detached whose expiry passed (Redis expired their keys:
        nothing to delete; another instance that resumed one renewed them), and those it
        let go of for memory (still in Redis: a resume finds them there)."""
        now = time.time() * 1000
        gone = [sid for sid, expiry in self._detached.items() if now > expiry + 1]
        for session_id in gone:
            self._let_go_here(session_id)
        gone += self._gone
        self._gone = []
        return gone

    def _hold(self, session_id: str, entry: _SessionLog) -> _SessionLog:
        """``entry`` is the log of a session held here from now on."""
        self._let_go_here(session_id)
        self._logs[session_id] = entry
        self._cached(entry, SESSION_COST + entry.size)
        return entry

    def _cached(self, entry: _SessionLog, delta: int) -> None:
        """A held session's cache grew by ``delta`` bytes: past the total, make room
        (a log not held here, a lookup's or a let-go one's, is not counted)."""
        if self._logs.get(entry.id) is not entry:
            return
        self.used += delta
        while delta > 0 and self.used > self.total_max_bytes:
            if self._detached:  # the session detached longest ago: Redis keeps it
                session_id = next(iter(self._detached))
                self._let_go_here(session_id)
                self._gone.append(session_id)
                self._count_loudly(
                    "sessions_let_go",
                    "redis broker: session memory full (session.total_max_bytes=%d): "
                    "let go of the detached session %s (it stays in Redis)",
                    self.total_max_bytes,
                    session_id,
                )
            elif not (entry.shed() or self._shed_other()):
                return

    def _shed_other(self) -> bool:
        """Let go of one cached answer of another held session, taking them in turn."""
        for _ in range(2):  # the rest of this round, then one whole round
            for entry in self._turns:
                if self._logs.get(entry.id) is entry and entry.shed():
                    return True
            self._turns = iter(list(self._logs.values()))
        return False

    async def _since(self, session_id: str, seq: int) -> list[bytes] | None:
        self._need_ready()
        await self._barrier()
        keys = self._session_keys(session_id)[:2]
        reply = await self._call(self._s["SINCE"](keys, [seq]))
        if reply[0] != 1:
            return None
        return list(reply[1]) if len(reply) > 1 else []

    async def _answer(self, session_id: str, seq: int, digest: int) -> tuple[bytes, int]:
        """The answer frame ``seq`` of a remembered request; ``b""`` when it is gone or
        Redis cannot say (the request must not run twice either way)."""
        try:
            self._need_ready()
            await self._barrier()
            keys = self._session_keys(session_id)[:2]
            frame = await self._call(self._s["FRAME_AT"](keys, [seq]))
        except BackchannelError:
            return b"", digest
        return (bytes(frame) if frame else b""), digest

    async def _recall(self, session_id: str, request_id: str) -> tuple[bytes, int] | None:
        """A cold log's cache missed: the answer Redis remembers for ``request_id``, if any
        (None also when Redis cannot say now: the request runs, as it would have without
        the cache bound)."""
        try:
            self._need_ready()
            await self._barrier()
            answers_key = self._session_keys(session_id)[2]
            value = await self._call(self._redis.hget(answers_key, request_id))
        except BackchannelError:
            self._count("cold_recalls_failed")
            return None
        self._count("cold_recalls")
        if value is None:
            return None
        ms, seq, digest = _text(value).split(":")
        if time.time() * 1000 - int(ms) > self.dedupe_window * 1000:
            return None
        return await self._answer(session_id, int(seq), int(digest))

    # ------------------------------------------------------- control messages

    def on_control(self, listener: ControlListener) -> None:
        self._control = listener

    def tell(self, instance: str | None, message: dict[str, Any]) -> None:
        """Queue a control message for the teller (sync: ``app.send`` may call it)."""
        told = (instance, orjson.dumps({**message, "from": self.instance}))
        if self._tells.put(told) is not None:
            self._count_loudly(
                "control_dropped",
                "redis broker control buffer full (%d): dropped a control message",
                self.max_buffered_writes,
            )

    async def _teller(self) -> None:
        """Forever: publish queued control messages in order, pipelined.

        At most once (PUBLISH is not idempotent, so a batch cut by a lost connection
        is counted, not sent again); a message for an instance nobody listens for
        (it died) is counted and logged.
        """
        while True:
            batch = await self._next_batch(self._tells)
            try:
                with anyio.fail_after(self.timeout * 2):
                    received = await self._publish_all(batch)
            except _UNREACHABLE as exc:
                self._count("control_lost", len(batch))
                self._set_ready(False, f"control publish failed: {_reason(exc)}")
                log.warning("redis broker lost %d control messages: %s", len(batch), _reason(exc))
                continue
            except Exception:  # Redis refused (e.g. an ACL without pub/sub): never fatal
                self._count("control_lost", len(batch))
                log.exception("redis broker dropped %d control messages Redis refused", len(batch))
                continue
            for (to, _), n in zip(batch, received, strict=True):
                if to is not None and not n:
                    self._count_loudly(
                        "control_unreached",
                        "control message for instance %s reached no process (is it gone?)",
                        to,
                    )

    async def _publish_all(self, batch: list[tuple[str | None, bytes]]) -> list[int]:
        """``PUBLISH`` each, in order, in one call; on a cluster always from the same node
        (coredis sends a bare ``PUBLISH`` to any node, and messages leaving different
        nodes may overtake each other)."""
        args: list[Any] = []
        for to, data in batch:
            args += (self._control_channel(to), data)
        received: list[Any] = await self._s["CONTROL"]([f"{self.prefix}:control"], args)
        return [int(n) for n in received]

    async def _on_control(self, channel: str, data: bytes) -> None:
        try:
            message = orjson.loads(data)
            if channel == self._control_channel(None) and message.get("from") == self.instance:
                return  # this instance's own broadcast: the kernel delivered it here already
            if message.get("op") == "takeover":  # may need Redis: not in the reader's way
                assert self._tasks is not None
                self._tasks.start_soon(self._take_over, message)
            elif self._control is not None:
                self._control(message)
        except Exception:
            self._count("control_errors")
            log.exception("control message failed: %r", bytes(data[:200]))

    async def _take_over(self, message: dict[str, Any]) -> None:
        """Another instance attached a session held here: let go of it, unless this
        instance resumed it again since (the message is late, or this one's ATTACH is
        still on its way): then Redis names this instance the holder."""
        session_id = message["session"]
        try:
            if self._flushed < self._attaching.get(session_id, 0):
                owner: Any = self.instance.encode()  # this one's ATTACH lands after theirs
            else:
                meta_key = self._session_keys(session_id)[0]
                owner = await self._call(self._redis.hget(meta_key, "o"))
        except BackchannelError:
            owner = None  # Redis cannot say now: the other instance's attach is the news
        if owner is not None and _text(owner) == self.instance:
            self._count("takeover_late")
            return
        self._let_go_here(session_id)
        if self._control is not None:
            try:
                self._control(message)
            except Exception:
                self._count("control_errors")
                log.exception("takeover of session %s failed", session_id)

    def _let_go_here(self, session_id: str) -> None:
        """Forget a session another instance holds now (it writes nothing more here), or
        one let go of for memory."""
        entry = self._logs.pop(session_id, None)
        if entry is not None:
            self.used -= SESSION_COST + entry.size
        self._attached.discard(session_id)
        self._detached.pop(session_id, None)
        self._attaching.pop(session_id, None)

    # ------------------------------------------------------------------ rooms

    async def _based(self, room: str) -> None:
        """A room subscribed here but whose base offset is not read yet: wait for it,
        so what this call sees (a publish, a position) is after the subscription."""
        state = self._rooms.get(room)
        if state is not None and not state.based.is_set():
            with anyio.move_on_after(self.timeout * 2):
                await state.based.wait()

    async def publish(
        self,
        room: str,
        message: dict[str, Any],
        *,
        history_size: int,
        history_ttl: float,
        dedupe: str | None = None,
    ) -> dict[str, Any]:
        """Store and fan out: one script, one round trip; the listeners of every instance
        (this one's too) get the message from pub/sub, in offset order."""
        self._need_ready()
        await self._based(room)
        publish_id = f"{self.instance}-{next(self._publish_ids)}"
        keep = int(max(self.room_ttl, history_ttl) * 1000)
        reply = await self._call(
            self._s["PUBLISH"](
                self._room_keys(room),
                [
                    self._channel(room),
                    orjson.dumps(message),
                    os.urandom(8).hex(),
                    history_size,
                    int(history_ttl * 1000),
                    keep,
                    publish_id,
                    dedupe or "",
                    int(self.cluster),
                ],
            ),
            write=True,
        )
        offset, epoch = reply[0], reply[1]
        if len(reply) > 2:  # a retry of a publish: nothing was published now
            self._count("publish_retried")
            if reply[2] is not None:
                message = orjson.loads(reply[2])
        return {**message, "room": room, "offset": int(offset), "epoch": _text(epoch)}

    async def room_since(
        self, room: str, offset: int, epoch: str
    ) -> tuple[list[dict[str, Any]] | None, int, str]:
        self._need_ready()
        await self._based(room)
        keep = int(self.room_ttl * 1000)
        reply = await self._call(
            self._s["ROOM_SINCE"](
                self._room_keys(room),
                [offset, epoch, os.urandom(8).hex(), keep, int(self.cluster)],
            )
        )
        current, room_epoch, covered = int(reply[0]), _text(reply[1]), reply[2]
        if not covered:
            return None, current, room_epoch
        missed = [
            {**orjson.loads(body), "room": room, "offset": offset + i, "epoch": room_epoch}
            for i, body in enumerate(reply[3:], 1)
        ]
        return missed, current, room_epoch

    async def room_position(self, room: str) -> tuple[int, str]:
        """From this instance's subscription when it has a base (no round trip: every
        message after it comes through pub/sub or a catch-up), else from Redis."""
        await self._based(room)
        state = self._rooms.get(room)
        if state is not None and state.last is not None and state.epoch is not None:
            return state.last, state.epoch
        _, offset, epoch = await self.room_since(room, 0, "")
        return offset, epoch

    def subscribe(self, room: str, listener: RoomListener) -> None:
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = _Room(room)
            self._events_in.send_nowait(("subscribe", state))
        if listener not in state.listeners:
            state.listeners.append(listener)

    def unsubscribe(self, room: str, listener: RoomListener) -> None:
        state = self._rooms.get(room)
        if state is None or listener not in state.listeners:
            return
        state.listeners.remove(listener)
        if not state.listeners:
            del self._rooms[room]
            self._events_in.send_nowait(("unsubscribe", room))

    # ---------------------------------------------------------- live fan-out

    async def _reader(self) -> None:
        """Forever: hold the pub/sub connection; deliver room messages in offset order.

        One task handles, in arrival order, pub/sub messages and (un)subscribe
        requests, so a room's base offset, its catch-ups and its live messages are
        never reordered. A lost connection is made again with backoff, every room is
        subscribed again, and each subscription's confirmation fills the gap from
        the room's stream. On a cluster, rooms are on sharded pub/sub (a connection to
        each primary, made again when one fails), control messages on classic pub/sub.
        """
        delay = self.reconnect_min_delay
        lost: float | None = None  # when the connection was lost, until it is back
        attempts = 0
        while True:
            try:
                async with AsyncExitStack() as subscriptions:
                    control_sub = rooms_sub = await subscriptions.enter_async_context(
                        self._redis.pubsub(
                            retry_policy=NoRetryPolicy(), subscription_timeout=self.timeout
                        )
                    )
                    if isinstance(self._redis, coredis.RedisCluster):
                        rooms_sub = await subscriptions.enter_async_context(
                            self._redis.sharded_pubsub(
                                retry_policy=NoRetryPolicy(), subscription_timeout=self.timeout
                            )
                        )
                    channels: set[str] = set()
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._pump, control_sub)
                        if rooms_sub is not control_sub:
                            tg.start_soon(self._pump, rooms_sub)
                        control = [self._control_channel(i) for i in (self.instance, None)]
                        await control_sub.subscribe(*control)
                        channels.update(control)
                        self._listening.set()
                        for state in list(self._rooms.values()):
                            await self._establish(rooms_sub, channels, state)
                        delay = self.reconnect_min_delay
                        if lost is not None:
                            log.info(
                                "redis broker pub/sub connection restored after %.1fs "
                                "(%d attempts); rooms subscribed again: %d",
                                time.monotonic() - lost,
                                attempts,
                                len(self._rooms),
                            )
                            lost, attempts = None, 0
                        async for kind, value in self._events:
                            await self._on_event(rooms_sub, channels, kind, value)
            except Exception as exc:
                if self._stopping:
                    return
                # One line per transition (lost, then restored), not one per attempt: an
                # outage of a few seconds is otherwise ~20 lines (issue 11).
                self._count("subscriber_reconnects")
                attempts += 1
                if lost is None:
                    lost = time.monotonic()
                    log.warning(
                        "redis broker pub/sub connection lost: %s; reconnecting with backoff "
                        "(%g-%gs)",
                        _reason(exc),
                        self.reconnect_min_delay,
                        self.reconnect_max_delay,
                    )
                else:
                    log.debug("redis broker pub/sub attempt %d failed: %s", attempts, _reason(exc))
                await self._rediscover()
            await anyio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self.reconnect_max_delay)

    async def _pump(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message()
            if message is not None:
                self._events_in.send_nowait(("pubsub", message))

    async def _establish(self, pubsub: Any, channels: set[str], state: _Room) -> None:
        """Read a new subscription's base offset, then subscribe its channel."""
        if self._rooms.get(state.name) is not state:
            return  # unsubscribed (or replaced) meanwhile
        if state.last is None:
            meta_key = self._room_keys(state.name)[0]
            offset, epoch = await self._redis.hmget(meta_key, ["offset", "epoch"])
            state.last = int(offset or 0)
            state.epoch = None if epoch is None else _text(epoch)
            state.based.set()
        channel = self._channel(state.name)
        if channel not in channels:
            await pubsub.subscribe(channel)
            channels.add(channel)

    async def _on_event(self, pubsub: Any, channels: set[str], kind: str, value: Any) -> None:
        if kind == "subscribe":
            await self._establish(pubsub, channels, value)
        elif kind == "unsubscribe":
            channel = self._channel(value)
            if value not in self._rooms and channel in channels:
                channels.discard(channel)
                await pubsub.unsubscribe(channel)
        elif value["type"] == "sunsubscribe" and _text(value["channel"]) in channels:
            # not asked for: the room's slot moved to another node (resharding), which
            # drops its sharded subscribers; subscribe everything again where it is now
            self._count("shard_moved")
            raise _Unavailable(f"Redis moved channel {_text(value['channel'])}")
        elif value["type"] in ("subscribe", "ssubscribe", "message"):
            channel = _text(value["channel"])
            rooms = self._room_channels
            if not channel.startswith(rooms):  # a control channel
                if value["type"] == "message":
                    await self._on_control(channel, bytes(value["data"]))
                return
            state = self._rooms.get(channel[len(rooms) + 1 : -1])  # prefix:r:{room}
            if state is None or state.last is None:
                return  # unsubscribed, or published before this subscription
            if value["type"] != "message":  # confirmed (again): fill what was missed
                await self._catch_up(state)
                return
            head, epoch, _, body = bytes(value["data"]).split(b" ", 3)
            await self._deliver(state, int(head), _text(epoch), body)

    async def _catch_up(self, state: _Room) -> None:
        """Deliver what the room's stream holds after ``state.last``."""
        assert state.last is not None
        reply: list[Any] = await self._s["ROOM_AFTER"](
            self._room_keys(state.name), [state.last, state.epoch or "", _CATCH_UP_MAX]
        )
        if reply[1] is None:
            return
        epoch = _text(reply[1])
        entries = reply[2:]
        for i in range(0, len(entries), 3):
            await self._deliver(state, int(entries[i]), epoch, entries[i + 2], fill=False)

    async def _deliver(
        self, state: _Room, offset: int, epoch: str, body: bytes, *, fill: bool = True
    ) -> None:
        assert state.last is not None
        if epoch != state.epoch:
            if state.epoch is not None:
                self._count("room_epoch_changed")
                log.warning(
                    "room %s: epoch changed %s -> %s (its history was lost)",
                    state.name,
                    state.epoch,
                    epoch,
                )
            state.epoch, state.last = epoch, 0
        if offset <= state.last:
            return  # delivered already (a catch-up and pub/sub overlap)
        if offset > state.last + 1 and fill:
            self._count("gaps")
            await self._catch_up(state)
            if offset <= state.last:
                return
        if offset > state.last + 1:
            self._count("gaps_lost")
            log.warning(
                "room %s: offsets %d..%d are gone from its history; listeners skip them",
                state.name,
                state.last + 1,
                offset - 1,
            )
        state.last = offset
        stored = {**orjson.loads(body), "room": state.name, "offset": offset, "epoch": epoch}
        for listener in list(state.listeners):
            try:
                listener(stored)
            except Exception:
                self._count("listener_errors")
                log.exception("room listener failed room=%s", state.name)

    # --------------------------------------------------------------- presence

    async def presence_add(self, room: str, member: str, key: str) -> tuple[bool, int]:
        """Gathered with the other adds of the room waiting now: one script call for a
        crowd joining at once (the greeter task makes them)."""
        self._need_ready()
        arrival = _Arrival(member, key)
        self._arrivals.setdefault(room, []).append(arrival)
        self._arriving.set()
        with anyio.move_on_after(self.timeout * 3):
            await arrival.done.wait()
        if arrival.result is None:
            raise _Unavailable(arrival.failure or "presence was not confirmed in time")
        self._present.setdefault(room, set()).add((member, key))
        return arrival.result

    async def _greeter(self) -> None:
        """Forever: the waiting presence adds, one ``PRESENCE_ADD`` call per room."""
        while True:
            await self._arriving.wait()
            self._arriving = anyio.Event()
            arrivals, self._arrivals = self._arrivals, {}
            ttl = int(self.presence_ttl * 1000)
            for room, crowd in arrivals.items():
                args: list[Any] = [self.instance]
                for arrival in crowd:
                    args += (arrival.member, arrival.key)
                args.append(ttl)
                try:
                    reply = await self._call(
                        self._s["PRESENCE_ADD"](self._presence_keys(room), args)
                    )
                except _Unavailable:
                    failure = "Redis did not answer"
                except Exception as exc:  # Redis refused: never fatal to the greeter
                    log.exception("redis broker: presence add failed room=%s", room)
                    failure = _reason(exc)
                else:
                    for i, arrival in enumerate(crowd):
                        arrival.result = (bool(reply[2 * i]), int(reply[2 * i + 1]))
                    failure = ""
                for arrival in crowd:
                    arrival.failure = failure
                    arrival.done.set()

    async def presence_remove(self, room: str, member: str, key: str) -> tuple[bool, int]:
        """Remove now, or, while Redis is away, as soon as it is back (this instance's
        heartbeat would otherwise keep the entry counting); False then: who can say."""
        entries = self._present.get(room)
        if entries is not None:
            entries.discard((member, key))
            if not entries:
                del self._present[room]
        try:
            self._need_ready()
            gone, count = await self._call(
                self._s["PRESENCE_REMOVE"](self._presence_keys(room), [self.instance, member, key])
            )
        except BackchannelError:
            self._absent.add((room, member, key))
            self._count("presence_remove_deferred")
            return False, 0
        return bool(gone), int(count)

    async def presence(self, room: str) -> list[str]:
        self._need_ready()
        members = await self._call(self._s["PRESENCE_LIST"](self._presence_keys(room)))
        return [_text(m) for m in members]

    async def presence_count(self, room: str) -> int:
        """``HLEN``: counts the members of an instance that died until they are swept
        (by ``presence``, or a little with each heartbeat of a live instance)."""
        self._need_ready()
        return int(await self._call(self._redis.hlen(self._presence_keys(room)[0])))

    async def _beat(self) -> None:
        """This instance still counts in every room where it has presence."""
        ttl = int(self.presence_ttl * 1000)
        await self._for_each(
            "PRESENCE_BEAT",
            list(self._present),
            self._presence_keys,
            [self.instance, _SWEEP, ttl],
        )

    async def _reassert_presence(self) -> None:
        """After Redis was away (maybe restarted empty), put this instance's presence back
        and take out what left meanwhile."""
        ttl = int(self.presence_ttl * 1000)
        while self._present or self._absent:
            await self._restore_presence(ttl)
            if not self._absent:  # nothing left meanwhile
                return

    async def _restore_presence(self, ttl: int) -> None:
        absent, self._absent = self._absent, set()
        try:
            async with self._redis.pipeline(transaction=False, timeout=self.timeout) as pipe:
                for room, member, key in absent:
                    self._s["PRESENCE_REMOVE"](
                        self._presence_keys(room), [self.instance, member, key], client=pipe
                    )
                for room, entries in self._present.items():
                    for member, key in entries:
                        self._s["PRESENCE_ADD"](
                            self._presence_keys(room),
                            [self.instance, member, key, ttl],
                            client=pipe,
                        )
        except BaseException:
            self._absent |= absent  # the next recovery tries again
            raise
