"""The ``ping`` message type: an application-level ping answered by ``pong``.

Browsers cannot send WebSocket protocol pings, so clients use this to measure
round-trip time and to notice a dead connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from backchannel import Connection, Message, Reply, hookimpl
from backchannel.contracts import load_schema

__all__ = ["Plugin"]


class Plugin:
    """Registers ``ping``."""

    @hookimpl
    def message_types(self, register: Callable[..., None]) -> None:
        schema = load_schema("backchannel_ping", "ping.schema.json")
        register("ping", schema=schema, reply=schema["$defs"]["reply"], reply_type="pong")

    @hookimpl
    def handle(self, message: Message, connection: Connection) -> Reply:
        content: dict[str, Any] = {"serverTime": connection.app.now_iso()}
        if "clientTime" in message.content:
            content["clientTime"] = message.content["clientTime"]
        return Reply("pong", content)
