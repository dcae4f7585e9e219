"""The ``init`` message type: the client's first request, starting its session.

Answers ``{sessionId, resumed, missed, epoch, server}``. With ``sessionId`` (and
``lastSeq``) it resumes that session: the frames the client missed are replayed
before this answer. A session that cannot be resumed is reported as such
(``resumed: false`` and a ``reason``) and the client continues in a new session.

While the broker is not ready (Redis unreachable) ``init`` is answered
``overloaded``: the broker cannot say which epoch the session will live in (Redis
may come back empty, with a new one), and an answer with the old epoch would make
the session's later resume fail as ``epoch_changed`` (issue 11). ``overloaded`` is
not remembered for retries, so the client's next ``init``, same id or not, runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from backchannel import (
    App,
    BackchannelError,
    Connection,
    ErrorCode,
    Message,
    __version__,
    hookimpl,
)
from backchannel.contracts import load_schema

__all__ = ["Plugin"]


class Plugin:
    """Registers ``init``."""

    @hookimpl
    def message_types(self, register: Callable[..., None]) -> None:
        schema = load_schema("backchannel_init", "init.schema.json")
        # forbidden: resuming another principal's session
        register("init", schema=schema, reply=schema["$defs"]["reply"], errors=["forbidden"])

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
        epoch = ""
        if self.app is not None:
            broker = self.app.broker
            if not broker.ready:
                raise BackchannelError(
                    ErrorCode.OVERLOADED,
                    f"the {broker.name} broker is not reachable; retry init later",
                )
            epoch = broker.epoch
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
