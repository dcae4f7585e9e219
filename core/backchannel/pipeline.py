"""The per-message pipeline (DESIGN §5) and the type → handler table it dispatches on.

After the envelope contract (checked on arrival by :class:`~backchannel.hub.Connection`):
type lookup → permission → the type's content schema → ``validate`` hooks →
handler under ``message.timeout`` → exactly one terminal answer (reply, ``ack``
or ``error``). Everything here is built once at start-up; a message costs one dict
lookup and direct calls, no plugin discovery.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .contracts import Validator, compile_schema, load_schema, violations
from .errors import BackchannelError, ErrorCode, StartupError
from .hooks import HookFailed, bind
from .model import Message, Reply

if TYPE_CHECKING:
    from .app import App
    from .hub import Connection, Job

__all__ = ["Pipeline", "Rest", "TypeEntry", "adapt_handler"]

log = logging.getLogger("backchannel.pipeline")

Handler = Callable[[Message, "Connection"], Any]
_ARGS = ("message", "connection")
_INTERRUPTED = {
    "timeout": (ErrorCode.TIMEOUT, "handler did not answer within {timeout:g} s"),
    "cancelled": (ErrorCode.CANCELLED, "cancelled by the client"),
    "shutting_down": (ErrorCode.SHUTTING_DOWN, "server shut down before the handler finished"),
    "expired": (ErrorCode.CANCELLED, "the session expired"),
}
_monotonic = time.monotonic
_isawaitable = inspect.isawaitable
_isasyncgen = inspect.isasyncgen


@dataclass(slots=True)
class TypeEntry:
    """One registered message type."""

    name: str
    plugin: str
    handler: Handler
    validator: Validator | None
    permission: str | None
    timeout: float
    schema: dict[str, Any] | None


@dataclass(slots=True)
class Rest:
    """What is left of a request after :meth:`Pipeline.start`: an awaitable to finish.

    ``pending`` is a validator's awaitable (``validator`` is its index) or the
    handler's coroutine or async generator (``validator`` is None).
    """

    entry: TypeEntry
    pending: Any
    validator: int | None

    def discard(self) -> None:
        """Close a coroutine that will never be awaited (no 'never awaited' warning)."""
        close = getattr(self.pending, "close", None)
        if close is not None and inspect.iscoroutine(self.pending):
            close()


def _call_handler(entry: TypeEntry, message: Message, conn: Connection) -> Any:
    """Call the type's handler; an unexpected exception names the plugin that owns it."""
    try:
        return entry.handler(message, conn)
    except BackchannelError:
        raise
    except Exception as exc:
        raise HookFailed("handle", entry.plugin, exc) from exc


def adapt_handler(func: Callable[..., Any]) -> Handler:
    """Accept handlers taking ``(message)`` or ``(message, connection)``."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return func
    positional = [
        p
        for p in params.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(positional) == 1:
        return lambda message, connection: func(message)
    return func


class Pipeline:
    """The compiled pipeline of one App."""

    def __init__(self, app: App) -> None:
        self.app = app
        cfg = app.config
        self.envelope: Validator = compile_schema(
            load_schema("backchannel", "envelope.schema.json")
        )
        self.timeout: float = cfg["message"]["timeout"]
        self.max_queued: int = cfg["message"]["max_queued"]
        self.max_in_flight: int = cfg["message"]["max_in_flight"]
        self.types: dict[str, TypeEntry] = {}
        self.validators: list[tuple[str, Handler]] = []
        self.observe_sent = False
        self.observe_errors = False
        self.observe_received = False

    # ----------------------------------------------------------------- build

    def build(self) -> None:
        """Collect types, wrap handlers and validators from the hooks (start-up only)."""
        hooks = self.app.hooks
        types: dict[str, TypeEntry] = {}
        handles = {impl.plugin_name: impl for impl in hooks.impls("handle")}
        for impl in hooks.impls("message_types"):
            plugin = impl.plugin_name

            def register(
                name: str,
                *,
                schema: dict[str, Any] | None = None,
                permission: str | None = None,
                handler: Callable[..., Any] | None = None,
                timeout: float | None = None,
                _plugin: str = plugin,
            ) -> None:
                if name == "cancel":
                    raise StartupError(f"plugin {_plugin!r}: 'cancel' is a kernel message type")
                if name in types:
                    raise StartupError(
                        f"message type {name!r} is registered by both plugin "
                        f"{types[name].plugin!r} and plugin {_plugin!r}; disable one of them"
                    )
                if handler is None:
                    owner = handles.get(_plugin)
                    if owner is None:
                        raise StartupError(
                            f"plugin {_plugin!r} registers type {name!r} without a handler "
                            f"and implements no 'handle' hook"
                        )
                    handler = bind(owner, _ARGS)
                else:
                    handler = adapt_handler(handler)
                try:
                    validator = compile_schema(schema) if schema else None
                except Exception as exc:
                    raise StartupError(
                        f"plugin {_plugin!r}: schema of type {name!r} is invalid: {exc}"
                    ) from exc
                types[name] = TypeEntry(
                    name,
                    _plugin,
                    handler,
                    validator,
                    permission,
                    self.timeout if timeout is None else timeout,
                    schema,
                )

            try:
                impl.function(*[{"register": register}[n] for n in impl.argnames])
            except StartupError:
                raise
            except Exception as exc:
                raise StartupError(
                    f"plugin {plugin!r} failed in hook 'message_types': {exc!r}"
                ) from exc
        wrappers = list(reversed(hooks.impls("wrap_handler")))  # first plugin outermost
        for entry in types.values():
            for impl in wrappers:
                args = {"type": entry.name, "handler": entry.handler}
                try:
                    wrapped: Any = impl.function(*[args[n] for n in impl.argnames])
                except Exception as exc:
                    raise StartupError(
                        f"plugin {impl.plugin_name!r} failed in hook 'wrap_handler' "
                        f"for type {entry.name!r}: {exc!r}"
                    ) from exc
                if wrapped is not None:
                    entry.handler = adapt_handler(wrapped)
        self.types = types
        self.validators = [
            (impl.plugin_name, bind(impl, _ARGS)) for impl in hooks.impls("validate")
        ]
        self.observe_sent = hooks.has("message_sent")
        self.observe_errors = hooks.has("error")
        self.observe_received = hooks.has("message_received")

    # --------------------------------------------------------------- process

    def start(self, conn: Connection, message: Message) -> Rest | None:
        """Run the pipeline as far as it goes without waiting.

        Returns None when the request got its answer (a sync handler: the common
        case, with no task switch at all), or the :class:`Rest` to pass to
        :meth:`finish` when a validator or the handler returned an awaitable.
        """
        try:
            entry = self.types.get(message.type)
            if entry is None:
                raise BackchannelError(
                    ErrorCode.UNKNOWN_TYPE, f"unknown message type {message.type!r}"
                )
            if self.observe_received:
                self.app.hooks.notify("message_received", message=message, connection=conn)
            permission = entry.permission
            if permission is not None and not conn.principal.allows(permission):  # type: ignore[union-attr]
                raise BackchannelError(
                    ErrorCode.FORBIDDEN, f"permission {permission!r} is required"
                )
            if entry.validator is not None and not entry.validator.is_valid(message.content):
                details = violations(entry.validator, message.content, "content")
                text = "; ".join(f"{d['path']}: {d['rule']}" for d in details[:3])
                raise BackchannelError(ErrorCode.VALIDATION_FAILED, text, details=details)
            for index, (plugin, check) in enumerate(self.validators):
                try:
                    result = check(message, conn)
                except BackchannelError:
                    raise
                except Exception as exc:
                    raise HookFailed("validate", plugin, exc) from exc
                if result is not None and _isawaitable(result):
                    return Rest(entry, result, index)
            result = _call_handler(entry, message, conn)
            if (
                result is not None
                and type(result) is not dict
                and (_isawaitable(result) or _isasyncgen(result))
            ):
                return Rest(entry, result, None)
            self._answer(conn, message, result)
        except Exception as exc:
            self._fail(conn, message, exc)
        return None

    async def finish(self, conn: Connection, job: Job, rest: Rest) -> None:
        """Await what :meth:`start` left, under the job's deadline; send the one answer."""
        message = job.message
        try:
            if await conn.runtime.run(job, self._rest, conn, job, rest):
                self._answer(conn, message, job.result)
            else:
                rest.discard()
                code, text = _INTERRUPTED[job.reason or "cancelled"]
                conn.send_error(
                    message.id, BackchannelError(code, text.format(timeout=rest.entry.timeout))
                )
        except Exception as exc:
            self._fail(conn, message, exc)

    async def process(self, conn: Connection, job: Job) -> None:
        """Handle one request to its one terminal answer, whatever happens."""
        rest = self.start(conn, job.message)
        if rest is not None:
            await self.finish(conn, job, rest)

    def _fail(self, conn: Connection, message: Message, exc: Exception) -> None:
        if isinstance(exc, BackchannelError):
            conn.send_error(message.id, exc, message)
        elif isinstance(exc, HookFailed):
            self.app.hooks.count_failure(exc.hook, exc.plugin)
            self._failed(conn, message, exc.cause, f"plugin {exc.plugin!r} failed in {exc.hook}")
        else:
            log.exception("answer failed conn=%s msg=%s", conn.id, message.id)
            self._failed(conn, message, exc, "handler failed")

    async def _rest(self, conn: Connection, job: Job, rest: Rest) -> None:
        message = job.message
        entry = rest.entry
        job.deadline = _monotonic() + entry.timeout  # bounds slow validate hooks too
        result = rest.pending
        if rest.validator is not None:
            validators = self.validators
            current = rest.validator  # the validator whose awaitable is pending
            try:
                await result
                for current in range(rest.validator + 1, len(validators)):
                    result = validators[current][1](message, conn)
                    if result is not None and _isawaitable(result):
                        await result
            except BackchannelError:
                raise
            except Exception as exc:
                raise HookFailed("validate", validators[current][0], exc) from exc
            job.deadline = _monotonic() + entry.timeout
            result = _call_handler(entry, message, conn)
        try:
            if _isawaitable(result):
                result = await result
            elif _isasyncgen(result):
                await self._stream(conn, job, entry, result)
                result = None
        except BackchannelError:
            raise
        except Exception as exc:
            raise HookFailed("handle", entry.plugin, exc) from exc
        job.deadline = 0.0
        job.result = result

    async def _stream(self, conn: Connection, job: Job, entry: TypeEntry, agen: Any) -> None:
        try:
            async for item in agen:
                conn.send("chunk", item if type(item) is dict else {"value": item}, job.message.id)
                job.deadline = _monotonic() + entry.timeout
        finally:
            await agen.aclose()

    def _answer(self, conn: Connection, message: Message, result: Any) -> None:
        try:
            send = conn.session.send
            if result is None:
                send("ack", {}, message.id)
            elif type(result) is dict:
                send(message.type, result, message.id)
            elif isinstance(result, Reply) and type(result.content) is dict:
                send(result.type, result.content, message.id)
            else:
                raise BackchannelError(
                    ErrorCode.HANDLER_ERROR,
                    "handler returned an invalid reply",
                    extra={"ref": self._log_invalid(conn, message, type(result).__name__)},
                )
        except TypeError as exc:
            raise BackchannelError(
                ErrorCode.HANDLER_ERROR,
                "handler returned an invalid reply",
                extra={"ref": self._log_invalid(conn, message, str(exc))},
            ) from exc

    def _log_invalid(self, conn: Connection, message: Message, why: str) -> str:
        ref = os.urandom(4).hex()
        log.error(
            "invalid reply ref=%s conn=%s session=%s msg=%s type=%s: %s",
            ref,
            conn.id,
            conn.session.id,
            message.id,
            message.type,
            why,
            extra={"connection_id": conn.id, "message_id": message.id, "ref": ref},
        )
        return ref

    def _failed(self, conn: Connection, message: Message, exc: BaseException, what: str) -> None:
        """An unexpected exception: let ``on_error`` map it, else ``handler_error`` with a ref."""
        hooks = self.app.hooks
        for impl in hooks.impls("on_error"):
            try:
                args = {"message": message, "connection": conn, "error": exc}
                mapped = impl.function(*[args[n] for n in impl.argnames])
            except Exception:
                hooks.record_failure("on_error", impl.plugin_name)
                continue
            if isinstance(mapped, BackchannelError):
                conn.send_error(message.id, mapped, message)
                return
        ref = os.urandom(4).hex()
        log.error(
            "%s ref=%s conn=%s session=%s msg=%s type=%s",
            what,
            ref,
            conn.id,
            conn.session.id,
            message.id,
            message.type,
            exc_info=exc,
            extra={"connection_id": conn.id, "message_id": message.id, "ref": ref},
        )
        conn.send_error(
            message.id,
            BackchannelError(
                ErrorCode.HANDLER_ERROR, f"{what}; see server log", extra={"ref": ref}
            ),
            message,
        )
