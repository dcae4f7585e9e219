"""Fixtures of the redis plugin's tests that run their own Redis: a test module loads them
with ``pytest_plugins = ["redis_fixtures"]``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from instances import RedisCluster, RedisServer, require_redis_server


@pytest.fixture(scope="module")
def redis_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private ``redis-server`` for the module (a free loopback port, stopped by PID),
    which its tests may shut down, start again or pause; the shared Redis is never
    touched. Skipped without ``redis-server`` on PATH, failed when ``CI`` is set."""
    server = RedisServer(require_redis_server(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(redis_process: RedisServer) -> RedisServer:
    """The module's Redis, running and not paused (a test that stopped or paused it and
    failed left it so)."""
    if redis_process.process is None or redis_process.process.poll() is not None:
        redis_process.start()
    redis_process.call("CLIENT", "UNPAUSE")
    return redis_process


@pytest.fixture(scope="module")
def redis_cluster_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A private Redis Cluster for the module (6 nodes: 3 masters, 3 replicas, on free
    loopback ports, killed by PID). Skipped without ``redis-server`` on PATH, failed
    when ``CI`` is set."""
    cluster = RedisCluster(require_redis_server(), tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(redis_cluster_process: RedisCluster) -> RedisCluster:
    """The module's cluster with all six nodes running and ``cluster_state:ok`` (a test
    that killed a master and failed left it so)."""
    redis_cluster_process.ensure()
    return redis_cluster_process
