"""The Redis Cluster harness (``instances.RedisCluster``) does what cluster tests rely on:
six real nodes whose three masters each serve their slots; a SIGKILLed master's replica
takes over its slots with the data it acknowledged (``WAIT``); the killed node comes back
as a replica. Skipped without ``redis-server`` on PATH, failed when ``CI`` is set."""

from __future__ import annotations

import pytest
from instances import BOUND, RedisCluster

#: the private cluster fixtures (redis_cluster_process, redis_cluster)
pytest_plugins = ["redis_fixtures"]


def key_on(cluster: RedisCluster, port: int, stem: str) -> str:
    """A key whose slot the master on ``port`` serves."""
    for i in range(10_000):
        key = f"{stem}:{i}"
        if cluster.port_for_key(key) == port:
            return key
    raise AssertionError(f"no key of {port} found")


def test_every_master_serves_its_keys(redis_cluster: RedisCluster) -> None:
    masters = redis_cluster.masters()
    assert len(masters) == 3
    assert len(set(redis_cluster.ports)) == 6
    for port in masters:
        key = key_on(redis_cluster, port, "harness:own")
        assert redis_cluster.call(port, "SET", key, str(port)) == "OK"
        assert redis_cluster.call(port, "GET", key) == str(port).encode()
        other = next(p for p in masters if p != port)
        with pytest.raises(RuntimeError, match="MOVED"):
            redis_cluster.call(other, "GET", key)
        assert len(redis_cluster.replica_of(port)) == 1


def test_failover_keeps_acknowledged_data_and_the_killed_node_rejoins(
    redis_cluster: RedisCluster,
) -> None:
    old = redis_cluster.masters()[0]
    key = key_on(redis_cluster, old, "harness:kept")
    slot = int(redis_cluster.call(old, "CLUSTER", "KEYSLOT", key))
    assert redis_cluster.call(old, "SET", key, "before") == "OK"
    assert redis_cluster.call(old, "WAIT", 1, 5000) == 1  # the replica has it

    redis_cluster.kill_master(old)
    took = redis_cluster.wait_failover(old)
    assert took < BOUND * 2
    new = redis_cluster.slot_owner(slot)
    assert new != old and new in redis_cluster.masters()
    assert len(redis_cluster.masters()) == 3
    assert redis_cluster.call(new, "GET", key) == b"before"
    assert redis_cluster.call(new, "SET", key, "after") == "OK"

    redis_cluster.restart(old)
    assert old not in redis_cluster.masters()
    assert redis_cluster.replica_of(new) == [old]
    assert redis_cluster.call(new, "WAIT", 1, 5000) == 1
    with pytest.raises(RuntimeError, match="MOVED"):
        redis_cluster.call(old, "GET", key)  # a replica redirects writes' owners


def test_a_killed_master_is_back_for_the_next_test(redis_cluster: RedisCluster) -> None:
    """The function fixture restarts what a test left killed."""
    old = redis_cluster.masters()[-1]
    redis_cluster.kill_master(old)
    assert not redis_cluster.alive(old)
    redis_cluster.ensure()
    assert all(redis_cluster.alive(port) for port in redis_cluster.ports)
    assert len(redis_cluster.masters()) == 3
