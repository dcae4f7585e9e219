"""Every hook a backchannel plugin can implement, in lifecycle order.

This module is the reference for plugin authors. Each hook is called by the
kernel's hook caller (:mod:`backchannel.hooks`), never with pluggy's
``firstresult`` flag, because a hook may return an awaitable and the kernel
awaits it before deciding anything.

Call order: implementations run in the order their plugins are named in config
(``[plugins] enabled``), then in-process plugins added with ``App.use`` in the order
added. ``tryfirst``/``trylast`` on a hookimpl move it to the front or back.

Failure policy, by kind of hook:

* gatekeepers (``authenticate``, ``connect``, ``validate``) fail closed: an
  exception rejects that connection (close 1011, or the ``Reject`` code) or that
  message (``handler_error``, or the ``BackchannelError`` code);
* set-up hooks (``config_schema``, ``startup``, ``message_types``, ``wrap_handler``,
  ``broker``, ``http_routes``) fail start-up, naming the plugin;
* observers (``connection_added``, ``connection_removed``, ``message_received``,
  ``message_sent``, ``error``, ``alert``, ``on_error``, ``disconnect``,
  ``session_resumed``, ``session_expired``, ``control_message``, ``shutdown``)
  log the failure with the plugin's name, count it, and carry on.

Hooks marked *sync only* are on the hot path and must not return an awaitable.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .app import App
    from .broker import Broker
    from .errors import BackchannelError
    from .hub import Connection, Session
    from .model import Message, Principal

__all__ = ["hookimpl", "hookspec", "PROJECT"]

PROJECT = "backchannel"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------
# start-up


@hookspec
def config_schema() -> dict[str, Any] | None:
    """Return the JSON Schema of this plugin's ``[plugins.<name>]`` settings table.

    Called once, before start-up, only for enabled plugins. The schema's
    ``default`` values fill in missing keys; unknown keys fail start-up with their
    dotted path. Returning None means the plugin takes no settings (any table given
    for it is then an error).
    """


@hookspec
def message_types(register: Callable[..., None]) -> None:
    """Declare the message types this plugin owns, by calling ``register``.

    ``register(name, *, schema=None, permission=None, handler=None, timeout=None)``:

    * ``schema``: JSON Schema (dict) for the request's ``content``; checked before
      any ``validate`` hook.
    * ``permission``: the permission a principal needs to send this type, or None.
    * ``handler``: the callable answering it; None means this plugin's ``handle``
      hookimpl.
    * ``timeout``: seconds, overriding ``message.timeout`` for this type.

    Called once at start-up. Two plugins registering one name fail start-up, naming
    both. Returns nothing.
    """


@hookspec
def wrap_handler(type: str, handler: Callable[..., Any]) -> Callable[..., Any] | None:
    """Wrap the handler of message type ``type`` (middleware, the seed's ``next()``).

    Called once per type at start-up, after every type is registered, in call
    order; each wrapper receives the previous one's result. Return the new handler
    (same signature: ``(message, connection)``), or None to leave it as it is.
    Compose here, not per message.
    """


@hookspec
def broker(app: App) -> Broker | None:
    """Return the broker this App should use (the first non-None result wins).

    Called once at start-up; may return an awaitable. None means "not me"; when
    every plugin returns None the embedded in-memory broker is used.
    """


@hookspec
def http_routes(register: Callable[..., None]) -> None:
    """Add plain HTTP routes served on the WebSocket port, by calling ``register``.

    ``register(method, path, handler)`` where ``handler(request)`` returns (or
    awaits to) an :class:`backchannel.http.HttpResponse`. A path already taken
    (by the kernel's ``/healthz``/``/readyz`` or another plugin) fails start-up.
    """


@hookspec
def cli_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add sub-commands to the ``backchannel`` CLI.

    Call ``subparsers.add_parser(name, help=...)`` and set a ``func`` default
    taking the parsed ``argparse.Namespace`` and returning an exit code. Called for
    every installed plugin that implements it (the CLI is built before config is
    read), so keep imports inside ``func``.
    """


@hookspec
def startup(app: App) -> None:
    """The App is starting: open resources, read ``app.plugin_config(name)``.

    Called once, after config is checked and before the server listens; may
    return an awaitable, which is awaited. An exception fails start-up.
    """


# --------------------------------------------------------------------------
# connection


@hookspec
def authenticate(connection: Connection) -> Principal | None:
    """Say who is connecting, from the handshake (headers, query, remote address).

    Called once per connection, right after the WebSocket handshake; may return an
    awaitable. The first non-None principal wins and the rest are not called.
    None from every plugin gives the anonymous principal (see the ``auth``
    settings). Raise :class:`backchannel.Reject` (e.g. 4001) to close the
    connection.
    """


@hookspec
def connect(connection: Connection) -> None:
    """Decide whether an authenticated connection may stay.

    Called for every plugin, in call order, after ``authenticate``; may return
    an awaitable. Raise :class:`backchannel.Reject` to close with its code.
    Messages that arrive meanwhile wait and are handled once every ``connect``
    returned.
    """


@hookspec
def connection_added(connection: Connection) -> None:
    """Observer, sync only: a connection was accepted (after ``connect``)."""


# --------------------------------------------------------------------------
# message


@hookspec
def message_received(message: Message, connection: Connection) -> None:
    """Observer, sync only: a request passed the envelope contract.

    Called before the request is validated or handled.
    """


@hookspec
def validate(message: Message, connection: Connection) -> None:
    """Check a request before it is handled; raise to reject it.

    Called for every request whose type is registered, after the type's content
    schema accepted it, in call order; may return an awaitable. Raise
    :class:`backchannel.BackchannelError` (``validation_failed``, ``rate_limited``,
    ``forbidden``, ...) to answer with that error; any other exception answers
    ``handler_error`` and is logged with the plugin's name. Mutating
    ``message.content`` (e.g. sanitizing text) is allowed. Returns nothing.
    """


@hookspec
def handle(message: Message, connection: Connection) -> Any:
    """Answer a request of a type this plugin registered.

    Called only for the owner of ``message.type`` (dispatch is one table lookup).
    Return a dict (reply of the same type), a :class:`backchannel.Reply` (another
    type), or None (the client gets an ``ack``); or be an ``async def`` returning
    one of those; or be an async generator, whose every item goes out as a
    ``chunk`` frame followed by an ``ack`` (streaming). Raise
    :class:`backchannel.BackchannelError` for an error answer. The time allowed is
    ``message.timeout`` (between chunks, for a generator).
    """


@hookspec
def on_error(message: Message | None, connection: Connection, error: BaseException) -> Any:
    """A handler or hook failed with an unexpected exception; map it, or observe it.

    Return a :class:`backchannel.BackchannelError` to answer with it (the first
    non-None result wins), or None to keep the default ``handler_error``. May not
    return an awaitable (sync only).
    """


@hookspec
def message_sent(connection: Connection | None, frame: dict[str, Any]) -> None:
    """Observer, sync only: a frame was sent to a session (after ``seq``).

    ``connection`` is None when the session has no connection right now: the
    frame waits in the session's outbox for a resume.
    """


@hookspec
def error(connection: Connection, message_id: str | None, error: BackchannelError) -> None:
    """Observer, sync only: an ``error`` frame was sent (``message_id`` is its replyTo)."""


@hookspec
def alert(name: str, state: str, details: dict[str, Any]) -> None:
    """Observer, sync only: an alert changed ``state`` (``"firing"`` or ``"resolved"``)."""


# --------------------------------------------------------------------------
# end


@hookspec
def disconnect(connection: Connection, code: int) -> None:
    """A connection closed with ``code``; release per-connection resources.

    Called for every plugin; may return an awaitable. Failures are logged.
    """


@hookspec
def session_resumed(session: Session, connection: Connection) -> None:
    """A connection resumed ``session`` (after its missed frames were replayed).

    Called for every plugin; may return an awaitable (e.g. to restore presence).
    Failures are logged.
    """


@hookspec
def control_message(app: App, message: dict[str, Any]) -> None:
    """Observer, sync only: another process sharing the broker told this one ``message``
    (``app.broker.tell``) with an ``op`` the kernel does not handle itself (it handles
    ``send``, ``broadcast``, ``takeover``). Plugins name their ops ``"<plugin>.<what>"``
    and ignore the others; delivery between processes is at most once."""


@hookspec
def session_expired(session: Session) -> None:
    """Observer, sync only: ``session`` is gone from this process: it outlived
    ``session.ttl`` without a connection, or another process sharing the broker
    resumed it (took it over); release what it held here (room memberships, ...)."""


@hookspec
def connection_removed(connection: Connection, code: int) -> None:
    """Observer, sync only: a connection is gone (after ``disconnect``)."""


@hookspec
def shutdown(app: App) -> None:
    """The App is stopping: close resources. May return an awaitable; failures are logged."""
