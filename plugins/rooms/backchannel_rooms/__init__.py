"""Rooms: ordered, resumable group chat with presence.

``join``/``leave``/``presence`` are this plugin's types; ``text`` with a ``room``
is published to that room through a ``wrap_handler`` around the text plugin's
handler. Membership belongs to the session (it survives reconnects and ends when
the session expires); presence follows connections. Offsets, epochs, history and
fan-out across processes are the broker's (``app.broker``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from backchannel import (
    App,
    BackchannelError,
    Connection,
    ErrorCode,
    Message,
    Session,
    hookimpl,
)
from backchannel.contracts import load_schema

__all__ = ["Plugin"]

_PKG = "backchannel_rooms"


def _require(connection: Connection, action: str, room: str) -> None:
    permission = f"rooms:{action}:{room}"
    principal = connection.principal
    if principal is None or not principal.allows(permission):
        raise BackchannelError(ErrorCode.FORBIDDEN, f"permission {permission!r} is required")


#: fields of a stored room message that only the plugin reads
_PRIVATE = frozenset({"session", "request"})
#: most publishes remembered as answered with an error (see ``Plugin.unconfirmed``)
_UNCONFIRMED_MAX = 10_000


def _public(stored: dict[str, Any]) -> dict[str, Any]:
    """The room message as clients see it (without the sender's session and request ids)."""
    return {k: v for k, v in stored.items() if k not in _PRIVATE}


class Plugin:
    """Registers ``join``, ``leave``, ``presence``; publishes ``text`` with a room."""

    def __init__(self) -> None:
        self.app: App | None = None
        self.history_size = 1000
        self.history_ttl = 3600.0
        self.max_rooms = 100
        #: room -> ids of member sessions in this process.
        self.members: dict[str, set[str]] = {}
        #: session id -> rooms it is a member of.
        self.joined: dict[str, set[str]] = {}
        self._listeners: dict[str, Callable[[dict[str, Any]], None]] = {}
        # Per room, so a room without joins in progress costs the fan-out nothing:
        #: room -> session id of a join reading its position -> live messages held meanwhile
        self.joining: dict[str, dict[str, list[dict[str, Any]]]] = {}
        #: room -> session id -> (offset, epoch) its join replayed up to, until the broker's
        #: delivery passes it (a new subscription may deliver what the replay held)
        self.replayed: dict[str, dict[str, tuple[int, str]]] = {}
        #: room -> (offset, epoch) of the last message delivered to its members here
        self.delivered: dict[str, tuple[int, str]] = {}
        #: "session:request" of publishes answered with an error (oldest first)
        self.unconfirmed: dict[str, None] = {}

    # set-up -----------------------------------------------------------------

    @hookimpl
    def config_schema(self) -> dict[str, Any]:
        return load_schema(_PKG, "rooms.config.schema.json")

    @hookimpl
    def startup(self, app: App) -> None:
        self.app = app
        cfg = app.plugin_config("rooms")
        self.history_size = cfg["history_size"]
        self.history_ttl = cfg["history_ttl"]
        self.max_rooms = cfg["max_rooms_per_session"]

    @hookimpl
    def message_types(self, register: Callable[..., None]) -> None:
        join = load_schema(_PKG, "join.schema.json")
        presence = load_schema(_PKG, "presence.schema.json")
        # forbidden: without rooms:<action>:<room>, or past max_rooms_per_session
        register(
            "join",
            schema=join,
            handler=self.join,
            reply=join["$defs"]["reply"],
            errors=["forbidden"],
        )
        register(
            "leave", schema=load_schema(_PKG, "leave.schema.json"), handler=self.leave, reply="ack"
        )
        register(
            "presence",
            schema=presence,
            handler=self.presence,
            reply=presence["$defs"]["reply"],
            errors=["forbidden"],
        )

    @hookimpl
    def wrap_handler(self, type: str, handler: Callable[..., Any]) -> Callable[..., Any] | None:
        if type != "text":
            return None

        def text(message: Message, connection: Connection) -> Any:
            # sync: a text without a room costs one dict lookup more, and no task switch
            if "room" in message.content:
                return self.publish(message, connection)
            return handler(message, connection)

        return text

    # handlers ---------------------------------------------------------------

    @property
    def _app(self) -> App:
        assert self.app is not None, "rooms plugin used before startup"
        return self.app

    async def join(self, message: Message, connection: Connection) -> dict[str, Any]:
        room: str = message.content["room"]
        _require(connection, "join", room)
        session = connection.session
        rooms = self.joined.setdefault(session.id, set())
        if room not in rooms and len(rooms) >= self.max_rooms:
            raise BackchannelError(
                ErrorCode.FORBIDDEN, f"a session may join at most {self.max_rooms} rooms"
            )
        broker = self._app.broker
        since = message.content.get("since")
        # Live messages reach a member from here on, while its position (and replay) is
        # read: hold them, so none arrives before the replay nor twice.
        held: list[dict[str, Any]] = []
        joining = self.joining.setdefault(room, {})
        joining.setdefault(session.id, held)
        self._add_member(room, session.id)
        reply: dict[str, Any] = {"room": room}
        offset, epoch = -1, ""
        try:
            if since is not None:
                missed, offset, epoch = await broker.room_since(
                    room, since["offset"], since["epoch"]
                )
                reply["recovered"] = missed is not None
                reply["missed"] = len(missed or ())
                for stored in missed or ():
                    session.send("text", _public(stored))
            else:
                _, offset, epoch = await broker.room_since(room, 0, "")
        finally:
            if joining.get(session.id) is held:
                del joining[session.id]
                if not joining:
                    self.joining.pop(room, None)
            for stored in held:  # published after the position read
                if stored["offset"] > offset or stored["epoch"] != epoch:
                    session.send("text", _public(stored))
                    offset, epoch = stored["offset"], stored["epoch"]
        if room in self.joined.get(session.id, ()):  # not left while the position was read
            last = self.delivered.get(room)
            if last is None or last[1] != epoch or last[0] < offset:
                self.replayed.setdefault(room, {})[session.id] = (offset, epoch)
            await self._present(room, connection)
        reply.update(members=await broker.presence(room), offset=offset, epoch=epoch)
        return reply

    async def leave(self, message: Message, connection: Connection) -> None:
        room: str = message.content["room"]
        session = connection.session
        if room not in self.joined.get(session.id, ()):
            raise BackchannelError(
                ErrorCode.VALIDATION_FAILED,
                "content.room: not a member of this room",
                details=[{"path": "content.room", "rule": "not a member of this room"}],
            )
        await self._absent(room, connection)
        self._remove_member(room, session.id)

    async def presence(self, message: Message, connection: Connection) -> dict[str, Any]:
        room: str = message.content["room"]
        _require(connection, "presence", room)
        return {"room": room, "members": await self._app.broker.presence(room)}

    async def publish(self, message: Message, connection: Connection) -> dict[str, Any]:
        room: str = message.content["room"]
        session = connection.session
        if room not in self.joined.get(session.id, ()):
            raise BackchannelError(ErrorCode.FORBIDDEN, "join the room before publishing to it")
        _require(connection, "publish", room)
        body = {
            "from": session.principal_id,
            "text": message.content["text"],
            "session": session.id,
            "request": message.id,
        }
        try:
            stored = await self._app.broker.publish(
                room,
                body,
                history_size=self.history_size,
                history_ttl=self.history_ttl,
                # a retry: same session (or the one its client failed to resume), id, bytes
                dedupe=f"{session.origin}:{message.id}:{message.digest}",
            )
        except BackchannelError as exc:
            # Answered with an error whose outcome is unknown (a networked broker sent it
            # but did not hear back: ``maybe_done``): should it land, its sender gets it too.
            if getattr(exc, "maybe_done", False):
                self.unconfirmed[f"{session.id}:{message.id}"] = None
                if len(self.unconfirmed) > _UNCONFIRMED_MAX:
                    del self.unconfirmed[next(iter(self.unconfirmed))]
            raise
        return _public(stored)

    # membership, fan-out, presence ------------------------------------------

    def _add_member(self, room: str, session_id: str) -> None:
        self.joined.setdefault(session_id, set()).add(room)
        members = self.members.setdefault(room, set())
        if not members:
            listener = partial(self._fan_out, room)
            self._listeners[room] = listener
            self._app.broker.subscribe(room, listener)
        members.add(session_id)

    def _remove_member(self, room: str, session_id: str) -> None:
        rooms = self.joined.get(session_id)
        if rooms is not None:
            rooms.discard(room)
            if not rooms:
                del self.joined[session_id]
        skip = self.replayed.get(room)
        if skip is not None:
            skip.pop(session_id, None)
            if not skip:
                del self.replayed[room]
        members = self.members.get(room)
        if members is None:
            return
        members.discard(session_id)
        if not members:
            del self.members[room]
            self.delivered.pop(room, None)
            listener = self._listeners.pop(room, None)
            if listener is not None:
                self._app.broker.unsubscribe(room, listener)

    def _fan_out(self, room: str, stored: dict[str, Any]) -> None:
        """Deliver a room message to every local member session but the sender's (who
        gets it as the answer to its request, unless that answer was an error)."""
        session_of = self._app.session
        content = _public(stored)
        sender = stored.get("session")
        if self.unconfirmed:
            request = f"{sender}:{stored.get('request')}"
            if request in self.unconfirmed:
                del self.unconfirmed[request]
                sender = None
        self.delivered[room] = (stored["offset"], stored["epoch"])
        joining = self.joining.get(room)
        skip = self.replayed.get(room)
        for session_id in list(self.members.get(room, ())):
            if session_id == sender:
                continue
            if joining is not None and session_id in joining:
                joining[session_id].append(stored)
                continue
            if skip is not None and session_id in skip:
                offset, epoch = skip[session_id]
                if stored["offset"] <= offset and stored["epoch"] == epoch:
                    continue  # its join's replay had it
                del skip[session_id]
                if not skip:
                    del self.replayed[room]
            session = session_of(session_id)
            if session is not None:
                session.send("text", content)

    def _announce(self, room: str, event: str, member: str, skip: str) -> None:
        """A member joined or left: tell the room's members here and on every other
        instance sharing the broker (at most once there, like any control message)."""
        self._notify(room, event, member, skip)
        message = {"op": "rooms.presence", "room": room, "event": event, "member": member}
        self._app.broker.tell(None, message)

    @hookimpl
    def control_message(self, message: dict[str, Any]) -> None:
        if message["op"] == "rooms.presence":
            self._notify(message["room"], message["event"], message["member"])

    def _notify(self, room: str, event: str, member: str, skip: str | None = None) -> None:
        session_of = self._app.session
        content = {"room": room, "event": event, "member": member}
        for session_id in list(self.members.get(room, ())):
            session = session_of(session_id)
            if session is not None and session_id != skip:
                session.send("presence", content)

    async def _present(self, room: str, connection: Connection) -> None:
        member = connection.session.principal_id
        if await self._app.broker.presence_add(room, member, connection.id):
            self._announce(room, "join", member, skip=connection.session.id)

    async def _absent(self, room: str, connection: Connection) -> None:
        member = connection.session.principal_id
        if await self._app.broker.presence_remove(room, member, connection.id):
            self._announce(room, "leave", member, skip=connection.session.id)

    # lifecycle --------------------------------------------------------------

    @hookimpl
    async def disconnect(self, connection: Connection, code: int) -> None:
        for room in list(self.joined.get(connection.session.id, ())):
            await self._absent(room, connection)

    @hookimpl
    async def session_resumed(self, session: Session, connection: Connection) -> None:
        for room in list(self.joined.get(session.id, ())):
            await self._present(room, connection)

    @hookimpl
    def session_expired(self, session: Session) -> None:
        for room in list(self.joined.get(session.id, ())):
            self._remove_member(room, session.id)
