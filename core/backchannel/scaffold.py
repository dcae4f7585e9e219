"""``backchannel new-plugin NAME``: a third-party plugin package, ready to test and build.

The files come from ``backchannel/templates/plugin/`` (package data): a tree whose paths
say ``MODULE``, ``NAME`` and ``SNAKE`` where the package name, the plugin name and the
plugin name with ``_`` for ``-`` go, and whose ``.tmpl``
files hold ``{{key}}`` placeholders. The result (the datasette plugin template is the
model): a pyproject building with hatchling (schemas in wheel and sdist), the entry
point, one message type with its JSON Schema, a streaming handler, settings with
defaults, a README and tests on the test kit that pass as generated (``uv run pytest``).
"""

from __future__ import annotations

import json
import re
from importlib import metadata
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import StartupError

__all__ = ["NAME_RULE", "kernel_source", "new_plugin"]

#: a plugin name: what ``plugins.enabled`` accepts, and a valid message type name
NAME_RULE = re.compile(r"^[a-z][a-z0-9_-]{0,40}$")
_TEMPLATE = "templates/plugin"
_DOTTED = {"gitignore": ".gitignore"}


def kernel_source() -> str | None:
    """Where the running kernel was installed from, when that was a local wheel or
    directory (``direct_url.json``, PEP 610): the generated project's uv finds it there
    until ``backchannel`` is on an index. None for an install from an index."""
    raw = metadata.distribution("backchannel").read_text("direct_url.json")
    if not raw:
        return None
    url = urlparse(json.loads(raw).get("url", ""))
    return unquote(url.path) if url.scheme == "file" else None


def _values(name: str) -> dict[str, str]:
    module = "backchannel_" + name.replace("-", "_")
    version = metadata.version("backchannel")
    major, minor = (int(part) for part in version.split(".")[:2])
    sources = ""
    source = kernel_source()
    if source is not None:
        sources = (
            "\n# Where uv finds the kernel while `backchannel` is not on an index: the one this\n"
            "# project was made with. Remove it once the kernel is published; pip and other\n"
            "# build tools never read it.\n"
            f"[tool.uv.sources]\nbackchannel = {{ path = {json.dumps(source)} }}\n"
        )
    return {
        "name": name,
        "NAME": name.upper(),
        "module": module,
        "dist": f"backchannel-{name}",
        "wheel": f"{module}-0.1.0-py3-none-any.whl",
        "requirement": f"backchannel>={major}.{minor},<{major}.{minor + 1}",
        "sources": sources,
    }


def _render(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def _files(root: Traversable, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    """Every template file under ``root``: its path parts and its text."""
    found = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            found += _files(entry, (*prefix, entry.name))
        elif entry.name.endswith(".tmpl"):
            found.append(((*prefix, entry.name.removesuffix(".tmpl")), entry.read_text()))
    return found


def new_plugin(name: str, parent: Path) -> Path:
    """Write the package of plugin ``name`` into ``parent/backchannel-<name>``; return that
    directory. Raises :class:`StartupError` for a bad name or an existing directory."""
    if not NAME_RULE.match(name):
        raise StartupError(
            f"plugin name {name!r}: lower-case letters, digits, '_' and '-', starting with a "
            "letter (it is also the message type's name)"
        )
    values = _values(name)
    target = parent / values["dist"]
    if target.exists():
        raise StartupError(f"{target} exists already; choose another name or directory")
    paths = {"MODULE": values["module"], "NAME": name, "SNAKE": name.replace("-", "_")}
    for parts, text in _files(files("backchannel").joinpath(_TEMPLATE)):
        names = [_DOTTED.get(p, p) for p in parts]
        relative = Path(*(re.sub("MODULE|NAME|SNAKE", lambda m: paths[m[0]], p) for p in names))
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_render(text, values))
    return target
