"""The tracing plugin: one OpenTelemetry span per handled request.

``wrap_handler`` (outermost but for monitoring) opens a span named
``<span_prefix> <type>`` when the handler is called and ends it at the terminal
answer: at once for a sync handler, when the awaitable completes, or after the last
chunk of a streaming handler. The span is current while the handler's sync part runs
and while its awaitable is driven, so spans the handler starts are its children.

Spans go to the process's tracer provider (``opentelemetry-sdk`` plus an exporter);
with none installed, the API's no-op tracer makes this nearly free. When the plugin
is not enabled, the kernel never imports it: nothing runs at all.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from backchannel import App, BackchannelError, Reply, hookimpl
from backchannel.contracts import load_schema

__all__ = ["Plugin", "traced"]

_PKG = "backchannel_tracing"
_isawaitable = inspect.isawaitable
_isasyncgen = inspect.isasyncgen
Handler = Callable[..., Any]


def _valid(result: Any) -> bool:
    """Whether the kernel turns ``result`` into a reply or an ack (else ``handler_error``)."""
    return (
        result is None
        or result.__class__ is dict
        or (isinstance(result, Reply) and result.content.__class__ is dict)
    )


def _end(span: Span, result: Any = None, error: BaseException | None = None) -> None:
    """Record the outcome (``ok`` or an error code) and end ``span``."""
    if error is None and _valid(result):
        span.set_attribute("backchannel.outcome", "ok")
        span.set_status(Status(StatusCode.OK))
    else:
        if isinstance(error, BackchannelError):
            code = str(error.code)
        elif error is not None and not isinstance(error, Exception):
            code = "cancelled"  # task cancellation (trio/asyncio) or exit
        else:
            code = "handler_error"
        span.set_attribute("backchannel.outcome", code)
        span.set_attribute("backchannel.error.code", code)
        if error is not None and isinstance(error, Exception):
            span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, code))
    span.end()


class _Traced:
    """An awaitable handler result whose span ends when it completes.

    Not a coroutine wrapper (same reason as monitoring's ``_Timed``): if the kernel
    drops it unstarted, ``__del__`` closes the inner coroutine and ends the span.
    """

    __slots__ = ("_inner", "_span", "_started")

    def __init__(self, inner: Any, span: Span) -> None:
        self._inner = inner
        self._span = span
        self._started = False

    def __await__(self) -> Generator[Any, None, Any]:
        self._started = True
        token = otel_context.attach(trace.set_span_in_context(self._span))
        try:
            result = yield from self._inner.__await__()
        except BaseException as exc:
            _end(self._span, error=exc)
            raise
        finally:
            otel_context.detach(token)
        _end(self._span, result)
        return result

    def __del__(self) -> None:
        if not self._started:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
            _end(self._span, error=BaseException("not started"))


async def _traced_stream(agen: Any, span: Span) -> AsyncGenerator[Any, None]:
    """A streaming handler whose span ends after its last chunk."""
    error: BaseException | None = None
    chunks = 0
    try:
        async for item in agen:
            chunks += 1
            yield item
    except BaseException as exc:
        error = exc
        raise
    finally:
        span.set_attribute("backchannel.chunks", chunks)
        _end(span, error=error)
        await agen.aclose()


def traced(tracer: Tracer, name: str, handler: Handler, *, type_attribute: bool = True) -> Handler:
    """``handler`` in a span from its call to its terminal answer."""
    span_name = name
    start_span = tracer.start_span
    use_span = trace.use_span

    def wrapper(message: Any, connection: Any) -> Any:
        attributes: dict[str, Any] = {
            "backchannel.message.id": message.id,
            "backchannel.connection.id": connection.id,
        }
        if type_attribute:
            attributes["backchannel.message.type"] = message.type
        session = connection.session
        if session is not None:
            attributes["backchannel.session.id"] = session.id
        span = start_span(span_name, kind=trace.SpanKind.SERVER, attributes=attributes)
        try:
            with use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                result = handler(message, connection)
        except BaseException as exc:
            _end(span, error=exc)
            raise
        if result is None or result.__class__ is dict:  # the common sync answer
            _end(span, result)
            return result
        if _isawaitable(result):
            return _Traced(result, span)
        if _isasyncgen(result):
            return _traced_stream(result, span)
        _end(span, result)
        return result

    return wrapper


class Plugin:
    """Wraps each traced type's handler in a span (see the module docstring)."""

    def __init__(self) -> None:
        self.tracer: Tracer | None = None
        self.cfg: dict[str, Any] = {}

    @hookimpl
    def config_schema(self) -> dict[str, Any]:
        return load_schema(_PKG, "tracing.config.schema.json")

    @hookimpl
    def startup(self, app: App) -> None:
        self.cfg = app.plugin_config("tracing")
        # the global provider, looked up on each span (a proxy until one is installed)
        self.tracer = trace.get_tracer(self.cfg["tracer_name"])

    @hookimpl(tryfirst=True)  # outermost-but-monitoring: other middleware runs in the span
    def wrap_handler(self, type: str, handler: Handler) -> Handler | None:
        types = self.cfg.get("types")
        if self.tracer is None or (types is not None and type not in types):
            return None
        return traced(
            self.tracer,
            f"{self.cfg['span_prefix']} {type}".strip(),
            handler,
            type_attribute=self.cfg["message_type_attribute"],
        )
