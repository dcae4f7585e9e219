"""The tracing plugin: one span per handled request, ended at the terminal answer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from backchannel import App, BackchannelError, Message
from backchannel.errors import StartupError
from backchannel.testing import connect, serve_in_memory

pytestmark = pytest.mark.anyio

_EXPORTER = InMemorySpanExporter()


def _install() -> None:
    """Export the process's spans to ``_EXPORTER`` (the global provider is set only once)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))


_install()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def new_app(tracing: dict[str, Any] | None = None) -> App:
    cfg: dict[str, Any] = {"log": {"level": "DEBUG"}, "plugins": {"tracing": tracing or {}}}
    return App(cfg, plugins=["init", "text", "tracing"])


def one(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = [s for s in exporter.get_finished_spans() if s.name == name]
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return found[0]


async def test_sync_request_gets_a_span_with_ids_and_ok(spans: InMemorySpanExporter) -> None:
    app = new_app()
    async with serve_in_memory(app), connect(app) as client:
        await client.request("init", {"client": {"name": "t", "version": "1"}})
        reply = await client.request("text", {"text": "hi"}, id="m-1")
        conn_id, session_id = client.connection.id, client.connection.session.id
    assert reply["type"] == "text"
    span = one(spans, "backchannel.handle text")
    attrs = dict(span.attributes or {})
    assert attrs["backchannel.message.type"] == "text"
    assert attrs["backchannel.message.id"] == "m-1"
    assert attrs["backchannel.connection.id"] == conn_id
    assert attrs["backchannel.session.id"] == session_id
    assert attrs["backchannel.outcome"] == "ok"
    assert span.status.status_code is StatusCode.OK
    assert span.kind is trace.SpanKind.SERVER
    assert len(spans.get_finished_spans()) == 2  # init and text, nothing else


@pytest.mark.server_fault
async def test_handler_errors_set_error_status_and_code(spans: InMemorySpanExporter) -> None:
    app = new_app()

    @app.handler("deny")
    async def deny(message: Message) -> dict[str, Any]:
        await anyio.sleep(0)
        raise BackchannelError("forbidden", "no")

    @app.handler("boom")
    def boom(message: Message) -> dict[str, Any]:
        raise RuntimeError("secret")

    async with serve_in_memory(app), connect(app) as client:
        denied = await client.request("deny", id="d")
        broken = await client.request("boom", id="b")
    assert denied["content"]["code"] == "forbidden"
    assert broken["content"]["code"] == "handler_error"
    for name, code in (("deny", "forbidden"), ("boom", "handler_error")):
        span = one(spans, f"backchannel.handle {name}")
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes is not None
        assert span.attributes["backchannel.outcome"] == code
        assert span.attributes["backchannel.error.code"] == code
    boom_span = one(spans, "backchannel.handle boom")
    assert [e.name for e in boom_span.events] == ["exception"]


async def test_async_handler_span_covers_the_await(spans: InMemorySpanExporter) -> None:
    """The span is open (and current) while the awaitable runs; it ends when it completes."""
    app = new_app()
    seen: list[bool] = []

    @app.handler("slow")
    async def slow(message: Message) -> dict[str, Any]:
        await anyio.sleep(0)
        current = trace.get_current_span()
        seen.append(current.is_recording())
        assert spans.get_finished_spans() == ()  # not ended yet
        return {"done": True}

    async with serve_in_memory(app), connect(app) as client:
        reply = await client.request("slow", id="s")
    assert reply["content"] == {"done": True}
    assert seen == [True]
    span = one(spans, "backchannel.handle slow")
    assert span.attributes is not None and span.attributes["backchannel.outcome"] == "ok"


async def test_streaming_span_ends_after_the_last_chunk(spans: InMemorySpanExporter) -> None:
    app = new_app()
    open_at: list[int] = []

    @app.handler("stream")
    async def stream(message: Message) -> AsyncIterator[dict[str, int]]:
        for n in range(3):
            open_at.append(len(spans.get_finished_spans()))
            yield {"n": n}
        open_at.append(len(spans.get_finished_spans()))

    async with serve_in_memory(app), connect(app) as client:
        answer = await client.request("stream", id="st")
    assert answer["type"] == "ack"
    assert open_at == [0, 0, 0, 0]  # still open after every chunk, the last one included
    span = one(spans, "backchannel.handle stream")
    assert span.attributes is not None
    assert span.attributes["backchannel.chunks"] == 3
    assert span.attributes["backchannel.outcome"] == "ok"


@pytest.mark.server_fault
async def test_streaming_failure_marks_the_span(spans: InMemorySpanExporter) -> None:
    app = new_app()

    @app.handler("stream")
    async def stream(message: Message) -> AsyncIterator[dict[str, int]]:
        yield {"n": 1}
        raise RuntimeError("mid-stream")

    async with serve_in_memory(app), connect(app) as client:
        answer = await client.request("stream", id="st")
    assert answer["content"]["code"] == "handler_error"
    span = one(spans, "backchannel.handle stream")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["backchannel.chunks"] == 1


async def test_config_names_types_and_attributes(spans: InMemorySpanExporter) -> None:
    app = new_app({"types": ["text"], "span_prefix": "chat", "message_type_attribute": False})
    async with serve_in_memory(app), connect(app) as client:
        await client.request("init", {"client": {"name": "t", "version": "1"}})
        await client.request("text", {"text": "hi"})
    [span] = spans.get_finished_spans()
    assert span.name == "chat text"
    assert span.attributes is not None and "backchannel.message.type" not in span.attributes
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "backchannel"


async def test_not_enabled_means_no_spans(spans: InMemorySpanExporter) -> None:
    app = App({"log": {"level": "DEBUG"}}, plugins=["text"])
    async with serve_in_memory(app), connect(app) as client:
        await client.request("text", {"text": "hi"})
        status = app.health()
    assert spans.get_finished_spans() == ()
    assert "tracing" not in status["plugins"]


def test_bad_settings_fail_start_up() -> None:
    with pytest.raises(StartupError, match=r"plugins\.tracing\.tracer: unknown key"):
        new_app({"tracer": "x"})
    with pytest.raises(StartupError, match=r"plugins\.tracing\.tracer_name"):
        new_app({"tracer_name": ""})
