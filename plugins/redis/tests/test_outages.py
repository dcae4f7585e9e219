"""Redis outages, said plainly (issue 11 item 7), with a real App, real sockets and a real
``redis-server`` that each test shuts down (``SHUTDOWN NOSAVE``) and starts again empty.

* An outage is logged once per transition (lost, recovered), naming the underlying
  exception, however many reconnect attempts it takes: not one line per attempt, and
  never the exception group a task group wrapped the cause in.
* An ``init`` on a new connection while Redis is away is answered ``overloaded``, not
  with the old broker epoch: once Redis is back, the retried ``init`` hands out the
  epoch the session really lives in, so the session resumes.

This module runs its own Redis (``redis-server`` from PATH on a free loopback port,
stopped by PID; skipped without one, failed when ``CI`` is set): the shared Redis is
never touched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from backchannel_redis import RedisBroker
from backchannel_redis.testing import fresh_prefix
from instances import BOUND, RedisServer

from backchannel import App
from backchannel.testing import websocket

#: the private redis-server fixtures (redis_process, redis_server)
pytest_plugins = ["redis_fixtures"]

pytestmark = pytest.mark.anyio

REDIS_LOG = "backchannel.broker.redis"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def new_app(redis: RedisServer) -> App:
    """An App on the private Redis: fast health checks and reconnects, so an outage of a
    second or two sees many reconnect attempts."""
    return App(
        {
            "server": {"port": 0},
            "log": {"level": "INFO"},
            "plugins": {
                "redis": {
                    "url": redis.url,
                    "key_prefix": fresh_prefix(),
                    "timeout": 0.5,
                    "health_interval": 0.1,
                    "reconnect_min_delay": 0.02,
                    "reconnect_max_delay": 0.2,
                }
            },
        },
        plugins=["init", "text", "rooms", "redis"],
    )


def reconnects(app: App) -> int:
    """Failed attempts of the broker's pub/sub reader to reach Redis so far."""
    assert isinstance(app.broker, RedisBroker)
    return app.broker.counters.get("subscriber_reconnects", 0)


async def until(condition: Callable[[], bool], what: str) -> None:
    with anyio.fail_after(BOUND):
        while not condition():
            await anyio.sleep(0.01)
    assert condition(), what


async def request(sock: Any, ident: str, type: str, content: dict[str, Any]) -> dict[str, Any]:
    """Send a request; its answer (frames before it are skipped)."""
    await sock.send(json.dumps({"id": ident, "type": type, "content": content}))
    with anyio.fail_after(BOUND):
        while True:
            frame: dict[str, Any] = json.loads(await sock.recv())
            if frame.get("replyTo") == ident:
                return frame


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    """The redis broker's log lines at ``level`` or above."""
    return [r.getMessage() for r in caplog.records if r.name == REDIS_LOG and r.levelno >= level]


async def test_an_outage_is_logged_once_per_transition_naming_its_cause(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis shut down while the instance holds a room subscription: many reconnect
    attempts, but one WARNING that the broker is not ready, one that the pub/sub
    connection was lost (naming the ConnectionError, not "unhandled errors in a
    TaskGroup"), one for the lost data (new epoch); once it is back, one INFO each for
    ready and pub/sub restored."""
    caplog.set_level(logging.INFO, logger="backchannel")
    app = new_app(redis_server)
    async with app.run(host="127.0.0.1", port=0), websocket(app.port or 0) as member:
        assert (await request(member, "j1", "join", {"room": "lobby"}))["type"] == "join"
        caplog.clear()
        await anyio.to_thread.run_sync(redis_server.shutdown)
        await until(lambda: not app.broker.ready, "a lost Redis went unnoticed")
        # several attempts fail while Redis is away: each would have been a log line
        attempts = reconnects(app)
        await until(lambda: reconnects(app) >= attempts + 5, "the pub/sub reader stopped retrying")
        await anyio.to_thread.run_sync(redis_server.start)
        await until(lambda: app.broker.ready, "Redis never came back")
        async with websocket(app.port or 0) as speaker:  # live fan-out works again: pub/sub is back
            assert (await request(speaker, "j2", "join", {"room": "lobby"}))["type"] == "join"
            sent = await request(speaker, "t1", "text", {"room": "lobby", "text": "back"})
            with anyio.fail_after(BOUND):
                while (frame := json.loads(await member.recv())).get("type") != "text":
                    pass
            assert frame["content"] == sent["content"]
    warnings = messages(caplog, logging.WARNING)
    infos = [m for m in messages(caplog, logging.INFO) if m not in warnings]
    lost = [m for m in warnings if "pub/sub connection lost" in m]
    not_ready = [m for m in warnings if "NOT ready" in m]
    assert len(lost) == 1 and len(not_ready) == 1, warnings
    assert "ConnectionError: " in lost[0], lost
    assert not any("TaskGroup" in m or "sub-exception" in m for m in warnings), warnings
    assert len([m for m in warnings if "epoch changed" in m]) == 1, warnings
    assert len(warnings) == 3, warnings
    assert len([m for m in infos if "broker ready" in m]) == 1, infos
    assert len([m for m in infos if "pub/sub connection restored" in m]) == 1, infos
    assert reconnects(app) >= 5


async def test_init_while_redis_is_away_is_overloaded_then_gets_the_epoch_it_lives_in(
    redis_server: RedisServer,
) -> None:
    """A new connection's ``init`` while Redis is away (and comes back empty) is answered
    ``overloaded``, not with the old epoch. Its retry (same id) once Redis is back gets
    the new epoch, and a resume with that epoch resumes the session with what it missed;
    before issue 11 the answer carried the old epoch and that resume got
    ``epoch_changed``. A session from before the outage is told its data is gone."""
    app = new_app(redis_server)
    async with app.run(host="127.0.0.1", port=0):
        async with websocket(app.port or 0) as before:
            first = await request(before, "i0", "init", {})
            old_session, old_epoch = first["content"]["sessionId"], first["content"]["epoch"]
        await anyio.to_thread.run_sync(redis_server.shutdown)
        await until(lambda: not app.broker.ready, "a lost Redis went unnoticed")
        async with websocket(app.port or 0) as during:
            refused = await request(during, "i1", "init", {})
            assert refused["type"] == "error" and refused["content"]["code"] == "overloaded"
            await anyio.to_thread.run_sync(redis_server.start)
            await until(lambda: app.broker.ready, "Redis never came back")
            answer = await request(during, "i1", "init", {})  # the client's retry
            assert answer["type"] == "init", answer
            epoch, session = answer["content"]["epoch"], answer["content"]["sessionId"]
            assert epoch == app.broker.epoch != old_epoch  # Redis came back empty
            echo = await request(during, "t1", "text", {"text": "kept"})
            last_seq = answer["seq"]
        async with websocket(app.port or 0) as after:
            resumed = await request(
                after, "i2", "init", {"sessionId": session, "lastSeq": last_seq, "epoch": epoch}
            )
            assert resumed["content"]["resumed"] is True, resumed
            assert resumed["content"]["missed"] == 1 and echo["seq"] == last_seq + 1
        async with websocket(app.port or 0) as old:
            gone = await request(
                old, "i3", "init", {"sessionId": old_session, "lastSeq": 1, "epoch": old_epoch}
            )
            assert gone["content"]["resumed"] is False
            assert gone["content"]["reason"] == "epoch_changed"
