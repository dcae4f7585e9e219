"""The ``validation`` plugin: limits, allowed types, extra schemas, sanitizing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from backchannel_validation import depth

from backchannel import App, Message
from backchannel.testing import connect, serve_in_memory

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def validating_app(**settings: Any) -> App:
    """The validation plugin with ``settings`` and an ``echo`` type returning its content."""
    app = App({"plugins": {"validation": settings}}, plugins=["validation"])

    @app.handler("echo")
    def echo(message: Message) -> dict[str, Any]:
        return message.content

    app.handler("other")(lambda m: None)
    return app


async def answer(app: App, type: str, content: Any, raw: str | None = None) -> dict[str, Any]:
    async with serve_in_memory(app), connect(app) as client:
        if raw is not None:
            client.send_raw(raw)
            return await client.answer("raw")
        return await client.request(type, content)


def test_depth_counts_nesting() -> None:
    """``depth`` is 0 for scalars and counts nested objects and arrays."""
    assert depth("x") == 0
    assert depth({}) == 1
    assert depth({"a": [1, {"b": []}]}) == 4


async def test_long_string_fails_naming_path_and_rule_without_the_value() -> None:
    """A string over ``max_string_length`` names ``content.<key>`` and the limit."""
    app = validating_app(max_string_length=10)
    err = await answer(app, "echo", {"text": "y" * 11})
    assert err["content"] == {
        "code": "validation_failed",
        "message": "content.text: longer than 10 characters",
        "details": [{"path": "content.text", "rule": "longer than 10 characters"}],
    }
    assert (await answer(app, "echo", {"text": "y" * 10}))["content"] == {"text": "y" * 10}


async def test_deep_nesting_fails() -> None:
    """Content nested deeper than ``max_depth`` is refused; at the limit it passes."""
    app = validating_app(max_depth=3)
    ok = {"a": {"b": {"c": 1}}}
    assert (await answer(app, "echo", ok))["content"] == ok
    err = await answer(app, "echo", {"a": {"b": {"c": [1]}}})
    assert err["content"]["code"] == "validation_failed"
    assert err["content"]["details"] == [
        {"path": "content.a", "rule": "nested deeper than 3 levels"}
    ]


async def test_type_outside_allowed_types_is_type_not_allowed() -> None:
    """With ``allowed_types`` set, another registered type is ``type_not_allowed``."""
    app = validating_app(allowed_types=["echo"])
    assert (await answer(app, "echo", {"x": 1}))["type"] == "echo"
    err = await answer(app, "other", {})
    assert err["content"] == {
        "code": "type_not_allowed",
        "message": "message type 'other' is not allowed here",
    }


@pytest.mark.parametrize(("text", "expected"), [("a" * 40, "echo"), ("é" * 40, "error")])
async def test_max_bytes_counts_utf8_bytes(text: str, expected: str) -> None:
    """A request over ``max_bytes`` UTF-8 bytes (not characters) is ``too_large``."""
    app = validating_app(max_bytes=100)
    raw = json.dumps({"id": "raw", "type": "echo", "content": {"t": text}}, ensure_ascii=False)
    assert len(raw) <= 100 and (len(raw.encode()) > 100) == (expected == "error")
    reply = await answer(app, "echo", None, raw=raw)
    assert reply["type"] == expected
    if expected == "error":
        assert reply["content"]["code"] == "too_large"
        assert reply["content"]["details"] == [
            {"path": "(message)", "rule": "larger than 100 bytes"}
        ]


@pytest.mark.parametrize(
    ("sanitize", "expected"), [(True, "ab\tc\nd"), (False, "a\x00b\tc\nd\x7f")]
)
async def test_sanitize_strips_control_characters(sanitize: bool, expected: str) -> None:
    """``sanitize`` removes control characters except tab and newline; off keeps them."""
    app = validating_app(sanitize=sanitize)
    reply = await answer(app, "echo", {"text": "a\x00b\tc\nd\x7f"})
    assert reply["content"]["text"] == expected


async def test_extra_schema_file_per_type(tmp_path: Path) -> None:
    """``schemas = {type = path}`` adds a content schema for that type from a file."""
    schema = {
        "type": "object",
        "required": ["city"],
        "properties": {"city": {"type": "string", "maxLength": 20}},
    }
    path = tmp_path / "echo.schema.json"
    path.write_text(json.dumps(schema))
    app = validating_app(schemas={"echo": str(path)})
    assert (await answer(app, "echo", {"city": "Oslo"}))["content"] == {"city": "Oslo"}
    err = await answer(app, "echo", {"town": "Oslo"})
    assert err["content"]["code"] == "validation_failed"
    assert err["content"]["details"] == [
        {"path": "content", "rule": "missing required property 'city'"}
    ]
    assert (await answer(app, "other", {"town": "Oslo"}))["type"] == "ack"  # other types untouched
