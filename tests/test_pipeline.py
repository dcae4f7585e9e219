"""The per-message pipeline (DESIGN §5) and its one-answer guarantee (DESIGN §1.1).

Most tests talk to the App in memory (``backchannel.testing``); the last few go over
real sockets, where a client sees the frames.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

from backchannel import App, BackchannelError, ErrorCode, Message, Reply, hookimpl
from backchannel.testing import MemoryClient, connect, serve_in_memory
from conftest import check_frame, make_app, serving, ws_connect

pytestmark = pytest.mark.anyio

SECRET = "hunter2-do-not-leak"


def new_app(config: dict[str, Any] | None = None, *plugins: object) -> App:
    """An App with exactly ``plugins`` (nothing installed is loaded)."""
    return App(config or {}, plugins=list(plugins))


async def wait(event: anyio.Event, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        await event.wait()


def assert_no_leak(frame: dict[str, Any]) -> None:
    text = json.dumps(frame)
    for needle in (SECRET, "Traceback", "RuntimeError", 'File "'):
        assert needle not in text, needle


# ---------------------------------------------------------------- answers


async def test_dict_reply_has_request_type_and_reply_to() -> None:
    """A handler returning a dict answers with a frame of the request's own type."""
    app = new_app()
    app.handler("echo")(lambda m: {"got": m.content["x"]})
    async with serve_in_memory(app), connect(app) as client:
        reply = await client.request("echo", {"x": 7}, id="q1")
    assert reply["type"] == "echo" and reply["replyTo"] == "q1"
    assert reply["content"] == {"got": 7}
    assert reply["seq"] == 1 and reply["timestamp"].endswith("Z")


async def test_reply_object_chooses_the_frame_type() -> None:
    """``Reply(type, content)`` answers with another frame type."""
    app = new_app()
    app.handler("ask")(lambda m: Reply("told", {"ok": True}))
    async with serve_in_memory(app), connect(app) as client:
        reply = await client.request("ask")
    assert (reply["type"], reply["content"]) == ("told", {"ok": True})


async def test_none_becomes_ack() -> None:
    """A handler returning None (sync or async) gets the client an empty ``ack``."""
    app = new_app()
    app.handler("sync")(lambda m: None)

    @app.handler("async")
    async def quiet(message: Message) -> None:
        await anyio.lowlevel.checkpoint()

    async with serve_in_memory(app), connect(app) as client:
        for kind in ("sync", "async"):
            ack = await client.request(kind, id=f"{kind}-1")
            assert (ack["type"], ack["replyTo"], ack["content"]) == ("ack", f"{kind}-1", {})


async def test_backchannel_error_answers_with_its_code() -> None:
    """A handler raising ``BackchannelError`` answers with that code and message."""
    app = new_app()

    @app.handler("limited")
    def limited(message: Message) -> None:
        raise BackchannelError(ErrorCode.RATE_LIMITED, "slow down", extra={"retryAfter": 2})

    async with serve_in_memory(app), connect(app) as client:
        err = await client.request("limited", id="r")
    assert err["type"] == "error" and err["replyTo"] == "r"
    assert err["content"] == {"code": "rate_limited", "message": "slow down", "retryAfter": 2}
    assert app.counters.errors == {"rate_limited": 1}


@pytest.mark.server_fault
async def test_unexpected_exception_is_handler_error_with_ref_logged_and_counted(
    caplog_bc: pytest.LogCaptureFixture,
) -> None:
    """A crash answers ``handler_error`` with a ``ref``; the log line has ref and ids."""
    app = new_app()

    @app.handler("boom")
    def boom(message: Message) -> None:
        raise RuntimeError(SECRET)

    async with serve_in_memory(app), connect(app) as client:
        err = await client.request("boom", id="b1")
        conn, session = client.connection.id, client.connection.session.id
        assert (await client.request("ping-after", id="b2"))["content"]["code"] == "unknown_type"
    content = err["content"]
    assert content["code"] == "handler_error" and len(content["ref"]) >= 8
    assert_no_leak(err)
    lines = [r for r in caplog_bc.records if r.levelno == logging.ERROR]
    assert len(lines) == 1
    line = lines[0].getMessage()
    for needle in (content["ref"], conn, session, "b1"):
        assert needle in line
    assert lines[0].exc_info is not None  # the traceback stays in the server log
    assert app.hook_failures() == {("handle", "handler:boom"): 1}
    assert app.metrics()["errors"]["byCode"]["handler_error"] == 1


@pytest.mark.parametrize(
    "result",
    [{"when": object()}, {1: "non-string key"}, 42, "text", ["a"], Reply("told", ["a"])],
    ids=["object", "int-key", "int", "str", "list", "reply-list"],
)
async def test_invalid_reply_is_handler_error(result: Any) -> None:
    """A reply that is not a dict/Reply/None, or not JSON, answers ``handler_error``."""
    app = new_app()
    app.handler("bad")(lambda m: result)
    async with serve_in_memory(app), connect(app) as client:
        err = await client.request("bad", id="x")
        assert err["content"]["code"] == "handler_error" and err["content"]["ref"]
        assert_no_leak(err)
        assert [f["replyTo"] for f in client.frames] == ["x"]  # one answer, no partial frame
        assert (await client.request("bad", id="y"))["replyTo"] == "y"  # still serving


# ---------------------------------------------------------------- timeouts


async def test_hanging_handler_times_out_after_message_timeout() -> None:
    """A handler that never returns answers ``timeout`` after ``message.timeout``."""
    app = new_app({"message": {"timeout": 0.2}})
    stopped = anyio.Event()

    @app.handler("hang")
    async def hang(message: Message) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            stopped.set()

    async with serve_in_memory(app), connect(app) as client:
        start = anyio.current_time()
        err = await client.request("hang", id="h")
        elapsed = anyio.current_time() - start
        await wait(stopped)
    assert err["content"]["code"] == "timeout" and err["replyTo"] == "h"
    assert "0.2" in err["content"]["message"]
    assert 0.2 <= elapsed < 2.0


async def test_per_type_timeout_overrides_message_timeout() -> None:
    """``register(..., timeout=)`` bounds that type instead of ``message.timeout``."""
    app = new_app({"message": {"timeout": 30}})

    @app.handler("quick", timeout=0.1)
    async def hang(message: Message) -> None:
        await anyio.sleep_forever()

    async with serve_in_memory(app), connect(app) as client:
        err = await client.request("quick", timeout=3)
    assert err["content"]["code"] == "timeout"
    assert "0.1 s" in err["content"]["message"]


# ---------------------------------------------------------------- plugin hooks


class LeakyValidator:
    """A plugin whose ``validate`` hook crashes with a secret in the exception."""

    @hookimpl
    def validate(self, message: Message) -> None:
        raise ValueError(f"db password {SECRET}")


@pytest.mark.server_fault
async def test_crashing_validate_hook_is_handler_error_counted_per_plugin() -> None:
    """A ``validate`` crash answers ``handler_error`` without the secret; counted per plugin."""
    app = new_app()
    app.use(LeakyValidator(), name="leaky")
    app.use(LeakyValidator(), name="leaky-too")
    app.handler("echo")(lambda m: {})
    ran = []
    app.handler("never")(lambda m: ran.append(m))
    async with serve_in_memory(app), connect(app) as client:
        first = await client.request("echo")
        second = await client.request("never")
    for err in (first, second):
        assert err["content"]["code"] == "handler_error" and err["content"]["ref"]
        assert_no_leak(err)
    assert ran == []  # the handler never ran
    # the first validate plugin raises first: only it is counted, once per request
    assert app.hook_failures() == {("validate", "leaky"): 2}
    assert app.metrics()["pluginFailures"] == {"validate:leaky": 2}


async def test_validate_hook_raising_backchannel_error_answers_its_code() -> None:
    """A ``validate`` hook raising ``BackchannelError`` rejects with that code."""

    class Strict:
        @hookimpl
        def validate(self, message: Message) -> None:
            if message.content.get("n", 0) > 3:
                raise BackchannelError(ErrorCode.VALIDATION_FAILED, "content.n: too big")

    app = new_app({}, Strict())
    app.handler("count")(lambda m: {"n": m.content["n"]})
    async with serve_in_memory(app), connect(app) as client:
        assert (await client.request("count", {"n": 2}))["content"] == {"n": 2}
        err = await client.request("count", {"n": 4})
    assert err["content"] == {"code": "validation_failed", "message": "content.n: too big"}
    assert app.hook_failures() == {}


async def test_hanging_validate_hook_times_out() -> None:
    """An async ``validate`` hook that never returns is bounded by ``message.timeout``."""

    class Stuck:
        @hookimpl
        async def validate(self, message: Message) -> None:
            await anyio.sleep_forever()

    app = new_app({"message": {"timeout": 0.2}}, Stuck())
    app.handler("echo")(lambda m: {})
    async with serve_in_memory(app), connect(app) as client:
        err = await client.request("echo", timeout=3)
    assert err["content"]["code"] == "timeout"


@pytest.mark.server_fault
async def test_on_error_maps_an_exception_to_a_backchannel_error() -> None:
    """``on_error`` returning a ``BackchannelError`` replaces ``handler_error``."""
    seen: list[BaseException] = []

    class Mapper:
        @hookimpl
        def on_error(self, error: BaseException) -> BackchannelError | None:
            seen.append(error)
            if isinstance(error, PermissionError):
                return BackchannelError(ErrorCode.FORBIDDEN, "not yours")
            return None

    class Broken:
        @hookimpl
        def on_error(self) -> None:
            raise RuntimeError("observer bug")

    app = new_app({}, Broken(), Mapper())

    @app.handler("guarded")
    def guarded(message: Message) -> None:
        raise PermissionError(SECRET) if message.content.get("deny") else KeyError("other")

    async with serve_in_memory(app), connect(app) as client:
        mapped = await client.request("guarded", {"deny": True})
        default = await client.request("guarded", {})
    assert mapped["content"] == {"code": "forbidden", "message": "not yours"}
    assert default["content"]["code"] == "handler_error"
    assert [type(e) for e in seen] == [PermissionError, KeyError]
    assert app.hook_failures()[("on_error", "inline-1")] == 2  # a broken observer is counted


# ---------------------------------------------------------------- streaming


def streaming_app(gen: Callable[[Message], AsyncIterator[Any]], timeout: float = 5) -> App:
    app = new_app({"message": {"timeout": timeout}})
    app.handler("stream")(gen)
    return app


async def chunks_then_answer(client: MemoryClient, rid: str) -> tuple[list[Any], dict[str, Any]]:
    answer = await client.answer(rid)
    chunks = [f for f in client.frames if f["type"] == "chunk" and f["replyTo"] == rid]
    return [c["content"] for c in chunks], answer


async def test_async_generator_streams_chunks_then_ack_with_consecutive_seq() -> None:
    """Each yielded item is a ``chunk`` (non-dicts wrapped in ``value``), then an ``ack``."""

    async def tokens(message: Message) -> AsyncIterator[Any]:
        for word in ("one", "two"):
            yield {"token": word}
        yield "three"

    app = streaming_app(tokens)
    async with serve_in_memory(app), connect(app) as client:
        chunks, answer = await chunks_then_answer(client, client.send("stream", id="s"))
    assert chunks == [{"token": "one"}, {"token": "two"}, {"value": "three"}]
    assert answer["type"] == "ack" and answer["replyTo"] == "s"
    assert [f["type"] for f in client.frames] == ["chunk", "chunk", "chunk", "ack"]
    assert [f["seq"] for f in client.frames] == [1, 2, 3, 4]


@pytest.mark.server_fault
async def test_generator_failing_mid_stream_sends_chunks_then_error() -> None:
    """A generator that raises after two chunks ends with ``handler_error``, no ack."""

    async def flaky(message: Message) -> AsyncIterator[dict[str, int]]:
        yield {"n": 1}
        yield {"n": 2}
        raise RuntimeError(SECRET)

    app = streaming_app(flaky)
    async with serve_in_memory(app), connect(app) as client:
        chunks, answer = await chunks_then_answer(client, client.send("stream", id="s"))
    assert chunks == [{"n": 1}, {"n": 2}]
    assert answer["type"] == "error" and answer["content"]["code"] == "handler_error"
    assert_no_leak(answer)
    assert [f["type"] for f in client.frames] == ["chunk", "chunk", "error"]


async def test_generator_stalling_between_chunks_times_out() -> None:
    """The timeout bounds the gap between chunks: a stalled stream ends with ``timeout``."""
    closed = anyio.Event()

    async def stall(message: Message) -> AsyncIterator[dict[str, int]]:
        try:
            yield {"n": 1}
            await anyio.sleep_forever()
            yield {"n": 2}
        finally:
            closed.set()

    app = streaming_app(stall, timeout=0.2)
    async with serve_in_memory(app), connect(app) as client:
        chunks, answer = await chunks_then_answer(client, client.send("stream", id="s"))
        await wait(closed)
    assert chunks == [{"n": 1}]
    assert answer["content"]["code"] == "timeout"


async def test_steady_stream_may_outlast_the_timeout() -> None:
    """A stream longer than ``message.timeout`` in total completes while chunks keep coming."""

    async def steady(message: Message) -> AsyncIterator[dict[str, int]]:
        for n in range(8):
            await anyio.sleep(0.05)
            yield {"n": n}

    app = streaming_app(steady, timeout=0.25)
    async with serve_in_memory(app), connect(app) as client:
        chunks, answer = await chunks_then_answer(client, client.send("stream", id="s"))
    assert answer["type"] == "ack"
    assert len(chunks) == 8


# ---------------------------------------------------------------- cancel


async def test_cancel_stops_a_running_handler() -> None:
    """Cancelling a running request: target gets ``cancelled``, cancel gets an ack."""
    app = new_app()
    started, stopped = anyio.Event(), anyio.Event()

    @app.handler("work")
    async def work(message: Message) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            stopped.set()

    async with serve_in_memory(app), connect(app) as client:
        target = client.send("work", id="w1")
        await wait(started)
        ack = await client.request("cancel", {"target": target}, id="c1")
        err = await client.answer(target)
        await wait(stopped)
        assert (await client.request("work.done", id="next"))["replyTo"] == "next"
    assert ack["type"] == "ack" and ack["content"] == {"target": "w1", "cancelled": True}
    assert err["type"] == "error" and err["content"]["code"] == "cancelled"
    assert [f["replyTo"] for f in client.frames].count("w1") == 1


async def test_cancel_removes_a_queued_request_before_it_runs() -> None:
    """Cancelling a queued request answers it ``cancelled``; its handler never runs."""
    app = new_app()
    started, release = anyio.Event(), anyio.Event()
    ran: list[str] = []

    @app.handler("work")
    async def work(message: Message) -> None:
        ran.append(message.id)
        started.set()
        await wait(release)

    async with serve_in_memory(app), connect(app) as client:
        first = client.send("work", id="first")
        await wait(started)
        queued = client.send("work", id="queued")
        ack = await client.request("cancel", {"target": queued})
        err = await client.answer(queued)
        release.set()
        done = await client.answer(first)
    assert ack["content"] == {"target": "queued", "cancelled": True}
    assert err["content"]["code"] == "cancelled"
    assert done["type"] == "ack"
    assert ran == ["first"]


async def test_cancel_of_unknown_id_acks_cancelled_false() -> None:
    """A cancel naming nothing running or queued is acked with ``cancelled: false``."""
    app = new_app()
    async with serve_in_memory(app), connect(app) as client:
        ack = await client.request("cancel", {"target": "nope"}, id="c")
        bad = await client.request("cancel", {}, id="c2")
    assert (ack["type"], ack["replyTo"]) == ("ack", "c")
    assert ack["content"] == {"target": "nope", "cancelled": False}
    assert bad["content"]["code"] == "validation_failed"
    assert bad["content"]["details"] == [
        {"path": "content.target", "rule": "must be of type string"}
    ]


# ---------------------------------------------------------------- ordering and limits


def race_app(config: dict[str, Any]) -> App:
    """``slow`` waits (bounded) for ``fast`` to release it, and says whether it was."""
    app = new_app(config)
    release = anyio.Event()

    @app.handler("slow")
    async def slow(message: Message) -> dict[str, bool]:
        with anyio.move_on_after(0.3):
            await release.wait()
        return {"released": release.is_set()}

    @app.handler("fast")
    def fast(message: Message) -> dict[str, bool]:
        release.set()
        return {}

    return app


async def test_requests_of_one_connection_are_handled_in_order_by_default() -> None:
    """With ``max_in_flight = 1`` a fast request waits for the slow one before it."""
    app = race_app({})
    async with serve_in_memory(app), connect(app) as client:
        client.send("slow", id="slow")
        client.send("fast", id="fast")
        await client.answer("fast")
    answers = [f["replyTo"] for f in client.frames]
    assert answers == ["slow", "fast"]
    assert client.frames[0]["content"] == {"released": False}  # fast had not run yet


async def test_max_in_flight_lets_a_fast_request_overtake_a_slow_one() -> None:
    """With ``message.max_in_flight = 4`` a fast request is answered before a slow one."""
    app = race_app({"message": {"max_in_flight": 4}})
    async with serve_in_memory(app), connect(app) as client:
        client.send("slow", id="slow")
        client.send("fast", id="fast")
        await client.answer("slow")
    assert [f["replyTo"] for f in client.frames] == ["fast", "slow"]
    assert client.frames[1]["content"] == {"released": True}


async def test_queue_overflow_answers_overloaded() -> None:
    """Past ``message.max_queued`` waiting requests, a new one is answered ``overloaded``."""
    app = new_app({"message": {"max_queued": 2}})
    started, release = anyio.Event(), anyio.Event()

    @app.handler("work")
    async def work(message: Message) -> None:
        started.set()
        await wait(release)

    async with serve_in_memory(app), connect(app) as client:
        client.send("work", id="running")
        await wait(started)
        client.send("work", id="q1")
        client.send("work", id="q2")
        over = await client.request("work", id="over")
        release.set()
        answers = [await client.answer(i) for i in ("running", "q1", "q2")]
    assert over["content"]["code"] == "overloaded"
    assert [a["type"] for a in answers] == ["ack", "ack", "ack"]
    assert app.counters.errors == {"overloaded": 1}


@pytest.mark.parametrize(
    ("permissions", "expected"),
    [([], "forbidden"), (["text"], "forbidden"), (["admin:*"], "ack"), (["*"], "ack")],
)
async def test_type_permission_against_anonymous_permissions(
    permissions: list[str], expected: str
) -> None:
    """A type registered with a permission needs it; patterns in the grant count."""
    app = new_app({"auth": {"anonymous_permissions": permissions}})
    app.handler("purge", permission="admin:purge")(lambda m: None)
    async with serve_in_memory(app), connect(app) as client:
        answer = await client.request("purge")
    got = answer["content"]["code"] if answer["type"] == "error" else answer["type"]
    assert got == expected
    if expected == "forbidden":
        assert "admin:purge" in answer["content"]["message"]


# ---------------------------------------------------------------- middleware


class Wrap:
    """``wrap_handler`` middleware recording when it runs and how often it was built."""

    def __init__(self, label: str, log: list[str]) -> None:
        self.label = label
        self.log = log
        self.built: list[str] = []

    @hookimpl
    def wrap_handler(self, type: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        self.built.append(type)

        async def wrapped(message: Message, connection: Any) -> Any:
            self.log.append(f"{self.label}>")
            result = handler(message, connection)
            if inspect.isawaitable(result):
                result = await result
            self.log.append(f"<{self.label}")
            return result

        return wrapped


async def test_wrap_handler_composes_once_first_plugin_outermost() -> None:
    """Middleware wraps in plugin order (first outermost) and is built once per type."""
    log: list[str] = []
    outer, inner = Wrap("A", log), Wrap("B", log)

    class Ignore:
        @hookimpl
        def wrap_handler(self) -> None:
            return None  # None leaves the handler as it is

    app = new_app({}, outer, Ignore(), inner)

    @app.handler("echo")
    def echo(message: Message) -> dict[str, Any]:
        log.append("handler")
        return {"n": message.content["n"]}

    app.handler("other")(lambda m: None)
    async with serve_in_memory(app), connect(app) as client:
        replies = [await client.request("echo", {"n": n}) for n in range(3)]
    assert [r["content"] for r in replies] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert log == ["A>", "B>", "handler", "<B", "<A"] * 3
    assert sorted(outer.built) == sorted(inner.built) == ["echo", "other"]


# ---------------------------------------------------------------- observers and order


async def test_app_on_observers_see_each_event() -> None:
    """``@app.on`` callbacks fire for every event with the documented arguments."""
    app = new_app()
    events: list[tuple[Any, ...]] = []
    app.on("connection_added")(lambda c: events.append(("added", c.id)))
    app.on("connection_removed")(lambda c, code: events.append(("removed", c.id, code)))
    app.on("message_received")(lambda m, c: events.append(("received", m.id, m.type)))
    app.on("message_sent")(lambda c, f: events.append(("sent", f["replyTo"], f["type"])))
    app.on("error")(lambda c, mid, e: events.append(("error", mid, e.code.value)))
    app.on("alert")(lambda name, state, details: events.append(("alert", name, state)))
    app.handler("echo")(lambda m: {})
    async with serve_in_memory(app):
        async with connect(app) as client:
            cid = client.connection.id
            await client.request("echo", id="e1")
            await client.request("nope", id="n1")
        app.alert("error_rate", "firing", {"rate": 0.5})
    assert events == [
        ("added", cid),
        ("received", "e1", "echo"),
        ("sent", "e1", "echo"),
        ("sent", "n1", "error"),
        ("error", "n1", "unknown_type"),
        ("removed", cid, 1000),
        ("alert", "error_rate", "firing"),
    ]


@pytest.mark.server_fault
async def test_raising_observer_does_not_break_the_request() -> None:
    """An observer that raises is logged and counted; the request is still answered."""
    app = new_app()

    @app.on("message_received")
    def broken(message: Message, connection: Any) -> None:
        raise RuntimeError("observer bug")

    @app.on("message_sent")
    def broken_too(connection: Any, frame: dict[str, Any]) -> None:
        raise RuntimeError("observer bug")

    app.handler("echo")(lambda m: {"ok": 1})
    async with serve_in_memory(app), connect(app) as client:
        reply = await client.request("echo")
    assert reply["content"] == {"ok": 1}
    assert sorted(app.hook_failures().values()) == [1, 1]


async def test_async_disconnect_hook_runs_to_completion() -> None:
    """An async ``disconnect`` hook finishes before ``connection_removed`` observers run."""
    seen: list[str] = []

    class Cleanup:
        @hookimpl
        async def disconnect(self, code: int) -> None:
            await anyio.sleep(0.02)
            seen.append(f"disconnect {code}")

        @hookimpl
        def connection_removed(self, code: int) -> None:
            seen.append(f"removed {code}")

    app = new_app({}, Cleanup())
    app.handler("echo")(lambda m: None)
    async with serve_in_memory(app), connect(app) as client:
        await client.request("echo")  # admitted
    assert seen == ["disconnect 1000", "removed 1000"]


class Recorder:
    """An inline ``validate`` plugin appending its label to a shared list."""

    def __init__(self, label: str, log: list[str]) -> None:
        self.label, self.log = label, log

    @hookimpl
    def validate(self, message: Message) -> None:
        self.log.append(self.label)


@pytest.mark.parametrize("labels", [["first", "second"], ["second", "first"]])
async def test_hooks_run_in_plugin_order(labels: list[str]) -> None:
    """``validate`` implementations run in the order their plugins were given."""
    log: list[str] = []
    app = new_app({}, *(Recorder(label, log) for label in labels))
    app.handler("echo")(lambda m: None)
    async with serve_in_memory(app), connect(app) as client:
        await client.request("echo")
    assert log == labels


# ---------------------------------------------------------------- over real sockets


def socket_app(config: dict[str, Any] | None = None) -> App:
    app = make_app(config, plugins=[])

    @app.handler("boom")
    def boom(message: Message) -> None:
        raise RuntimeError(SECRET)

    @app.handler("stream")
    async def stream(message: Message) -> AsyncIterator[dict[str, int]]:
        for n in range(message.content.get("n", 3)):
            yield {"n": n}
        if message.content.get("hang"):
            await anyio.sleep_forever()

    return app


@pytest.mark.server_fault
async def test_real_socket_crash_is_a_well_formed_handler_error() -> None:
    """Over a socket, a crashing handler yields one schema-valid error frame, no traceback."""
    async with serving(socket_app()) as app, ws_connect(app.port) as c:
        err = await c.request("boom")
        assert err["content"]["code"] == "handler_error" and err["content"]["ref"]
        assert_no_leak(err)
        assert (await c.request("stream", {"n": 0}))["type"] == "ack"


async def test_real_socket_stream_chunks_then_ack() -> None:
    """Over a socket, chunks arrive with consecutive ``seq`` and then the ``ack``."""
    async with serving(socket_app()) as app, ws_connect(app.port) as c:
        rid = await c.send("stream", {"n": 3})
        answer = await c.answer(rid)
    assert [f["type"] for f in c.frames] == ["chunk", "chunk", "chunk", "ack"]
    assert [f["content"] for f in c.frames[:3]] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [f["seq"] for f in c.frames] == [1, 2, 3, 4]
    assert answer["replyTo"] == rid


async def test_real_socket_cancel_and_timeout() -> None:
    """Over a socket, a stalled stream can be cancelled, and otherwise times out."""
    app = socket_app({"message": {"timeout": 0.3}})
    async with serving(app), ws_connect(app.port) as c:
        rid = await c.send("stream", {"n": 1, "hang": True})
        assert (await c.recv())["type"] == "chunk"  # the handler is now running
        cid = await c.send("cancel", {"target": rid})
        ack = await c.answer(cid)
        err = await c.answer(rid)
        assert ack["content"] == {"target": rid, "cancelled": True}
        assert err["content"]["code"] == "cancelled"
        check_frame(err)
        timed = await c.request("stream", {"n": 1, "hang": True})
        assert timed["content"]["code"] == "timeout"
