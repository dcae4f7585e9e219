"""Session memory within budgets (issue 11 item 5).

One byte budget per session (``session.outbox_max_bytes``) counts what the session keeps,
dedupe records included, at what it costs in memory; one total for the process
(``session.total_max_bytes``) evicts the sessions detached longest ago first, and their
resume is answered ``resumed: false`` with reason ``evicted``. The costs the budgets count
are checked against what tracemalloc sees, and the eviction over a real socket.
"""

from __future__ import annotations

import gc
import logging
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from zlib import crc32

import anyio
import pytest

from backchannel import App, Message, Session
from backchannel.broker import ANSWER_COST, SESSION_COST
from backchannel.memory import EVICTED_COST, FRAME_COST, MemoryBroker
from conftest import make_app, serving, ws_connect

pytestmark = pytest.mark.anyio

#: what issue 11 asks a busy session to stay within, with the default settings
BUSY_SESSION_BYTES = 16 << 10


@contextmanager
def traced() -> Iterator[list[int]]:
    """Bytes allocated (and still alive) inside the block, by tracemalloc: ``[n]``."""
    grown = [0]
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        yield grown
        gc.collect()
        grown[0] = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()


def kept_session(app: App, principal: str = "alice") -> Session:
    """A session kept as a connection's is once authenticated (no connection attached)."""
    hub = app._hub
    session = Session(hub, principal)
    session.log = app.broker.open_session(session.id, principal)
    hub.sessions[session.id] = session
    return session


def answer(session: Session, request_id: str, text: str = "hello") -> None:
    """What answering a ``text`` request does to its session: the answer frame, kept and
    remembered with the request's digest, as the pipeline does it."""
    raw = f'{{"id":"{request_id}","type":"text","content":{{"text":"{text}"}}}}'.encode()
    message = Message(request_id, "text", {"text": text}, size=len(raw), digest=crc32(raw))
    session.pending[request_id] = message
    session.send("text", {"text": text, "from": session.principal_id}, request_id)
    del session.pending[request_id]


def memory_broker(app: App) -> MemoryBroker:
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    return broker


# ------------------------------------------------------------------ what is counted


def test_the_costs_counted_are_what_the_memory_really_holds() -> None:
    """Per session, per kept frame and per remembered answer, the broker counts at least what
    tracemalloc sees allocated, and no more than a fifth above it."""
    app = make_app({"session": {"outbox_max_bytes": 1 << 30, "total_max_bytes": 1 << 40}})
    broker = memory_broker(app)
    n = 2000
    with traced() as empty:
        sessions = [kept_session(app, f"p{i}") for i in range(n)]
    counted = broker.memory_bytes()
    assert counted == n * SESSION_COST
    assert empty[0] <= counted <= 1.2 * empty[0], (empty[0] / n, SESSION_COST)

    with traced() as held:
        for session in sessions:
            for i in range(30):  # ids as clients make them, decoded from each request
                answer(session, f"c-{session.id[-6:]}-{i}")
    grew = broker.memory_bytes() - counted
    assert held[0] <= grew <= 1.2 * held[0], (held[0] / n / 30, FRAME_COST, ANSWER_COST)


def test_a_busy_session_holds_at_most_16_kib_with_the_default_settings() -> None:
    """A session answering requests without end keeps at most ``outbox_max_bytes`` (13 KiB)
    plus its fixed cost: at most 16 KiB in all, as tracemalloc sees it, remembered answers
    (the newest ``dedupe_size``) included."""
    app = make_app()
    session = app.settings.session
    assert (session.outbox_max_bytes, session.dedupe_size) == (13 << 10, 32)
    broker = memory_broker(app)
    answer(kept_session(app, "warm-up"), "w")  # first-call caches are not the session's
    with traced() as held:
        busy = kept_session(app)
        for i in range(5000):
            answer(busy, f"c1-{i}", text="x" * (i % 200))
    log = broker.sessions[busy.id]
    assert log.size <= session.outbox_max_bytes and len(log.answers) == session.dedupe_size
    assert log.size + SESSION_COST <= BUSY_SESSION_BYTES
    assert held[0] <= BUSY_SESSION_BYTES, held[0]
    # the newest answers are remembered, and the newest frames kept
    assert list(log.answers) == [f"c1-{i}" for i in range(5000 - 32, 5000)]
    assert log.last_seq == 5000 and log.size > session.outbox_max_bytes - 600  # full


def test_remembered_answers_count_toward_the_session_budget() -> None:
    """Answers cost their id plus ``ANSWER_COST`` within ``outbox_max_bytes``: the oldest
    frames go first to make room for them, then the oldest answers."""
    budget = 8 << 10
    app = make_app({"session": {"outbox_max_bytes": budget, "dedupe_size": 48}})
    broker = memory_broker(app)
    short, long = kept_session(app, "short"), kept_session(app, "long")
    for i in range(200):
        answer(short, f"s{i}")
        answer(long, f"{i:04d}-" + "x" * 120)
    for session in (short, long):
        log = broker.sessions[session.id]
        frames = sum(len(f) + FRAME_COST for f in log.frames)
        answers = sum(len(k) + ANSWER_COST for k in log.answers)
        assert log.size == frames + answers <= budget
    short_log, long_log = broker.sessions[short.id], broker.sessions[long.id]
    assert len(short_log.answers) == 48 and short_log.frames  # bounded by count, frames fit
    assert not long_log.frames  # 48 long answers do not fit: no frame is kept...
    assert len(long_log.answers) == budget // (125 + ANSWER_COST)  # ...and the newest answers
    assert list(long_log.answers)[-1].startswith("0199-")


# ------------------------------------------------------------------ the process total


def small_broker(sessions: int, per_session: int = 1024) -> MemoryBroker:
    """A broker whose total holds ``sessions`` sessions full to ``per_session`` bytes (and
    512 bytes more: room for a few records of evicted sessions)."""
    total = sessions * (SESSION_COST + per_session) + 512
    return MemoryBroker(outbox_max_bytes=per_session, total_max_bytes=total)


def fill(broker: MemoryBroker, session_id: str, frames: int = 10) -> None:
    """Open session ``session_id`` and send it ``frames`` frames of 100 bytes."""
    log = broker.open_session(session_id, "alice")
    for seq in range(1, frames + 1):
        log.append(seq, b"x" * 100, None)


async def test_past_the_total_the_sessions_detached_longest_ago_are_evicted_first() -> None:
    broker = small_broker(3)
    for sid in ("s-a", "s-b", "s-c"):
        fill(broker, sid)
    broker.detach_session("s-b", 10, ttl=60)
    broker.detach_session("s-a", 10, ttl=60)
    broker.detach_session("s-c", 10, ttl=60)
    broker.attach_session("s-c", 10)  # resumed: no longer detached
    assert broker.memory_bytes() <= broker.total_max_bytes and not broker.expired_sessions()

    fill(broker, "s-d")  # over the total: s-b goes (detached first), s-a stays
    assert broker.memory_bytes() <= broker.total_max_bytes
    assert broker.expired_sessions() == ["s-b"]  # the kernel forgets it
    assert await broker.find_session("s-b") is None and broker.evicted_session("s-b")
    assert not broker.evicted_session("s-a") and await broker.find_session("s-a") is not None
    fill(broker, "s-e")
    assert broker.expired_sessions() == ["s-a"] and broker.evicted_session("s-a")
    assert set(broker.sessions) == {"s-c", "s-d", "s-e"}
    assert broker.sizes()["evicted"] == 2
    assert broker.memory_bytes() == sum(
        SESSION_COST + log.size for log in broker.sessions.values()
    ) + sum(len(sid) + EVICTED_COST for sid in broker.evicted)
    assert broker.memory_bytes() <= broker.total_max_bytes


async def test_records_of_evicted_sessions_are_bounded_and_go_when_they_would_expire() -> None:
    """An evicted session's id is remembered (so its resume says ``evicted``) until it would
    have expired, within a 32nd of the total (the oldest record goes first), and before
    any frame when nothing detached is left to evict."""
    broker = small_broker(8)
    cap = broker.total_max_bytes // 32 // (len("s-old-10") + EVICTED_COST)
    assert cap == 5
    for n in range(14):  # from the 9th on, each evicts the oldest detached one
        fill(broker, f"s-old-{n:02d}")
        broker.detach_session(f"s-old-{n:02d}", 10, ttl=0.2)
    assert broker.sizes()["evicted"] == 6 and list(broker.evicted) == [
        f"s-old-{n:02d}" for n in range(1, 6)
    ]
    await anyio.sleep(0.3)
    assert len(broker.expired_sessions()) == 14 and not broker.evicted
    assert broker.memory_bytes() == 0

    broker = small_broker(2)
    fill(broker, "s-1")
    fill(broker, "s-2")
    broker.detach_session("s-1", 10, ttl=60)
    fill(broker, "s-3")  # evicts s-1: its record stays
    assert broker.evicted_session("s-1") and broker.memory_bytes() <= broker.total_max_bytes
    fill(broker, "s-4", frames=0)  # nothing detached: the record goes, then frames
    assert not broker.evicted_session("s-1") and broker.sizes()["shedFrames"] > 0
    assert broker.memory_bytes() <= broker.total_max_bytes


def test_with_nothing_detached_sessions_give_up_their_oldest_frames(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Attached sessions are never evicted: past the total, the session that grows sheds its
    oldest frames, then the others do in turn (a warning once, until the memory is back
    under the total). Only the fixed costs of attached sessions can pass the total."""
    caplog.set_level(logging.WARNING, logger="backchannel.broker")
    broker = small_broker(2)
    fill(broker, "s-1")
    fill(broker, "s-2")
    fill(broker, "s-3", frames=30)  # its own frames go first, then s-1's and s-2's
    assert broker.memory_bytes() <= broker.total_max_bytes
    kept = [len(broker.sessions[sid].frames) for sid in ("s-1", "s-2", "s-3")]
    assert kept[0] < 7 and kept[1] < 7 and sum(kept) > 0, kept
    assert broker.sizes()["shedFrames"] > 0 and not broker.expired_sessions()
    warnings = [r.getMessage() for r in caplog.records if "session memory full" in r.getMessage()]
    assert len(warnings) == 1 and "no detached session" in warnings[0]
    for n in range(4, 6):  # fixed costs only: nothing to shed, nothing evicted
        fill(broker, f"s-{n}", frames=0)
    assert broker.memory_bytes() <= 5 * SESSION_COST and set(broker.sessions) == {
        f"s-{n}" for n in range(1, 6)
    }


# ------------------------------------------------------------------ over a real socket


async def test_a_resume_of_an_evicted_session_says_evicted_and_the_client_starts_anew() -> None:
    """A detached session is evicted when attached ones need the room; the client resuming
    it is told ``resumed: false, reason: evicted`` and continues in a new session."""
    per_session = 4096  # room for two full sessions and a bit: a third one evicts
    total = 2 * (SESSION_COST + per_session) + SESSION_COST + 1000
    app = make_app({"session": {"outbox_max_bytes": per_session, "total_max_bytes": total}})
    async with serving(app):
        async with ws_connect(app.port) as first:
            init = await first.request("init", {})
            sid, epoch = init["content"]["sessionId"], init["content"]["epoch"]
            for i in range(20):
                await first.request("text", {"text": f"hello {i}"})
        with anyio.fail_after(5):
            while app.session(sid) is None or app.session(sid).connection is not None:
                await anyio.sleep(0.01)
        busy: list[Any] = []
        async with ws_connect(app.port) as a, ws_connect(app.port) as b:
            for client in (a, b):
                for i in range(40):
                    busy.append(await client.request("text", {"text": "x" * 100 + str(i)}))
            with anyio.fail_after(5):  # the kernel forgets it within a second (the sweep)
                while app.session(sid) is not None:
                    await anyio.sleep(0.01)
            async with ws_connect(app.port) as again:
                content = {"sessionId": sid, "lastSeq": 21, "epoch": epoch}
                answer_ = await again.request("init", content)
                assert answer_["content"]["resumed"] is False
                assert answer_["content"]["reason"] == "evicted"
                assert answer_["content"]["sessionId"] != sid
                redo = await again.request("text", {"text": "hello 19"})
                assert redo["type"] == "text"
        assert app.broker.sizes()["evicted"] >= 1  # type: ignore[attr-defined]
    assert all(frame["type"] == "text" for frame in busy)
