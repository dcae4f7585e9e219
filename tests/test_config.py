"""Configuration: defaults, TOML, environment and CLI precedence, errors that name the key."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from backchannel import App, StartupError, cli
from backchannel import config as config_mod
from conftest import ROOT, STANDARD

EXAMPLE = ROOT / "backchannel.toml"
SCHEMA: dict[str, Any] = json.loads((ROOT / "schemas" / "config.schema.json").read_text())
VALIDATION_SCHEMA: dict[str, Any] = json.loads(
    (ROOT / "schemas" / "validation.config.schema.json").read_text()
)
#: every plugin's settings schema, by plugin name (``schemas/<name>.config.schema.json``)
PLUGIN_SCHEMAS: dict[str, dict[str, Any]] = {
    p.name.removesuffix(".config.schema.json"): json.loads(p.read_text())
    for p in sorted((ROOT / "schemas").glob("*.config.schema.json"))
}


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``BACKCHANNEL_*`` variable of the developer's shell leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith(config_mod.ENV_PREFIX):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "bc.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(excinfo: pytest.ExceptionInfo[StartupError]) -> list[str]:
    """The problems of a config error: one on the ``invalid config:`` line itself, several
    on the lines under it."""
    first, *rest = str(excinfo.value).splitlines()
    if not rest:
        assert first.startswith("invalid config: ")
        return [first.removeprefix("invalid config: ")]
    assert first == "invalid config:" and len(rest) > 1
    return [line.strip() for line in rest]


def schema_defaults(schema: dict[str, Any]) -> dict[str, Any]:
    """Every leaf default of a config schema, by dotted key."""
    found = {}
    for section, sub in schema["properties"].items():
        for key, spec in sub.get("properties", {}).items():
            found[f"{section}.{key}"] = spec.get("default")
    return found


# ---------------------------------------------------------------- sources


def test_defaults_without_a_file_are_the_schema_defaults() -> None:
    """With no file and no environment, every key has its schema default."""
    cfg = config_mod.load(None, environ={})
    for dotted, default in schema_defaults(SCHEMA).items():
        section, key = dotted.split(".")
        assert cfg[section][key] == default, dotted
    assert cfg["server"]["port"] == 8765
    assert cfg["plugins"]["enabled"] == STANDARD


def test_toml_file_sets_keys_and_leaves_the_rest_default(tmp_path: Path) -> None:
    """Keys from the TOML file replace defaults; the others keep theirs."""
    path = write(tmp_path, '[server]\nport = 9001\nhost = "0.0.0.0"\n[message]\ntimeout = 5\n')
    cfg = config_mod.load(path, environ={})
    assert (cfg["server"]["port"], cfg["server"]["host"]) == (9001, "0.0.0.0")
    assert cfg["message"] == {"timeout": 5, "max_in_flight": 1, "max_queued": 256}
    assert cfg["server"]["path"] == "/ws"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    """``BACKCHANNEL_SERVER__PORT=9000`` beats the file; values parse as JSON."""
    path = write(tmp_path, "[server]\nport = 8000\n")
    environ = {
        "BACKCHANNEL_SERVER__PORT": "9000",
        "BACKCHANNEL_SERVER__HOST": "10.0.0.1",
        "BACKCHANNEL_PLUGINS__ENABLED": '["text", "ping"]',
        "BACKCHANNEL_NOT_A_KEY": "ignored (no __)",
        "OTHER__PORT": "1",
    }
    cfg = config_mod.load(path, environ=environ)
    assert cfg["server"]["port"] == 9000
    assert cfg["server"]["host"] == "10.0.0.1"
    assert cfg["plugins"]["enabled"] == ["text", "ping"]


def test_environment_sets_a_nested_plugin_key() -> None:
    """``BACKCHANNEL_PLUGINS__VALIDATION__MAX_STRING_LENGTH`` reaches the plugin's table."""
    environ = {"BACKCHANNEL_PLUGINS__VALIDATION__MAX_STRING_LENGTH": "100"}
    app = App(None, plugins=["validation"], environ=environ)
    assert app.plugin_config("validation")["max_string_length"] == 100
    assert app.plugin_config("validation")["max_depth"] == 16


def test_environment_value_is_checked_like_a_file_value() -> None:
    """A bad value from the environment fails with its dotted key."""
    with pytest.raises(StartupError) as excinfo:
        config_mod.load(None, environ={"BACKCHANNEL_SERVER__PORT": "high"})
    assert problems(excinfo) == [
        "server.port (from BACKCHANNEL_SERVER__PORT): must be of type integer"
    ]


@pytest.mark.parametrize(
    ("argv", "environ", "port"),
    [
        ([], {}, 8000),
        ([], {"BACKCHANNEL_SERVER__PORT": "9000"}, 9000),
        (["--port", "9100"], {"BACKCHANNEL_SERVER__PORT": "9000"}, 9100),
    ],
    ids=["file", "env-over-file", "flag-over-env"],
)
def test_cli_flags_take_precedence(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    environ: dict[str, str],
    port: int,
) -> None:
    """``backchannel serve``: flag beats environment beats file (server not started)."""
    path = write(tmp_path, "[server]\nport = 8000\n")
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    seen: dict[str, Any] = {}
    real_load = config_mod.load

    def spy_load(*args: Any, **kwargs: Any) -> dict[str, Any]:
        seen["config"] = real_load(*args, **kwargs)
        return seen["config"]

    def fake_run(func: Any, *, backend: str, backend_options: dict[str, Any]) -> None:
        seen["backend"] = backend

    monkeypatch.setattr(cli.config_mod, "load", spy_load)
    monkeypatch.setattr(cli, "_setup_logging", lambda level, *_: seen.setdefault("level", level))
    monkeypatch.setattr(cli.anyio, "run", fake_run)
    args = ["serve", "--config", str(path), *argv, "--backend", "trio", "--log-level", "debug"]
    assert cli.main(args) == 0
    assert seen["config"]["server"]["port"] == port
    assert seen["backend"] == "trio" and seen["level"] == "DEBUG"


# ---------------------------------------------------------------- errors


def test_unknown_key_names_its_dotted_path_and_the_allowed_keys(tmp_path: Path) -> None:
    """An unknown key fails with its dotted path and every allowed key of its table."""
    path = write(tmp_path, "bogus = 1\n[server]\nprot = 9000\n")
    with pytest.raises(StartupError) as excinfo:
        config_mod.load(path, environ={})
    assert sorted(problems(excinfo)) == [
        "bogus: unknown key (allowed: auth, connection, heartbeat, hooks, log, message, plugins, "
        "server, session, shutdown)",
        "server.prot: unknown key, did you mean 'port'? (allowed: backend, compression, demo, "
        "handshake_timeout, host, max_connections, max_message_size, origins, path, port, "
        "uvloop, workers)",
    ]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"server": {"port": "x"}}, "server.port: must be of type integer"),
        ({"server": {"port": 70000}}, "server.port: greater than 65535"),
        ({"server": {"backend": "gevent"}}, "server.backend: must be one of 'asyncio', 'trio'"),
        (
            {"log": {"level": "LOUD"}},
            "log.level: must be one of 'DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL'",
        ),
        ({"message": {"timeout": 0}}, "message.timeout: not greater than 0"),
        ({"auth": {"anonymous_permissions": "*"}}, "auth.anonymous_permissions: must be of type"),
        ({"server": 5}, "server: must be of type object"),
        ({"plugins": {"enabled": ["Text"]}}, "plugins.enabled[0]: does not match"),
    ],
)
def test_bad_value_names_the_key_and_what_is_allowed(data: dict[str, Any], expected: str) -> None:
    """A wrong type, range or enum value names the dotted key and the rule."""
    with pytest.raises(StartupError) as excinfo:
        config_mod.check(data)
    [problem] = problems(excinfo)
    assert problem.startswith(expected)


def test_every_problem_is_reported_at_once() -> None:
    """Several bad keys are listed together, so one run shows everything to fix."""
    with pytest.raises(StartupError) as excinfo:
        config_mod.check({"server": {"port": "x", "backend": "gevent"}, "log": {"nope": 1}})
    assert sorted(p.split(":")[0] for p in problems(excinfo)) == [
        "log.nope",
        "server.backend",
        "server.port",
    ]


def test_plugin_settings_are_checked_against_the_plugin_schema() -> None:
    """``plugins.validation.max_string_length = "x"`` fails naming that key."""
    with pytest.raises(StartupError) as excinfo:
        App({"plugins": {"validation": {"max_string_length": "x"}}}, plugins=["validation"])
    assert problems(excinfo) == ["plugins.validation.max_string_length: must be of type integer"]


def test_unknown_plugin_key_lists_the_plugin_keys() -> None:
    """An unknown key in a plugin's table names the allowed keys of that plugin."""
    with pytest.raises(StartupError) as excinfo:
        App({"plugins": {"validation": {"max_len": 5}}}, plugins=["validation"])
    assert problems(excinfo) == [
        "plugins.validation.max_len: unknown key, did you mean 'max_depth'? (allowed: "
        "allowed_types, max_bytes, max_depth, max_string_length, sanitize, schemas)"
    ]


def test_plugin_defaults_fill_its_table() -> None:
    """An enabled plugin's missing settings get its schema's defaults."""
    app = App({"plugins": {"validation": {"max_depth": 4}}}, plugins=["validation"])
    assert app.plugin_config("validation") == {
        "max_string_length": 8000,
        "max_depth": 4,
        "max_bytes": None,
        "allowed_types": None,
        "sanitize": True,
        "schemas": {},
    }


def test_settings_for_a_plugin_without_settings_fail() -> None:
    """A ``[plugins.text]`` table fails: the text plugin takes no settings."""
    with pytest.raises(StartupError) as excinfo:
        App({"plugins": {"text": {"echo": False}}}, plugins=["text"])
    assert problems(excinfo) == ["plugins.text.echo: plugin 'text' takes no settings"]


# ---------------------------------------------------------------- the environment


def test_a_list_from_the_environment_must_be_json() -> None:
    """``BACKCHANNEL_PLUGINS__ENABLED='init,text'`` names the variable and shows the JSON form."""
    with pytest.raises(StartupError) as excinfo:
        config_mod.load(None, environ={"BACKCHANNEL_PLUGINS__ENABLED": "init,text"})
    assert problems(excinfo) == [
        "plugins.enabled (from BACKCHANNEL_PLUGINS__ENABLED): must be of type array; the "
        "environment gives lists and tables as JSON: BACKCHANNEL_PLUGINS__ENABLED="
        """'["init", "text", "ping", "system", "validation", "rooms"]'"""
    ]


def kernel_variables() -> list[str]:
    """The variable of every key of the kernel's schema (``BACKCHANNEL_SERVER__PORT``, ...)
    but ``BACKCHANNEL_LOG__LEVEL``, whose one-underscore form is a variable of its own."""
    names = [
        config_mod.env_name((section, key))
        for section, sub in SCHEMA["properties"].items()
        for key in sub.get("properties", {})
    ]
    assert "BACKCHANNEL_LOG_LEVEL" in config_mod.OTHER_VARIABLES
    return [name for name in names if name != "BACKCHANNEL_LOG__LEVEL"]


@pytest.mark.parametrize("variable", kernel_variables())
def test_a_variable_with_one_underscore_between_levels_names_the_right_one(variable: str) -> None:
    """Every setting's variable written with ``_`` instead of ``__`` is refused, naming it."""
    near = variable.replace("__", "_")
    with pytest.raises(StartupError) as excinfo:
        config_mod.load(None, environ={near: "1"})
    assert problems(excinfo) == [
        f"{near} is not a setting; did you mean {variable}? (levels are separated by __)"
    ]


def test_a_plugin_variable_near_miss_names_the_right_one() -> None:
    """Inside a plugin's settings too: ``..._MAX__DEPTH`` is ``..._MAX_DEPTH``."""
    environ = {"BACKCHANNEL_PLUGINS__VALIDATION__MAX__DEPTH": "3"}
    with pytest.raises(StartupError) as excinfo:
        App(None, plugins=["validation"], environ=environ)
    assert problems(excinfo) == [
        "BACKCHANNEL_PLUGINS__VALIDATION__MAX__DEPTH is not a setting; did you mean "
        "BACKCHANNEL_PLUGINS__VALIDATION__MAX_DEPTH? (levels are separated by __)"
    ]


def test_variables_that_are_no_near_miss_are_left_alone() -> None:
    """``BACKCHANNEL_LOG_LEVEL`` (read by the logging set-up) and a program's own
    ``BACKCHANNEL_TOKEN`` are no settings and no mistakes."""
    environ = {"BACKCHANNEL_LOG_LEVEL": "debug", "BACKCHANNEL_TOKEN": "t", "BACKCHANNEL_X": "1"}
    assert config_mod.load(None, environ=environ)["server"]["port"] == 8765


def test_an_unknown_key_from_the_environment_names_the_variable() -> None:
    """A variable far from every setting is reported as the unknown key it makes."""
    with pytest.raises(StartupError) as excinfo:
        config_mod.load(None, environ={"BACKCHANNEL_QUEUE__SIZE": "1"})
    [problem] = problems(excinfo)
    assert problem.startswith("queue (from BACKCHANNEL_QUEUE__SIZE): unknown key (allowed: auth,")


# ---------------------------------------------------------------- plugin names


def test_an_unknown_enabled_plugin_suggests_the_closest_installed_one() -> None:
    with pytest.raises(StartupError, match=r"plugin 'txt' is enabled .*; did you mean 'text'\?"):
        App({"plugins": {"enabled": ["init", "txt"]}})


@pytest.mark.anyio
async def test_a_table_for_no_plugin_fails_start_up_with_a_suggestion() -> None:
    """``[plugins.validaton]`` would be ignored silently: start-up refuses it."""
    from backchannel.testing import serve_in_memory

    app = App({"plugins": {"validaton": {"max_depth": 3}}}, plugins=["validation"])
    with pytest.raises(StartupError) as excinfo:
        async with serve_in_memory(app):
            pass
    [problem] = problems(excinfo)
    assert problem.startswith(
        "plugins.validaton: settings for a plugin that is neither enabled nor installed; "
        "did you mean 'validation'? (installed: "
    )


@pytest.mark.anyio
async def test_tables_of_installed_and_in_process_plugins_are_accepted() -> None:
    """A table for an installed plugin not enabled (``redis``), or for a plugin object given
    to the App after it was made, is no mistake."""
    from backchannel import hookimpl
    from backchannel.testing import serve_in_memory

    class Weather:
        name = "weather"

        @hookimpl
        def config_schema(self) -> dict[str, Any]:
            return {"type": "object", "properties": {"city": {"type": "string"}}}

    config = {"plugins": {"redis": {"key_prefix": "x"}, "weather": {"city": "Oslo"}}}
    app = App(config, plugins=["text"])
    app.use(Weather())
    async with serve_in_memory(app):
        assert app.plugin_config("weather") == {"city": "Oslo"}


# ---------------------------------------------------------------- backchannel check


def test_check_accepts_a_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``backchannel check FILE`` exits 0 and names the plugins it loaded."""
    path = write(tmp_path, '[plugins]\nenabled = ["text", "validation"]\n')
    assert cli.main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{path}: OK (plugins: text, validation)"
    assert err == ""


def test_check_without_a_file_checks_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """``backchannel check`` with no file checks the built-in defaults."""
    assert cli.main(["check"]) == 0
    assert capsys.readouterr().out.strip() == f"(defaults): OK (plugins: {', '.join(STANDARD)})"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nport = -1\n", "server.port: less than 0"),
        ("[server]\nport = 80\nport = 81\n", "is not valid TOML"),
        ('[plugins]\nenabled = ["nope"]\n', "plugin 'nope' is enabled in config but not installed"),
        (
            '[plugins]\nenabled = ["validation"]\n[plugins.validation]\nsanitize = "yes"\n',
            "plugins.validation.sanitize: must be of type boolean",
        ),
    ],
    ids=["bad-value", "bad-toml", "unknown-plugin", "bad-plugin-value"],
)
def test_check_rejects_a_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    """``backchannel check FILE`` exits 1 and says what is wrong on stderr, in one line."""
    path = write(tmp_path, text)
    assert cli.main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("backchannel: ") and message in err and err.count("\n") == 1


def test_check_of_a_missing_file_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config path that does not exist is an error, not the defaults."""
    missing = tmp_path / "missing.toml"
    assert cli.main(["check", str(missing)]) == 1
    assert f"config file not found: {missing}" in capsys.readouterr().err


# ---------------------------------------------------------------- the example file


def test_example_config_passes_check(capsys: pytest.CaptureFixture[str]) -> None:
    """The committed ``backchannel.toml`` is valid and enables the standard plugins."""
    assert cli.main(["check", str(EXAMPLE)]) == 0
    assert "OK (plugins: init, text, ping, system, validation, rooms)" in capsys.readouterr().out
    cfg = tomllib.loads(EXAMPLE.read_text())
    assert cfg["server"]["demo"] is True
    assert cfg["plugins"]["enabled"] == STANDARD


_SETTING = re.compile(r"^#?\s*([a-z_][a-z0-9_]*) = (.*)$")


def documented(text: str) -> dict[str, tuple[bool, str]]:
    """``{dotted key: (commented out, value text)}`` for every setting line of a TOML file."""
    found: dict[str, tuple[bool, str]] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("["):
            table = line.strip().strip("[]")
            continue
        match = _SETTING.match(line)
        if match and table:
            found[f"{table}.{match.group(1)}"] = (line.startswith("#"), match.group(2))
    return found


@pytest.mark.parametrize(
    ("schema", "prefix"),
    [(SCHEMA, "")]
    + [({"properties": {name: s}}, "plugins.") for name, s in PLUGIN_SCHEMAS.items()],
    ids=["kernel", *PLUGIN_SCHEMAS],
)
def test_example_config_documents_every_key_with_its_default(
    schema: dict[str, Any], prefix: str
) -> None:
    """Every schema key appears in ``backchannel.toml``; commented values are the defaults."""
    lines = documented(EXAMPLE.read_text())
    for dotted, default in schema_defaults(schema).items():
        key = prefix + dotted
        assert key in lines, f"{key} is not documented in backchannel.toml"
        commented, value = lines[key]
        if not commented or default is None:  # set on purpose, or TOML has no null
            continue
        assert tomllib.loads(f"v = {value}")["v"] == default, key


def test_example_config_has_no_key_the_schemas_do_not_know() -> None:
    """Every setting line of ``backchannel.toml`` is a key of the kernel or a plugin schema."""
    known = set(schema_defaults(SCHEMA)) | {
        "plugins." + k
        for name, schema in PLUGIN_SCHEMAS.items()
        for k in schema_defaults({"properties": {name: schema}})
    }
    assert set(documented(EXAMPLE.read_text())) <= known
