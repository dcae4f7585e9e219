"""Message contracts: the JSON codec, packaged JSON Schemas, compiled validators.

Validators are compiled once (``jsonschema-rs``) and reused for every message.
Errors shown to clients are built from the JSON path and the failed rule, never
from the validator's own message, which embeds the offending value.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import jsonschema_rs
import orjson

__all__ = [
    "Validator",
    "compile_schema",
    "decode",
    "encode",
    "format_path",
    "load_schema",
    "rule",
    "violations",
]

decode = orjson.loads
encode = orjson.dumps
Validator = jsonschema_rs.Draft202012Validator

_RULES: dict[str, str] = {
    "MaxLength": "longer than {limit} characters",
    "MinLength": "shorter than {limit} characters",
    "Maximum": "greater than {limit}",
    "Minimum": "less than {limit}",
    "ExclusiveMaximum": "not less than {limit}",
    "ExclusiveMinimum": "not greater than {limit}",
    "MaxItems": "more than {limit} items",
    "MinItems": "fewer than {limit} items",
    "MaxProperties": "more than {limit} properties",
    "MinProperties": "fewer than {limit} properties",
    "Pattern": "does not match {pattern}",
    "Required": "missing required property {property!r}",
    "Type": "must be of type {types_text}",
    "Enum": "must be one of {options_text}",
    "Constant": "must be {expected_value!r}",
}
_NAME_LIMIT = 64


def load_schema(package: str, name: str) -> dict[str, Any]:
    """Read JSON Schema ``name`` shipped in ``package``'s ``schemas`` directory.

    A missing file raises :class:`FileNotFoundError` naming the package, the file and where
    it was looked for (a distribution built without its schemas fails start-up saying so).
    """
    resource = files(package).joinpath("schemas", name)
    try:
        data = resource.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"package {package!r} has no schemas/{name} (looked for {resource}); "
            "was it built without its schemas?"
        ) from None
    schema: dict[str, Any] = orjson.loads(data)
    return schema


def compile_schema(schema: dict[str, Any]) -> Validator:
    """Compile a 2020-12 schema once; reuse the validator for every message."""
    return jsonschema_rs.Draft202012Validator(schema)


def format_path(parts: list[str | int] | tuple[str | int, ...], prefix: str = "") -> str:
    """Dotted JSON path: ``content.items[2].text``."""
    out = prefix
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out or "(root)"


def _show_name(name: str) -> str:
    """A client-chosen property name, clipped and with control characters escaped."""
    if len(name) > _NAME_LIMIT:
        name = name[: _NAME_LIMIT - 3] + "..."
    return name if name.isprintable() else repr(name)


def rule(error: jsonschema_rs.ValidationError) -> str:
    """The failed rule in words, without the offending value."""
    kind = error.kind
    name = type(kind).__name__
    if name == "AdditionalProperties":
        unexpected = dict(kind.as_dict()).get("unexpected") or []
        names = [_show_name(str(n)) for n in unexpected[:5]]
        return "unexpected properties: " + ", ".join(names) if names else "unexpected property"
    template = _RULES.get(name)
    if template is None:
        return f"fails rule {name}"
    data = dict(kind.as_dict())
    data["types_text"] = " or ".join(data.get("types", []))
    data["options_text"] = ", ".join(repr(o) for o in data.get("options", []))
    try:
        return template.format(**data)
    except (KeyError, IndexError):  # a kind whose fields changed upstream
        return f"fails rule {name}"


def violations(
    validator: Validator, instance: Any, prefix: str = "", limit: int = 10
) -> list[dict[str, str]]:
    """The first ``limit`` failures as ``{"path", "rule"}`` objects, safe to show.

    ``jsonschema-rs`` checks any depth, but cannot describe a failure inside a value
    nested 256 levels or more ("Recursion limit reached"): that instance is reported
    as one failure of the whole, without a traceback.
    """
    found = []
    try:
        for error in validator.iter_errors(instance):
            path = format_path(list(error.instance_path), prefix)
            found.append({"path": path, "rule": rule(error)})
            if len(found) >= limit:
                break
    except ValueError:
        return [{"path": prefix or "(root)", "rule": "invalid, and nested too deeply to say where"}]
    return found
