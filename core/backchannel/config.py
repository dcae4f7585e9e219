"""Configuration: ``backchannel.toml``, environment overrides, CLI flags, one schema.

Precedence, lowest first: the schema's defaults, the TOML file (or the dict given to
``App``), environment variables ``BACKCHANNEL_<SECTION>__<KEY>`` (``__`` separates
levels; values are parsed as JSON when they parse, else taken as strings), then CLI
flags. The result is checked against ``schemas/config.schema.json`` and each enabled
plugin's own schema; every error names the dotted key and what is allowed, the variable
when the value came from the environment, and the closest key or variable when a name
is misspelled. The kernel reads its settings from one typed :class:`Settings`, built
once from the checked dict.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
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
    "env_overrides",
    "invalid",
    "kernel_schema",
    "load",
    "unknown_tables",
]

ENV_PREFIX = "BACKCHANNEL_"
#: ``BACKCHANNEL_*`` variables that are no setting (read elsewhere): never a near miss
OTHER_VARIABLES = frozenset({"BACKCHANNEL_LOG_LEVEL"})


def kernel_schema() -> dict[str, Any]:
    """The kernel's config schema (shipped as ``backchannel/schemas/config.schema.json``)."""
    return load_schema("backchannel", "config.schema.json")


def _parse_env_value(raw: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw


def _env_path(name: str) -> tuple[str, ...] | None:
    """The settings path a ``BACKCHANNEL_A__B`` variable sets (None: no ``__``, no setting)."""
    if not name.startswith(ENV_PREFIX) or "__" not in name:
        return None
    return tuple(p.lower() for p in name[len(ENV_PREFIX) :].split("__"))


def env_name(path: Iterable[str | int]) -> str:
    """The variable that sets ``path``: ``("server", "port")`` -> ``BACKCHANNEL_SERVER__PORT``."""
    return ENV_PREFIX + "__".join(str(p).upper() for p in path)


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Nested settings from ``BACKCHANNEL_<SECTION>__<KEY>`` variables."""
    result: dict[str, Any] = {}
    for name, raw in environ.items():
        parts = _env_path(name)
        if parts is None:
            continue
        target = result
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = _parse_env_value(raw)
    return result


def _env_sources(environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Settings path -> the variable that set it."""
    return {parts: name for name in environ if (parts := _env_path(name)) is not None}


def _env_names(schema: dict[str, Any], path: tuple[str, ...] = ()) -> list[str]:
    """The variable of every key ``schema`` declares (tables and their keys), under ``path``."""
    names = []
    for key, sub in schema.get("properties", {}).items():
        names.append(env_name((*path, key)))
        if isinstance(sub, dict):
            names += _env_names(sub, (*path, key))
    return names


def _declared(schema: dict[str, Any], path: Iterable[str]) -> bool:
    """Whether ``schema`` has a key at ``path`` (or a table there that takes any key)."""
    node = schema
    for part in path:
        properties = node.get("properties", {})
        if part in properties:
            node = properties[part]
        else:
            return node.get("additionalProperties", True) is not False
    return True


def _near_misses(
    environ: Mapping[str, str], schema: dict[str, Any], scope: tuple[str, ...] = ()
) -> list[str]:
    """A problem for each ``BACKCHANNEL_*`` variable in ``scope`` (the kernel's, or one
    plugin's ``("plugins", name)``) that sets no key of ``schema`` but looks like the
    variable of one (``BACKCHANNEL_SERVER_PORT``), naming the variable meant."""
    names = {re.sub("_+", "_", name): name for name in _env_names(schema, scope)}
    plugins = f"{ENV_PREFIX}PLUGINS_"
    problems = []
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var in OTHER_VARIABLES:
            continue
        path = _env_path(var)
        if scope and (path is None or path[: len(scope)] != scope):
            continue  # another plugin's, or the kernel's
        if path is not None and _declared(schema, path[len(scope) :]):
            continue
        flat = re.sub("_+", "_", var)
        meant = names.get(flat)
        if meant is None:
            close = difflib.get_close_matches(flat, names, n=1, cutoff=0.9)
            meant = names[close[0]] if close else None
        if meant is not None:
            problems.append(
                f"{var} is not a setting; did you mean {meant}? (levels are separated by __)"
            )
        elif not scope and flat.startswith(plugins) and (path is None or path[0] != "plugins"):
            problems.append(
                f"{var} is not a setting: a plugin's settings are "
                f"{plugins}_<NAME>__<KEY> (levels are separated by __)"
            )
    return problems


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


def _where(
    path: tuple[str | int, ...], sources: Mapping[tuple[str, ...], str]
) -> tuple[str, str | None]:
    """The dotted key of ``path``, with the variable that set it, a table holding it or a key
    under it; and that variable when it set the value itself or a table holding it."""
    dotted = format_path(list(path))
    keys = tuple(str(p) for p in path)
    for end in range(len(keys), 0, -1):
        var = sources.get(keys[:end])
        if var is not None:
            return f"{dotted} (from {var})", var
    under = sorted(var for key, var in sources.items() if key[: len(keys)] == keys)
    return (f"{dotted} (from {under[0]})" if under else dotted), None


def _json_hint(
    error: Any, var: str | None, environ: Mapping[str, str], schema: dict[str, Any]
) -> str:
    """For a list or table given as a plain string in the environment: how to write it."""
    if var is None or type(error.kind).__name__ != "Type":
        return ""
    wanted = set(dict(error.kind.as_dict()).get("types", []))
    if not wanted & {"array", "object"} or not isinstance(_parse_env_value(environ[var]), str):
        return ""
    example = schema.get("default")
    if not example:
        example = ["a", "b"] if "array" in wanted else {"key": "value"}
    shown = orjson.dumps(example).decode().replace('","', '", "')
    return f"; the environment gives lists and tables as JSON: {var}='{shown}'"


def _errors(
    schema: dict[str, Any],
    data: Any,
    prefix: tuple[str, ...] = (),
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    environ = environ or {}
    sources = _env_sources(environ)
    messages = []
    for error in compile_schema(schema).iter_errors(data):
        path = (*prefix, *error.instance_path)
        if type(error.kind).__name__ == "AdditionalProperties":
            known = _node(schema, list(error.schema_path)[:-1]).get("properties", {})
            allowed = ", ".join(sorted(known)) or "none"
            for key in _node(data, list(error.instance_path)):
                if key not in known:
                    where, _ = _where((*path, key), sources)
                    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                    hint = f", did you mean {close[0]!r}?" if close else ""
                    messages.append(f"{where}: unknown key{hint} (allowed: {allowed})")
        else:
            where, var = _where(path, sources)
            node = _node(schema, list(error.schema_path)[:-1])
            messages.append(f"{where}: {rule(error)}{_json_hint(error, var, environ, node)}")
    return messages


def invalid(problems: list[str]) -> StartupError:
    """One problem on one line; several, one per line under a heading."""
    if len(problems) == 1:
        return StartupError(f"invalid config: {problems[0]}")
    return StartupError("invalid config:\n  " + "\n  ".join(problems))


def check(data: dict[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Check kernel settings, fill defaults; raise :class:`StartupError` listing every problem
    (a value from ``environ`` is reported with its variable)."""
    schema = kernel_schema()
    problems = _near_misses(environ or {}, schema) or _errors(schema, data, (), environ)
    if problems:
        raise invalid(problems)
    return apply_defaults(schema, data)


def check_plugin(
    data: dict[str, Any],
    name: str,
    schema: dict[str, Any] | None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Check and default the ``[plugins.<name>]`` table against the plugin's schema."""
    plugins = data.setdefault("plugins", {})
    table: dict[str, Any] = plugins.setdefault(name, {})
    sources = _env_sources(environ or {})
    if schema is None:
        if table:
            keys = ", ".join(_where(("plugins", name, k), sources)[0] for k in table)
            raise invalid([f"{keys}: plugin {name!r} takes no settings"])
        return table
    path = ("plugins", name)
    problems = _near_misses(environ or {}, schema, path) or _errors(schema, table, path, environ)
    if problems:
        raise invalid(problems)
    return apply_defaults(schema, table)


def unknown_tables(
    data: Mapping[str, Any], known: Iterable[str], environ: Mapping[str, str] | None = None
) -> list[str]:
    """A problem for each ``[plugins.<name>]`` table naming no plugin in ``known``."""
    names = sorted(set(known))
    sources = _env_sources(environ or {})
    problems = []
    for table in data.get("plugins", {}):
        if table == "enabled" or table in names:
            continue
        where, _ = _where(("plugins", table), sources)
        close = difflib.get_close_matches(table, names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(
            f"{where}: settings for a plugin that is neither enabled nor installed{hint} "
            f"(installed: {', '.join(names) or 'none'})"
        )
    return problems


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
    environ = os.environ if environ is None else environ
    merge(data, env_overrides(environ))
    if overrides:
        merge(data, overrides)
    return check(data, environ)


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
    send_queue_bytes: int
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
