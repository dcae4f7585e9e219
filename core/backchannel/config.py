"""Configuration: ``backchannel.toml``, environment overrides, CLI flags, one schema.

Precedence, lowest first: the schema's defaults, the TOML file (or the dict given to
``App``), environment variables ``BACKCHANNEL_<SECTION>__<KEY>`` (``__`` separates
levels; values are parsed as JSON when they parse, else taken as strings), then CLI
flags. The result is checked against ``schemas/config.schema.json`` and each enabled
plugin's own schema; every error names the dotted key and what is allowed. The kernel
reads its settings from one typed :class:`Settings`, built once from the checked dict.
"""

from __future__ import annotations

import copy
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .contracts import compile_schema, format_path, load_schema, rule
from .errors import StartupError

__all__ = [
    "ENV_PREFIX",
    "Settings",
    "apply_defaults",
    "check",
    "check_plugin",
    "kernel_schema",
    "load",
]

ENV_PREFIX = "BACKCHANNEL_"


def kernel_schema() -> dict[str, Any]:
    """The kernel's config schema (shipped as ``backchannel/schemas/config.schema.json``)."""
    return load_schema("backchannel", "config.schema.json")


def _parse_env_value(raw: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Nested settings from ``BACKCHANNEL_<SECTION>__<KEY>`` variables."""
    result: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        target = result
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = _parse_env_value(raw)
    return result


def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into ``base`` (tables merge, other values replace)."""
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def apply_defaults(schema: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Fill missing keys from the schema's ``default`` values, recursively."""
    for key, sub in schema.get("properties", {}).items():
        if key not in data and "default" in sub:
            data[key] = copy.deepcopy(sub["default"])
        if isinstance(data.get(key), dict) and sub.get("type") == "object":
            apply_defaults(sub, data[key])
    return data


def _node(root: Any, path: Any) -> Any:
    for part in path:
        root = root[part]
    return root


def _errors(schema: dict[str, Any], data: Any, prefix: str) -> list[str]:
    messages = []
    for error in compile_schema(schema).iter_errors(data):
        path = format_path(list(error.instance_path), prefix)
        if type(error.kind).__name__ == "AdditionalProperties":
            known = _node(schema, list(error.schema_path)[:-1]).get("properties", {})
            allowed = ", ".join(sorted(known)) or "none"
            for key in _node(data, list(error.instance_path)):
                if key not in known:
                    where = f"{path}.{key}" if error.instance_path or prefix else key
                    messages.append(f"{where}: unknown key (allowed: {allowed})")
        else:
            messages.append(f"{path}: {rule(error)}")
    return messages


def check(data: dict[str, Any]) -> dict[str, Any]:
    """Check kernel settings, fill defaults; raise :class:`StartupError` listing every problem."""
    schema = kernel_schema()
    problems = _errors(schema, data, "")
    if problems:
        raise StartupError("invalid config:\n  " + "\n  ".join(problems))
    return apply_defaults(schema, data)


def check_plugin(data: dict[str, Any], name: str, schema: dict[str, Any] | None) -> dict[str, Any]:
    """Check and default the ``[plugins.<name>]`` table against the plugin's schema."""
    plugins = data.setdefault("plugins", {})
    table: dict[str, Any] = plugins.setdefault(name, {})
    if schema is None:
        if table:
            keys = ", ".join(f"plugins.{name}.{k}" for k in table)
            raise StartupError(f"invalid config:\n  {keys}: plugin {name!r} takes no settings")
        return table
    problems = _errors(schema, table, f"plugins.{name}")
    if problems:
        raise StartupError("invalid config:\n  " + "\n  ".join(problems))
    return apply_defaults(schema, table)


def load(
    source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Read, merge and check the kernel config (plugins are checked when loaded).

    ``source`` is a TOML file, a dict shaped like one, or None (the defaults); the
    environment (``os.environ`` unless ``environ`` is given) overrides it the same way
    in all three cases, and ``overrides`` (CLI flags) override both.
    """
    data: dict[str, Any] = {}
    if isinstance(source, Mapping):
        merge(data, source)
    elif source is not None:
        path = source
        try:
            with Path(path).open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError as exc:
            raise StartupError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise StartupError(f"config file {path} is not valid TOML: {exc}") from exc
    merge(data, env_overrides(os.environ if environ is None else environ))
    if overrides:
        merge(data, overrides)
    return check(data)


# ------------------------------------------------------------------ typed settings
# One dataclass per section of schemas/config.schema.json, field for field (a test keeps
# them equal), so the kernel reads ``settings.session.ttl`` instead of string keys.


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str
    port: int
    backend: str
    uvloop: bool
    path: str
    max_connections: int
    max_message_size: int
    compression: str
    handshake_timeout: float
    origins: list[str] | None
    demo: bool
    workers: int


@dataclass(frozen=True, slots=True)
class HeartbeatSettings:
    interval: float
    timeout: float


@dataclass(frozen=True, slots=True)
class MessageSettings:
    timeout: float
    max_in_flight: int
    max_queued: int


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    send_queue_size: int
    slow_consumer_timeout: float


@dataclass(frozen=True, slots=True)
class SessionSettings:
    outbox_size: int
    outbox_max_bytes: int
    ttl: float
    dedupe_window: float
    dedupe_size: int
    total_max_bytes: int


@dataclass(frozen=True, slots=True)
class ShutdownSettings:
    grace: float


@dataclass(frozen=True, slots=True)
class HooksSettings:
    timeout: float


@dataclass(frozen=True, slots=True)
class AuthSettings:
    allow_anonymous: bool
    anonymous_permissions: list[str]


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str
    format: str


@dataclass(frozen=True, slots=True)
class Settings:
    """The kernel's settings, checked and defaulted (``app.settings``); plugin tables are
    read with ``app.plugin_config(name)``."""

    server: ServerSettings
    heartbeat: HeartbeatSettings
    message: MessageSettings
    connection: ConnectionSettings
    session: SessionSettings
    shutdown: ShutdownSettings
    hooks: HooksSettings
    auth: AuthSettings
    log: LogSettings
    #: enabled plugins, by name, in call order
    plugins: tuple[str, ...]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Settings:
        """Build from a config checked by :func:`check` (every kernel key present)."""
        sections = {name: kind(**cfg[name]) for name, kind in _SECTIONS.items()}
        return cls(plugins=tuple(cfg["plugins"]["enabled"]), **sections)


_SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "heartbeat": HeartbeatSettings,
    "message": MessageSettings,
    "connection": ConnectionSettings,
    "session": SessionSettings,
    "shutdown": ShutdownSettings,
    "hooks": HooksSettings,
    "auth": AuthSettings,
    "log": LogSettings,
}
