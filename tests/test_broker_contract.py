"""The broker contract (``backchannel.broker.Broker``), written once for every broker.

Each test takes the ``broker`` fixture: a started broker built by one of the
factories in :data:`BROKERS`, with the small bounds below. Today that is the
in-memory broker; the redis plugin adds its own factories (``"redis": ...``,
``"redis-cluster": ...``) and runs the same suite against a real Redis and a real
Redis Cluster. A factory must yield a broker
that is started and isolated from every other test (e.g. a fresh key prefix),
and stop it afterwards; it is also where a broker that needs a server skips
(``pytest.skip``) when none is reachable and ``CI`` is unset (issue 5).

Networked brokers deliver to listeners and flush writes in the background, so
tests wait for what they expect within a bound (``until``) and prove an absence
with a witness: a later message or session that must arrive or expire after the
one that must not.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import anyio
import pytest
from backchannel_redis.testing import redis_broker, redis_cluster_broker

from backchannel.broker import Broker, SessionLog
from backchannel.memory import MemoryBroker

pytestmark = pytest.mark.anyio

T = TypeVar("T")

#: frames a session log keeps
OUTBOX_SIZE = 4
#: bytes a session log keeps (whichever bound is hit first trims); brokers may count a
#: frame's or an answer's memory beyond its bytes (the in-memory one does), so the tests
#: stay clear of the edge: only the one about bytes reaches it
OUTBOX_BYTES = 1024
#: seconds a remembered answer is recalled
DEDUPE_WINDOW = 0.3
#: seconds to wait for anything the broker does in the background
BOUND = 5.0

#: name -> factory of an async context manager yielding a started broker
BrokerFactory = Callable[..., AbstractAsyncContextManager[Broker]]


@asynccontextmanager
async def memory_broker(
    *, outbox_size: int, outbox_max_bytes: int, dedupe_window: float
) -> AsyncIterator[Broker]:
    broker = MemoryBroker(
        outbox_size=outbox_size, outbox_max_bytes=outbox_max_bytes, dedupe_window=dedupe_window
    )
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


#: the redis factory uses a fresh key prefix per test and deletes its keys after; it
#: skips without a reachable Redis, and fails instead when ``CI`` is set; the
#: redis-cluster one runs the Redis broker in cluster mode on a private Redis Cluster
#: (3 masters + 3 replicas, started once per test process; issue 15)
BROKERS: dict[str, BrokerFactory] = {
    "memory": memory_broker,
    "redis": redis_broker,
    "redis-cluster": redis_cluster_broker,
}


@pytest.fixture(params=sorted(BROKERS))
async def broker(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[Broker]:
    factory = BROKERS[request.param]
    async with factory(
        outbox_size=OUTBOX_SIZE, outbox_max_bytes=OUTBOX_BYTES, dedupe_window=DEDUPE_WINDOW
    ) as started:
        yield started


async def until(probe: Callable[[], Awaitable[T]], done: Callable[[T], bool]) -> T:
    """Call ``probe`` until ``done(result)``, within :data:`BOUND` seconds."""
    with anyio.fail_after(BOUND):
        while True:
            result = await probe()
            if done(result):
                return result
            await anyio.sleep(0.01)


class Collector:
    """A room listener that records what it is called with."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []

    def __call__(self, message: dict[str, Any]) -> None:
        self.got.append(message)

    @property
    def offsets(self) -> list[int]:
        return [m["offset"] for m in self.got]

    async def wait_for(self, count: int) -> list[dict[str, Any]]:
        """Wait until at least ``count`` messages arrived (bounded)."""

        async def probe() -> int:
            return len(self.got)

        await until(probe, lambda n: n >= count)
        return self.got


class _AnyEpoch:
    """Equal to any non-empty epoch string."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)

    def __hash__(self) -> int:
        return 0


ANY_EPOCH: Any = _AnyEpoch()


def frame(seq: int, size: int = 8) -> bytes:
    """An encoded frame of exactly ``size`` bytes that says which ``seq`` it is."""
    head = f"{seq}:".encode()
    return head + b"x" * (size - len(head))


async def recall(log: SessionLog, request_id: str) -> tuple[bytes, int] | None:
    """``log.recall`` (the answer frame and the request's digest), which a networked
    broker may make awaitable."""
    answer = log.recall(request_id)
    if inspect.isawaitable(answer):
        answer = await answer
    assert answer is None or isinstance(answer, tuple)
    return answer


async def publish(broker: Broker, room: str, text: str, **bounds: Any) -> dict[str, Any]:
    bounds.setdefault("history_size", 100)
    bounds.setdefault("history_ttl", 3600.0)
    return await broker.publish(room, {"from": "u", "text": text}, **bounds)


# ----------------------------------------------------------------- the broker


async def test_broker_is_ready_named_and_has_a_stable_epoch(broker: Broker) -> None:
    assert isinstance(broker, Broker)
    assert isinstance(broker.name, str) and broker.name
    assert broker.ready is True
    epoch = broker.epoch
    assert isinstance(epoch, str) and epoch
    await publish(broker, "lobby", "hi")
    assert broker.epoch == epoch


# ---------------------------------------------------------------- session logs


async def test_session_log_returns_frames_after_seq_in_order_unchanged(broker: Broker) -> None:
    log = broker.open_session("s-order", "alice")
    assert isinstance(log, SessionLog)
    assert await log.since(0) == []
    frames = [frame(seq) for seq in (1, 2, 3)]
    for seq, data in enumerate(frames, 1):
        log.append(seq, data, None)
    assert await log.since(0) == frames
    assert await log.since(1) == frames[1:]
    assert await log.since(2) == frames[2:]


async def test_appended_frames_are_delivered_once_in_order_and_kept(broker: Broker) -> None:
    """``append`` hands each frame to ``deliver`` exactly once, in the order appended (a
    networked broker once the write is acknowledged), and the frames are kept."""
    log = broker.open_session("s-deliver", "alice")
    other = broker.open_session("s-deliver-2", "bob")
    delivered: list[bytes] = []
    frames = [frame(seq) for seq in (1, 2, 3)]
    for seq, data in enumerate(frames, 1):
        log.append(seq, data, delivered.append)
        other.append(seq, frame(seq, size=9), None)  # no connection: kept, not delivered

    async def probe() -> int:
        return len(delivered)

    await until(probe, lambda n: n >= 3)
    assert delivered == frames
    record = await broker.find_session("s-deliver")
    assert record is not None and record.last_seq == 3
    assert await record.log.since(0) == frames
    log.append(4, frame(4), delivered.append)  # the witness: nothing else was delivered
    await until(probe, lambda n: n >= 4)
    assert delivered == [*frames, frame(4)]


async def test_since_last_seq_is_empty_and_last_seq_lets_the_caller_see_ahead(
    broker: Broker,
) -> None:
    """``since(last_seq)`` is ``[]``; a ``seq`` beyond it is the caller's to refuse
    (``ahead``), which it can because the record reports ``last_seq``."""
    log = broker.open_session("s-ahead", "alice")
    for seq in (1, 2, 3):
        log.append(seq, frame(seq), None)
    assert await log.since(3) == []
    record = await until(lambda: broker.find_session("s-ahead"), lambda r: r is not None)
    assert record is not None
    assert record.last_seq == 3
    assert not await record.log.since(7)


async def test_session_log_trimmed_by_frames_no_longer_covers_old_seqs(broker: Broker) -> None:
    log = broker.open_session("s-frames", "alice")
    frames = [frame(seq) for seq in range(1, OUTBOX_SIZE + 3)]  # 6 frames, 4 kept
    for seq, data in enumerate(frames, 1):
        log.append(seq, data, None)
    assert 8 * len(frames) <= OUTBOX_BYTES  # the frame bound trims, not the byte bound
    assert await log.since(0) is None
    assert await log.since(1) is None  # needs frame 2, which is gone
    assert await log.since(2) == frames[2:]
    assert await log.since(5) == frames[5:]
    assert await log.since(6) == []


async def test_session_log_trimmed_by_bytes_no_longer_covers_old_seqs(broker: Broker) -> None:
    log = broker.open_session("s-bytes", "alice")
    frames = [frame(seq, size=400) for seq in (1, 2, 3)]  # 1,200 bytes; the last two fit
    for seq, data in enumerate(frames, 1):
        log.append(seq, data, None)
    assert await log.since(0) is None
    assert await log.since(1) == frames[1:]


async def test_session_log_is_read_back_through_find_session(broker: Broker) -> None:
    log = broker.open_session("s-found", "alice")
    log.append(1, frame(1), None)
    log.append(2, frame(2), None)
    other = broker.open_session("s-other", "bob")
    other.append(1, frame(1, size=9), None)
    record = await until(
        lambda: broker.find_session("s-found"), lambda r: r is not None and r.last_seq == 2
    )
    assert record is not None and record.principal_id == "alice"
    assert await record.log.since(0) == [frame(1), frame(2)]
    assert await broker.find_session("s-never") is None


async def test_remembered_answer_is_recalled_within_the_window_only(broker: Broker) -> None:
    """``recall`` gives the answer frame (from the outbox) and the request's digest."""
    log = broker.open_session("s-dedupe", "alice")
    log.append(1, frame(1), None)
    log.append(2, frame(2), None)
    started = time.monotonic()
    log.remember("r1", 2, 12345)
    assert await recall(log, "r1") == (frame(2), 12345)
    assert await recall(log, "r2") is None
    other = broker.open_session("s-dedupe-2", "alice")
    other.append(1, frame(1, size=9), None)
    other.append(2, frame(2, size=9), None)
    assert await recall(other, "r1") is None  # answers belong to one session
    await until(lambda: recall(log, "r1"), lambda got: got is None)
    # brokers time the window on the wall clock (shared between instances), the test on
    # the monotonic one: they may disagree by a millisecond or two
    assert time.monotonic() - started >= DEDUPE_WINDOW - 0.005
    log.append(3, frame(3), None)
    log.remember("r3", 3, 3)  # a newer answer is kept while the older one is gone
    assert await recall(log, "r3") == (frame(3), 3)
    assert await recall(log, "r1") is None


async def test_answer_whose_frame_left_the_outbox_is_recalled_without_its_frame(
    broker: Broker,
) -> None:
    log = broker.open_session("s-dedupe-4", "alice")
    log.append(1, frame(1), None)
    log.remember("first", 1, 7)
    log.append(2, frame(2), None)
    log.remember("second", 2, 8)
    for seq in range(3, OUTBOX_SIZE + 2):  # frame 1 is pushed out, frame 2 stays
        log.append(seq, frame(seq), None)
    assert await recall(log, "second") == (frame(2), 8)
    assert await recall(log, "first") == (b"", 7)  # answered: must not run again


# ---------------------------------------------------------------- session ttl


async def expire(broker: Broker, session_id: str) -> list[str]:
    """Collect ``expired_sessions()`` until ``session_id`` is among them (bounded)."""
    seen: list[str] = []

    async def probe() -> list[str]:
        seen.extend(broker.expired_sessions())
        return seen

    await until(probe, lambda ids: session_id in ids)
    return seen


async def test_detached_session_is_found_until_its_ttl_then_expires_once(broker: Broker) -> None:
    log = broker.open_session("s-ttl", "alice")
    log.append(1, frame(1), None)
    started = time.monotonic()
    broker.detach_session("s-ttl", 1, 0.2)
    assert "s-ttl" not in broker.expired_sessions()
    record = await broker.find_session("s-ttl")
    assert record is not None and record.last_seq == 1
    assert await record.log.since(0) == [frame(1)]
    await expire(broker, "s-ttl")
    assert time.monotonic() - started >= 0.2
    assert await broker.find_session("s-ttl") is None
    assert "s-ttl" not in broker.expired_sessions()  # removed by the call that reported it


async def test_session_past_its_ttl_is_not_found_even_before_it_is_reported(
    broker: Broker,
) -> None:
    """Resume must not revive a session whose ttl passed but that no sweep
    (``expired_sessions``) removed yet; the sweep still reports it once."""
    broker.open_session("s-late", "alice").append(1, frame(1), None)
    started = time.monotonic()
    broker.detach_session("s-late", 1, 0.1)
    await until(lambda: broker.find_session("s-late"), lambda r: r is None)
    assert time.monotonic() - started >= 0.1
    assert (await expire(broker, "s-late")).count("s-late") == 1


async def test_attached_session_never_expires(broker: Broker) -> None:
    broker.open_session("s-back", "alice").append(1, frame(1), None)
    broker.open_session("s-witness", "bob").append(1, frame(1), None)
    broker.detach_session("s-back", 1, 0.1)
    broker.detach_session("s-witness", 1, 0.1)  # detached later: expires no earlier
    broker.attach_session("s-back", 1)
    seen = await expire(broker, "s-witness")
    assert "s-back" not in seen
    record = await broker.find_session("s-back")
    assert record is not None and record.last_seq == 1


async def test_session_that_was_never_detached_does_not_expire(broker: Broker) -> None:
    broker.open_session("s-live", "alice").append(1, frame(1), None)
    broker.open_session("s-witness", "bob").append(1, frame(1), None)
    broker.detach_session("s-witness", 1, 0.05)
    assert "s-live" not in await expire(broker, "s-witness")
    assert await broker.find_session("s-live") is not None


async def test_dropped_session_is_gone_at_once_and_never_reported_expired(
    broker: Broker,
) -> None:
    broker.open_session("s-drop", "alice").append(1, frame(1), None)
    broker.open_session("s-witness", "bob").append(1, frame(1), None)
    broker.detach_session("s-drop", 1, 0.05)
    broker.detach_session("s-witness", 1, 0.05)
    broker.drop_session("s-drop")
    await until(lambda: broker.find_session("s-drop"), lambda r: r is None)
    assert "s-drop" not in await expire(broker, "s-witness")
    broker.drop_session("s-never-was")  # forgetting an unknown session is harmless


# ----------------------------------------------------------------------- rooms


async def test_publish_gives_each_room_offsets_from_one_in_one_epoch(broker: Broker) -> None:
    first = await broker.publish(
        "lobby", {"from": "alice", "text": "a"}, history_size=10, history_ttl=60
    )
    assert first == {"from": "alice", "text": "a", "room": "lobby", "offset": 1, "epoch": ANY_EPOCH}
    second = await publish(broker, "lobby", "b")
    other = await publish(broker, "support", "c")
    third = await publish(broker, "lobby", "d")
    assert [first["offset"], second["offset"], third["offset"]] == [1, 2, 3]
    assert other["offset"] == 1 and other["room"] == "support"
    assert first["epoch"] == second["epoch"] == third["epoch"]
    _, offset, epoch = await broker.room_since("lobby", 0, "")
    assert (offset, epoch) == (3, first["epoch"])


async def test_a_retried_publish_returns_the_first_and_posts_nothing(broker: Broker) -> None:
    """The same dedupe key (session and request id) while the first publish is in the
    history: the first's stored message back, no new offset, no listener call."""
    heard = Collector()
    broker.subscribe("lobby", heard)
    first = await publish(broker, "lobby", "hi", dedupe="s-1:r1")
    again = await publish(broker, "lobby", "hi", dedupe="s-1:r1")
    assert again == first and again["offset"] == 1
    other = await publish(broker, "lobby", "hi", dedupe="s-2:r1")  # another session's r1
    assert other["offset"] == 2
    _, offset, _ = await broker.room_since("lobby", 0, "")
    assert offset == 2
    for n in range(3):  # push the first out of a two-message history
        await publish(broker, "lobby", f"filler {n}", history_size=2)
    later = await publish(broker, "lobby", "hi", dedupe="s-1:r1", history_size=2)
    assert later["offset"] == 6  # out of the history: a new publish
    assert [m["offset"] for m in await heard.wait_for(6)] == [1, 2, 3, 4, 5, 6]


async def test_control_messages_reach_the_process_told_in_order(broker: Broker) -> None:
    """``tell`` to this process's own instance reaches its listener, in the order told;
    a message for every *other* process does not come back to this one."""
    told: list[dict[str, Any]] = []
    broker.on_control(told.append)
    broker.tell(None, {"op": "test.everyone"})
    for n in range(3):
        broker.tell(broker.instance, {"op": "test.self", "n": n})

    async def probe() -> int:
        return len(told)

    await until(probe, lambda count: count >= 3)
    assert [(m["op"], m["n"]) for m in told] == [
        ("test.self", 0),
        ("test.self", 1),
        ("test.self", 2),
    ]


async def test_listeners_get_every_message_once_in_offset_order(broker: Broker) -> None:
    one, two = Collector(), Collector()
    broker.subscribe("lobby", one)
    broker.subscribe("lobby", two)
    returned: list[dict[str, Any]] = []

    async def publisher(name: str) -> None:
        for i in range(10):
            returned.append(await publish(broker, "lobby", f"{name}{i}"))

    async with anyio.create_task_group() as tg:
        for name in "abcde":
            tg.start_soon(publisher, name)
    for listener in (one, two):
        await listener.wait_for(50)
        assert listener.offsets == list(range(1, 51))
    assert sorted(returned, key=lambda m: m["offset"]) == one.got == two.got


@pytest.mark.server_fault
async def test_a_failing_listener_does_not_stop_the_others(broker: Broker) -> None:
    def broken(message: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    good = Collector()
    broker.subscribe("lobby", broken)
    broker.subscribe("lobby", good)
    await publish(broker, "lobby", "one")
    await publish(broker, "lobby", "two")
    assert [m["text"] for m in await good.wait_for(2)] == ["one", "two"]


async def test_subscribe_delivers_from_now_on_and_only_that_room(broker: Broker) -> None:
    await publish(broker, "lobby", "before")
    listener = Collector()
    broker.subscribe("lobby", listener)
    await publish(broker, "elsewhere", "not mine")
    await publish(broker, "lobby", "after")
    await listener.wait_for(1)
    witness = Collector()
    broker.subscribe("elsewhere", witness)
    await publish(broker, "lobby", "last")
    await publish(broker, "elsewhere", "witness")
    await listener.wait_for(2)
    await witness.wait_for(1)
    assert [m["text"] for m in listener.got] == ["after", "last"]


async def test_unsubscribed_listener_is_no_longer_called(broker: Broker) -> None:
    gone, staying = Collector(), Collector()
    broker.subscribe("lobby", gone)
    broker.subscribe("lobby", staying)
    await publish(broker, "lobby", "one")
    await gone.wait_for(1)
    broker.unsubscribe("lobby", gone)
    await publish(broker, "lobby", "two")
    await staying.wait_for(2)  # the witness: "two" reached this process's listeners
    assert [m["text"] for m in gone.got] == ["one"]
    broker.unsubscribe("lobby", gone)  # twice is harmless
    broker.unsubscribe("never-subscribed", gone)


async def test_history_keeps_only_the_last_history_size_messages(broker: Broker) -> None:
    for i in range(5):
        last = await publish(broker, "lobby", f"m{i}", history_size=3)
    epoch = last["epoch"]
    missed, offset, current = await broker.room_since("lobby", 0, epoch)
    assert (missed, offset, current) == (None, 5, epoch)
    assert (await broker.room_since("lobby", 1, epoch))[0] is None  # needs offset 2, gone
    missed, _, _ = await broker.room_since("lobby", 2, epoch)
    assert missed is not None and [m["offset"] for m in missed] == [3, 4, 5]
    assert [m["text"] for m in missed] == ["m2", "m3", "m4"]
    assert (await broker.room_since("lobby", 4, epoch))[0] == [last]
    assert (await broker.room_since("lobby", 5, epoch))[0] == []


async def test_history_size_zero_keeps_nothing_but_the_position(broker: Broker) -> None:
    last = await publish(broker, "lobby", "a", history_size=0)
    assert await broker.room_since("lobby", 0, last["epoch"]) == (None, 1, last["epoch"])
    assert await broker.room_since("lobby", 1, last["epoch"]) == ([], 1, last["epoch"])


async def test_history_forgets_messages_older_than_history_ttl(broker: Broker) -> None:
    started = time.monotonic()
    first = await publish(broker, "lobby", "a", history_ttl=0.2)
    await publish(broker, "lobby", "b", history_ttl=0.2)
    epoch = first["epoch"]
    missed, _, _ = await broker.room_since("lobby", 0, epoch)
    assert missed is not None and [m["text"] for m in missed] == ["a", "b"]
    missed, offset, _ = await until(
        lambda: broker.room_since("lobby", 0, epoch), lambda got: got[0] is None
    )
    assert time.monotonic() - started >= 0.2
    assert offset == 2  # the position survives the history
    assert (await broker.room_since("lobby", 2, epoch))[0] == []
    third = await publish(broker, "lobby", "c", history_ttl=60)
    assert third["offset"] == 3 and third["epoch"] == epoch
    assert (await broker.room_since("lobby", 2, epoch))[0] == [third]


async def test_room_since_covered_returns_the_messages_after_offset(broker: Broker) -> None:
    sent = [await publish(broker, "lobby", t) for t in ("a", "b", "c")]
    epoch = sent[0]["epoch"]
    assert await broker.room_since("lobby", 0, epoch) == (sent, 3, epoch)
    assert await broker.room_since("lobby", 1, epoch) == (sent[1:], 3, epoch)
    assert await broker.room_since("lobby", 3, epoch) == ([], 3, epoch)


async def test_room_since_with_another_epoch_or_an_offset_ahead_is_not_covered(
    broker: Broker,
) -> None:
    sent = await publish(broker, "lobby", "a")
    epoch = sent["epoch"]
    assert await broker.room_since("lobby", 0, "not-" + epoch) == (None, 1, epoch)
    assert await broker.room_since("lobby", 1, "not-" + epoch) == (None, 1, epoch)
    assert await broker.room_since("lobby", 9, epoch) == (None, 1, epoch)


async def test_position_query_of_a_new_room_gives_offset_zero_and_a_lasting_epoch(
    broker: Broker,
) -> None:
    """``epoch=""`` asks only for the position; the epoch a joiner got from an
    empty room is still the room's after its first messages, so it recovers them."""
    missed, offset, epoch = await broker.room_since("fresh", 0, "")
    assert missed is None
    assert offset == 0 and isinstance(epoch, str) and epoch
    sent = [await publish(broker, "fresh", t) for t in ("a", "b")]
    assert all(m["epoch"] == epoch for m in sent)
    assert await broker.room_since("fresh", 0, epoch) == (sent, 2, epoch)
    assert (await broker.room_since("fresh", 0, ""))[1:] == (2, epoch)


# -------------------------------------------------------------------- presence


async def test_presence_counts_a_member_once_whatever_its_keys(broker: Broker) -> None:
    """``presence_add``/``presence_remove`` say whether the member came or went, and how
    many members the room has then."""
    assert await broker.presence_add("lobby", "alice", "c-1") == (True, 1)
    assert await broker.presence_add("lobby", "alice", "c-2") == (False, 1)
    assert await broker.presence_add("lobby", "alice", "c-2") == (False, 1)  # same key again
    assert await broker.presence_add("lobby", "bob", "c-3") == (True, 2)
    assert await broker.presence("lobby") == ["alice", "bob"]
    assert await broker.presence_remove("lobby", "alice", "c-1") == (False, 2)  # c-2 remains
    assert await broker.presence("lobby") == ["alice", "bob"]
    assert await broker.presence_remove("lobby", "alice", "c-2") == (True, 1)
    assert await broker.presence_remove("lobby", "bob", "c-3") == (True, 0)
    assert await broker.presence("lobby") == []
    assert await broker.presence_add("lobby", "alice", "c-3") == (True, 1)  # back again


async def test_removing_an_unknown_presence_key_is_false(broker: Broker) -> None:
    assert await broker.presence_remove("lobby", "alice", "c-1") == (False, 0)
    await broker.presence_add("lobby", "alice", "c-1")
    assert await broker.presence_remove("lobby", "alice", "c-9") == (False, 1)
    assert await broker.presence_remove("lobby", "bob", "c-1") == (False, 1)
    assert await broker.presence_remove("elsewhere", "alice", "c-1") == (False, 0)
    assert await broker.presence("lobby") == ["alice"]


async def test_a_listener_subscribed_before_the_position_gets_exactly_what_follows(
    broker: Broker,
) -> None:
    """``room_position`` read after subscribing splits the room's messages: the listener
    gets every message after it and none up to it, however publishes interleave."""
    for n in range(3):
        await publish(broker, "lobby", f"before {n}")
    heard = Collector()
    broker.subscribe("lobby", heard)
    published: list[dict[str, Any]] = []

    async def talk() -> None:
        for n in range(20):
            published.append(await publish(broker, "lobby", f"during {n}"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(talk)
        offset, epoch = await broker.room_position("lobby")
    assert offset >= 3 and epoch == published[0]["epoch"]
    await heard.wait_for(23 - offset)
    assert heard.offsets == list(range(offset + 1, 24))
    assert await broker.room_position("lobby") == (23, epoch)  # all delivered by now


async def test_presence_count_counts_members_once_per_room(broker: Broker) -> None:
    assert await broker.presence_count("lobby") == 0
    await broker.presence_add("lobby", "alice", "c-1")
    await broker.presence_add("lobby", "alice", "c-2")
    await broker.presence_add("lobby", "bob", "c-3")
    await broker.presence_add("support", "carol", "c-4")
    assert await broker.presence_count("lobby") == 2
    assert await broker.presence_count("support") == 1
    await broker.presence_remove("lobby", "alice", "c-1")
    assert await broker.presence_count("lobby") == 2  # alice is still there through c-2
    await broker.presence_remove("lobby", "alice", "c-2")
    assert await broker.presence_count("lobby") == 1
    assert await broker.presence_count("lobby") == len(await broker.presence("lobby"))


async def test_presence_is_sorted_and_per_room(broker: Broker) -> None:
    for member in ("carol", "alice", "bob"):
        assert (await broker.presence_add("lobby", member, f"c-{member}"))[0] is True
    assert await broker.presence_add("support", "alice", "c-alice") == (True, 1)  # other room
    assert await broker.presence("lobby") == ["alice", "bob", "carol"]
    assert await broker.presence("support") == ["alice"]
    assert await broker.presence("empty") == []
    assert await broker.presence_remove("support", "alice", "c-alice") == (True, 0)
    assert await broker.presence("lobby") == ["alice", "bob", "carol"]
