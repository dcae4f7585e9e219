"""Sessions, resume and safe retries over real sockets (protocol.md "Sessions and resume").

Each test plays a client that loses its connection at a chosen moment and checks what
the promise of DESIGN §1.2 and §1.3 says it gets back: every missed frame, once, in order and
unchanged, or a plain ``resumed: false`` with the reason; one answer per request and no
handler run twice. Nothing sleeps and hopes: handlers wait on events the test sets, and
the test waits (bounded) on conditions.
"""

from __future__ import annotations

import gc
import json
import logging
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any
from unittest.mock import ANY

import anyio
import pytest

from backchannel import (
    App,
    BackchannelError,
    Connection,
    ErrorCode,
    Message,
    Principal,
    Session,
    hookimpl,
)
from backchannel.memory import SESSION_COST, MemoryBroker
from backchannel.testing import connect, raw_connect, serve_in_memory
from conftest import STANDARD, WsClient, check_frame, make_app, serving, ws_connect

pytestmark = pytest.mark.anyio


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def no_error_records(caplog: pytest.LogCaptureFixture) -> Any:
    """Fail a test during which anything logged at ERROR (a crash, a lost task exception)."""
    caplog.set_level(logging.INFO, logger="backchannel")
    yield
    gc.collect()
    errors = [
        r
        for phase in ("setup", "call")
        for r in caplog.get_records(phase)  # type: ignore[arg-type]
        if r.levelno >= logging.ERROR
    ]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (bounded) until ``condition()`` holds; fails the test after ``timeout``."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)


async def recv_raw(c: WsClient, timeout: float = 5.0) -> tuple[str, dict[str, Any]]:
    """The next frame as the exact text the server sent, and parsed."""
    with anyio.fail_after(timeout):
        raw = await c.ws.recv()
    assert isinstance(raw, str)
    frame = check_frame(json.loads(raw))
    c.frames.append(frame)
    return raw, frame


async def start(c: WsClient) -> tuple[str, str, dict[str, Any]]:
    """Send ``init {}``; return the new session id, the broker epoch and the answer."""
    answer = await c.answer(await c.send("init", {}, id="init-1"))
    assert answer["content"]["resumed"] is False
    return answer["content"]["sessionId"], answer["content"]["epoch"], answer


async def resume(
    c: WsClient, session_id: str, last_seq: int, epoch: str, ident: str = "init-2"
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Send a resuming ``init``; return the frames that came before its answer, and the answer."""
    content = {"sessionId": session_id, "lastSeq": last_seq, "epoch": epoch}
    await c.send("init", content, id=ident)
    before = []
    while True:
        frame = await c.recv()
        if frame.get("replyTo") == ident:
            return before, frame
        before.append(frame)


async def detached(app: App, session_id: str) -> Session:
    """Wait until the session's connection is gone (the server saw the disconnect)."""
    session = app.session(session_id)
    await wait_until(lambda: session.connection is None)
    return session


async def until_pong(c: WsClient) -> list[dict[str, Any]]:
    """Ping and return every frame that arrived before the pong (nothing may be pending)."""
    ident = await c.send("ping", {}, id=f"ping-{len(c.frames)}")
    frames = []
    while True:
        frame = await c.recv()
        if frame.get("replyTo") == ident:
            return frames
        frames.append(frame)


def seqs(frames: list[dict[str, Any]]) -> list[int]:
    return [f["seq"] for f in frames]


class HeaderAuth:
    """Authenticates every connection as the principal named by its ``x-user`` header."""

    @hookimpl
    def authenticate(self, connection: Connection) -> Principal:
        return Principal(connection.request.headers["x-user"])


# ------------------------------------------------------------------ 1. seq and replay


async def test_resume_replays_every_missed_frame_unchanged_and_in_order_before_init_answer() -> (
    None
):
    """Every frame carries seq +1; resume replays each frame after lastSeq byte for byte (seen
    ones and ones made while away), in order, before ``init {resumed: true, missed: N}``."""
    app = make_app()
    started, go = anyio.Event(), anyio.Event()

    @app.handler("later")
    async def later(message: Message) -> AsyncIterator[dict[str, Any]]:
        started.set()
        await go.wait()
        for i in range(3):
            yield {"i": i}

    async with serving(app):
        async with ws_connect(app.port) as c1:
            await c1.send("init", {}, id="i1")
            seen = [await recv_raw(c1)]
            sid, epoch = seen[0][1]["content"]["sessionId"], seen[0][1]["content"]["epoch"]
            for text in ("a", "b", "c"):
                await c1.send("text", {"text": text}, id=f"t-{text}")
                seen.append(await recv_raw(c1))
            await c1.send("later", {}, id="L")
            with anyio.fail_after(5):
                await started.wait()
        assert seqs([f for _, f in seen]) == [1, 2, 3, 4]
        session = await detached(app, sid)
        go.set()  # 3 chunks and the ack go to the outbox only
        await wait_until(lambda: session.seq == 8)
        async with ws_connect(app.port) as c2:
            await c2.send("init", {"sessionId": sid, "lastSeq": 1, "epoch": epoch}, id="i2")
            got = []
            while not got or got[-1][1].get("replyTo") != "i2":
                got.append(await recv_raw(c2))
            replayed, answer = got[:-1], got[-1][1]
            assert seqs([f for _, f in replayed]) == [2, 3, 4, 5, 6, 7, 8]
            assert [raw for raw, _ in replayed[:3]] == [raw for raw, _ in seen[1:]]
            later_frames = [f for _, f in replayed[3:]]
            assert [f["content"] for f in later_frames[:3]] == [{"i": 0}, {"i": 1}, {"i": 2}]
            assert all(f["replyTo"] == "L" for f in later_frames)
            assert [f["type"] for f in later_frames] == ["chunk"] * 3 + ["ack"]
            assert answer["seq"] == 9
            assert answer["content"]["sessionId"] == sid
            assert answer["content"]["resumed"] is True
            assert answer["content"]["missed"] == 7
            assert (await c2.request("text", {"text": "d"}))["seq"] == 10
            # the resuming connection's own new session is not kept around
            assert list(app._hub.sessions) == [sid]
            assert await app.broker.find_session(sid) is not None


# ------------------------------------------------------------- 2. resumed: false


async def test_resume_of_unknown_session_says_so_and_continues_in_a_new_session() -> None:
    """An unknown session id gets ``resumed: false, reason: unknown_session``; nothing is
    replayed and the connection continues in its own new session (seq from 1)."""
    async with serving(make_app()) as app, ws_connect(app.port) as c:
        before, answer = await resume(c, "s-" + "0" * 24, 7, app.broker.epoch)
        assert before == []
        content = answer["content"]
        assert content["resumed"] is False and content["reason"] == "unknown_session"
        assert content["missed"] == 0
        assert content["sessionId"].startswith("s-") and content["sessionId"] != "s-" + "0" * 24
        assert answer["seq"] == 1
        assert (await c.request("text", {"text": "x"}))["seq"] == 2


async def test_resume_with_last_seq_ahead_of_the_session_is_refused_not_a_crash() -> None:
    """``lastSeq`` beyond what the session sent gets ``reason: ahead`` (no error, no crash);
    the connection works and the session can still be resumed correctly afterwards."""
    async with serving(make_app()) as app:
        async with ws_connect(app.port) as c1:
            sid, epoch, _ = await start(c1)
            await c1.request("text", {"text": "x"})
        await detached(app, sid)
        async with ws_connect(app.port) as c2:
            before, answer = await resume(c2, sid, 50, epoch)
            assert before == []
            assert answer["type"] == "init"
            assert answer["content"]["resumed"] is False
            assert answer["content"]["reason"] == "ahead"
            assert answer["content"]["sessionId"] != sid
            assert (await c2.request("text", {"text": "still here"}))["type"] == "text"
        async with ws_connect(app.port) as c3:
            before, answer = await resume(c3, sid, 2, epoch)
            assert before == [] and answer["content"]["resumed"] is True
            assert answer["content"]["missed"] == 0 and answer["seq"] == 3


async def test_outbox_overflow_during_disconnect_is_trimmed_never_a_silent_gap() -> None:
    """With ``outbox_size`` 5, 21 frames made while away leave a gap: a resume from before
    the outbox says ``trimmed`` and replays nothing; one from its first frame replays all."""
    app = make_app({"session": {"outbox_size": 5}})
    started, go = anyio.Event(), anyio.Event()

    @app.handler("burst")
    async def burst(message: Message) -> AsyncIterator[dict[str, Any]]:
        started.set()
        await go.wait()
        for i in range(20):
            yield {"i": i}

    async with serving(app):
        async with ws_connect(app.port) as c1:
            sid, epoch, _ = await start(c1)
            await c1.send("burst", {}, id="B")
            with anyio.fail_after(5):
                await started.wait()
        session = await detached(app, sid)
        go.set()
        await wait_until(lambda: session.seq == 22)  # 20 chunks + ack; outbox holds 18..22
        async with ws_connect(app.port) as c2:
            before, answer = await resume(c2, sid, 1, epoch)
            assert before == []  # not one frame of the old session: the client must resync
            assert answer["content"]["resumed"] is False
            assert answer["content"]["reason"] == "trimmed"
            assert answer["content"]["missed"] == 0
            assert answer["content"]["sessionId"] != sid and answer["seq"] == 1
        async with ws_connect(app.port) as c3:
            before, answer = await resume(c3, sid, 16, epoch)
            assert before == [] and answer["content"]["reason"] == "trimmed"
        async with ws_connect(app.port) as c4:  # lastSeq + 1 is the oldest frame kept
            before, answer = await resume(c4, sid, 17, epoch)
            assert answer["content"]["resumed"] is True and answer["content"]["missed"] == 5
            assert seqs(before) == [18, 19, 20, 21, 22]
            assert [f["content"].get("i") for f in before] == [16, 17, 18, 19, None]
            assert before[-1]["type"] == "ack"


async def test_resume_with_another_epoch_is_refused_as_epoch_changed() -> None:
    """An ``init`` carrying an epoch the broker does not have says ``epoch_changed`` (the data
    it refers to is gone); the right epoch resumes."""
    async with serving(make_app()) as app:
        async with ws_connect(app.port) as c1:
            sid, epoch, _ = await start(c1)
        await detached(app, sid)
        async with ws_connect(app.port) as c2:
            before, answer = await resume(c2, sid, 1, "0badc0de")
            assert before == []
            assert answer["content"]["resumed"] is False
            assert answer["content"]["reason"] == "epoch_changed"
            assert answer["content"]["sessionId"] != sid
        async with ws_connect(app.port) as c3:
            _, answer = await resume(c3, sid, 1, epoch)
            assert answer["content"]["resumed"] is True


async def test_session_past_its_ttl_is_forgotten_and_resume_says_unknown_session() -> None:
    """A session detached for longer than ``session.ttl`` is removed (hub and broker); a
    later resume gets ``unknown_session``."""
    app = make_app({"session": {"ttl": 0.2}})
    async with serving(app):
        async with ws_connect(app.port) as c1:
            sid, epoch, _ = await start(c1)
            await c1.request("text", {"text": "x"})
        await wait_until(lambda: app.session(sid) is None, timeout=5)
        assert await app.broker.find_session(sid) is None
        async with ws_connect(app.port) as c2:
            before, answer = await resume(c2, sid, 1, epoch)
            assert before == []
            assert answer["content"]["resumed"] is False
            assert answer["content"]["reason"] == "unknown_session"


# ---------------------------------------------------------- 3. principal binding


async def test_anonymous_session_is_a_bearer_token_another_anonymous_connection_resumes() -> None:
    """An anonymous session's id is its credential: another anonymous connection resumes it,
    gets what it missed and takes the session's principal."""
    async with serving(make_app()) as app:
        async with ws_connect(app.port) as c1:
            sid, epoch, first = await start(c1)
            await c1.request("text", {"text": "x"})
        await detached(app, sid)
        async with ws_connect(app.port) as c2:
            before, answer = await resume(c2, sid, 1, epoch)
            assert answer["content"]["resumed"] is True
            assert [f["content"]["text"] for f in before] == ["x"]
            assert answer["content"]["principal"] == first["content"]["principal"]


async def test_session_of_an_authenticated_principal_cannot_be_resumed_by_another() -> None:
    """Bob resuming Alice's session (attached or not) gets ``error forbidden`` and stays in
    his own new session, Alice's connection untouched; Alice herself resumes it."""
    app = make_app(plugins=["init", "text", "ping", HeaderAuth()])
    async with serving(app):
        async with ws_connect(app.port, additional_headers={"x-user": "alice"}) as alice:
            sid, epoch, first = await start(alice)
            assert first["content"]["principal"] == "alice"
            async with ws_connect(app.port, additional_headers={"x-user": "bob"}) as bob:
                before, answer = await resume(bob, sid, 1, epoch)
                assert before == []
                assert answer["type"] == "error" and answer["content"]["code"] == "forbidden"
                assert answer["seq"] == 1  # in bob's own new session
                reply = await bob.request("text", {"text": "mine"})
                assert reply["type"] == "text" and reply["seq"] == 2
                assert app.session(sid).connection is not None
            assert (await alice.request("text", {"text": "a"}))["seq"] == 2  # untouched
        await detached(app, sid)
        async with ws_connect(app.port, additional_headers={"x-user": "bob"}) as bob:
            _, answer = await resume(bob, sid, 1, epoch)
            assert answer["type"] == "error" and answer["content"]["code"] == "forbidden"
            assert (await bob.request("ping", {}))["type"] == "pong"
        async with ws_connect(app.port, additional_headers={"x-user": "alice"}) as alice:
            before, answer = await resume(alice, sid, 1, epoch)
            assert answer["content"]["resumed"] is True and answer["content"]["missed"] == 1
            assert [f["content"]["text"] for f in before] == ["a"]


# ------------------------------------------------------- 4. reply after disconnect


async def test_reply_to_a_request_cut_off_by_a_disconnect_is_delivered_after_resume() -> None:
    """A handler still running when its client disconnects is not stopped: an answer made while
    away is replayed on resume, one made after resume arrives live; each handler ran once."""
    app = make_app({"message": {"max_in_flight": 2}})
    runs: Counter[str] = Counter()
    started = {"s1": anyio.Event(), "s2": anyio.Event()}
    release = {"s1": anyio.Event(), "s2": anyio.Event()}

    @app.handler("slow")
    async def slow(message: Message) -> dict[str, Any]:
        runs[message.id] += 1
        started[message.id].set()
        await release[message.id].wait()
        return {"done": message.id}

    async with serving(app):
        async with ws_connect(app.port) as c1:
            sid, epoch, _ = await start(c1)
            await c1.send("slow", {}, id="s1")
            await c1.send("slow", {}, id="s2")
            with anyio.fail_after(5):
                await started["s1"].wait()
                await started["s2"].wait()
        session = await detached(app, sid)
        release["s1"].set()
        await wait_until(lambda: session.seq == 2)
        async with ws_connect(app.port) as c2:
            before, answer = await resume(c2, sid, 1, epoch)
            assert [(f["replyTo"], f["content"]) for f in before] == [("s1", {"done": "s1"})]
            assert answer["content"]["missed"] == 1 and answer["seq"] == 3
            release["s2"].set()
            reply = await c2.answer("s2")
            assert reply["content"] == {"done": "s2"} and reply["seq"] == 4
            assert await until_pong(c2) == []
    assert runs == {"s1": 1, "s2": 1}


# ----------------------------------------------- 5. server cuts 100 requests in flight


async def test_server_cutting_all_connections_mid_flight_loses_and_repeats_nothing() -> None:
    """100 requests in flight over 10 clients (50 running, 50 queued) when the server closes
    every connection (1012): after resume and re-send with the same ids, each request has
    exactly one terminal answer and no handler ran twice."""
    app = make_app({"message": {"max_in_flight": 5}})
    runs: Counter[str] = Counter()
    release = anyio.Event()

    @app.handler("work")
    async def work(message: Message) -> dict[str, Any]:
        runs[message.id] += 1
        await release.wait()
        return {"id": message.id, "n": message.content["n"]}

    ids = {k: [f"w{k}-{i}" for i in range(10)] for k in range(10)}
    resume_from: dict[int, tuple[str, str, int]] = {}
    async with serving(app):
        async with AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(ws_connect(app.port)) for _ in range(10)]
            for k, c in enumerate(clients):
                sid, epoch, answer = await start(c)
                resume_from[k] = (sid, epoch, answer["seq"])
                for i, ident in enumerate(ids[k]):
                    await c.send("work", {"n": i}, id=ident)
            await wait_until(lambda: len(runs) == 50)
            for conn in app.connections():
                conn.close(1012, "restarting")
            for c in clients:
                assert await c.closed() == 1012
        await wait_until(lambda: not app.connections())
        assert len(runs) == 50 and not release.is_set()
        async with AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(ws_connect(app.port)) for _ in range(10)]
            sessions = [app._hub.sessions[resume_from[k][0]] for k in ids]
            attachable = sum(
                len(set(ids[k]) & set(s.pending)) for k, s in zip(ids, sessions, strict=True)
            )
            for k, c in enumerate(clients):
                sid, epoch, last = resume_from[k]
                before, answer = await resume(c, sid, last, epoch)
                assert before == [] and answer["content"]["resumed"] is True
                for i, ident in enumerate(ids[k]):  # nothing answered yet: re-send all
                    await c.send("work", {"n": i}, id=ident)
            # every re-send reached the server before any handler finishes: attached to the
            # request still pending, or queued anew when the cut came before the server had
            # read the original (a closing connection reads no more)
            await wait_until(
                lambda: (
                    app.counters.retries == attachable
                    and all(
                        set(ids[k]) <= set(s.pending) for k, s in zip(ids, sessions, strict=True)
                    )
                )
            )
            release.set()
            for k, c in enumerate(clients):
                answers: dict[str, dict[str, Any]] = {}
                while len(answers) < 10:
                    frame = await c.recv()
                    reply_to = frame.get("replyTo")
                    assert reply_to in ids[k] and reply_to not in answers, frame
                    answers[reply_to] = frame
                assert all(a["type"] == "work" for a in answers.values())
                assert {a["content"]["id"] for a in answers.values()} == set(ids[k])
                assert await until_pong(c) == []  # no second answer to anything
    assert runs == Counter({ident: 1 for k in ids for ident in ids[k]})


# ------------------------------------------------------------------ 6. safe retries


async def test_retry_of_an_answered_request_gets_the_original_answer_and_runs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Re-sending an answered id (same connection or after a resume) sends the original answer
    again under a new seq and runs nothing; different content under that id still gets the
    original answer, plus a WARNING in the server log, every time."""
    app = make_app()
    runs: Counter[str] = Counter()

    @app.handler("count")
    def count(message: Message) -> dict[str, Any]:
        runs[message.id] += 1
        return {"n": runs.total(), "x": message.content.get("x")}

    def warnings() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and "different content" in r.getMessage()
        ]

    async with serving(app):
        async with ws_connect(app.port) as c1:
            sid, epoch, _ = await start(c1)
            first = await c1.answer(await c1.send("count", {"x": 1}, id="a"))
            assert first["content"] == {"n": 1, "x": 1} and first["seq"] == 2
            again = await c1.answer(await c1.send("count", {"x": 1}, id="a"))
            assert (again["type"], again["content"], again["replyTo"]) == (
                "count",
                first["content"],
                "a",
            )
            assert again["seq"] == 3 and again["id"] != first["id"]
            assert warnings() == []
            other = await c1.answer(await c1.send("count", {"x": 2}, id="a"))
            assert other["content"] == first["content"] and other["seq"] == 4
            assert len(warnings()) == 1 and "msg=a" in warnings()[0]
        await detached(app, sid)
        async with ws_connect(app.port) as c2:
            before, _ = await resume(c2, sid, 4, epoch)
            assert before == []
            after = await c2.answer(await c2.send("count", {"x": 3}, id="a"))
            assert after["type"] == "count" and after["content"] == first["content"]
            assert len(warnings()) == 2
            assert await until_pong(c2) == []
    assert runs == {"a": 1}


async def test_retry_of_a_request_still_running_is_attached_one_answer_one_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A retry of an id still being handled is attached to the running request: one handler
    run, one terminal answer."""
    app = make_app()
    runs: Counter[str] = Counter()
    started, release = anyio.Event(), anyio.Event()

    @app.handler("slow")
    async def slow(message: Message) -> dict[str, Any]:
        runs[message.id] += 1
        started.set()
        await release.wait()
        return {"done": True}

    async with serving(app) as app, ws_connect(app.port) as c:
        await start(c)
        await c.send("slow", {}, id="b")
        with anyio.fail_after(5):
            await started.wait()
        await c.send("slow", {}, id="b")
        await wait_until(lambda: app.counters.retries == 1)
        release.set()
        answer = await c.answer("b")
        assert answer["content"] == {"done": True}
        assert await until_pong(c) == []
        assert [f["replyTo"] for f in c.frames].count("b") == 1
    assert runs == {"b": 1}
    assert any("retry attached" in r.getMessage() for r in caplog.records)


async def test_a_retried_error_answer_is_sent_counted_and_observed_like_any_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A retry of a request answered with an error gets that error again (same content), and
    each copy reaches ``error`` observers with the request (so abuse rules see repeats), is
    counted, and is logged only within the connection's refusal budget."""
    seen: list[tuple[str | None, str, str | None]] = []

    class Observer:
        @hookimpl
        def error(self, message_id: str | None, error: Any, message: Message | None) -> None:
            seen.append((message_id, error.code.value, message and message.id))

    app = make_app(plugins=[*STANDARD, Observer()])

    @app.handler("fails")
    def fails(message: Message) -> None:
        raise BackchannelError(ErrorCode.HANDLER_ERROR, "the backend is broken")

    async with serving(app) as app, ws_connect(app.port) as c:
        await start(c)
        first = await c.answer(await c.send("text", {"bogus": 1}, id="v"))
        assert first["content"]["code"] == "validation_failed"
        crashed = await c.answer(await c.send("fails", {}, id="h"))
        assert crashed["content"]["code"] == "handler_error"
        for _ in range(20):
            for type_, content, original in (("text", {"bogus": 1}, first), ("fails", {}, crashed)):
                again = await c.answer(await c.send(type_, content, original["replyTo"]))
                assert (again["type"], again["content"]) == ("error", original["content"])
                assert again["seq"] > original["seq"]
        assert await until_pong(c) == []
    assert seen == [("v", "validation_failed", "v"), ("h", "handler_error", "h")] * 21
    assert app.counters.retries == 40
    assert app.metrics()["errors"]["byCode"] == {"validation_failed": 21, "handler_error": 21}
    lines = [r.getMessage() for r in caplog.records if r.name == "backchannel.connection"]
    assert sum("msg=h" in line for line in lines) <= 2 + 5  # the first answer's, then budgeted
    assert any("more refusals" in line for line in lines)  # the rest summarised at close


async def test_a_retry_passes_the_validate_hooks_before_its_answer_is_sent_again() -> None:
    """A retry of an answered request passes the ``validate`` hooks like any request (the
    idempotency check comes after them, DESIGN §5): a hook refusing it answers with that
    refusal instead (not remembered), a hook that awaits delays it; a retry whose other
    content fails the type's schema is ``validation_failed`` without reaching the hooks
    (they may rely on the schema); the handler never runs twice."""
    verdicts: list[str] = []
    checked: list[str] = []

    class Gate:
        @hookimpl
        def validate(self, message: Message, connection: Connection) -> Any:
            checked.append(message.id)
            verdict = verdicts.pop(0) if verdicts else "pass"
            if verdict == "refuse":
                raise BackchannelError(ErrorCode.RATE_LIMITED, "slow down", extra={"retryAfter": 1})
            if verdict == "await":
                return anyio.sleep(0.01)
            return None

    app = make_app(plugins=[*STANDARD, Gate()])
    runs: Counter[str] = Counter()

    @app.handler("count")
    def count(message: Message) -> dict[str, Any]:
        runs[message.id] += 1
        return {"n": runs[message.id]}

    async with serving(app) as app, ws_connect(app.port) as c:
        await start(c)
        first = await c.answer(await c.send("count", {}, id="a"))
        verdicts.append("refuse")
        refused = await c.answer(await c.send("count", {}, id="a"))
        assert refused["content"] == {
            "code": "rate_limited",
            "message": "slow down",
            "retryAfter": 1,
        }
        for verdict in ("await", "pass"):
            verdicts.append(verdict)
            again = await c.answer(await c.send("count", {}, id="a"))
            assert (again["type"], again["content"]) == ("count", first["content"])
        invalid = await c.answer(await c.send("text", {"bogus": 1}, id="t"))
        again = await c.answer(await c.send("text", {"bogus": 1}, id="t"))
        assert again["content"] == invalid["content"]  # the original refusal, not checked
        text = await c.answer(await c.send("text", {"text": "hi"}, id="u"))
        other = await c.answer(await c.send("text", {"bogus": 1}, id="u"))
        assert other["content"]["code"] == "validation_failed"  # not the hooks' business
        assert (await c.answer(await c.send("text", {"text": "hi"}, id="u"))) == {
            **text,
            "id": ANY,
            "seq": ANY,
            "timestamp": ANY,
        }
        assert await until_pong(c) == []
    assert runs == {"a": 1}
    assert checked.count("a") == 4 and checked.count("t") == 0 and checked.count("u") == 2


# ------------------------------------------------------- 7. interrupted stream


async def test_stream_interrupted_by_disconnect_resumes_where_it_stopped() -> None:
    """Chunks made but not seen before a disconnect are replayed on resume, the rest follow
    live, every chunk arrives once in order and the terminal ack once."""
    app = make_app()
    half = anyio.Event()

    @app.handler("stream")
    async def stream(message: Message) -> AsyncIterator[dict[str, Any]]:
        for i in range(10):
            if i == 5:
                await half.wait()
            yield {"i": i}

    async with serving(app):
        async with ws_connect(app.port) as c1:
            sid, epoch, _ = await start(c1)
            await c1.send("stream", {}, id="st")
            seen = [await c1.recv() for _ in range(3)]  # chunks 0..2; 3 and 4 unread
            session = app.session(sid)
            await wait_until(lambda: session.seq == 6)
        await detached(app, sid)
        async with ws_connect(app.port) as c2:
            before, answer = await resume(c2, sid, seen[-1]["seq"], epoch)
            assert [f["content"]["i"] for f in before] == [3, 4]
            assert answer["content"]["missed"] == 2
            half.set()
            rest = []
            while not rest or rest[-1]["type"] != "ack":
                rest.append(await c2.recv())
            assert await until_pong(c2) == []  # the ack came once
        chunks = seen + before + rest[:-1]
        assert [f["content"]["i"] for f in chunks] == list(range(10))
        assert all(f["type"] == "chunk" and f["replyTo"] == "st" for f in chunks)
        assert seqs(seen + before + [answer] + rest) == list(range(2, 14))


# --------------------------------------------------------- 8. slow consumer 1013


async def test_slow_consumer_closed_1013_resumes_with_nothing_lost() -> None:
    """A client that stops reading is closed with 1013 while the server keeps producing; it
    resumes from the last seq it parsed and gets every later frame, in order."""
    app = make_app(
        {
            "connection": {"slow_consumer_timeout": 0.3},
            "heartbeat": {"interval": 30, "timeout": 5},
            "session": {"outbox_max_bytes": 8 << 20},
        }
    )
    pad = "x" * 8192

    @app.handler("flood")
    async def flood(message: Message, connection: Connection) -> None:
        i = 0
        while not app.counters.errors.get("slow_consumer") and i < 6000:
            connection.send("text", {"i": i, "pad": pad})
            i += 1
            await anyio.sleep(0)
        for _ in range(50):  # after the 1013: these reach the outbox only
            connection.send("text", {"i": i, "pad": pad})
            i += 1

    async with serving(app):
        async with raw_connect(app.port) as raw:
            assert await raw.handshake() == 101
            await raw.send("init", {}, id="i1")
            init = await raw.next_message()
            assert isinstance(init, dict) and init["seq"] == 1
            sid, epoch = init["content"]["sessionId"], init["content"]["epoch"]
            await raw.send("flood", {}, id="f")
            await wait_until(lambda: app.counters.errors.get("slow_consumer") == 1, timeout=10)
            session = app.session(sid)
            await wait_until(lambda: "f" not in session.pending)  # the flood ended (ack sent)
            parsed = [1]
            with anyio.fail_after(10):  # read what reached us, up to the close frame
                while isinstance(got := await raw.next_message(), dict):
                    assert got["seq"] == parsed[-1] + 1
                    parsed.append(got["seq"])
            assert got == 1013
        await detached(app, sid)
        total = session.seq
        assert total - parsed[-1] >= 51  # the 50 frames made after the close, and the ack
        async with ws_connect(app.port) as c:
            before, answer = await resume(c, sid, parsed[-1], epoch)
            assert answer["content"]["resumed"] is True
            assert answer["content"]["missed"] == total - parsed[-1]
            assert seqs(before) == list(range(parsed[-1] + 1, total + 1))
            texts = [f["content"]["i"] for f in before if f["type"] == "text"]
            assert texts == list(range(texts[0], texts[0] + len(texts)))
            assert before[-1]["type"] == "ack" and before[-1]["replyTo"] == "f"


# ------------------------------------------------------------------- 9. takeover


async def test_resuming_a_session_attached_elsewhere_takes_it_over_closing_the_other_4009() -> None:
    """Resuming a session still attached to a live connection moves it to the new one and
    closes the old one with 4009; the session stays attached (not expiring)."""
    async with serving(make_app()) as app, ws_connect(app.port) as c1:
        sid, epoch, _ = await start(c1)
        await c1.request("text", {"text": "x"})
        async with ws_connect(app.port) as c2:
            before, answer = await resume(c2, sid, 1, epoch)
            assert [f["content"]["text"] for f in before] == ["x"]
            assert answer["content"]["resumed"] is True and answer["seq"] == 3
            assert await c1.closed() == 4009
            await wait_until(lambda: len(app.connections()) == 1)
            session = app.session(sid)
            assert session.connection is app.connections()[0]
            assert (await c2.request("text", {"text": "y"}))["seq"] == 4
            assert await app.broker.find_session(sid) is not None
            assert sid not in app.broker.detached  # type: ignore[attr-defined]


# ---------------------------------------------------------------- in-memory kit


async def test_in_memory_disconnect_and_resume_replays_the_answer_made_while_away() -> None:
    """The socket-free kit shows the same promise: an answer made after ``close()`` is
    replayed by a resume on a new in-memory connection."""
    app = make_app(plugins=["init", "text"])
    go = anyio.Event()

    @app.handler("later")
    async def later(message: Message) -> dict[str, Any]:
        await go.wait()
        return {"ok": True}

    # c1's requests live in its block's task group: the resume happens inside it
    async with serve_in_memory(app), connect(app) as c1:
        init = await c1.request("init", {})
        sid, epoch = init["content"]["sessionId"], init["content"]["epoch"]
        c1.send("later", {}, id="L")
        c1.close()
        session = await detached(app, sid)
        go.set()
        await wait_until(lambda: session.seq == 2)
        async with connect(app) as c2:
            answer = await c2.request(
                "init", {"sessionId": sid, "lastSeq": 1, "epoch": epoch}, id="i2"
            )
            assert answer["content"]["resumed"] is True
            assert answer["content"]["missed"] == 1
            assert [(f["replyTo"], f["content"], f["seq"]) for f in c2.frames] == [
                ("L", {"ok": True}, 2),
                ("i2", answer["content"], 3),
            ]


# ---------------------------------------------------------- 10. bounded memory


SESSIONS = 10_000


def test_outbox_memory_of_10000_full_sessions_stays_within_the_configured_budget(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """10,000 sessions sent more than their outbox holds keep at most ``outbox_size`` frames and
    ``outbox_max_bytes`` bytes each (plus the fixed ``SESSION_COST``), and the memory really
    held stays near that budget."""
    outbox_size, outbox_max_bytes = 64, 16 << 10
    limits = {"outbox_size": outbox_size, "outbox_max_bytes": outbox_max_bytes}
    app = make_app({"session": {**limits, "total_max_bytes": 1 << 30}})  # room for all
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    text = "x" * 300  # ~410-byte frames: the byte bound is reached at ~40 of the 48 sent
    began = time.perf_counter()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        sessions = [Session(app._hub, f"anonymous:{n}") for n in range(SESSIONS)]
        for session in sessions:
            session.log = broker.open_session(session.id, session.principal_id)
            for i in range(48):
                session.send("text", {"text": text, "i": i})
        held = tracemalloc.get_traced_memory()[0] - base  # every allocation still alive
    finally:
        tracemalloc.stop()
    budget = SESSIONS * (outbox_max_bytes + SESSION_COST)
    logs = list(broker.sessions.values())
    assert len(logs) == SESSIONS
    for log in logs:
        assert len(log.frames) <= outbox_size and log.size <= outbox_max_bytes
        assert log.size > outbox_max_bytes - 512  # full: the bound, not the traffic, decided
    frame_bytes = broker.memory_bytes()
    assert frame_bytes <= budget
    # every allocation, as tracemalloc sees it: what the budget counts, within a few %
    assert held <= 1.05 * budget, f"{held / 1e6:.0f} MB held for a {budget / 1e6:.0f} MB budget"
    with capsys.disabled():
        print(
            f"\n{SESSIONS} full outboxes: counted {frame_bytes / 1e6:.1f} MB "
            f"(budget {budget / 1e6:.1f} MB), all session state {held / 1e6:.1f} MB, "
            f"{time.perf_counter() - began:.1f} s"
        )


async def test_retry_whose_answer_left_the_outbox_is_refused_not_run_again() -> None:
    """A retry of an answered request whose answer was trimmed gets an error; no second run."""
    app = App({"session": {"outbox_size": 5}}, plugins=["text"])
    runs: Counter[str] = Counter()

    @app.handler("count")
    def count(message: Message) -> dict[str, Any]:
        runs[message.id] += 1
        return {"runs": runs[message.id]}

    async with serve_in_memory(app), connect(app) as client:
        first = await client.request("count", {}, id="once")
        assert first["content"] == {"runs": 1}
        for _ in range(10):  # push the answer out of the 5-frame outbox
            await client.request("text", {"text": "filler"})
        again = await client.request("count", {}, id="once")
        assert again["type"] == "error" and again["content"]["code"] == "invalid_envelope"
        assert runs["once"] == 1
