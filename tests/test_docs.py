"""Tests that keep the reference honest: hookspec docs, the error-code set, the schemas."""

from __future__ import annotations

import inspect
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from backchannel import App, ErrorCode, hookspecs
from conftest import ROOT

SCHEMAS = sorted((ROOT / "schemas").glob("*.json"))


def specs() -> dict[str, Any]:
    """Every function of ``hookspecs`` marked as a hookspec."""
    marker = f"{hookspecs.PROJECT}_spec"
    return {
        name: func
        for name, func in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(func, marker)
    }


def test_hookspecs_are_found() -> None:
    """The marker lookup finds the hooks DESIGN §3 requires (so the next test is not vacuous)."""
    required = {"startup", "shutdown", "authenticate", "connect", "disconnect", "validate"}
    required |= {"handle", "on_error", "message_types", "wrap_handler", "broker"}
    required |= {"http_routes", "cli_commands", "message_received", "message_sent", "alert"}
    assert required <= set(specs())


@pytest.mark.parametrize("name", sorted(specs()))
def test_every_hookspec_has_a_docstring(name: str) -> None:
    """Each hookspec documents itself (when it is called, arguments, return)."""
    doc = inspect.getdoc(specs()[name])
    assert doc and len(doc) > 40, f"hookspec {name!r} needs a docstring"


def test_error_codes_equal_the_schema_enum() -> None:
    """``ErrorCode`` and ``error.schema.json`` list the same closed set, in the same order."""
    schema = json.loads((ROOT / "schemas" / "error.schema.json").read_text())
    assert [code.value for code in ErrorCode] == schema["$defs"]["code"]["enum"]


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.name)
def test_schema_id_matches_its_file_name(path: Path) -> None:
    """A schema's ``$id`` ends with its own file name (so ``$ref`` by name resolves)."""
    schema = json.loads(path.read_text())
    assert schema["$id"] == f"https://backchannel.dev/schemas/{path.name}"


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.name)
def test_schema_is_valid_draft_2020_12(path: Path) -> None:
    """Every schema declares 2020-12 and passes the 2020-12 meta-schema."""
    schema = json.loads(path.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_schema_directory_is_not_empty() -> None:
    """The parametrized schema tests above really ran over the contracts."""
    names = {p.name for p in SCHEMAS}
    assert {"envelope.schema.json", "error.schema.json", "config.schema.json"} <= names


def test_the_scaling_guide_config_is_valid() -> None:
    """The configuration docs/scaling.md shows loads, plugins and all (as ``backchannel check``)."""
    text = (ROOT / "docs" / "scaling.md").read_text()
    # the first block; the Redis Cluster example is checked and served by the redis
    # plugin's tests (plugins/redis/tests/test_cluster_config.py)
    block = re.findall(r"```toml\n(.*?)```", text, re.S)[0]
    app = App(tomllib.loads(block))
    assert "redis" in app.config["plugins"]["enabled"]
    assert app.plugin_config("redis")["key_prefix"] == "chat-prod"
