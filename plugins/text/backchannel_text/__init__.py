"""The ``text`` message type: chat text.

Without ``room`` the text is echoed to the sender (the seed's echo chat); with
``room`` it is published to that room, which needs the rooms plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from backchannel import BackchannelError, Connection, ErrorCode, Message, hookimpl
from backchannel.contracts import load_schema

__all__ = ["Plugin"]


class Plugin:
    """Registers ``text``."""

    @hookimpl
    def message_types(self, register: Callable[..., None]) -> None:
        schema = load_schema("backchannel_text", "text.schema.json")
        # forbidden: publishing to a room (rooms plugin) not joined, or without permission
        register("text", schema=schema, reply=schema["$defs"]["reply"], errors=["forbidden"])

    @hookimpl
    def handle(self, message: Message, connection: Connection) -> dict[str, Any]:
        content = message.content
        if "room" in content:
            raise BackchannelError(
                ErrorCode.VALIDATION_FAILED,
                "content.room: publishing to a room needs the rooms plugin",
                details=[{"path": "content.room", "rule": "needs the rooms plugin"}],
            )
        principal = connection.principal
        return {"text": content["text"], "from": principal.id if principal else "anonymous"}
