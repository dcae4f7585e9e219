"""Refused requests over real sockets, against ``backchannel serve --config
backchannel.production.toml`` (jwt, anonymous connections off, ratelimit on, JSON logs):
issue 11 items 1 (deep nesting), 2 (no principal, nothing learned) and 6 (the kernel's
refusal log rate).

Each server is a subprocess on this test's backend; its log is read back line by line
(one JSON object each) to check that no refusal wrote an ERROR or a traceback.
"""

from __future__ import annotations

import json
import time
from contextlib import suppress
from typing import Any

import anyio
import pytest
from websockets.exceptions import ConnectionClosed

from conftest import ORIGIN, WsClient, production, records, token_for, tracebacks, ws_connect

pytestmark = pytest.mark.anyio

#: every type the production config registers, with content that is otherwise valid
TYPES: list[tuple[str, dict[str, Any]]] = [
    ("init", {}),
    ("text", {"text": "hi"}),
    ("ping", {}),
    ("system", {"event": "notice", "message": "hi"}),
    ("join", {"room": "lobby"}),
    ("leave", {"room": "lobby"}),
    ("presence", {"room": "lobby"}),
    ("auth.refresh", {"token": "x"}),
]


def nested(levels: int) -> str:
    """``{"a": {"a": ...}}``, ``levels`` deep, as JSON text (300 levels: 1.8 KB)."""
    return '{"a":' * levels + "{}" + "}" * levels


def request(type_: str, content: dict[str, Any], deep: str, id: str = "r") -> str:
    """A request of ``type_`` whose content is ``content`` plus ``"deep": deep``."""
    head = json.dumps({"id": id, "type": type_, "content": content})[:-2]  # no "}}"
    return f'{head}{", " if content else ""}"deep": {deep}}}}}'


async def refused(
    client: WsClient, type_: str, content: dict[str, Any], code: str, deep: str | None = None
) -> dict[str, Any]:
    """Send a request (its content plus ``deep`` nesting, if given); check its error code."""
    if deep is None:
        answer = await client.request(type_, content)
    else:
        ident = f"deep-{len(client.frames)}"  # a new id each time: not a retry
        await client.send_raw(request(type_, content, deep, id=ident))
        answer = await client.answer(ident)
    assert answer["type"] == "error", (type_, answer)
    assert answer["content"]["code"] == code, (type_, answer["content"])
    return answer


async def flood_until_closed(client: WsClient, payloads: list[str]) -> list[dict[str, Any]]:
    """Send ``payloads`` while reading the answers, until the server closes the connection;
    the frames it sent."""
    frames: list[dict[str, Any]] = []

    async def send() -> None:
        with suppress(ConnectionClosed):  # closed before all were sent
            for payload in payloads:
                await client.send_raw(payload)

    async with anyio.create_task_group() as tg:
        tg.start_soon(send)
        with suppress(ConnectionClosed):
            while True:
                frames.append(await client.recv(10))
    return frames


async def test_without_a_token_every_request_but_init_is_unauthorized(anyio_backend: str) -> None:
    """Item 2: a connection without a principal learns nothing about the server's types or
    schemas: invalid content, an unknown type and 300 levels of nesting, for every type,
    are all ``unauthorized``, and none of it is logged as an error."""
    deep = nested(300)
    async with production(anyio_backend) as (served, secret):
        async with ws_connect(served.port, origin=ORIGIN) as client:
            await refused(client, "no.such.type", {}, "unauthorized")
            await refused(client, "text", {"bogus": 1}, "unauthorized")
            for type_, content in TYPES[1:]:
                await refused(client, type_, content, "unauthorized")
                await refused(client, type_, content, "unauthorized", deep)
            # init is the one type it may send: its content is checked like anyone's
            answer = await refused(client, "init", {}, "validation_failed", deep)
            assert answer["content"]["details"][0]["path"] == "content"
            welcome = await client.request("init", {"token": token_for(secret, "alice")})
            assert welcome["content"]["principal"] == "alice"
            await refused(client, "no.such.type", {}, "unknown_type")
            await refused(client, "text", {"bogus": 1}, "validation_failed")
        assert tracebacks(served) == []


async def test_deep_nesting_is_validation_failed_without_a_traceback(anyio_backend: str) -> None:
    """Item 1: with a token, content nested 256+ levels deep is ``validation_failed`` for
    every type (one violation of the whole, not a ``handler_error``), logs no traceback,
    and costs what any refusal costs: the abuse rule closes the connection (1008) after
    its 101st refusal (the abuse budget refills at 10/s meanwhile), and another client is
    served all along."""
    async with production(anyio_backend) as (served, secret):
        headers = {"Authorization": f"Bearer {token_for(secret, 'alice')}"}
        async with ws_connect(served.port, origin=ORIGIN, additional_headers=headers) as client:
            for levels in (256, 300, 1000):
                for type_, content in TYPES:
                    deep = nested(levels)
                    answer = await refused(client, type_, content, "validation_failed", deep)
                    assert answer["content"]["details"] == [
                        {"path": "content", "rule": "invalid, and nested too deeply to say where"}
                    ]
        headers = {"Authorization": f"Bearer {token_for(secret, 'bob')}"}
        async with (
            ws_connect(served.port, origin=ORIGIN, additional_headers=headers) as flood,
            ws_connect(served.port, origin=ORIGIN, additional_headers=headers) as other,
        ):
            payloads = [request("text", {"text": "hi"}, nested(600), f"x{n}") for n in range(1000)]
            frames = await flood_until_closed(flood, payloads)
            assert {f["content"]["code"] for f in frames} == {"validation_failed"}
            # 100 refusals allowed in 10 s, then the 101st closes (plus one per 0.1 s taken)
            assert await flood.closed() == 1008 and 101 <= len(frames) <= 120
            assert (await other.request("text", {"text": "still here"}))["type"] == "text"
        assert tracebacks(served) == []


async def test_ten_thousand_refusals_log_a_few_lines_and_a_summary(anyio_backend: str) -> None:
    """Item 6 (the kernel's part): 10,000 refused requests from one connection (abuse
    closing off, so all are answered) log at most ``REFUSALS_LOGGED`` (5) lines per
    ``REFUSAL_INTERVAL`` (10 s), then one summary line counting the rest."""
    sent = 10_000
    settings = {"BACKCHANNEL_PLUGINS__RATELIMIT__ABUSE_REJECTIONS": "false"}
    async with production(anyio_backend, **settings) as (served, _):
        began = time.monotonic()
        async with ws_connect(served.port, origin=ORIGIN) as client:
            payload = json.dumps({"id": "x", "type": "text", "content": {"text": "hi"}})

            async def flood() -> None:
                for _ in range(sent):
                    await client.send_raw(payload)

            async with anyio.create_task_group() as tg:
                tg.start_soon(flood)
                for _ in range(sent):
                    frame = await client.recv(30)
                    assert frame["content"]["code"] == "unauthorized"
        elapsed = time.monotonic() - began
        with anyio.fail_after(10):  # the summary is written when the connection is gone
            while not any("more refusals" in r["msg"] for r in records(served)):
                await anyio.sleep(0.05)
        lines = [r for r in records(served) if r["msg"].startswith("error unauthorized")]
        summaries = [r for r in records(served) if "more refusals from conn=" in r["msg"]]
        intervals = int(elapsed // 10) + 1
        assert 5 <= len(lines) <= 5 * intervals, (len(lines), elapsed)
        assert 1 <= len(summaries) <= intervals
        assert len(lines) + sum(r["suppressed"] for r in summaries) == sent
        assert {r["connection_id"] for r in lines + summaries} == {lines[0]["connection_id"]}
        assert tracebacks(served) == []
        print(f"\n{sent} refusals in {elapsed:.1f} s: {len(lines) + len(summaries)} log lines")


async def test_a_thousand_retries_of_one_id_are_rate_limited_then_cut_off(
    anyio_backend: str,
) -> None:
    """Item 4 (found by review): re-sending an answered id 1,000 times is not 1,000 free
    answers. A replayed answer passes the rate limiter (the connection's burst of 50, then
    ``rate_limited``); a replayed refusal counts toward the abuse rule like the first:
    either way the connection is closed 1008 after its 101st refusal."""
    async with production(anyio_backend) as (served, secret):
        headers = {"Authorization": f"Bearer {token_for(secret, 'alice')}"}
        for content, first in [({"text": "hi"}, None), ({"bogus": 1}, "validation_failed")]:
            async with ws_connect(served.port, origin=ORIGIN, additional_headers=headers) as c:
                payload = json.dumps({"id": "same", "type": "text", "content": content})
                frames = await flood_until_closed(c, [payload] * 1000)
                assert {f["replyTo"] for f in frames} == {"same"}
                codes = [f["content"].get("code") for f in frames]
                assert await c.closed() == 1008
                assert 101 <= len(codes) - codes.count(None) <= 120
                if first is None:  # answered, replayed while the bucket had tokens, refused
                    replayed = codes.index("rate_limited")
                    assert 50 <= replayed <= 60 and set(codes[:replayed]) == {None}
                    # (once its copies and refusals pushed the answer out of the session's
                    # outbox, a retry is told it was answered: invalid_envelope)
                    assert set(codes[replayed:]) <= {None, "rate_limited", "invalid_envelope"}
                else:  # the same refusal each time, each counted (then invalid_envelope)
                    assert codes[:20] == [first] * 20  # 20 copies fit in any outbox
                    assert set(codes) <= {first, "invalid_envelope"}
        assert tracebacks(served) == []
