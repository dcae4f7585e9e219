"""The broker follows a Redis Cluster's topology (issue 15): a room's slot moved to
another master (resharding) keeps its room delivering, under a new epoch, since
another node now writes it; nothing is missed silently."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from backchannel_redis.broker import RedisBroker
from backchannel_redis.testing import BOUND, RedisCluster, fresh_prefix

from backchannel import BackchannelError, ErrorCode

#: the private cluster fixtures (redis_cluster_process, redis_cluster)
pytest_plugins = ["redis_fixtures"]

pytestmark = pytest.mark.anyio


@pytest.fixture
async def broker(redis_cluster: RedisCluster) -> AsyncIterator[RedisBroker]:
    started = RedisBroker(
        url=redis_cluster.url, cluster=True, key_prefix=fresh_prefix(), timeout=1.0
    )
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


async def publish_when_possible(broker: RedisBroker, text: str) -> dict[str, Any]:
    """Publish, retrying while the broker answers ``overloaded`` (following a change)."""
    with anyio.fail_after(BOUND):
        while True:
            try:
                return await broker.publish(
                    "lobby", {"text": text}, history_size=100, history_ttl=60
                )
            except BackchannelError as exc:
                assert exc.code is ErrorCode.OVERLOADED, exc
                await anyio.sleep(0.05)


async def test_a_room_whose_slot_moves_keeps_delivering_under_a_new_epoch(
    redis_cluster: RedisCluster, broker: RedisBroker
) -> None:
    heard: list[dict[str, Any]] = []
    broker.subscribe("lobby", heard.append)
    first = await publish_when_possible(broker, "before")
    key = f"{broker.prefix}:r:{{lobby}}:m"
    slot = int(redis_cluster.call(redis_cluster.port_for_key(key), "CLUSTER", "KEYSLOT", key))
    source = redis_cluster.slot_owner(slot)
    target = next(port for port in redis_cluster.masters() if port != source)
    await anyio.to_thread.run_sync(redis_cluster.move_slot, slot, target)
    second = await publish_when_possible(broker, "after")
    assert (second["offset"], second["text"]) == (1, "after")
    assert second["epoch"] != first["epoch"]  # written by another node now
    with anyio.fail_after(BOUND):
        while len(heard) < 2:
            await anyio.sleep(0.01)
    assert [(m["text"], m["offset"], m["epoch"]) for m in heard] == [
        ("before", 1, first["epoch"]),
        ("after", 1, second["epoch"]),
    ]
    third = await publish_when_possible(broker, "later")
    assert (third["offset"], third["epoch"]) == (2, second["epoch"])
    with anyio.fail_after(BOUND):
        while len(heard) < 3:
            await anyio.sleep(0.01)
    assert heard[2]["text"] == "later"
