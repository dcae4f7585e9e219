"""The per-message pipeline (DESIGN §5) and the type → handler table it dispatches on.

After the envelope contract (checked on arrival by :class:`~backchannel.inbox.Inbox`):
a principal (every request but ``init`` of a connection that has none is answered
``unauthorized``, before anything about types leaks) → type lookup → permission → the
type's content schema → ``validate`` hooks → handler under ``message.timeout`` →
exactly one terminal answer (reply, ``ack`` or ``error``). Everything here is built
once at start-up; a message costs one dict lookup and direct calls, no plugin discovery.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import Settings
from .contracts import Validator, compile_schema, load_schema, violations
from .errors import BackchannelError, ErrorCode, StartupError
from .hooks import Gateway, HookFailed
from .model import Message, MessageType, Reply
from .runtime import Interrupt

if TYPE_CHECKING:
    from .connection import Connection
    from .inbox import Job

__all__ = ["Pipeline", "Rest", "TypeEntry", "adapt_handler"]

log = logging.getLogger("backchannel.pipeline")

Handler = Callable[[Message, "Connection"], Any]
_ARGS = ("message", "connection")
_INTERRUPTED = {
    Interrupt.TIMEOUT: (ErrorCode.TIMEOUT, "handler did not answer within {timeout:g} s"),
    Interrupt.CANCELLED: (ErrorCode.CANCELLED, "cancelled by the client"),
    Interrupt.SHUTTING_DOWN: (
        ErrorCode.SHUTTING_DOWN,
        "server shut down before the handler finished",
    ),
    Interrupt.EXPIRED: (ErrorCode.CANCELLED, "the session expired"),
}
#: the one type a connection without a principal may send
INIT = "init"
_monotonic = time.monotonic
_isawaitable = inspect.isawaitable
_isasyncgen = inspect.isasyncgen


@dataclass(slots=True)
class TypeEntry:
    """One registered message type, as the pipeline dispatches it."""

    name: str
    plugin: str
    handler: Handler
    validator: Validator | None
    permission: str | None
    timeout: float
    schema: dict[str, Any] | None
    #: the declared contract of the answer (see :class:`~backchannel.model.MessageType`)
    reply: dict[str, Any] | str | None = None
    reply_type: str | None = None
    chunks: dict[str, Any] | None = None
    errors: tuple[ErrorCode, ...] = ()

    def describe(self) -> MessageType:
        return MessageType(
            self.name,
            self.plugin,
            self.schema,
            self.permission,
            self.timeout,
            self.reply,
            self.reply_type,
            self.chunks,
            self.errors,
        )


@dataclass(slots=True)
class Rest:
    """What is left of a request after :meth:`Pipeline.start`: an awaitable to finish.

    ``pending`` is what is left of the ``validate`` hooks (``validating``: the handler
    runs after it) or the handler's coroutine or async generator.
    """

    entry: TypeEntry
    pending: Any
    validating: bool

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

    def __init__(self, settings: Settings, gateway: Gateway) -> None:
        self.gateway = gateway
        self.envelope: Validator = compile_schema(
            load_schema("backchannel", "envelope.schema.json")
        )
        self._type_name: Validator = compile_schema(
            load_schema("backchannel", "envelope.schema.json")["properties"]["type"]
        )
        self.timeout: float = settings.message.timeout
        self.max_queued: int = settings.message.max_queued
        self.max_in_flight: int = settings.message.max_in_flight
        self.types: dict[str, TypeEntry] = {}
        self._validate: Callable[[Message, Connection], Any] | None = None
        self._observe_received = False

    # ----------------------------------------------------------------- build

    def build(self) -> None:
        """Collect types, wrap handlers and validators from the hooks (start-up only)."""
        gateway = self.gateway
        types: dict[str, TypeEntry] = {}
        owners = {impl.plugin_name for impl in gateway.impls("handle")}

        def registrar(plugin: str) -> dict[str, Any]:
            def register(
                name: str,
                *,
                schema: dict[str, Any] | None = None,
                permission: str | None = None,
                handler: Callable[..., Any] | None = None,
                timeout: float | None = None,
                reply: dict[str, Any] | str | None = None,
                reply_type: str | None = None,
                chunks: dict[str, Any] | None = None,
                errors: Iterable[ErrorCode | str] | None = None,
            ) -> None:
                entry = self._entry(
                    plugin, name, schema, permission, handler, timeout, types, owners
                )
                types[name] = self._contract(entry, reply, reply_type, chunks, errors)

            return {"register": register}

        gateway.setup("message_types", registrar)
        for entry in types.values():
            entry.handler = adapt_handler(gateway.wrap(entry.name, entry.handler))
        self.types = types
        self._validate = gateway.gatekeeper("validate", _ARGS)
        self._observe_received = gateway.has("message_received")

    def _entry(
        self,
        plugin: str,
        name: str,
        schema: dict[str, Any] | None,
        permission: str | None,
        handler: Callable[..., Any] | None,
        timeout: float | None,
        types: dict[str, TypeEntry],
        owners: set[str],
    ) -> TypeEntry:
        """One ``register(...)`` call, checked: a mistake fails start-up naming the plugin."""
        what = f"plugin {plugin!r} registers type {name!r}"
        if not isinstance(name, str) or not self._type_name.is_valid(name):
            raise StartupError(
                f"plugin {plugin!r} registers type {name!r}, which no request can carry: a type "
                "is 1-64 characters of a-z, 0-9, '_', '.', '-', starting with a letter"
            )
        if name == "cancel":
            raise StartupError(f"{what}: 'cancel' is a kernel message type")
        if name in types:
            raise StartupError(
                f"message type {name!r} is registered by both plugin "
                f"{types[name].plugin!r} and plugin {plugin!r}; disable one of them"
            )
        if permission is not None and not isinstance(permission, str):
            raise StartupError(f"{what} with a permission that is not a string")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
        ):
            raise StartupError(f"{what} with timeout {timeout!r}: a number of seconds > 0")
        if handler is None:
            if plugin not in owners:
                raise StartupError(f"{what} without a handler and implements no 'handle' hook")
            handler = self.gateway.implementation("handle", plugin, _ARGS)
        elif not callable(handler):
            raise StartupError(f"{what} with a handler that is not callable")
        validator = self._compiled(what, "schema", schema) if schema else None
        return TypeEntry(
            name,
            plugin,
            adapt_handler(handler),
            validator,
            permission,
            self.timeout if timeout is None else float(timeout),
            schema,
        )

    def _contract(
        self,
        entry: TypeEntry,
        reply: dict[str, Any] | str | None,
        reply_type: str | None,
        chunks: dict[str, Any] | None,
        errors: Iterable[ErrorCode | str] | None,
    ) -> TypeEntry:
        """The answer ``register(...)`` declares (reply, chunks, error codes), checked."""
        frame_types = {"ack", "chunk", "error"}  # the kernel's own answers: no reply_type
        codes = [code.value for code in ErrorCode]
        what = f"plugin {entry.plugin!r} registers type {entry.name!r}"
        if chunks is not None:
            if not isinstance(chunks, dict):
                raise StartupError(f"{what} with chunks that are not a JSON Schema (dict)")
            self._compiled(what, "chunks schema", chunks)
            if reply is None:
                reply = "ack"  # a streaming handler's terminal answer
            elif reply != "ack":
                raise StartupError(
                    f"{what} with chunks and a reply: a streaming handler is answered "
                    "'ack' after its last chunk (leave reply out)"
                )
        if reply == "ack":
            if reply_type is not None:
                raise StartupError(f"{what} with reply 'ack' and a reply_type: leave it out")
            reply_type = "ack"
        elif isinstance(reply, dict):
            self._compiled(what, "reply schema", reply)
            if reply_type is None:
                reply_type = entry.name
            elif (
                not isinstance(reply_type, str)
                or not self._type_name.is_valid(reply_type)
                or reply_type in frame_types
            ):
                raise StartupError(
                    f"{what} with reply_type {reply_type!r}: a message type name other than "
                    f"{', '.join(sorted(frame_types))} (for an ack, reply='ack')"
                )
        elif reply is not None:
            raise StartupError(
                f"{what} with reply {reply!r}: the reply content's JSON Schema (dict), or 'ack'"
            )
        elif reply_type is not None:
            raise StartupError(f"{what} with a reply_type but no reply (its content's schema)")
        entry.reply, entry.reply_type, entry.chunks = reply, reply_type, chunks
        if errors is not None:
            if isinstance(errors, str) or not isinstance(errors, Iterable):
                raise StartupError(f"{what} with errors {errors!r}: a list of error codes")
            declared = set()
            for code in errors:
                if code not in codes:
                    raise StartupError(
                        f"{what} with error code {code!r}, which is not one of: " + ", ".join(codes)
                    )
                declared.add(ErrorCode(code))
            entry.errors = tuple(code for code in ErrorCode if code in declared)
        return entry

    @staticmethod
    def _compiled(what: str, label: str, schema: dict[str, Any]) -> Validator:
        """``schema`` compiled, or a start-up error naming ``what`` registered it."""
        try:
            return compile_schema(schema)
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise StartupError(f"{what}: its {label} is invalid: {first_line}") from exc

    # --------------------------------------------------------------- process

    def start(self, conn: Connection, message: Message) -> Rest | None:
        """Run the pipeline as far as it goes without waiting.

        Returns None when the request got its answer (a sync handler: the common
        case, with no task switch at all), or the :class:`Rest` to pass to
        :meth:`finish` when a validator or the handler returned an awaitable.
        """
        try:
            principal = conn.principal
            if principal is None and message.type != INIT:
                raise BackchannelError(
                    ErrorCode.UNAUTHORIZED, "authenticate first: send init with a token"
                )
            entry = self.types.get(message.type)
            if entry is None:
                raise BackchannelError(
                    ErrorCode.UNKNOWN_TYPE, f"unknown message type {message.type!r}"
                )
            if self._observe_received:
                self.gateway.notify("message_received", message=message, connection=conn)
            permission = entry.permission
            if permission is not None and (principal is None or not principal.allows(permission)):
                raise BackchannelError(
                    ErrorCode.FORBIDDEN, f"permission {permission!r} is required"
                )
            validator = entry.validator
            if validator is not None and not validator.is_valid(message.content):
                details = violations(validator, message.content, "content")
                text = "; ".join(f"{d['path']}: {d['rule']}" for d in details[:3])
                raise BackchannelError(ErrorCode.VALIDATION_FAILED, text, details=details)
            validate = self._validate
            if validate is not None:
                pending = validate(message, conn)
                if pending is not None:
                    return Rest(entry, pending, True)
            try:  # (inline: the handler's failure names its plugin)
                result = entry.handler(message, conn)
            except BackchannelError:
                raise
            except Exception as exc:
                raise HookFailed("handle", entry.plugin, exc) from exc
            if (
                result is not None
                and type(result) is not dict
                and (_isawaitable(result) or _isasyncgen(result))
            ):
                return Rest(entry, result, False)
            self._answer(conn, message, result)
        except Exception as exc:
            self.fail(conn, message, exc)
        return None

    def replay(self, conn: Connection, message: Message, reply: Reply, digest: int) -> Rest | None:
        """A retry of an answered request, checked as any request is before its original
        answer (``reply``) goes again (DESIGN §5: the idempotency check comes last): a
        retry whose content differs from the original's (``digest``) must pass the type's
        content schema; then the ``validate`` hooks (the rate limiter) may refuse it.

        Returns None when answered (or refused), else the :class:`Rest` to finish: a
        ``validate`` hook's awaitable, then the reply. Nothing is remembered: the original
        answer stays the answer.
        """
        entry = self.types.get(message.type)
        try:
            validator = None if entry is None else entry.validator
            if (
                message.digest != digest
                and validator is not None
                and not validator.is_valid(message.content)
            ):
                details = violations(validator, message.content, "content")
                text = "; ".join(f"{d['path']}: {d['rule']}" for d in details[:3])
                raise BackchannelError(ErrorCode.VALIDATION_FAILED, text, details=details)
            validate = self._validate
            pending = None if validate is None else validate(message, conn)
            if pending is None:
                conn.session.send(reply.type, reply.content, message.id)
                return None
        except Exception as exc:
            self.fail(conn, message, exc)
            return None
        timeout = self.timeout if entry is None else entry.timeout
        again = TypeEntry(message.type, "backchannel", lambda *_: reply, None, None, timeout, None)
        return Rest(again, pending, True)

    async def finish(self, conn: Connection, job: Job, rest: Rest) -> None:
        """Await what :meth:`start` left, under the job's deadline; send the one answer."""
        message = job.message
        try:
            if await job.runtime.run(job, self._rest, conn, job, rest):
                self._answer(conn, message, job.result)
            else:
                rest.discard()
                code, text = _INTERRUPTED[job.reason or Interrupt.CANCELLED]
                conn.send_error(
                    message.id,
                    BackchannelError(code, text.format(timeout=rest.entry.timeout)),
                    message,
                )
        except Exception as exc:
            self.fail(conn, message, exc)

    async def _rest(self, conn: Connection, job: Job, rest: Rest) -> None:
        message = job.message
        entry = rest.entry
        job.deadline = _monotonic() + entry.timeout  # bounds slow validate hooks too
        result = rest.pending
        if rest.validating:
            await result
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

    def fail(self, conn: Connection, message: Message, exc: Exception) -> None:
        """The one answer of a request that failed: its own error, an ``on_error`` mapping,
        or ``handler_error`` with a ref to the one log line naming the plugin."""
        if isinstance(exc, BackchannelError):
            conn.send_error(message.id, exc, message)
            return
        cause = exc.cause if isinstance(exc, HookFailed) else exc
        mapped = self.gateway.first("on_error", message=message, connection=conn, error=cause)
        if isinstance(exc, HookFailed):
            self.gateway.count(exc)
        if mapped is not None:
            conn.send_error(message.id, mapped, message)
            return
        ref = os.urandom(4).hex()
        where = f"ref={ref} conn={conn.id} session={conn.session.id} msg={message.id}"
        extra = {"connection_id": conn.id, "message_id": message.id, "ref": ref}
        if isinstance(exc, HookFailed):
            what = f"plugin {exc.plugin!r} failed in {exc.hook}"
            log.error(
                "%s %s type=%s: %s",
                what,
                where,
                message.type,
                exc.why,
                exc_info=cause if exc.raised else None,
                extra={**extra, "plugin": exc.plugin, "hook": exc.hook},
            )
        else:
            what = "handler failed"
            log.error("%s %s type=%s", what, where, message.type, exc_info=exc, extra=extra)
        conn.send_error(
            message.id,
            BackchannelError(
                ErrorCode.HANDLER_ERROR, f"{what}; see server log", extra={"ref": ref}
            ),
            message,
        )
