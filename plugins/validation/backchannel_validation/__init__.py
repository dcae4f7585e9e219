"""Request limits beyond each type's own schema: sizes, lengths, depth, allowed types.

Runs as a ``validate`` hook after the type's content schema. Errors name the JSON
path and the rule, never the offending value. With ``sanitize`` on, control
characters (except tab and newline) are removed from strings directly in
``content`` before the handler sees them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson

from backchannel import App, BackchannelError, Connection, ErrorCode, Message, hookimpl
from backchannel.contracts import Validator, compile_schema, load_schema, violations

__all__ = ["Plugin", "depth"]

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f]")


def depth(value: Any) -> int:
    """Nesting depth of objects and arrays (a scalar is 0), iteratively."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if type(node) is dict else node if type(node) is list else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def _fail(code: ErrorCode, path: str, rule: str) -> BackchannelError:
    return BackchannelError(code, f"{path}: {rule}", details=[{"path": path, "rule": rule}])


class Plugin:
    """The ``validate`` hook with the ``[plugins.validation]`` limits."""

    def __init__(self) -> None:
        self.max_len = 8000
        self.max_depth = 16
        self.max_bytes: int | None = None
        self.allowed: frozenset[str] | None = None
        self.sanitize = True
        self.extra: dict[str, Validator] = {}

    @hookimpl
    def config_schema(self) -> dict[str, Any]:
        return load_schema("backchannel_validation", "validation.config.schema.json")

    @hookimpl
    def startup(self, app: App) -> None:
        cfg = app.plugin_config("validation")
        self.max_len = cfg["max_string_length"]
        self.max_depth = cfg["max_depth"]
        self.max_bytes = cfg["max_bytes"]
        allowed = cfg["allowed_types"]
        self.allowed = None if allowed is None else frozenset(allowed)
        self.sanitize = cfg["sanitize"]
        self.extra = {
            name: compile_schema(orjson.loads(Path(path).read_bytes()))
            for name, path in cfg["schemas"].items()
        }

    @hookimpl
    def validate(self, message: Message, connection: Connection) -> None:
        if self.allowed is not None and message.type not in self.allowed:
            raise BackchannelError(
                ErrorCode.TYPE_NOT_ALLOWED, f"message type {message.type!r} is not allowed here"
            )
        if self.max_bytes is not None and message.size > self.max_bytes:
            raise _fail(ErrorCode.TOO_LARGE, "(message)", f"larger than {self.max_bytes} bytes")
        content = message.content
        for key, value in content.items():
            if type(value) is str:
                if len(value) > self.max_len:
                    raise _fail(
                        ErrorCode.VALIDATION_FAILED,
                        f"content.{key}",
                        f"longer than {self.max_len} characters",
                    )
                if self.sanitize and _CONTROL.search(value):
                    content[key] = _CONTROL.sub("", value)
            elif (type(value) is dict or type(value) is list) and depth(value) >= self.max_depth:
                raise _fail(
                    ErrorCode.VALIDATION_FAILED,
                    f"content.{key}",
                    f"nested deeper than {self.max_depth} levels",
                )
        extra = self.extra.get(message.type)
        if extra is not None and not extra.is_valid(content):
            details = violations(extra, content, "content")
            text = "; ".join(f"{d['path']}: {d['rule']}" for d in details[:3])
            raise BackchannelError(ErrorCode.VALIDATION_FAILED, text, details=details)
