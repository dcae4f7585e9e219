"""Redis broker plugin: several backchannel instances share sessions, rooms and presence.

Enable ``redis`` in ``[plugins] enabled`` and set ``[plugins.redis] url``. The
plugin answers the kernel's ``broker`` hook with a :class:`RedisBroker` built from
its settings and the kernel's ``[session]`` bounds; readiness transitions are
logged, counted (``broker.counters``) and reported through the ``alert`` hook
(``redis_unavailable`` firing / resolved).
"""

from __future__ import annotations

from typing import Any

from backchannel import App, hookimpl
from backchannel.contracts import load_schema

from .broker import RedisBroker

__all__ = ["Plugin", "RedisBroker"]

_PKG = "backchannel_redis"


def broker_from_config(app: App, **overrides: Any) -> RedisBroker:
    """A broker for ``app``: its ``[plugins.redis]`` settings and ``[session]`` bounds."""
    cfg = app.plugin_config("redis")
    session = app.settings.session

    def on_state(ready: bool, why: str) -> None:
        app.alert(
            "redis_unavailable", "resolved" if ready else "firing", {"url": cfg["url"], "why": why}
        )

    options: dict[str, Any] = {
        "url": cfg["url"],
        "key_prefix": cfg["key_prefix"],
        "timeout": cfg["timeout"],
        "health_interval": cfg["health_interval"],
        "reconnect_min_delay": cfg["reconnect_min_delay"],
        "reconnect_max_delay": cfg["reconnect_max_delay"],
        "presence_ttl": cfg["presence_ttl"],
        "room_ttl": cfg["room_ttl"],
        "max_buffered_writes": cfg["max_buffered_writes"],
        "cluster": cfg["cluster"],
        "outbox_size": session.outbox_size,
        "outbox_max_bytes": session.outbox_max_bytes,
        "dedupe_window": session.dedupe_window,
        "dedupe_size": session.dedupe_size,
        "total_max_bytes": session.total_max_bytes,
        # a held session outlives an instance that dies holding it by session.ttl
        "session_lease": session.ttl,
        "on_state": on_state,
        **overrides,
    }
    return RedisBroker(**options)


class Plugin:
    """Supplies the ``broker`` hook with a :class:`RedisBroker`."""

    def __init__(self) -> None:
        self.broker_instance: RedisBroker | None = None

    @hookimpl
    def config_schema(self) -> dict[str, Any]:
        return load_schema(_PKG, "redis.config.schema.json")

    @hookimpl
    def broker(self, app: App) -> RedisBroker:
        self.broker_instance = broker_from_config(app)
        return self.broker_instance
