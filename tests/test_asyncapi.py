"""The AsyncAPI 3.0 document: every request type a server accepts, with its answer.

A running server (standard plugins, a third-party plugin declared inline, a handler that
declares nothing) serves ``/asyncapi.json``: it validates against the official AsyncAPI
3.0 JSON Schema (vendored in tests/asyncapi/, see its README), every ``$ref`` resolves,
and every registered type has its operation with its answer, chunks and error codes.
The answers the standard types really send match what they declare, and the committed
``docs/asyncapi.json`` is what ``backchannel asyncapi`` prints today.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jsonschema
import pytest

from backchannel import App, BackchannelError, ErrorCode, Message, hookimpl
from backchannel.asyncapi import document, dumps, registered_types
from backchannel.model import COMMON_ERRORS
from conftest import ROOT, STANDARD, make_app, serving, ws_connect

SPEC = json.loads((ROOT / "tests" / "asyncapi" / "asyncapi-3.0.0.schema.json").read_text())
ASYNCAPI = jsonschema.Draft7Validator(SPEC)
COMMITTED = ROOT / "docs" / "asyncapi.json"

FORECAST = {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}
HOUR = {
    "type": "object",
    "required": ["hour", "sky"],
    "properties": {"hour": {"type": "integer"}, "sky": {"enum": ["clear", "rain"]}},
}


class Weather:
    """A third-party plugin: one streaming type and one with a reply of another type."""

    name = "weather"

    @hookimpl
    def message_types(self, register: Callable[..., None]) -> None:
        register("forecast", schema=FORECAST, handler=self.forecast, chunks=HOUR)
        register(
            "weather.now",
            schema=FORECAST,
            handler=self.now,
            reply={"$ref": "#/$defs/sky", "$defs": {"sky": HOUR}},
            reply_type="weather.report",
            errors=[ErrorCode.FORBIDDEN, "rate_limited"],
            permission="weather:read",
        )

    async def forecast(self, message: Message) -> AsyncIterator[dict[str, Any]]:
        for hour in range(3):
            yield {"hour": hour, "sky": "clear"}

    def now(self, message: Message) -> Any:
        from backchannel import Reply

        if message.content["city"] == "Atlantis":
            raise BackchannelError(ErrorCode.FORBIDDEN, "content.city: not for you")
        return Reply("weather.report", {"hour": 12, "sky": "rain"})


def weather_app() -> App:
    app = make_app(plugins=[*STANDARD, Weather()])

    @app.handler("undeclared")
    def undeclared(message: Message) -> dict[str, Any]:
        return {"anything": True}

    return app


def resolve(doc: dict[str, Any], ref: str) -> Any:
    """The node a local ``$ref`` points at (JSON pointer), or KeyError."""
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def test_the_vendored_schema_rejects_what_asyncapi_3_forbids() -> None:
    """The validator is not vacuous: a 2.x document, a bad action, a bad payload fail."""
    doc = document({}, host="localhost:8765", path="/ws", version="0.1.0")
    assert ASYNCAPI.is_valid(doc)
    assert not ASYNCAPI.is_valid({**doc, "asyncapi": "2.6.0"})
    broken = json.loads(json.dumps(doc))
    broken["operations"]["cancel"]["action"] = "publish"
    assert not ASYNCAPI.is_valid(broken)
    broken = json.loads(json.dumps(doc))
    broken["components"]["schemas"]["frame"]["type"] = 3
    assert not ASYNCAPI.is_valid(broken)


@pytest.mark.anyio
async def test_a_running_server_describes_every_type_it_accepts() -> None:
    """GET /asyncapi.json on a server with standard plugins, a third-party one and an inline
    handler: valid AsyncAPI 3.0, every $ref resolves, and each registered type (cancel too)
    has a receive operation whose reply lists its answer, its chunks and an error with its
    codes."""
    app = weather_app()
    async with serving(app):
        assert app.port is not None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.port}") as http:
            response = await http.get("/asyncapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    doc = response.json()
    ASYNCAPI.validate(doc)
    for ref in refs(doc):
        resolve(doc, ref)
    assert doc["servers"]["backchannel"]["host"] == f"127.0.0.1:{app.port}"
    assert doc["channels"]["connection"]["address"] == "/ws"
    types = app.message_types()
    assert set(doc["operations"]) == {*types, "cancel", "push"}
    channel = doc["channels"]["connection"]["messages"]
    for name, contract in types.items():
        operation = doc["operations"][name]
        assert operation["action"] == "receive"
        (request,) = operation["messages"]
        payload = resolve(doc, resolve(doc, request["$ref"])["$ref"])["payload"]
        assert payload["allOf"][1]["properties"]["type"] == {"const": name}
        answers = {ref["$ref"].rsplit("/", 1)[1] for ref in operation["reply"]["messages"]}
        assert answers <= set(channel)
        codes = [code.value for code in contract.error_codes()]
        assert operation["x-backchannel"]["errors"] == codes
        error = resolve(doc, f"#/components/messages/error.{name}")["payload"]
        assert error["allOf"][1]["properties"]["content"]["allOf"][1] == {
            "properties": {"code": {"enum": codes}}
        }
        assert {code.value for code in COMMON_ERRORS} <= set(codes)
        expected = {f"error.{name}"}
        if contract.chunks is not None:
            expected |= {"ack", f"chunk.{name}"}
        elif contract.reply_type == "ack":
            expected |= {"ack"}
        elif contract.reply_type is None:
            expected |= {f"reply.{name}", "chunk", "ack"}
        else:
            expected |= {f"reply.{name}"}
        assert answers == expected, name
    now = doc["operations"]["weather.now"]["x-backchannel"]
    assert now == {
        "plugin": "weather",
        "permission": "weather:read",
        "timeout": 30.0,
        "replyType": "weather.report",
        "streams": False,
        "errors": [code.value for code in ErrorCode if code in COMMON_ERRORS | {"forbidden"}],
    }
    report = resolve(doc, "#/components/messages/reply.weather.now")["payload"]
    assert report["allOf"][1]["properties"]["type"] == {"const": "weather.report"}
    sky = resolve(doc, "#/components/schemas/reply.weather.now")
    assert resolve(doc, sky["$ref"]) == HOUR  # the reply's own $ref, rewritten to the doc
    assert resolve(doc, "#/components/schemas/chunk.forecast") == HOUR
    assert doc["operations"]["forecast"]["x-backchannel"]["streams"] is True
    assert doc["operations"]["undeclared"]["x-backchannel"]["replyType"] is None


@pytest.mark.anyio
async def test_the_answers_sent_match_the_declared_contracts() -> None:
    """Each standard type's real answer (and the third party's chunks and error) over a real
    socket matches what it registered: the reply's type and content schema, chunk schema,
    and an error code among its codes."""
    app = weather_app()
    async with serving(app):
        assert app.port is not None
        types = app.message_types()
        requests = [
            ("init", {}),
            ("text", {"text": "hi"}),
            ("ping", {"clientTime": 1}),
            ("system", {"event": "notice", "message": "tea"}),
            ("join", {"room": "lobby"}),
            ("presence", {"room": "lobby"}),
            ("text", {"text": "hello, room", "room": "lobby"}),
            ("leave", {"room": "lobby"}),
            ("weather.now", {"city": "Paris"}),
            ("weather.now", {"city": "Atlantis"}),
            ("leave", {"room": "nowhere"}),
            ("forecast", {"city": "Paris"}),
        ]
        async with ws_connect(app.port) as client:
            for kind, content in requests:
                contract = types[kind]
                ident = await client.send(kind, content)
                chunks = []
                while True:
                    frame = await client.recv()
                    if frame.get("replyTo") != ident:
                        continue  # a room message, a presence event, the system notice
                    if frame["type"] != "chunk":
                        break
                    chunks.append(frame["content"])
                if frame["type"] == "error":
                    assert frame["content"]["code"] in contract.error_codes(), (kind, frame)
                    continue
                assert frame["type"] == contract.reply_type, (kind, frame)
                if isinstance(contract.reply, dict):
                    jsonschema.Draft202012Validator(contract.reply).validate(frame["content"])
                if contract.chunks is not None:
                    assert len(chunks) == 3
                    for chunk in chunks:
                        jsonschema.Draft202012Validator(contract.chunks).validate(chunk)
                else:
                    assert chunks == []
    errors = [f for f in client.frames if f["type"] == "error"]
    assert [f["content"]["code"] for f in errors] == ["forbidden", "validation_failed"]


def test_standard_types_declare_their_answers() -> None:
    """Every type our plugins register says what answers it (no undeclared contract)."""
    app = App(ROOT / "backchannel.production.toml", environ={})  # every standard type
    assert "auth.refresh" in registered_types(app)
    for name, contract in registered_types(app).items():
        assert contract.reply_type is not None, name
    assert registered_types(app)["ping"].reply_type == "pong"
    assert registered_types(app)["leave"].reply == "ack"
    assert ErrorCode.FORBIDDEN in registered_types(app)["system"].error_codes()


def test_asyncapi_command_prints_the_committed_document() -> None:
    """``docs/asyncapi.json`` is what ``backchannel asyncapi`` prints for the production
    config (every standard type): regenerate it (README, "Other languages") when a schema
    or a registration changes."""
    config = ROOT / "backchannel.production.toml"
    result = subprocess.run(
        [sys.executable, "-m", "backchannel.cli", "asyncapi", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    ASYNCAPI.validate(json.loads(result.stdout))
    assert result.stdout == COMMITTED.read_text(), (
        "docs/asyncapi.json is stale: run  uv run backchannel asyncapi --config "
        "backchannel.production.toml > docs/asyncapi.json"
    )
    assert dumps(json.loads(result.stdout)) == result.stdout


def test_asyncapi_command_reports_a_bad_config_in_one_line(tmp_path: Any) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[plugins]\nenabled = ["text", "nosuchplugin"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "backchannel.cli", "asyncapi", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("backchannel: ") and "nosuchplugin" in result.stderr
