"""The ``init`` message type: the client's first request, starting its session.

Answers ``{sessionId, resumed, missed, server}``. A client that asks to resume a
session this server cannot resume is told so (``resumed: false`` and a
``reason``) and continues in a new session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from backchannel import Connection, Message, __version__, hookimpl
from backchannel.contracts import load_schema

__all__ = ["Plugin"]


class Plugin:
    """Registers ``init``."""

    @hookimpl
    def message_types(self, register: Callable[..., None]) -> None:
        register("init", schema=load_schema("backchannel_init", "init.schema.json"))

    @hookimpl
    def handle(self, message: Message, connection: Connection) -> dict[str, Any]:
        session = connection.session
        reply: dict[str, Any] = {
            "sessionId": session.id,
            "resumed": False,
            "missed": 0,
            "server": {"name": "backchannel", "version": __version__, "protocol": "backchannel.v1"},
        }
        wanted = message.content.get("sessionId")
        if wanted is not None and wanted != session.id:
            reply["reason"] = "unknown_session"
        if connection.principal is not None:
            reply["principal"] = connection.principal.id
        return reply
