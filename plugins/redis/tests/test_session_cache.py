"""What the redis broker keeps of sessions in the process, within the session budgets
(issue 11 item 5): the remembered answers it caches (so that a request never answered
costs no round trip) fit in ``session.outbox_max_bytes`` per session and
``session.total_max_bytes`` per process; what the cache lets go of is still in Redis, so
no answered request runs twice."""

from __future__ import annotations

import inspect
from typing import Any

import anyio
import pytest
from backchannel_redis.broker import RedisBroker
from backchannel_redis.testing import redis_broker

from backchannel.broker import ANSWER_COST, SESSION_COST

pytestmark = pytest.mark.anyio


async def recall(log: Any, request_id: str) -> tuple[bytes, int] | None:
    answer = log.recall(request_id)
    if inspect.isawaitable(answer):
        answer = await answer
    assert answer is None or isinstance(answer, tuple)
    return answer


async def settled(broker: RedisBroker) -> None:
    """Every write queued so far reached Redis."""
    with anyio.fail_after(5):
        await broker._barrier()


def answered(log: Any, count: int, prefix: str = "r", id_len: int = 8) -> None:
    """Frames 1..count, each the answer to request ``<prefix><n>`` (ids ``id_len`` long)."""
    for n in range(1, count + 1):
        log.append(n, f"answer {n}".encode(), None)
        log.remember(f"{prefix}{n}".ljust(id_len, "-"), n, n)


async def test_the_cache_stays_within_the_session_budget_and_misses_go_to_redis() -> None:
    budget = 2048
    async with redis_broker(outbox_max_bytes=budget, dedupe_size=32) as broker:
        log = broker.open_session("s-cache", "alice")
        answered(log, 40, id_len=40)  # 32 fit by count, not by bytes
        cost = 40 + ANSWER_COST
        assert log.size == len(log.answers) * cost <= budget and len(log.answers) == budget // cost
        assert log.cold  # it let go of answers Redis still remembers
        assert broker.used == SESSION_COST + log.size
        await settled(broker)
        oldest_kept = 40 - 32 + 1  # Redis keeps the newest 32
        assert await recall(log, f"r{oldest_kept}".ljust(40, "-")) == (
            f"answer {oldest_kept}".encode(),
            oldest_kept,
        )
        assert await recall(log, "r1".ljust(40, "-")) is None  # beyond dedupe_size everywhere
        assert broker.counters["cold_recalls"] == 2


async def test_a_detached_session_caches_nothing_and_a_resume_reads_its_answers_back() -> None:
    async with redis_broker(outbox_max_bytes=1 << 20, dedupe_size=32) as broker:
        log = broker.open_session("s-away", "alice")
        answered(log, 10)
        broker.detach_session("s-away", 10, ttl=60)
        assert not log.answers and log.size == 0 and broker.used == SESSION_COST
        await settled(broker)
        record = await broker.find_session("s-away")
        assert record is not None and record.log is log
        assert len(log.answers) == 10 and not log.cold  # filled from Redis, all of them
        broker.attach_session("s-away", 10)
        assert broker.used == SESSION_COST + log.size
        assert await recall(log, "r10-----") == (b"answer 10", 10)
        assert broker.counters.get("cold_recalls") is None  # from the cache
        broker.detach_session("s-away", 10, ttl=60)
        assert log.cold == 32  # (answers finishing while it is away are cached again)
        for n in range(11, 11 + 32):  # once it remembered 32 more, Redis holds no other
            log.remember(f"r{n}".ljust(8, "-"), n, n)
        assert not log.cold and len(log.answers) == 32


async def test_past_the_total_it_lets_go_of_detached_sessions_which_stay_in_redis() -> None:
    per_session = 2048
    total = 2 * (SESSION_COST + per_session)
    async with redis_broker(outbox_max_bytes=per_session, total_max_bytes=total) as broker:
        for sid in ("s-1", "s-2"):
            answered(broker.open_session(sid, "alice"), 5)
        broker.detach_session("s-1", 5, ttl=60)
        big = broker.open_session("s-3", "alice")
        answered(big, 20)
        assert broker.used <= total
        assert broker.expired_sessions() == ["s-1"]  # the kernel forgets it here...
        assert not broker.evicted_session("s-1")
        await settled(broker)
        record = await broker.find_session("s-1")  # ...but it resumes from Redis
        assert record is not None and record.last_seq == 5
        assert await record.log.since(0) == [f"answer {n}".encode() for n in range(1, 6)]
        assert await recall(record.log, "r5------") == (b"answer 5", 5)
        assert broker.counters["sessions_let_go"] == 1
        answered(broker.open_session("s-4", "alice"), 20)  # nothing detached: caches shrink
        assert broker.used <= total and big.cold
        assert await recall(big, "r1------") == (b"answer 1", 1)  # Redis still knows
