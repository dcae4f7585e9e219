"""Wire protocol v1 over a real socket: answers, errors, seq, subprotocol, HTTP routes."""

from __future__ import annotations

import json
import logging

import anyio
import pytest

from conftest import make_app, serving, ws_connect

pytestmark = pytest.mark.anyio


async def test_init_text_ping_answers_with_reply_to_and_increasing_seq() -> None:
    async with serving(make_app()) as app, ws_connect(app.port) as c:
        assert c.ws.subprotocol == "backchannel.v1"
        init = await c.request("init", {})
        assert init["type"] == "init" and init["replyTo"] == "r1"
        assert init["content"]["sessionId"].startswith("s-")
        assert init["content"]["resumed"] is False
        text = await c.request("text", {"text": "hello"})
        assert text["content"]["text"] == "hello"
        pong = await c.request("ping", {"clientTime": 5})
        assert pong["type"] == "pong" and pong["content"]["clientTime"] == 5
        assert [f["seq"] for f in c.frames] == [1, 2, 3]


async def test_client_without_subprotocol_is_accepted() -> None:
    async with serving(make_app()) as app, ws_connect(app.port, subprotocols=None) as c:
        assert c.ws.subprotocol is None
        assert (await c.request("text", {"text": "x"}))["type"] == "text"


BAD_INPUT = [
    ("not json", None, "bad_json"),
    ('{"id": "a", "type": ', None, "bad_json"),
    ("[" * 2000 + "]" * 2000, None, "bad_json"),
    ("[1, 2]", None, "invalid_envelope"),
    ('"just a string"', None, "invalid_envelope"),
    ('{"type": "text", "content": {"text": "x"}}', None, "invalid_envelope"),
    ('{"id": "", "type": "text"}', None, "invalid_envelope"),
    (json.dumps({"id": "x" * 129, "type": "text"}), None, "invalid_envelope"),
    ('{"id": "m1"}', "m1", "invalid_envelope"),
    ('{"id": "m2", "type": "text", "content": "str"}', "m2", "invalid_envelope"),
    ('{"id": "m3", "type": "text", "extra": 1}', "m3", "invalid_envelope"),
    ('{"id": "m4", "type": "no.such.type"}', "m4", "unknown_type"),
    ('{"id": "m5", "type": "text", "content": {"text": 5}}', "m5", "validation_failed"),
    ('{"id": "m6", "type": "text", "content": {}}', "m6", "validation_failed"),
    (
        json.dumps({"id": "m7", "type": "text", "content": {"text": "x" * 8001}}),
        "m7",
        "validation_failed",
    ),
    ('{"id": "m8", "type": "system", "content": {"event": "notice", "message": "x"}}', "m8", None),
]


@pytest.mark.parametrize(("payload", "reply_to", "code"), BAD_INPUT)
async def test_bad_input_gets_one_documented_error_and_connection_stays(
    payload: str, reply_to: str | None, code: str | None, caplog_bc: pytest.LogCaptureFixture
) -> None:
    async with serving(make_app()) as app, ws_connect(app.port) as c:
        await c.send_raw(payload)
        frame = await c.recv()
        if code is None:  # system needs no special permission for anonymous by default
            assert frame["type"] == "system"
            return
        assert frame["type"] == "error"
        assert frame["replyTo"] == reply_to
        assert frame["content"]["code"] == code
        assert "x" * 100 not in json.dumps(frame)  # never echoes the offending value
        assert app.counters.errors[code] == 1
        assert any(code in r.getMessage() for r in caplog_bc.records)
        # the connection still works
        assert (await c.request("text", {"text": "still here"}))["type"] == "text"


async def test_binary_frame_gets_bad_json_and_connection_stays() -> None:
    async with serving(make_app()) as app, ws_connect(app.port) as c:
        await c.send_raw(b"\x00\x01binary")
        frame = await c.recv()
        assert frame["content"]["code"] == "bad_json" and frame["replyTo"] is None
        assert (await c.request("ping"))["type"] == "pong"


async def test_validation_sanitizes_control_characters() -> None:
    async with serving(make_app()) as app, ws_connect(app.port) as c:
        reply = await c.request("text", {"text": "a\x00b\x07c\nd"})
        assert reply["content"]["text"] == "abc\nd"


async def test_oversized_frame_closes_1009_and_server_keeps_serving() -> None:
    app = make_app({"server": {"max_message_size": 1024}})
    async with serving(app):
        async with ws_connect(app.port) as c:
            await c.send("text", {"text": "x" * 2000})
            assert await c.closed() == 1009
        async with ws_connect(app.port) as c:
            assert (await c.request("text", {"text": "ok"}))["type"] == "text"


async def test_healthz_and_readyz_on_the_same_port() -> None:
    async with serving(make_app()) as app:
        stream = await anyio.connect_tcp("127.0.0.1", app.port)
        async with stream:
            await stream.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            with anyio.fail_after(5):
                while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                    data += await stream.receive()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        health = json.loads(body)
        assert health["status"] == "ok" and health["ready"] is True
        assert set(health) >= {"status", "uptime", "connections", "version", "timestamp"}


async def test_unknown_path_is_404_and_plain_get_on_ws_path_is_426() -> None:
    async with serving(make_app()) as app:
        for path, status in (("/nope", b"404"), ("/ws", b"426")):
            stream = await anyio.connect_tcp("127.0.0.1", app.port)
            async with stream:
                await stream.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                with anyio.fail_after(5):
                    data = await stream.receive()
            assert data.split(b" ")[1] == status, data


async def test_every_error_is_logged_with_connection_session_and_message_ids(
    caplog_bc: pytest.LogCaptureFixture,
) -> None:
    async with serving(make_app()) as app, ws_connect(app.port) as c:
        await c.request("init", {})
        frame = await c.request("no-such-type")
        assert frame["content"]["code"] == "unknown_type"
    records = [r for r in caplog_bc.records if getattr(r, "code", None) == "unknown_type"]
    assert records and records[0].levelno == logging.INFO
    rec = records[0]
    assert rec.message_id == "r2" and rec.connection_id.startswith("c-")  # type: ignore[attr-defined]
    assert rec.session_id.startswith("s-")  # type: ignore[attr-defined]
