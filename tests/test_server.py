"""The standalone server's limits and lifecycle over real sockets (DESIGN §6).

Each limit yields its documented close code or HTTP status, a log line and a
counter, and the server keeps serving everybody else. Some tests use
:class:`backchannel.testing.RawClient`, a hand-rolled WebSocket client on a bare TCP
stream that does only what it is told.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from backchannel import App, hookimpl
from backchannel.testing import RawClient, raw_connect
from conftest import STANDARD, make_app, serving, ws_connect

pytestmark = pytest.mark.anyio

# --------------------------------------------------------------------------- helpers


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (bounded) until ``condition()`` holds; fails the test after ``timeout``."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)


async def assert_serves(app: App, **connect: Any) -> None:
    """A fresh client still gets an answer."""
    async with ws_connect(_port(app), **connect) as c:
        assert (await c.request("ping", {}))["type"] == "pong"


def _port(app: App) -> int:
    assert app.port is not None
    return app.port


def logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


@pytest.fixture(autouse=True)
def no_error_records(caplog: pytest.LogCaptureFixture) -> Any:
    """Fail any test during which something logged at ERROR (e.g. 'Task exception was never
    retrieved', 'Fatal error: protocol.data_received() call failed')."""
    caplog.set_level(logging.DEBUG, logger="backchannel")
    yield
    gc.collect()  # asyncio reports unretrieved task exceptions when tasks are collected
    errors = [
        r
        for phase in ("setup", "call")
        for r in caplog.get_records(phase)  # type: ignore[arg-type]
        if r.levelno >= logging.ERROR
    ]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


# ------------------------------------------------------------------------- limits


async def test_connection_past_max_connections_is_closed_1013(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The 3rd of max 2 connections gets 1013; the first two keep working; a freed slot is
    reused."""
    app = make_app({"server": {"max_connections": 2}})
    async with serving(app), ws_connect(_port(app)) as a:
        async with ws_connect(_port(app)) as b:
            await a.request("ping", {})
            await b.request("ping", {})
            async with ws_connect(_port(app)) as c:
                assert await c.closed() == 1013
            assert app.counters.closes.get(1013) == 1
            assert app.metrics()["closes"]["1013"] == 1
            assert logged(caplog, "max_connections")
            assert (await a.request("ping", {}))["type"] == "pong"
            assert (await b.request("ping", {}))["type"] == "pong"
        await wait_until(lambda: len(app.connections()) == 1)
        await assert_serves(app)
        assert app.counters.closes.get(1013) == 1


class SlowAuth:
    """An ``authenticate`` hook that awaits (like a JWKS lookup) and claims nobody."""

    @hookimpl
    async def authenticate(self, connection: Any) -> None:
        await anyio.sleep(0.05)


async def test_simultaneous_handshakes_cannot_exceed_max_connections() -> None:
    """Ten clients connecting at once against max 2, while authentication awaits: exactly two
    are admitted."""
    app = make_app({"server": {"max_connections": 2}}, plugins=[*STANDARD, SlowAuth()])
    codes: list[int | None] = []
    async with serving(app), AsyncExitStack() as stack:
        clients = []
        for _ in range(10):
            clients.append(await stack.enter_async_context(ws_connect(_port(app))))
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:

                async def probe(client: Any) -> None:
                    try:
                        await client.request("ping", {}, timeout=5)
                        codes.append(None)
                    except Exception:
                        codes.append(client.ws.protocol.close_rcvd.code)

                for client in clients:
                    tg.start_soon(probe, client)
        assert codes.count(None) == 2 and codes.count(1013) == 8, codes
        assert len(app.connections()) == 2 and app.counters.closes.get(1013) == 8


async def test_origin_allow_list_rejects_with_403_at_handshake(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A disallowed or missing Origin gets HTTP 403; listed ones (and "null" = none) connect."""
    app = make_app({"server": {"origins": ["https://chat.example", "null"]}})
    async with serving(app):
        async with raw_connect(_port(app)) as raw:
            assert await raw.handshake(origin="https://evil.example") == 403
        async with raw_connect(_port(app)) as raw:
            assert await raw.handshake(origin=None) == 101
        await assert_serves(app, origin="https://chat.example")
        assert logged(caplog, "403")
        assert app.metrics()["handshakes"]["rejected"].get("403") == 1
    strict = make_app({"server": {"origins": ["https://chat.example"]}})
    async with serving(strict):
        async with raw_connect(_port(strict)) as raw:
            assert await raw.handshake(origin=None) == 403
        await assert_serves(strict, origin="https://chat.example")


async def test_client_that_never_pongs_is_closed_1011_after_heartbeat_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A silent client is pinged, then closed with 1011; a ponging client stays connected."""
    app = make_app({"heartbeat": {"interval": 0.2, "timeout": 0.3}})
    async with serving(app), ws_connect(_port(app)) as good:
        async with raw_connect(_port(app)) as raw:
            assert await raw.handshake() == 101
            with anyio.fail_after(5):
                assert await raw.close_code() == 1011
            assert raw.pings >= 1
        await wait_until(lambda: app.counters.closes.get(1011) == 1)
        assert logged(caplog, "heartbeat timeout")
        # the websockets client answered every ping: still here after several timeouts
        assert len(app.connections()) == 1
        assert (await good.request("ping", {}))["type"] == "pong"


async def test_client_that_stops_reading_is_closed_1013_as_slow_consumer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that never reads while frames pile up is closed with 1013 after
    ``slow_consumer_timeout``; another client is served throughout."""
    app = make_app(
        {
            "connection": {"slow_consumer_timeout": 0.3},
            "heartbeat": {"interval": 30, "timeout": 2},
        }
    )
    blob = "x" * 32768

    @app.handler("flood")
    def flood(message: Any, connection: Any) -> None:
        for _ in range(400):  # ~13 MB: far more than the socket buffers hold
            connection.send("text", {"text": blob})

    async with serving(app), ws_connect(_port(app)) as other:
        async with raw_connect(_port(app)) as raw:
            assert await raw.handshake() == 101
            await raw.send("flood")
            # the other client is served while the slow one is stuck
            assert (await other.request("ping", {}))["type"] == "pong"
            await wait_until(lambda: app.counters.errors.get("slow_consumer") == 1)
            assert len(app.connections()) == 2  # not closed yet: nothing was read
            # reading again now, the client finds the close frame behind the backlog
            with anyio.fail_after(5):
                assert await raw.close_code() == 1013
        await wait_until(lambda: app.counters.closes.get(1013) == 1)
        assert logged(caplog, "slow consumer: not reading")
        assert len(app.connections()) == 1
        assert (await other.request("ping", {}))["type"] == "pong"


async def flood_a_client_that_does_not_read(app: App, blob: str, most: int) -> int:
    """A handler sends ``blob`` frames (at most ``most``) to a raw client that never reads,
    until the server closes it; asserts the close (1013, counted ``slow_consumer``) and that
    another client is still served. How many frames were sent."""
    sent = 0

    @app.handler("flood")
    async def flood(message: Any, connection: Any) -> None:
        nonlocal sent
        while connection.close_code is None and sent < most:
            connection.send("text", {"text": blob})
            sent += 1
            await anyio.sleep(0)  # let the driver write, as a streaming handler would

    async with serving(app), ws_connect(_port(app)) as other:
        async with raw_connect(_port(app)) as raw:
            assert await raw.handshake() == 101
            await raw.send("flood")
            await wait_until(lambda: app.counters.errors.get("slow_consumer") == 1)
            with anyio.fail_after(5):
                assert await raw.close_code() == 1013
        assert (await other.request("ping", {}))["type"] == "pong"
    return sent


async def test_send_queue_past_send_queue_size_closes_1013_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The send queue is bounded: frames piling up past ``send_queue_size`` for a client that
    does not read close it with 1013 without waiting for ``slow_consumer_timeout``."""
    app = make_app(
        {
            "connection": {"slow_consumer_timeout": 60, "send_queue_size": 50},
            "heartbeat": {"interval": 60, "timeout": 2},
        }
    )
    sent = await flood_a_client_that_does_not_read(app, "x" * 32768, 5000)
    assert sent < 5000  # stopped long before the end: the queue did not grow unbounded
    await wait_until(lambda: app.counters.closes.get(1013) == 1)
    assert logged(caplog, "slow consumer: send queue full")


async def test_send_queue_past_send_queue_bytes_closes_1013_at_once() -> None:
    """The send queue is bounded in bytes too: a few big frames for a client that does not
    read close it with 1013 long before ``send_queue_size`` frames are waiting."""
    app = make_app(
        {
            "connection": {"slow_consumer_timeout": 60, "send_queue_bytes": 256 * 1024},
            "heartbeat": {"interval": 60, "timeout": 2},
        }
    )
    sent = await flood_a_client_that_does_not_read(app, "x" * 60_000, 1000)
    assert sent < 100  # far below send_queue_size (1,024 frames): the bytes decided


async def test_client_that_keeps_reading_is_never_a_slow_consumer() -> None:
    """However much a reading client receives (a long stream of chunks), the queue bound and
    the timeout leave it alone."""
    app = make_app({"connection": {"slow_consumer_timeout": 0.2, "send_queue_size": 50}})

    @app.handler("stream")
    async def stream(message: Any) -> AsyncIterator[dict[str, Any]]:
        for i in range(3000):
            yield {"i": i, "pad": "x" * 1000}
            await anyio.sleep(0)  # a token stream awaits its source between chunks

    async with serving(app), ws_connect(_port(app)) as c:
        ident = await c.send("stream", {})
        with anyio.fail_after(20):
            chunks = 0
            while (frame := await c.recv())["type"] == "chunk":
                chunks += 1
        assert chunks == 3000 and frame["type"] == "ack" and frame["replyTo"] == ident
        assert "slow_consumer" not in app.counters.errors


async def test_handshake_timeout_disconnects_silent_and_dribbling_clients(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A TCP client that sends nothing, or dribbles a request byte by byte, is dropped after
    ``handshake_timeout``."""
    app = make_app({"server": {"handshake_timeout": 0.3}})
    async with serving(app):
        async with raw_connect(_port(app)) as silent:
            with anyio.fail_after(3):
                assert await silent.eof()
        async with raw_connect(_port(app)) as dribbler:
            with anyio.fail_after(3):
                async with anyio.create_task_group() as tg:

                    async def dribble() -> None:
                        with suppress(anyio.BrokenResourceError, OSError):  # dropped: fine
                            for byte in b"GET /ws HTTP/1.1\r\nHost: x\r\n" + b"X: y" * 1000:
                                await dribbler.stream.send(bytes([byte]))
                                await anyio.sleep(0.02)

                    tg.start_soon(dribble)
                    assert await dribbler.eof()
                    tg.cancel_scope.cancel()
        assert logged(caplog, "handshake timeout")
        assert app.metrics()["handshakes"]["rejected"].get("timeout") == 2
        await assert_serves(app)


async def test_a_megabyte_of_headers_is_rejected_without_harm() -> None:
    """1 MB of request headers (past websockets' line and count limits) ends that connection
    only."""
    app = make_app()
    async with serving(app), ws_connect(_port(app)) as other:
        for header in (b"X-Big: " + b"a" * (1 << 20) + b"\r\n", b"X-Many: a\r\n" * 100_000):
            async with raw_connect(_port(app)) as raw:
                request = b"GET /ws HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n"
                with anyio.fail_after(5):
                    async with anyio.create_task_group() as tg:

                        async def send(raw: RawClient = raw, request: bytes = request) -> None:
                            # the server may stop listening before we are done: fine
                            with suppress(anyio.BrokenResourceError, OSError):
                                await raw.stream.send(request)

                        tg.start_soon(send)
                        assert await raw.eof()
        assert (await other.request("ping", {}))["type"] == "pong"
        await assert_serves(app)


# ---------------------------------------------------------------------- lifecycle


async def test_leaving_run_sends_going_away_then_closes_1001() -> None:
    """Leaving ``app.run()`` warns every client with a ``system`` going-away frame, then 1001."""
    app = make_app()
    leave = anyio.Event()

    async def run_until_left() -> None:
        async with serving(app):
            await leave.wait()

    async with anyio.create_task_group() as tg, AsyncExitStack() as clients:
        tg.start_soon(run_until_left)
        await wait_until(lambda: app.health()["ready"])
        conns = [await clients.enter_async_context(ws_connect(_port(app))) for _ in range(3)]
        for c in conns:
            await c.request("ping", {})
        leave.set()
        for c in conns:
            notice = await c.recv()
            assert notice["type"] == "system" and notice["content"]["event"] == "going_away"
            assert await c.closed() == 1001
    assert app.counters.closes.get(1001) == 3
    assert not app.connections()


@asynccontextmanager
async def serving_in_background(app: App) -> AsyncIterator[anyio.abc.TaskGroup]:
    """Run ``app.serve_forever()`` in a task so the test can call ``app.stop()`` mid-request
    (clients opened inside stay properly nested: trio's client owns a nursery)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(app.serve_forever, "127.0.0.1", 0)
        await wait_until(lambda: app.health()["ready"])
        yield tg


async def test_stop_lets_in_flight_handler_finish_within_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On stop an in-flight handler finishes within ``shutdown.grace`` and its reply arrives
    before the 1001 close; a request arriving during shutdown gets ``shutting_down``."""
    app = make_app({"shutdown": {"grace": 5}})
    started, release = anyio.Event(), anyio.Event()

    @app.handler("slow")
    async def slow(message: Any) -> dict[str, Any]:
        started.set()
        await release.wait()
        return {"done": True}

    async with serving_in_background(app), ws_connect(_port(app)) as c:
        slow_id = await c.send("slow", {})
        with anyio.fail_after(5):
            await started.wait()
        await app.stop()
        notice = await c.recv()
        assert notice["type"] == "system" and notice["content"]["event"] == "going_away"
        late = await c.request("ping", {})
        assert late["type"] == "error" and late["content"]["code"] == "shutting_down"
        assert app.health()["status"] == "shutting_down"
        release.set()
        reply = await c.answer(slow_id)
        assert reply["type"] == "slow" and reply["content"] == {"done": True}
        assert await c.closed() == 1001
    assert app.counters.errors == {"shutting_down": 1}
    assert logged(caplog, "shutting_down")


async def test_handler_exceeding_grace_gets_shutting_down_then_1001() -> None:
    """A handler still running when ``shutdown.grace`` ends is stopped: its request gets an
    ``error`` with code ``shutting_down``, then the connection closes with 1001."""
    app = make_app({"shutdown": {"grace": 0.2}})
    started = anyio.Event()

    @app.handler("stuck")
    async def stuck(message: Any) -> None:
        started.set()
        await anyio.sleep_forever()

    async with serving_in_background(app), ws_connect(_port(app)) as c:
        stuck_id = await c.send("stuck", {})
        with anyio.fail_after(5):
            await started.wait()
        await app.stop()
        answer = await c.answer(stuck_id)
        assert answer["type"] == "error" and answer["content"]["code"] == "shutting_down"
        assert await c.closed() == 1001
    assert app.counters.errors.get("shutting_down") == 1
    assert app.counters.closes.get(1001) == 1
    assert not app._hub.running


async def test_stop_during_slow_startup_is_not_lost() -> None:
    """``app.stop()`` (SIGTERM) while a plugin's ``startup`` hook still awaits (a broker
    connecting) stops the server as soon as it is up, instead of being forgotten."""
    entered, proceed = anyio.Event(), anyio.Event()

    class SlowStartup:
        @hookimpl
        async def startup(self, app: Any) -> None:
            entered.set()
            await proceed.wait()

    app = make_app(plugins=[*STANDARD, SlowStartup()])
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.serve_forever, "127.0.0.1", 0)
            await entered.wait()
            await app.stop()
            proceed.set()
    # serve_forever returned by itself: the task group did not need cancelling


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_client_vanishing_mid_reply_is_logged_and_harmless(
    reset: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that drops its TCP connection (FIN or RST) while its handler runs: the handler
    still finishes, its reply goes nowhere, the close is logged and counted as 1006, no
    exception escapes, the server keeps serving."""
    app = make_app()
    started, release, finished = anyio.Event(), anyio.Event(), anyio.Event()

    @app.handler("slow")
    async def slow(message: Any) -> dict[str, Any]:
        started.set()
        await release.wait()
        finished.set()
        return {"text": "x" * 100_000}

    async with serving(app):
        async with raw_connect(_port(app)) as raw:
            assert await raw.handshake() == 101
            await raw.send("slow")
            with anyio.fail_after(5):
                await started.wait()
            (conn,) = app.connections()
            if reset:
                raw.reset_on_close()
        await wait_until(lambda: conn.close_code is not None)  # the server noticed
        release.set()  # now the handler answers a connection that is gone
        with anyio.fail_after(5):
            await finished.wait()
        await wait_until(lambda: len(app.connections()) == 0)
        assert app.counters.closes == {1006: 1}
        assert logged(caplog, "code=1006")
        await assert_serves(app)
    gc.collect()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_thousand_connects_and_disconnects_leave_nothing_behind() -> None:
    """1,000 connections, closed cleanly or dropped (FIN, RST, mid-handshake), leave no
    connection or job behind, every close is counted, and the server still answers."""
    app = make_app()
    accepted = 0

    async def one(i: int) -> None:
        nonlocal accepted
        kind = i % 4
        if kind == 0:  # clean close handshake (every 20th also asks something)
            async with ws_connect(_port(app)) as c:
                if i % 20 == 0:
                    await c.request("ping", {})
            accepted += 1
            return
        async with raw_connect(_port(app)) as raw:
            if kind == 3:  # vanish mid-handshake
                await raw.stream.send(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
                return
            assert await raw.handshake() == 101
            accepted += 1
            if kind == 2:
                raw.reset_on_close()

    async with serving(app):
        with anyio.fail_after(60):
            for start in range(0, 1000, 25):
                async with anyio.create_task_group() as tg:
                    for i in range(start, start + 25):
                        tg.start_soon(one, i)
        await wait_until(lambda: not app.connections(), timeout=10)
        assert len(app.connections()) == 0 and app.metrics()["connections"]["active"] == 0
        assert not app._hub.running
        assert app.counters.connections_total == accepted == 750
        assert sum(app.counters.closes.values()) == accepted
        await assert_serves(app)


# ---------------------------------------------------------------------------- CLI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_cli_serve_answers_and_sigterm_drains_with_1001(anyio_backend: str) -> None:
    """``backchannel serve --backend B --port P`` (B = this test's backend) answers requests;
    SIGTERM sends going-away, closes with 1001 and exits 0."""
    script = Path(sys.executable).with_name("backchannel")
    port = _free_port()
    cmd = [str(script), "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend", anyio_backend]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKCHANNEL_")}
    stderr = bytearray()
    listening = anyio.Event()
    process = await anyio.open_process(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env
    )
    try:
        async with anyio.create_task_group() as tg:

            async def read_stderr() -> None:
                assert process.stderr is not None
                async for chunk in process.stderr:
                    stderr.extend(chunk)
                    if b"listening on" in stderr:
                        listening.set()

            tg.start_soon(read_stderr)
            with anyio.fail_after(20):  # bounded, not a timing assertion
                await listening.wait()
            async with ws_connect(port) as c:
                assert (await c.request("ping", {}))["type"] == "pong"
                assert (await c.request("text", {"text": "hi"}))["content"]["text"] == "hi"
                process.send_signal(signal.SIGTERM)
                notice = await c.recv()
                assert notice["type"] == "system" and notice["content"]["event"] == "going_away"
                assert await c.closed() == 1001
            with anyio.fail_after(10):
                assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
        await process.aclose()
    assert f"({anyio_backend}; plugins: {', '.join(STANDARD)})".encode() in stderr
    assert b"received SIGTERM" in stderr, stderr.decode()
