"""Rooms: ordered, resumable group chat with presence.

``join``/``leave``/``presence`` are this plugin's types; ``text`` with a ``room``
is published to that room through a ``wrap_handler`` around the text plugin's
handler. Offsets, epochs, history and fan-out across processes are the broker's
(``app.broker``).

A room message rides the room's stream, not the members' sessions (issue 13): the
broker stores it once and calls this process's listener once; the listener encodes
one frame (``room``, ``offset``, ``epoch``, no ``seq``) and writes it to every local
member connection (:meth:`Connection.deliver`), the sender's included. Nothing is
copied into a session's outbox: a member that reconnects gets what it missed by
joining again with ``since``.

Membership belongs to the session (it survives reconnects and ends when the session
expires, or with ``leave``); delivery belongs to the connection that joined. After a
disconnect a room delivers nothing to the session until a connection of it joins the
room again (with ``since``: the join replays what was missed and hands over to live
delivery without duplicates or reordering); a resumed session's ``init`` answer lists
its rooms (``rooms``) to re-join. Presence follows connections: a connection is present
in the rooms it joined.

Presence that scales: joins and leaves are announced (``presence`` events) only in
rooms of at most ``large_room`` members, and only such rooms list their members in
the ``join`` answer (larger ones give the ``count``; a ``presence`` request lists
them). So n joins cost at most ``large_room`` events each: O(n), not O(n²).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from backchannel import (
    App,
    BackchannelError,
    Connection,
    ErrorCode,
    Message,
    Session,
    StashKey,
    hookimpl,
)
from backchannel.contracts import load_schema

__all__ = ["Plugin"]

_PKG = "backchannel_rooms"

#: a stored message and its frame, encoded once in this process
_Held = tuple[dict[str, Any], bytes]
#: the rooms a connection is present in (its disconnect withdraws it from each)
_PRESENT = StashKey[set[str]]()


def _require(connection: Connection, action: str, room: str) -> None:
    permission = f"rooms:{action}:{room}"
    principal = connection.principal
    if principal is None or not principal.allows(permission):
        raise BackchannelError(ErrorCode.FORBIDDEN, f"permission {permission!r} is required")


#: fields of a stored room message that only the plugin reads
_PRIVATE = frozenset({"session", "request"})


def _public(stored: dict[str, Any]) -> dict[str, Any]:
    """The room message as clients see it (without the sender's session and request ids)."""
    return {k: v for k, v in stored.items() if k not in _PRIVATE}


@dataclass(eq=False)
class _Room:
    """What this process knows of one room with members here."""

    #: subscribed to the broker while the room has members here
    listener: Callable[[dict[str, Any]], None]
    #: member sessions (membership survives reconnects)
    members: set[str] = field(default_factory=set)
    #: session id -> the connection its join made live: room frames go there
    live: dict[str, Connection] = field(default_factory=dict)
    #: session id of a join reading its position -> messages held for it meanwhile
    joining: dict[str, list[_Held]] = field(default_factory=dict)
    #: session id -> (offset, epoch) its join's replay reached, until the broker's
    #: delivery passes it (a new subscription may deliver what the replay held)
    replayed: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: (offset, epoch) of the last message the broker delivered here
    delivered: tuple[int, str] | None = None


class Plugin:
    """Registers ``join``, ``leave``, ``presence``; publishes ``text`` with a room."""

    def __init__(self) -> None:
        self.app: App | None = None
        self.history_size = 1000
        self.history_ttl = 3600.0
        self.max_rooms = 100
        self.large_room = 100
        #: room -> its state in this process (rooms with member sessions here)
        self.rooms: dict[str, _Room] = {}
        #: session id -> rooms it is a member of.
        self.joined: dict[str, set[str]] = {}

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
        self.large_room = cfg["large_room"]

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
        if type == "text":

            def text(message: Message, connection: Connection) -> Any:
                # sync: a text without a room costs one dict lookup more, and no task switch
                if "room" in message.content:
                    return self.publish(message, connection)
                return handler(message, connection)

            return text
        if type == "init":

            async def init(message: Message, connection: Connection) -> Any:
                reply = handler(message, connection)
                if inspect.isawaitable(reply):
                    reply = await reply
                if isinstance(reply, dict) and reply.get("resumed") is True:
                    # its memberships here: rooms that deliver nothing until joined again
                    rooms = sorted(self.joined.get(connection.session.id, ()))
                    reply = {**reply, "rooms": rooms}
                return reply

            return init
        return None

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
        state = self._add_member(room, session.id)
        # Live messages reach this connection from the end of this join on; while its
        # position (and replay) is read, hold them, so none arrives before the replay
        # nor twice. A join again (after a reconnect) starts over the same way.
        state.live.pop(session.id, None)
        held: list[_Held] = []
        state.joining.setdefault(session.id, held)
        reply: dict[str, Any] = {"room": room}
        try:
            if since is not None:
                missed, offset, epoch = await broker.room_since(
                    room, since["offset"], since["epoch"]
                )
                reply["recovered"] = missed is not None
                reply["missed"] = len(missed or ())
                for stored in missed or ():
                    connection.deliver(self._frame(stored))
            else:
                offset, epoch = await broker.room_position(room)
        finally:
            if state.joining.get(session.id) is held:
                del state.joining[session.id]
        for stored, frame in held:  # published after the position read
            if stored["offset"] > offset or stored["epoch"] != epoch:
                connection.deliver(frame)
                offset, epoch = stored["offset"], stored["epoch"]
        # not left, expired or closed while the position was read
        if room in self.joined.get(session.id, ()) and not connection.closing:
            last = state.delivered
            if last is None or last[1] != epoch or last[0] < offset:
                state.replayed[session.id] = (offset, epoch)
            state.live[session.id] = connection
            count = await self._present(room, connection)
        else:
            count = await self._app.broker.presence_count(room)
        reply.update(count=count, offset=offset, epoch=epoch)
        if count <= self.large_room:
            members = await broker.presence(room)
            reply.update(members=members, count=len(members))
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
        # The reply is this answer (a session frame); the message itself reaches every
        # member connection, the sender's too, as a room frame. A publish answered
        # ``overloaded`` that lands anyway (a networked broker that did not confirm in
        # time) reaches its sender like any member.
        stored = await self._app.broker.publish(
            room,
            body,
            history_size=self.history_size,
            history_ttl=self.history_ttl,
            # a retry: same session (or the one its client failed to resume), id, bytes
            dedupe=f"{session.origin}:{message.id}:{message.digest}",
        )
        return _public(stored)

    # membership, fan-out ----------------------------------------------------

    def _frame(self, stored: dict[str, Any]) -> bytes:
        """The room frame of a stored message: encoded once, the same for every member."""
        return self._app.encode_frame(
            "text",
            _public(stored),
            room=stored["room"],
            offset=stored["offset"],
            epoch=stored["epoch"],
        )

    def _add_member(self, room: str, session_id: str) -> _Room:
        self.joined.setdefault(session_id, set()).add(room)
        state = self.rooms.get(room)
        if state is None:
            state = self.rooms[room] = _Room(partial(self._fan_out, room))
            self._app.broker.subscribe(room, state.listener)
        state.members.add(session_id)
        return state

    def _remove_member(self, room: str, session_id: str) -> None:
        rooms = self.joined.get(session_id)
        if rooms is not None:
            rooms.discard(room)
            if not rooms:
                del self.joined[session_id]
        state = self.rooms.get(room)
        if state is None:
            return
        state.members.discard(session_id)
        state.live.pop(session_id, None)
        state.replayed.pop(session_id, None)
        if not state.members:
            del self.rooms[room]
            self._app.broker.unsubscribe(room, state.listener)

    def _fan_out(self, room: str, stored: dict[str, Any]) -> None:
        """The broker's delivery of one room message to this process: one frame, written
        to every live member connection (the sender's too), in offset order."""
        state = self.rooms.get(room)
        if state is None:
            return
        state.delivered = (stored["offset"], stored["epoch"])
        if not state.live and not state.joining:
            return
        frame = self._frame(stored)
        if state.joining:
            for held in state.joining.values():
                held.append((stored, frame))
        skip = state.replayed
        if not skip:
            for connection in list(state.live.values()):
                connection.deliver(frame)
            return
        for session_id, connection in list(state.live.items()):
            done = skip.get(session_id)
            if done is not None:
                if stored["offset"] <= done[0] and stored["epoch"] == done[1]:
                    continue  # its join's replay had it
                del skip[session_id]
            connection.deliver(frame)

    # presence ---------------------------------------------------------------

    def _announce(self, room: str, event: str, member: str, skip: str) -> None:
        """A member joined or left a room that is not large: tell the room's live members
        here and on every other process sharing the broker (at most once there, like any
        control message)."""
        self._notify(room, event, member, skip)
        message = {"op": "rooms.presence", "room": room, "event": event, "member": member}
        self._app.broker.tell(None, message)

    @hookimpl
    def control_message(self, message: dict[str, Any]) -> None:
        if message["op"] == "rooms.presence":
            self._notify(message["room"], message["event"], message["member"])

    def _notify(self, room: str, event: str, member: str, skip: str | None = None) -> None:
        """One presence frame (unnumbered, not kept), written to the room's live members."""
        state = self.rooms.get(room)
        if state is None or not state.live:
            return
        content = {"room": room, "event": event, "member": member}
        frame = self._app.encode_frame("presence", content, room=room)
        for session_id, connection in list(state.live.items()):
            if session_id != skip:
                connection.deliver(frame)

    async def _present(self, room: str, connection: Connection) -> int:
        """``connection`` is present in ``room``; returns the room's member count."""
        broker = self._app.broker
        member = connection.session.principal_id
        added, count = await broker.presence_add(room, member, connection.id)
        if connection.closing:  # closed meanwhile: its disconnect may have run already
            return (await broker.presence_remove(room, member, connection.id))[1]
        connection.stash.setdefault(_PRESENT, set()).add(room)
        if added and count <= self.large_room:
            self._announce(room, "join", member, skip=connection.session.id)
        return count

    async def _absent(self, room: str, connection: Connection) -> None:
        present = connection.stash.get(_PRESENT, set())
        if room not in present:
            return
        present.discard(room)
        member = connection.session.principal_id
        gone, count = await self._app.broker.presence_remove(room, member, connection.id)
        if gone and count < self.large_room:  # it was not large before
            self._announce(room, "leave", member, skip=connection.session.id)

    # lifecycle --------------------------------------------------------------

    @hookimpl
    async def disconnect(self, connection: Connection, code: int) -> None:
        """The connection's rooms deliver nothing more to its session (until a connection
        of it joins again); it is no longer present where it joined."""
        session_id = connection.session.id
        for room in list(self.joined.get(session_id, ())):
            state = self.rooms.get(room)
            if state is not None and state.live.get(session_id) is connection:
                del state.live[session_id]
                state.replayed.pop(session_id, None)
        present: set[str] = connection.stash.get(_PRESENT, set())
        for room in list(present):
            await self._absent(room, connection)

    @hookimpl
    def session_expired(self, session: Session) -> None:
        for room in list(self.joined.get(session.id, ())):
            self._remove_member(room, session.id)
