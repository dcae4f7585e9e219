"""Structured logs (issue 6 item 3): JSON or console lines with ids, levels, redaction.

Output is captured from the handler :func:`backchannel.logs.setup_logging`
installs (what ``backchannel serve`` uses), and grepped: secrets must not appear
in it whoever logged them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from backchannel import cli, hookimpl
from backchannel.errors import StartupError
from backchannel.logs import debug_enabled, redact, resolve_level, setup_logging
from conftest import ROOT, make_app, serving, ws_connect


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root and ``backchannel`` loggers back as they were."""
    root = logging.getLogger()
    ours = logging.getLogger("backchannel")
    handlers, root_level, level = list(root.handlers), root.level, ours.level
    yield
    root.handlers[:] = handlers
    root.setLevel(root_level)
    ours.setLevel(level)


def lines_of(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


class Crashes:
    """A type whose handler fails: the kernel logs it with a ref and the ids."""

    @hookimpl
    def message_types(self, register: Any) -> None:
        def crash(message: Any) -> None:
            raise RuntimeError("boom")

        register("crash", handler=crash)


# ------------------------------------------------------------------ formats


@pytest.mark.server_fault
@pytest.mark.anyio
async def test_json_lines_carry_connection_session_and_message_ids(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("DEBUG", "json", stream=out, environ={})
    app = make_app(plugins=["init", "text", "validation", Crashes()])
    async with serving(app), ws_connect(app.port) as client:
        init = await client.request("init", {})
        session_id = init["content"]["sessionId"]
        bad = await client.request("text", {"text": 5})
        crashed = await client.request("crash", {})
        connection_id = app.connections()[0].id
    records = [json.loads(line) for line in lines_of(out)]  # every line is one JSON object
    for record in records:
        assert {"ts", "level", "logger", "msg"} <= record.keys()
        assert record["ts"].endswith("Z") and record["logger"].startswith("backchannel")
    error = next(r for r in records if r["msg"].startswith("error validation_failed"))
    assert error["level"] == "INFO"
    assert (error["connection_id"], error["session_id"], error["message_id"]) == (
        connection_id,
        session_id,
        bad["replyTo"],
    )
    assert error["code"] == "validation_failed"
    failed = next(r for r in records if r.get("ref") == crashed["content"]["ref"])
    assert failed["level"] == "ERROR" and "RuntimeError: boom" in failed["exc"]
    # this call passes connection and message ids as extra; the session id comes from its words
    assert (failed["connection_id"], failed["session_id"], failed["message_id"]) == (
        connection_id,
        session_id,
        crashed["replyTo"],
    )


@pytest.mark.anyio
async def test_console_lines_show_the_ids(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("INFO", "console", stream=out, environ={})
    app = make_app()
    async with serving(app), ws_connect(app.port) as client:
        await client.request("nope", {})
        connection_id = app.connections()[0].id
    line = next(x for x in lines_of(out) if "error unknown_type" in x)
    assert " INFO backchannel.connection: error unknown_type" in line
    assert connection_id in line and "msg=r1" in line and "session=s-" in line
    logging.getLogger("backchannel.test").info("plain", extra={"connection_id": "c-42"})
    assert lines_of(out)[-1].endswith("plain [connection_id=c-42]")


# ---------------------------------------------------------------- redaction

SECRETS = ["qs-s3cret", "hdr-s3cret", "init-s3cret", "pw-s3cret"]
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"


class Chatty:
    """A plugin that logs far too much: the request line, headers, init content."""

    log = logging.getLogger("backchannel.chatty")

    @hookimpl
    def connect(self, connection: Any) -> None:
        request = connection.request
        self.log.info("connect %s headers=%s", request.target, request.headers)
        self.log.warning("auth header: %s", request.headers.get("authorization"))
        self.log.info("retrying with Authorization=%s", request.headers.get("x-raw-auth"))

    @hookimpl
    def message_received(self, message: Any, connection: Any) -> None:
        self.log.info(
            "received %s", message.content, extra={"payload": json.dumps(message.content)}
        )


@pytest.mark.parametrize("fmt", ["json", "console"])
@pytest.mark.anyio
async def test_tokens_and_secrets_never_reach_the_output(fmt: str, restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("DEBUG", fmt, stream=out, environ={})
    app = make_app(plugins=["init", "text", Chatty()])
    headers = {"Authorization": f"Bearer {SECRETS[1]}", "X-Raw-Auth": JWT}
    path = f"/ws?room=lobby&token={SECRETS[0]}&password={SECRETS[3]}"
    async with serving(app), ws_connect(app.port, path, additional_headers=headers) as client:
        await client.request("init", {"token": SECRETS[2]})
        await client.request("text", {"text": f"my jwt is {JWT}"})
    output = out.getvalue()
    assert "connect /ws?room=lobby&token=[REDACTED]" in output  # what is not secret stays
    assert "Bearer [REDACTED]" in output
    for secret in [*SECRETS, JWT, JWT.split(".")[1]]:
        assert secret not in output, f"{secret} leaked in:\n{output}"


def test_redact_keeps_ordinary_text() -> None:
    assert (
        redact("conn=c-1 session=s-2 msg=m3 code=1000") == "conn=c-1 session=s-2 msg=m3 code=1000"
    )
    assert redact("GET /ws?token=abc&room=x") == "GET /ws?token=[REDACTED]&room=x"
    assert (
        redact("{'authorization': 'Basic dXNlcjpwYXNz'}") == "{'authorization': 'Basic [REDACTED]'}"
    )
    assert redact('{"access_token": "abc", "n": 1}') == '{"access_token": "[REDACTED]", "n": 1}'
    assert redact("Authorization: abc123") == "Authorization: [REDACTED]"


# ------------------------------------------------------------------- levels


def test_level_precedence_flag_then_debug_then_env_then_config() -> None:
    env = {"BACKCHANNEL_LOG_LEVEL": "warning", "DEBUG": "backchannel:*"}
    assert resolve_level("ERROR", env, explicit="info") == "INFO"
    assert resolve_level("ERROR", env) == "DEBUG"
    assert resolve_level("ERROR", {"BACKCHANNEL_LOG_LEVEL": "warning"}) == "WARNING"
    assert resolve_level("ERROR", {}) == "ERROR"
    with pytest.raises(StartupError, match="BACKCHANNEL_LOG_LEVEL: 'loud' is not one of DEBUG"):
        resolve_level("INFO", {"BACKCHANNEL_LOG_LEVEL": "loud"})


@pytest.mark.parametrize(
    ("value", "enabled"),
    [
        ("backchannel:*", True),
        ("*", True),
        ("express:*,backchannel:*", True),
        ("backchannel*", True),
        ("express:* backchannel:app", True),
        ("*,-backchannel:*", False),
        ("express:*", False),
        ("", False),
        ("1", False),
    ],
)
def test_debug_variable_follows_the_npm_debug_convention(value: str, enabled: bool) -> None:
    assert debug_enabled(value) is enabled


def test_cli_sets_up_logging_from_config_env_and_flag(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = logging.getLogger("backchannel")
    monkeypatch.delenv("DEBUG", raising=False)
    monkeypatch.setenv("BACKCHANNEL_LOG_LEVEL", "ERROR")
    cli._setup_logging("INFO", "json")
    assert ours.level == logging.ERROR
    cli._setup_logging("INFO", "json", "debug")
    assert ours.level == logging.DEBUG
    monkeypatch.setenv("DEBUG", "backchannel:*")
    cli._setup_logging("INFO", "console")
    assert ours.level == logging.DEBUG
    installed = [h for h in logging.getLogger().handlers if type(h).__name__ == "_Installed"]
    assert len(installed) == 1  # set up three times, one handler


def test_serve_logs_json_at_debug_with_the_seed_debug_variable() -> None:
    """End to end: ``backchannel serve`` with ``log.format = json`` and ``DEBUG=backchannel:*``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKCHANNEL_")}
    env |= {"BACKCHANNEL_LOG__FORMAT": "json", "DEBUG": "backchannel:*"}
    env["BACKCHANNEL_PLUGINS__ENABLED"] = '["init", "text"]'
    cmd = [sys.executable, "-m", "backchannel.cli", "serve", "--port", "0", "--host", "127.0.0.1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    watchdog = threading.Timer(30, proc.kill)  # bounds every blocking read below
    watchdog.start()
    try:
        first = json.loads(proc.stderr.readline())
        assert first["msg"].startswith("listening on ws://127.0.0.1:"), first
        port = int(first["msg"].split(":")[2].split("/")[0])

        async def talk() -> None:
            async with ws_connect(port, "/ws?token=never-logged") as client:
                await client.request("text", {"text": "hi"})

        anyio.run(talk)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rest = proc.communicate(timeout=20)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            watchdog.cancel()
    records = [first] + [json.loads(line) for line in rest.splitlines() if line]
    closed = [r for r in records if r["msg"].startswith("closed conn=")]
    assert closed and closed[0]["level"] == "DEBUG"  # a 1000 close is logged at DEBUG only
    assert closed[0]["connection_id"].startswith("c-") and closed[0]["session_id"].startswith("s-")
    assert "never-logged" not in rest
