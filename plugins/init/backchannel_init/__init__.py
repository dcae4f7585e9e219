"""The ``init`` message type: the client's first request, starting its session.

Answers ``{sessionId, resumed, missed, epoch, server}``. With ``sessionId`` (and
``lastSeq``) it resumes that session: the frames the client missed are replayed
before this answer. A session that cannot be resumed is reported as such
(``resumed: false`` and a ``reason``) and the client continues in a new session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from backchannel import App, Connection, Message, __version__, hookimpl
from backchannel.contracts import load_schema

__all__ = ["Plugin"]


class Plugin:
    """Registers ``init``."""

    @hookimpl
    def message_types(self, register: Callable[..., None]) -> None:
        register("init", schema=load_schema("backchannel_init", "init.schema.json"))

    def __init__(self) -> None:
        self.app: App | None = None

    @hookimpl
    def startup(self, app: App) -> None:
        self.app = app

    @hookimpl
    async def handle(self, message: Message, connection: Connection) -> dict[str, Any]:
        content = message.content
        outcome: dict[str, Any] = {"resumed": False, "missed": 0}
        wanted = content.get("sessionId")
        epoch = self.app.broker.epoch if self.app is not None else ""
        if wanted is not None:
            if content.get("epoch", epoch) != epoch:
                outcome["reason"] = "epoch_changed"
            else:
                outcome = await connection.resume(wanted, content.get("lastSeq", 0))
        reply: dict[str, Any] = {
            "sessionId": connection.session.id,
            "resumed": outcome["resumed"],
            "missed": outcome.get("missed", 0),
            "epoch": epoch,
            "server": {"name": "backchannel", "version": __version__, "protocol": "backchannel.v1"},
        }
        if "reason" in outcome:
            reply["reason"] = outcome["reason"]
        if connection.principal is not None:
            reply["principal"] = connection.principal.id
        return reply
