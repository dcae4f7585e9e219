"""The ``system`` message type: server notices to every connection.

The server sends ``system`` frames on its own (``going_away`` at shutdown). This
plugin adds the admin side: :func:`broadcast_notice` from Python, and the
``system`` request over the wire for principals holding ``system:broadcast``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from backchannel import App, Connection, Message, hookimpl
from backchannel.contracts import load_schema

__all__ = ["PERMISSION", "Plugin", "broadcast_notice"]

PERMISSION = "system:broadcast"


def broadcast_notice(app: App, event: str, message: str, **extra: Any) -> int:
    """Send a ``system`` notice to every connection of ``app``; returns how many got it."""
    return app.broadcast("system", {"event": event, "message": message, **extra})


class Plugin:
    """Registers ``system`` (admin broadcast; needs ``system:broadcast``)."""

    def __init__(self) -> None:
        self.app: App | None = None

    @hookimpl
    def startup(self, app: App) -> None:
        self.app = app

    @hookimpl
    def message_types(self, register: Callable[..., None]) -> None:
        schema = load_schema("backchannel_system", "system.schema.json")
        register("system", schema=schema, permission=PERMISSION, reply=schema["$defs"]["reply"])

    @hookimpl
    def handle(self, message: Message, connection: Connection) -> dict[str, Any]:
        assert self.app is not None
        content = message.content
        reached = broadcast_notice(self.app, content["event"], content["message"])
        return {"event": content["event"], "reached": reached}
