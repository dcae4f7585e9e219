"""Plugin loading: enable by name, import only what is enabled, fail start-up clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from backchannel import App, StartupError, cli, hookimpl
from backchannel import plugins as plugins_mod
from backchannel.plugins import GROUP, PluginInfo
from backchannel.testing import connect, serve_in_memory
from conftest import STANDARD

INSTALLED = "installed plugins: " + ", ".join(sorted(plugins_mod.installed()))


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``BACKCHANNEL_*`` variable of the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("BACKCHANNEL_"):
            monkeypatch.delenv(name)


def fake_plugin(name: str, target: str, distribution: str | None = None) -> PluginInfo:
    """An installed-plugin record pointing at ``target`` (``module:attr``)."""
    ep = EntryPoint(name=name, value=target, group=GROUP)
    return PluginInfo(name, distribution or f"backchannel-{name}", "9.9.9", ep)


class Registers:
    """An inline plugin registering the given message types."""

    def __init__(self, *types: str) -> None:
        self.types = types

    @hookimpl
    def message_types(self, register: Callable[..., None]) -> None:
        for name in self.types:
            register(name, handler=lambda message: {})


# ---------------------------------------------------------------- loading


def test_only_enabled_plugins_are_imported() -> None:
    """An App started with only ``text`` imports no other plugin module."""
    script = textwrap.dedent(
        """
        import sys
        import anyio
        from backchannel import App
        from backchannel.plugins import installed
        from backchannel.testing import connect, serve_in_memory

        async def main():
            app = App({}, plugins=["text"])
            async with serve_in_memory(app), connect(app) as client:
                assert (await client.request("text", {"text": "hi"}))["type"] == "text"
                assert (await client.request("ping"))["content"]["code"] == "unknown_type"

        anyio.run(main)
        assert len(installed()) >= 5  # every plugin is known from metadata alone
        print(sorted(m for m in sys.modules if m.startswith("backchannel_")))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKCHANNEL_")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['backchannel_text']"


@pytest.mark.parametrize("order", [["ping", "text"], ["text", "ping"]])
def test_plugins_are_called_in_config_order(order: list[str]) -> None:
    """Hook implementations run in the order of ``plugins.enabled``."""
    app = App({"plugins": {"enabled": order}})
    assert [impl.plugin_name for impl in app._gateway.impls("message_types")] == order
    assert app.health()["plugins"] == order


def test_unknown_plugin_fails_listing_installed_names_and_the_distribution() -> None:
    """Naming a plugin that is not installed fails start-up with what would fix it."""
    with pytest.raises(StartupError) as excinfo:
        App({}, plugins=["text", "nope"])
    text = str(excinfo.value)
    assert "plugin 'nope' is enabled in config but not installed" in text
    assert INSTALLED in text
    assert "pip install backchannel-nope" in text


def test_missing_module_names_the_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin whose module cannot be imported names its distribution and version."""
    broken = fake_plugin("broken", "backchannel_broken_xyz:Plugin", "backchannel-broken")
    monkeypatch.setattr("backchannel.plugins.installed", lambda: {"broken": broken})
    with pytest.raises(StartupError) as excinfo:
        App({}, plugins=["broken"])
    text = str(excinfo.value)
    assert "plugin 'broken' from distribution 'backchannel-broken' 9.9.9 failed to load" in text
    assert "ModuleNotFoundError" in text


def test_plugin_raising_at_import_names_the_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin module that raises while importing fails start-up naming its distribution."""
    (tmp_path / "bc_raises_on_import.py").write_text("raise RuntimeError('bad plugin')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    info = fake_plugin("raises", "bc_raises_on_import:Plugin", "backchannel-raises")
    with pytest.raises(StartupError, match=r"'backchannel-raises'.*RuntimeError: bad plugin"):
        plugins_mod.load("raises", {"raises": info})


@pytest.mark.anyio
async def test_two_plugins_registering_one_type_fail_naming_both() -> None:
    """A message type registered twice fails start-up naming both plugins."""
    app = App({}, plugins=["text"])
    app.use(Registers("text"), name="shadow")
    with pytest.raises(StartupError) as excinfo:
        async with serve_in_memory(app):
            pass
    assert str(excinfo.value) == (
        "message type 'text' is registered by both plugin 'text' and plugin 'shadow'; "
        "disable one of them"
    )


@pytest.mark.anyio
async def test_registering_cancel_fails() -> None:
    """``cancel`` belongs to the kernel; a plugin registering it fails start-up."""
    app = App({}, plugins=[Registers("cancel")])
    with pytest.raises(
        StartupError,
        match="plugin 'inline-1' registers type 'cancel': 'cancel' is a kernel message type",
    ):
        async with serve_in_memory(app):
            pass


class FailsIn:
    """An inline plugin whose set-up hook ``hook`` fails."""

    def __init__(self, hook: str) -> None:
        self.hook = hook

    @hookimpl
    def startup(self) -> None:
        if self.hook == "startup":
            raise RuntimeError("no database")

    @hookimpl
    def message_types(self, register: Callable[..., None]) -> None:
        schema = {"type": "no-such-type"} if self.hook == "schema" else None
        register("thing", schema=schema, handler=lambda message: {})

    @hookimpl
    def wrap_handler(self, type: str) -> None:
        if self.hook == "wrap_handler":
            raise RuntimeError("no middleware")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("hook", "expected"),
    [
        ("startup", "plugin 'faulty' failed in hook 'startup': RuntimeError: no database"),
        ("schema", "plugin 'faulty' registers type 'thing': its schema is invalid"),
        ("wrap_handler", "plugin 'faulty' failed in hook 'wrap_handler' for type 'thing'"),
    ],
)
async def test_failing_setup_hook_fails_startup_naming_the_plugin(hook: str, expected: str) -> None:
    """A set-up hook that raises stops start-up with a ``StartupError`` naming the plugin."""
    app = App({}, plugins=[])
    app.use(FailsIn(hook), name="faulty")
    with pytest.raises(StartupError) as excinfo:
        async with serve_in_memory(app):
            pass
    assert str(excinfo.value).startswith(expected)


@pytest.mark.anyio
async def test_each_app_has_its_own_plugin_manager() -> None:
    """Two Apps in one process see only their own plugins and types."""
    texts, pings = App({}, plugins=["text"]), App({}, plugins=["ping"])
    texts.handler("only-here")(lambda m: {"app": "texts"})
    assert texts.plugin("text") is not None and pings.plugin("text") is None
    async with (
        serve_in_memory(texts),
        serve_in_memory(pings),
        connect(texts) as a,
        connect(pings) as b,
    ):
        assert (await a.request("text", {"text": "x"}))["type"] == "text"
        assert (await a.request("only-here"))["content"] == {"app": "texts"}
        assert (await a.request("ping"))["content"]["code"] == "unknown_type"
        assert (await b.request("ping"))["type"] == "pong"
        assert (await b.request("text", {"text": "x"}))["content"]["code"] == "unknown_type"
        assert (await b.request("only-here"))["content"]["code"] == "unknown_type"
    assert set(texts.message_types()) == {"text", "only-here"}
    assert set(pings.message_types()) == {"ping"}


# ---------------------------------------------------------------- CLI


def test_plugins_command_lists_installed_plugins_as_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``backchannel plugins`` prints name, distribution, version, enabled and hooks."""
    assert cli.main(["plugins"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(STANDARD) <= set(rows)
    for name in STANDARD:
        row = rows[name]
        assert set(row) == {"name", "distribution", "version", "enabled", "hooks"}
        assert row["distribution"] == f"backchannel-{name}"
        assert row["version"] == "0.1.0" and row["enabled"] is True
    assert {name: rows[name]["hooks"] for name in STANDARD} == {
        "init": ["handle", "message_types", "startup"],
        "text": ["handle", "message_types"],
        "ping": ["handle", "message_types"],
        "system": ["handle", "message_types", "startup"],
        "validation": ["config_schema", "startup", "validate"],
        "rooms": [
            "config_schema",
            "control_message",
            "disconnect",
            "message_types",
            "session_expired",
            "startup",
            "wrap_handler",
        ],
    }

    config = tmp_path / "bc.toml"
    config.write_text('[plugins]\nenabled = ["text"]\n')
    assert cli.main(["plugins", "--config", str(config)]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert [n for n in STANDARD if rows[n]["enabled"]] == ["text"]


CLI_PLUGIN = """
from backchannel import hookimpl


class Plugin:
    @hookimpl
    def cli_commands(self, subparsers):
        hello = subparsers.add_parser("hello", help="say hello")
        hello.add_argument("--name", default="world")
        hello.set_defaults(func=lambda args: print(f"hello {args.name}") or 3)
"""


def test_plugin_cli_commands_add_a_subcommand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plugin's ``cli_commands`` adds a sub-command; a broken plugin does not break the CLI."""
    (tmp_path / "bc_cli_plugin.py").write_text(CLI_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = {
        "greeter": fake_plugin("greeter", "bc_cli_plugin:Plugin"),
        "broken": fake_plugin("broken", "bc_cli_plugin_missing:Plugin"),
    }
    monkeypatch.setattr(plugins_mod, "installed", lambda: fake)
    assert cli.main(["hello", "--name", "kernel"]) == 3
    out, err = capsys.readouterr()
    assert out == "hello kernel\n"
    assert "plugin 'broken' (bc_cli_plugin_missing)" in err
    assert "backchannel-broken" in err


def test_builtin_commands_do_not_import_plugins_for_their_cli(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parser for built-in commands is built without asking plugins for commands."""

    def forbidden() -> dict[str, PluginInfo]:
        raise AssertionError("plugins were consulted")

    monkeypatch.setattr(plugins_mod, "installed", forbidden)
    parser = cli.build_parser(plugin_commands=False)
    assert parser.parse_args(["check", "x.toml"]).config == "x.toml"
    with pytest.raises(AssertionError, match="consulted"):
        cli.build_parser()
