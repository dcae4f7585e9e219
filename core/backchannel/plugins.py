"""Finding and loading plugins: only the ones named in config are imported.

An installed plugin is an entry point in group ``backchannel.plugins`` whose name
is the plugin's name everywhere (config, settings table, pluggy registration).
It points at a class (instantiated once per App, so state is never global) or a
module (registered as it is).
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .errors import StartupError

__all__ = ["GROUP", "PluginInfo", "installed", "load", "name_of"]

GROUP = "backchannel.plugins"


@dataclass(frozen=True)
class PluginInfo:
    """An installed plugin as the package metadata describes it (nothing imported)."""

    name: str
    distribution: str
    version: str
    entry_point: EntryPoint


def installed() -> dict[str, PluginInfo]:
    """Every installed plugin by name, read from entry points without importing any."""
    found: dict[str, PluginInfo] = {}
    for ep in entry_points(group=GROUP):
        dist = ep.dist
        found[ep.name] = PluginInfo(
            name=ep.name,
            distribution=dist.name if dist else "?",
            version=dist.version if dist else "?",
            entry_point=ep,
        )
    return found


def load(name: str, available: dict[str, PluginInfo] | None = None) -> Any:
    """Import plugin ``name`` and return the object to register with pluggy.

    Raises :class:`StartupError` naming the installed plugins when ``name`` is
    unknown, and naming the distribution when its import fails.
    """
    available = installed() if available is None else available
    info = available.get(name)
    if info is None:
        names = ", ".join(sorted(available)) or "none"
        close = difflib.get_close_matches(name, available, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise StartupError(
            f"plugin {name!r} is enabled in config but not installed{hint} "
            f"(installed plugins: {names}); install the distribution "
            f"'backchannel-{name}' (pip install backchannel-{name}) or remove it from "
            f"plugins.enabled"
        )
    try:
        obj = info.entry_point.load()
        return obj() if inspect.isclass(obj) else obj
    except Exception as exc:
        raise StartupError(
            f"plugin {name!r} from distribution {info.distribution!r} {info.version} "
            f"failed to load: {type(exc).__name__}: {exc}"
        ) from exc


def name_of(plugin: object) -> str | None:
    """The name of the installed plugin whose entry point names ``plugin``'s class (so an
    instance made in a test gets its settings table), else None."""
    cls = type(plugin)
    target = f"{cls.__module__}:{cls.__qualname__}"
    for ep in entry_points(group=GROUP):
        if ep.value == target:
            return ep.name
    return None
