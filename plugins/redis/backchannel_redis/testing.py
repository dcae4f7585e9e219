"""Test helpers for code that needs a real Redis (this plugin's tests, the broker contract).

``BACKCHANNEL_TEST_REDIS_URL`` names the Redis (default ``redis://127.0.0.1:6379/0``).
A test that needs it calls :func:`require_redis`: without a reachable Redis it is
skipped, unless the ``CI`` environment variable is set, where it fails (CI machines
run Redis, so its absence is a broken machine, not a reason to pass).
Every test uses its own key prefix (:func:`fresh_prefix`) and deletes its keys after
(:func:`delete_keys`), so tests never see each other's data and leave none behind.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import coredis
import pytest

from .broker import RedisBroker

__all__ = ["delete_keys", "fresh_prefix", "redis_broker", "redis_url", "require_redis"]

_checked: dict[str, str | None] = {}


def redis_url() -> str:
    return os.environ.get("BACKCHANNEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _probe(url: str) -> str | None:
    """None when a Redis answers PING at ``url``, else why not."""
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 6379), 1.0
        ) as s:
            s.settimeout(1.0)
            s.sendall(b"PING\r\n")
            answer = s.recv(64)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if answer.startswith((b"+PONG", b"-NOAUTH")) else f"unexpected answer {answer!r}"


def require_redis(url: str | None = None) -> str:
    """The Redis URL to test against; skips the test (fails it when ``CI`` is set)
    when no Redis answers there."""
    url = url or redis_url()
    if url not in _checked:
        _checked[url] = _probe(url)
    why = _checked[url]
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but no Redis answers at {url} ({why}); start redis-server")
        pytest.skip(f"no Redis at {url} ({why}); set BACKCHANNEL_TEST_REDIS_URL or start one")
    return url


def fresh_prefix() -> str:
    return "bctest-" + os.urandom(6).hex()


async def delete_keys(url: str, prefix: str) -> int:
    """Delete every key under ``prefix``; returns how many there were."""
    deleted = 0
    async with coredis.Redis.from_url(url) as client:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += await client.delete(batch)
                batch = []
        if batch:
            deleted += await client.delete(batch)
    return deleted


@asynccontextmanager
async def redis_broker(**options: Any) -> AsyncIterator[RedisBroker]:
    """A started :class:`RedisBroker` on a fresh prefix (keys deleted after it stops)."""
    url = require_redis()
    options.setdefault("key_prefix", fresh_prefix())
    broker = RedisBroker(url=url, **options)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()
        await delete_keys(url, broker.prefix)
