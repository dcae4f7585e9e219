"""Our plugins use only the public plugin API, exactly as a third party would.

The public surface is what docs/plugins.md documents: the names ``backchannel`` exports,
the public modules listed there, and the documented members of ``App``, ``Connection``
and ``Session``. This reads every plugin's source (AST, tests aside) and fails on an
import from a kernel module that is not public, on a name ``backchannel`` does not
export, and on a kernel internal reached through an attribute. It also keeps
docs/plugins.md and the code equal: every public member is documented, and every
documented one exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import backchannel
from backchannel import App, Connection, Session
from conftest import ROOT

#: kernel modules a plugin may import (docs/plugins.md, "Public modules")
PUBLIC_MODULES = {
    "backchannel",
    "backchannel.broker",
    "backchannel.client",
    "backchannel.config",
    "backchannel.contracts",
    "backchannel.errors",
    "backchannel.hookspecs",
    "backchannel.http",
    "backchannel.logs",
    "backchannel.memory",
    "backchannel.model",
    "backchannel.testing",
}
#: members that exist on a public object for the kernel's own use, not for plugins
KERNEL_ONLY = {"log", "attach", "kept"}
DOC = ROOT / "docs" / "plugins.md"


def private_members(*classes: type) -> set[str]:
    """Underscore members of the kernel's public classes (slots and attributes included)."""
    found: set[str] = set()
    for cls in classes:
        names = set(dir(cls)) | set(getattr(cls, "__slots__", ()))
        found |= {n for n in names if n.startswith("_") and not n.startswith("__")}
    app = App({}, plugins=[])
    found |= {n for n in vars(app) if n.startswith("_") and not n.startswith("__")}
    return found


PRIVATE = private_members(App, Connection, Session)


def plugin_sources() -> list[Path]:
    """Every plugin's own code (its package and its benchmarks; its tests may look inside)."""
    files = sorted(ROOT.glob("plugins/*/backchannel_*/**/*.py"))
    files += sorted(ROOT.glob("plugins/*/benchmarks/*.py"))
    assert len(files) > 20, "the plugins were not found (the test would prove nothing)"
    return files


def violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            module = node.module
            if module == "backchannel":
                for alias in node.names:
                    public = alias.name in backchannel.__all__
                    if not public and f"backchannel.{alias.name}" not in PUBLIC_MODULES:
                        found.append(f"{where}: backchannel does not export {alias.name!r}")
            elif module.startswith("backchannel.") and module not in PUBLIC_MODULES:
                found.append(f"{where}: imports the kernel's private module {module}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                module = alias.name
                if module.startswith("backchannel.") and module not in PUBLIC_MODULES:
                    found.append(f"{where}: imports the kernel's private module {module}")
        elif isinstance(node, ast.Attribute):
            base = _name(node.value)
            if node.attr in PRIVATE and base in KERNEL_OBJECTS:
                found.append(f"{where}: reaches the kernel internal {base}.{node.attr}")
            if node.attr in KERNEL_ONLY and base == "session":
                found.append(f"{where}: uses session.{node.attr}, which is the kernel's")
    return found


#: what plugins call the kernel's objects (``app``, ``self.app``, ``self._app``, ...)
KERNEL_OBJECTS = {"app", "_app", "connection", "conn", "session"}


def _name(node: ast.expr) -> str | None:
    """The last name of an expression: ``session`` for ``connection.session``."""
    if isinstance(node, ast.Name):
        return node.id
    return node.attr if isinstance(node, ast.Attribute) else None


@pytest.mark.parametrize("path", plugin_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_plugin_uses_only_the_public_api(path: Path) -> None:
    assert violations(path) == []


def test_the_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    """Not vacuous: a plugin reaching inside the kernel is caught, each way."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from backchannel.hub import Hub\n"
        "import backchannel.pipeline\n"
        "from backchannel import Inbox\n"
        "def f(app, connection):\n"
        "    app._hub.sessions\n"
        "    connection._output\n"
        "    connection.session.log\n"
    )
    found = violations(bad)
    assert len(found) == 6, found


# ------------------------------------------------------------ docs/plugins.md = code


def public_members(cls: type, instance: object | None = None) -> set[str]:
    names = {n for n in dir(cls) if not n.startswith("_")}
    names |= {n for n in getattr(cls, "__slots__", ()) if not n.startswith("_")}
    if instance is not None:
        names |= {n for n in vars(instance) if not n.startswith("_")}
    return names - KERNEL_ONLY


@pytest.mark.parametrize(
    ("prefix", "members"),
    [
        ("app", public_members(App, App({}, plugins=[]))),
        ("connection", public_members(Connection)),
        ("session", public_members(Session)),
    ],
)
def test_every_public_member_is_documented(prefix: str, members: set[str]) -> None:
    """``dir(app)`` (and a connection's, a session's) shows only what docs/plugins.md
    documents, and the document names nothing that is not there."""
    text = DOC.read_text()
    documented = set(re.findall(rf"`{prefix}\.([a-z_]+)", text))
    assert members - documented == set(), f"public but undocumented: {members - documented}"
    assert documented - members == set(), f"documented but absent: {documented - members}"


def test_every_public_module_is_documented() -> None:
    text = DOC.read_text()
    documented = set(re.findall(r"`(backchannel(?:\.[a-z_]+)?)`", text))
    assert documented >= PUBLIC_MODULES


# ------------------------------------------------------------ inside the kernel


def _private_names_defined(tree: ast.Module) -> set[str]:
    """Underscore names a module defines: functions, methods, classes, attributes it
    assigns (``self._x = ...``), ``__slots__`` entries."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            found.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)  # (__slots__ entries, and any other string)
    return {n for n in found if n.startswith("_") and not n.startswith("__")}


KERNEL = sorted((ROOT / "core" / "backchannel").glob("*.py"))


@pytest.mark.parametrize("path", KERNEL, ids=lambda p: p.name)
def test_no_kernel_module_uses_another_modules_underscore_names(path: Path) -> None:
    """A kernel module reaches only its own internals (``x._name`` with ``_name`` defined
    in the same module); collaborators get public names."""
    assert foreign_privates(path.read_text(), path.name) == []


def test_the_kernel_check_finds_a_foreign_private() -> None:
    source = "from .hub import _helper\nimport argparse\ndef f(app):\n    app._gateway\n"
    source += "    argparse._SubParsersAction\n"
    assert sorted(foreign_privates(source, "x.py")) == [
        "x.py:1: imports _helper",
        "x.py:4: ._gateway",
    ]


def foreign_privates(source: str, name: str) -> list[str]:
    tree = ast.parse(source)
    own = _private_names_defined(tree)
    # (other libraries' internals are theirs to mind: argparse._SubParsersAction, ...)
    libraries = {
        alias.asname or alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if node.attr.startswith("__") or node.attr in own:
                continue
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls", *libraries):
                continue
            found.append(f"{name}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 1:
            found += [
                f"{name}:{node.lineno}: imports {a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
    return found
