"""The ASGI adapter under uvicorn, and inside FastAPI (issue 6 item 4; DESIGN §7).

The protocol suite (``test_protocol.py``) and the key session tests
(``test_sessions.py``) run again here, unchanged, with their ``serving`` swapped for
:func:`uvicorn_serving`: same protocol, same guarantees, same assertions. The
tests below them cover what is the adapter's own: handshake refusals, limits,
lifespan, mounting in FastAPI and the example app. uvicorn runs on asyncio only,
so every test here does too.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
import test_protocol
import test_sessions
import uvicorn
from fastapi import FastAPI
from test_sessions import no_error_records, start, wait_until

from backchannel import App, Message, hookimpl
from backchannel.asgi import asgi_app
from backchannel.http import HttpRequest, HttpResponse
from backchannel.testing import raw_connect
from conftest import ROOT, make_app, ws_connect

pytestmark = pytest.mark.anyio

__all__ = ["no_error_records"]  # a fixture: imported so that it applies here too


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn is asyncio-only


class Server(uvicorn.Server):
    """uvicorn without its signal handlers (the test runner owns those)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    @property
    def port(self) -> int:
        return int(self.servers[0].sockets[0].getsockname()[1])


@asynccontextmanager
async def uvicorn_server(application: Any, **options: Any) -> AsyncIterator[Server]:
    """Run ``application`` on uvicorn on a free port of 127.0.0.1 until the block ends."""
    options.setdefault("lifespan", "on")
    config = uvicorn.Config(
        application,
        host="127.0.0.1",
        port=0,
        log_config=None,  # leave logging to pytest: uvicorn's errors reach caplog
        log_level="warning",
        **options,
    )
    server = Server(config)

    async def serve() -> None:
        try:
            await server.serve()
        except SystemExit as exc:  # a failed start-up; never let it reach the event loop
            raise RuntimeError(f"uvicorn exited with {exc.code}") from None

    task = asyncio.get_running_loop().create_task(serve())
    try:
        with anyio.fail_after(10):
            while not server.started:
                if task.done():
                    task.result()  # re-raise why it did not start
                    raise RuntimeError("uvicorn exited")
                await asyncio.sleep(0.005)
        yield server
    finally:
        server.should_exit = True
        with anyio.fail_after(15):
            await task


@asynccontextmanager
async def uvicorn_serving(app: App) -> AsyncIterator[App]:
    """``conftest.serving``, on uvicorn + ASGI: ``app.port`` is uvicorn's port."""
    async with uvicorn_server(asgi_app(app)) as server:
        app.port = server.port
        yield app


@pytest.fixture(autouse=True)
def _served_by_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(test_protocol, "serving", uvicorn_serving)
    monkeypatch.setattr(test_sessions, "serving", uvicorn_serving)


# --------------------------------------------- the protocol suite, against uvicorn + ASGI

globals().update({k: v for k, v in vars(test_protocol).items() if k.startswith("test_")})

for _name in (
    "test_resume_replays_every_missed_frame_unchanged_and_in_order_before_init_answer",
    "test_resume_of_unknown_session_says_so_and_continues_in_a_new_session",
    "test_reply_to_a_request_cut_off_by_a_disconnect_is_delivered_after_resume",
    "test_retry_of_an_answered_request_gets_the_original_answer_and_runs_nothing",
    "test_stream_interrupted_by_disconnect_resumes_where_it_stopped",
    "test_slow_consumer_closed_1013_resumes_with_nothing_lost",
    "test_resuming_a_session_attached_elsewhere_takes_it_over_closing_the_other_4009",
):
    globals()[_name] = getattr(test_sessions, _name)


# ----------------------------------------------------------------------- handshakes


async def http_get(port: int, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        return await client.get(path, **kwargs)


async def test_origin_allow_list_refuses_with_403_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A disallowed Origin gets HTTP 403 at the handshake; a listed one, and a missing one when
    "null" is listed, connect with subprotocol backchannel.v1."""
    app = make_app({"server": {"origins": ["https://chat.example", "null"]}})
    async with uvicorn_serving(app):
        async with raw_connect(app.port) as raw:
            assert await raw.handshake(origin="https://evil.example") == 403
        async with raw_connect(app.port) as raw:
            assert await raw.handshake(origin=None) == 101
        async with ws_connect(app.port, origin="https://chat.example") as c:
            assert c.ws.subprotocol == "backchannel.v1"
            assert (await c.request("ping"))["type"] == "pong"
    assert app.metrics()["handshakes"]["rejected"] == {"403": 1}
    assert any("handshake rejected 403" in r.getMessage() for r in caplog.records)
    strict = make_app({"server": {"origins": ["https://chat.example"]}})
    async with uvicorn_serving(strict), raw_connect(strict.port) as raw:
        assert await raw.handshake(origin=None) == 403


async def test_websocket_on_another_path_is_refused_and_non_get_is_405() -> None:
    """Only server.path upgrades (ASGI servers refuse with 403); methods other than GET: 405."""
    app = make_app()
    async with uvicorn_serving(app):
        async with raw_connect(app.port) as raw:
            assert await raw.handshake(path="/elsewhere") == 403
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.port}") as client:
            response = await client.post("/healthz")
        assert response.status_code == 405 and response.headers["allow"] == "GET"
    assert app.counters.rejected == {"403": 1}


async def test_max_connections_closes_the_next_one_1013_through_the_kernel() -> None:
    app = make_app({"server": {"max_connections": 1}})
    async with uvicorn_serving(app), ws_connect(app.port) as first:
        assert (await first.request("ping"))["type"] == "pong"
        async with ws_connect(app.port) as second:
            assert await second.closed() == 1013
        assert (await first.request("ping"))["type"] == "pong"
        await wait_until(lambda: app.counters.closes.get(1013) == 1)


async def test_answers_made_outside_the_reading_task_arrive_in_order() -> None:
    """Frames written by other tasks (an async handler, a broadcast) go through the writer
    task, behind the ones written while a message was delivered, never reordered."""
    app = make_app()

    @app.handler("count")
    async def count(message: Message) -> Any:
        for i in range(50):
            yield {"i": i}
            if i % 10 == 0:
                app.broadcast("system", {"event": "notice", "message": f"at {i}"})

    async with uvicorn_serving(app), ws_connect(app.port) as c:
        answer = await c.request("count")
        assert answer["type"] == "ack"
        assert [f["seq"] for f in c.frames] == list(range(1, 57))
        chunks = [f["content"]["i"] for f in c.frames if f["type"] == "chunk"]
        assert chunks == list(range(50))


# ---------------------------------------------------------------- HTTP and lifespan


class Hello:
    """A plugin with an HTTP route, and a shutdown hook that records it ran."""

    def __init__(self) -> None:
        self.shutdowns = 0

    @hookimpl
    def http_routes(self, register: Callable[..., None]) -> None:
        register("GET", "/hello", self.hello)

    async def hello(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, f"hello {request.query['who']}".encode(), headers={"X-Hi": "1"})

    @hookimpl
    def shutdown(self, app: App) -> None:
        self.shutdowns += 1


async def test_plugin_routes_static_client_and_demo_page_are_served_over_asgi() -> None:
    hello = Hello()
    app = make_app({"server": {"demo": True}}, plugins=["init", "text", hello])
    async with uvicorn_serving(app):
        response = await http_get(app.port, "/hello", params={"who": "asgi"})
        assert (response.status_code, response.text) == (200, "hello asgi")
        assert response.headers["x-hi"] == "1"
        script = await http_get(app.port, "/static/backchannel.js")
        assert script.status_code == 200
        assert script.headers["content-type"] == "application/javascript"
        assert script.content == (ROOT / "core/backchannel/static/backchannel.js").read_bytes()
        page = await http_get(app.port, "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        ready = await http_get(app.port, "/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert (await http_get(app.port, "/nope")).status_code == 404
    assert hello.shutdowns == 1  # the lifespan's shutdown ran the App's shutdown hooks
    assert app.health()["ready"] is False


async def test_without_its_lifespan_it_answers_503_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Mounted where nobody runs its lifespan, it refuses clearly instead of half-working."""
    app = make_app()
    async with uvicorn_server(asgi_app(app), lifespan="off") as server:
        port = server.port
        response = await http_get(port, "/readyz")
        assert response.status_code == 503 and b"lifespan" in response.content
        async with raw_connect(port) as raw:
            assert await raw.handshake() == 403
    assert app.counters.rejected == {"403": 1}
    assert any("not started" in r.getMessage() for r in caplog.records)


@pytest.mark.server_fault
async def test_a_failing_start_up_fails_the_lifespan_and_uvicorn_does_not_serve(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken:
        @hookimpl
        def startup(self, app: App) -> None:
            raise RuntimeError("no database")

    app = make_app(plugins=["init", Broken()])
    with pytest.raises(RuntimeError, match="uvicorn exited"):
        async with uvicorn_server(asgi_app(app)):
            pass
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "ASGI lifespan startup failed" in failures
    assert any("no database" in line for line in failures)  # uvicorn's log says why
    assert app.health()["ready"] is False
    caplog.clear()  # those errors were the point (no_error_records checks the rest)


async def test_uvicorn_shutdown_closes_1012_then_the_lifespan_drains_running_handlers() -> None:
    """On shutdown uvicorn closes WebSockets (1012) before the lifespan ends; a handler still
    running then gets ``shutdown.grace``, and its answer waits in the session's outbox."""
    app = make_app({"shutdown": {"grace": 10}})
    started, go = anyio.Event(), anyio.Event()

    @app.handler("slow")
    async def slow(message: Message) -> dict[str, Any]:
        started.set()
        await go.wait()
        return {"done": True}

    async with uvicorn_server(asgi_app(app)) as server, ws_connect(server.port) as c:
        sid, _, _ = await start(c)
        await c.send("slow", {}, id="s1")
        with anyio.fail_after(5):
            await started.wait()
        server.should_exit = True  # what SIGTERM does
        assert await c.closed() == 1012
        session = app.session(sid)
        await wait_until(lambda: app._hub.shutting_down)  # the lifespan's drain: it waits
        go.set()
        await wait_until(lambda: session.seq == 2)
        (answer,) = await session.log.since(1) or []
        assert json.loads(answer)["replyTo"] == "s1"
    assert app.counters.closes == {1012: 1} and not app._hub.running


# ---------------------------------------------------------------------------- FastAPI


async def test_fastapi_app_mounts_it_at_ws_beside_its_own_routes() -> None:
    app = make_app()
    chat = asgi_app(app)
    api = FastAPI(lifespan=chat.lifespan)

    @api.get("/api/items/{item}")
    def item(item: int) -> dict[str, int]:
        return {"item": item, "connections": len(app.connections())}

    api.router.add_websocket_route("/ws", chat)
    api.mount("/ws", chat)
    async with uvicorn_server(api) as server:
        port = server.port
        async with ws_connect(port) as c:
            assert c.ws.subprotocol == "backchannel.v1"
            assert (await c.request("text", {"text": "hi"}))["content"]["text"] == "hi"
            assert (await http_get(port, "/api/items/7")).json() == {"item": 7, "connections": 1}
        async with ws_connect(port, path="/ws/") as c:  # the mount point itself
            assert (await c.request("ping"))["type"] == "pong"
        health = await http_get(port, "/ws/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert (await http_get(port, "/ws/ws")).status_code == 426
        async with raw_connect(port) as raw:
            assert await raw.handshake(path="/ws/nope") == 403
    assert app.metrics()["connections"]["total"] == 2


def load_example() -> Any:
    """Import ``examples/fastapi_app.py`` afresh (its App is module state)."""
    spec = importlib.util.spec_from_file_location("fastapi_app", ROOT / "examples/fastapi_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_example_fastapi_app_serves_chat_health_metrics_and_notices() -> None:
    example = load_example()
    async with uvicorn_server(example.api) as server:
        port = server.port
        health = (await http_get(port, "/api/websocket/health")).json()
        assert health["status"] == "ok" and health["ready"] is True
        assert health["plugins"] == ["init", "text", "ping", "system", "validation", "rooms"]
        async with ws_connect(port) as c:
            await c.request("init", {})
            assert (await c.request("text", {"text": "hello"}))["content"]["text"] == "hello"
            bad = await c.request("no.such.type")
            assert bad["content"]["code"] == "unknown_type"
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                pushed = await client.post("/api/websocket/notice", json={"message": "hi all"})
            assert pushed.json() == {"reached": 1}
            notice = await c.recv()
            assert notice["type"] == "system" and notice["content"]["message"] == "hi all"
            metrics = (await http_get(port, "/api/websocket/metrics")).json()
        assert metrics["connections"]["active"] == 1 and metrics["connections"]["total"] == 1
        assert metrics["messages"]["received"] == 3
        assert metrics["errors"]["byCode"] == {"unknown_type": 1}
        assert (await http_get(port, "/ws/readyz")).status_code == 200
    assert example.chat.health()["ready"] is False


# ------------------------------------------------------------ without a server, on Trio too


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_asgi_events_in_process_on_asyncio_and_trio(anyio_backend: str) -> None:
    """The adapter itself speaks plain ASGI events and runs on Trio (e.g. under hypercorn):
    accept with the subprotocol, answers as ``websocket.send`` text, disconnect counted."""
    app = make_app()
    chat = asgi_app(app)
    to_app, app_receives = anyio.create_memory_object_stream[dict[str, Any]](10)
    app_sends, from_app = anyio.create_memory_object_stream[dict[str, Any]](10)
    scope = {
        "type": "websocket",
        "path": "/ws",
        "headers": [(b"origin", b"https://chat.example")],
        "subprotocols": ["backchannel.v1"],
        "client": ("127.0.0.1", 5000),
    }
    async with chat.lifespan(), anyio.create_task_group() as tg:
        tg.start_soon(chat, scope, app_receives.receive, app_sends.send)
        with anyio.fail_after(5):
            await to_app.send({"type": "websocket.connect"})
            assert await from_app.receive() == {
                "type": "websocket.accept",
                "subprotocol": "backchannel.v1",
            }
            for ident, kind in (("1", "init"), ("2", "ping")):
                request = {"id": ident, "type": kind, "content": {}}
                await to_app.send({"type": "websocket.receive", "text": json.dumps(request)})
                event = await from_app.receive()
                assert event["type"] == "websocket.send"
                frame = json.loads(event["text"])
                assert (frame["replyTo"], frame["seq"]) == (ident, int(ident))
            await to_app.send({"type": "websocket.receive", "bytes": b"\x00"})
            event = await from_app.receive()
            assert json.loads(event["text"])["content"]["code"] == "bad_json"
            await to_app.send({"type": "websocket.disconnect", "code": 1000})
            await wait_until(lambda: app.counters.closes == {1000: 1})
        assert app.connections() == []
    assert app.health()["ready"] is False
