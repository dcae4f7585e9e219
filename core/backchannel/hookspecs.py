"""Every hook a backchannel plugin can implement, in lifecycle order.

This module is the reference for plugin authors. Each hookspec declares, in code, its
*kind* (the failure policy the kernel applies), how results combine, whether it may
return an awaitable, and the result it may return. The kernel calls hooks only
through its gateway (:mod:`backchannel.hooks`), which checks each result and applies
the policy, never through pluggy's ``firstresult`` (which cannot see through an
un-awaited coroutine). :data:`SPECS` holds the declarations by hook name.

Call order: implementations run in the order their plugins are named in config
(``[plugins] enabled``), then in-process plugins added with ``App.use`` in the order
added. ``tryfirst``/``trylast`` on a hookimpl move it to the front or back.
``wrapper=True``/``hookwrapper=True`` implementations are refused at registration:
they would wrap the *creation* of a coroutine, not its execution (use
``wrap_handler`` for middleware).

Kinds (:class:`Kind`):

* **set-up** (``config_schema``, ``message_types``, ``wrap_handler``, ``broker``,
  ``http_routes``, ``cli_commands``, ``startup``): an exception, a wrong result or a
  time-out stops start-up with one line naming the plugin and the hook;
* **gatekeeper** (``authenticate``, ``connect``, ``validate``) fails closed: an
  exception, a wrong result, an awaitable that fails or one that outlives its time
  rejects that connection (close 1011, or the ``Reject`` code) or that message
  (``handler_error``, or the ``BackchannelError`` code), with one log line naming the
  plugin and the hook;
* **dispatch** (``handle``): called only for the owner of a message type; whatever
  it does, the request gets its one answer (``handler_error`` for a crash or an
  invalid reply, ``timeout`` past ``message.timeout``);
* **observer** (everything else) is told what happened: a failure (exception, wrong
  result, time-out) is logged with the plugin's name, counted, and the kernel carries
  on.

Hooks marked *sync only* are on the hot path and must not return an awaitable; an
awaitable returned from one is closed, logged and counted as a failure. Awaitables
returned from the others are awaited for at most ``hooks.timeout`` seconds
(``validate`` and ``handle``: ``message.timeout``).
"""

from __future__ import annotations

import argparse
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from .errors import BackchannelError
from .model import Deferred, Principal

if TYPE_CHECKING:
    from .app import App
    from .broker import Broker
    from .connection import Connection
    from .model import Message
    from .session import Session

__all__ = ["PROJECT", "SPECS", "HookSpec", "Kind", "hookimpl", "hookspec"]

PROJECT = "backchannel"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

_F = TypeVar("_F", bound=Callable[..., Any])


class Kind(enum.Enum):
    """A hook's failure policy (see the module docstring)."""

    SETUP = "set-up"
    GATEKEEPER = "gatekeeper"
    DISPATCH = "dispatch"
    OBSERVER = "observer"


@dataclass(frozen=True, slots=True)
class HookSpec:
    """What the kernel promises about one hook, and checks."""

    name: str
    kind: Kind
    #: the first non-None result wins and the rest are not called
    first_result: bool = False
    #: the implementation may return an awaitable (else: sync only)
    awaitable: bool = False
    #: what a non-None result must be (an instance check; "callable" for callables);
    #: None: the result is ignored
    returns: type | tuple[type, ...] | str | None = None


#: every hook's declaration, by name
SPECS: dict[str, HookSpec] = {}


def _spec(
    kind: Kind,
    *,
    first_result: bool = False,
    awaitable: bool = False,
    returns: type | tuple[type, ...] | str | None = None,
) -> Callable[[_F], _F]:
    def declare(func: _F) -> _F:
        SPECS[func.__name__] = HookSpec(func.__name__, kind, first_result, awaitable, returns)
        return hookspec(func)

    return declare


# --------------------------------------------------------------------------
# start-up


@_spec(Kind.SETUP, returns=dict)
def config_schema() -> dict[str, Any] | None:
    """Return the JSON Schema of this plugin's ``[plugins.<name>]`` settings table.

    Called once, before start-up, only for enabled plugins. The schema's
    ``default`` values fill in missing keys; unknown keys fail start-up with their
    dotted path. Returning None means the plugin takes no settings (any table given
    for it is then an error).
    """


@_spec(Kind.SETUP)
def message_types(register: Callable[..., None]) -> None:
    """Declare the message types this plugin owns, by calling ``register``.

    ``register(name, *, schema=None, permission=None, handler=None, timeout=None,
    reply=None, reply_type=None, chunks=None, errors=None)``:

    * ``name``: what clients send as ``type``: 1-64 characters of ``a-z 0-9 _ . -``,
      starting with a letter (the envelope's rule; any other name fails start-up),
      and not ``cancel`` (the kernel's).
    * ``schema``: JSON Schema (dict) for the request's ``content``; checked before
      any ``validate`` hook.
    * ``permission``: the permission a principal needs to send this type, or None.
    * ``handler``: the callable answering it; None means this plugin's ``handle``
      hookimpl.
    * ``timeout``: seconds, overriding ``message.timeout`` for this type.

    The contract of the answer, for clients (``/asyncapi.json``, the TypeScript
    declarations); the kernel does not check replies against it:

    * ``reply``: JSON Schema (dict) of the reply's ``content``, or ``"ack"`` when the
      handler returns nothing.
    * ``reply_type``: the reply frame's ``type`` when it is not the request's own
      (``ping`` answers ``pong``).
    * ``chunks``: JSON Schema of each ``chunk``'s ``content`` when the handler streams
      (its answer is then ``ack``).
    * ``errors``: the error codes (:class:`~backchannel.ErrorCode` or their values) it
      may answer beyond those every request may get (``backchannel.model.COMMON_ERRORS``;
      ``forbidden`` is implied by ``permission``).

    Called once at start-up. Two plugins registering one name fail start-up, naming
    both; so does any option of the wrong kind. Returns nothing.
    """


@_spec(Kind.SETUP, returns="callable")
def wrap_handler(type: str, handler: Callable[..., Any]) -> Callable[..., Any] | None:
    """Wrap the handler of message type ``type`` (middleware, the seed's ``next()``).

    Called once per type at start-up, after every type is registered, in call
    order; each wrapper receives the previous one's result. Return the new handler
    (same signature: ``(message, connection)``), or None to leave it as it is.
    Compose here, not per message.
    """


@_spec(Kind.SETUP, first_result=True, awaitable=True, returns="broker")
def broker(app: App) -> Broker | None:
    """Return the broker this App should use (the first non-None result wins).

    Called once at start-up; may return an awaitable. None means "not me"; when
    every plugin returns None the embedded in-memory broker is used.
    """


@_spec(Kind.SETUP)
def http_routes(register: Callable[..., None]) -> None:
    """Add plain HTTP routes served on the WebSocket port, by calling ``register``.

    ``register(method, path, handler)`` where ``handler(request)`` returns (or
    awaits to) an :class:`backchannel.http.HttpResponse`. A path already taken
    (by the kernel's ``/healthz``/``/readyz`` or another plugin) fails start-up.
    """


@_spec(Kind.SETUP)
def cli_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add sub-commands to the ``backchannel`` CLI.

    Call ``subparsers.add_parser(name, help=...)`` and set a ``func`` default
    taking the parsed ``argparse.Namespace`` and returning an exit code. Called for
    every installed plugin that implements it (the CLI is built before config is
    read), so keep imports inside ``func``.
    """


@_spec(Kind.SETUP, awaitable=True)
def startup(app: App) -> None:
    """The App is starting: open resources, read ``app.plugin_config(name)``.

    Called once, after config is checked and before the server listens; may
    return an awaitable, which is awaited (for at most ``hooks.timeout``). An
    exception fails start-up.
    """


# --------------------------------------------------------------------------
# connection


@_spec(Kind.GATEKEEPER, first_result=True, awaitable=True, returns=(Principal, Deferred))
def authenticate(connection: Connection) -> Principal | Deferred | None:
    """Say who is connecting, from the handshake (headers, query, remote address).

    Called once per connection, right after the WebSocket handshake; may return an
    awaitable. The first non-None result wins and the rest are not called:

    * a :class:`backchannel.Principal`: the connection is that principal;
    * :data:`backchannel.DEFERRED`: admit the connection without a principal, to
      authenticate later with ``init`` (the plugin then calls
      ``connection.authenticate(principal)``); until then every request but
      ``init`` is answered ``unauthorized`` before its type is looked up, and
      nothing the connection is sent is kept for a resume;
    * None from every plugin: the anonymous principal (see the ``auth`` settings).

    Raise :class:`backchannel.Reject` (e.g. 4001) to close the connection. Anything
    else (another exception, another kind of result, an awaitable that fails or
    outlives ``hooks.timeout``) closes it with 1011.
    """


@_spec(Kind.GATEKEEPER, awaitable=True)
def connect(connection: Connection) -> None:
    """Decide whether an authenticated connection may stay.

    Called for every plugin, in call order, after ``authenticate``; may return
    an awaitable (awaited for at most ``hooks.timeout``). Raise
    :class:`backchannel.Reject` to close with its code; any other failure closes
    with 1011. Messages that arrive meanwhile wait and are handled once every
    ``connect`` returned.
    """


@_spec(Kind.OBSERVER)
def connection_added(connection: Connection) -> None:
    """Observer, sync only: a connection was accepted (after ``connect``)."""


# --------------------------------------------------------------------------
# message


@_spec(Kind.OBSERVER)
def message_received(message: Message, connection: Connection) -> None:
    """Observer, sync only: a request passed the envelope contract.

    Called before the request is validated or handled.
    """


@_spec(Kind.GATEKEEPER, awaitable=True)
def validate(message: Message, connection: Connection) -> None:
    """Check a request before it is handled; raise to reject it.

    Called for every request whose type is registered, after the type's content
    schema accepted it, in call order; may return an awaitable (its time counts
    against ``message.timeout``). Raise
    :class:`backchannel.BackchannelError` (``validation_failed``, ``rate_limited``,
    ``forbidden``, ...) to answer with that error; any other exception answers
    ``handler_error`` and is logged with the plugin's name, as does any result but
    None (or an awaitable of None). Mutating ``message.content`` (e.g. sanitizing
    text) is allowed.
    """


@_spec(Kind.DISPATCH, awaitable=True)
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


@_spec(Kind.OBSERVER, first_result=True, returns=BackchannelError)
def on_error(message: Message | None, connection: Connection, error: BaseException) -> Any:
    """A handler or hook failed with an unexpected exception; map it, or observe it.

    Return a :class:`backchannel.BackchannelError` to answer with it (the first
    non-None result wins), or None to keep the default ``handler_error``. May not
    return an awaitable (sync only).
    """


@_spec(Kind.OBSERVER)
def message_sent(connection: Connection | None, frame: dict[str, Any]) -> None:
    """Observer, sync only: a frame was sent to a session (after ``seq``).

    ``connection`` is None when the session has no connection right now: the
    frame waits in the session's outbox for a resume.
    """


@_spec(Kind.OBSERVER)
def error(
    connection: Connection,
    message_id: str | None,
    error: BackchannelError,
    message: Message | None,
) -> None:
    """Observer, sync only: an ``error`` frame was sent (``message_id`` is its replyTo).

    ``message`` is the request it answers when the envelope was valid, else None.
    """


@_spec(Kind.OBSERVER)
def alert(name: str, state: str, details: dict[str, Any]) -> None:
    """Observer, sync only: an alert changed ``state`` (``"firing"`` or ``"resolved"``)."""


# --------------------------------------------------------------------------
# end


@_spec(Kind.OBSERVER, awaitable=True)
def disconnect(connection: Connection, code: int) -> None:
    """A connection closed with ``code``; release per-connection resources.

    Called for every plugin; may return an awaitable (awaited for at most
    ``hooks.timeout``). Failures are logged.
    """


@_spec(Kind.OBSERVER, awaitable=True)
def session_resumed(session: Session, connection: Connection) -> None:
    """A connection resumed ``session`` (after its missed frames were replayed).

    Called for every plugin; may return an awaitable (e.g. to restore presence).
    Failures are logged.
    """


@_spec(Kind.OBSERVER)
def control_message(app: App, message: dict[str, Any]) -> None:
    """Observer, sync only: another process sharing the broker told this one ``message``
    (``app.broker.tell``) with an ``op`` the kernel does not handle itself (it handles
    ``send``, ``broadcast``, ``takeover``). Plugins name their ops ``"<plugin>.<what>"``
    and ignore the others; delivery between processes is at most once."""


@_spec(Kind.OBSERVER)
def session_expired(session: Session) -> None:
    """Observer, sync only: ``session`` is gone from this process: it outlived
    ``session.ttl`` without a connection, or another process sharing the broker
    resumed it (took it over); release what it held here (room memberships, ...)."""


@_spec(Kind.OBSERVER)
def connection_removed(connection: Connection, code: int) -> None:
    """Observer, sync only: a connection is gone (after ``disconnect``)."""


@_spec(Kind.OBSERVER, awaitable=True)
def shutdown(app: App) -> None:
    """The App is stopping: close resources.

    May return an awaitable (awaited for at most ``hooks.timeout``); failures are logged.
    """
