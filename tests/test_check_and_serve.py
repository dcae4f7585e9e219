"""``backchannel check`` refuses what ``backchannel serve`` refuses, with the same one line.

Each bad configuration below runs through both commands as real subprocesses (the
installed ``backchannel`` script, a clean environment plus the case's variables); both
must fail before listening and print the same single line, naming what to fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backchannel.contracts import load_schema
from conftest import ROOT

BACKCHANNEL = Path(sys.executable).with_name("backchannel")
PRODUCTION = ROOT / "backchannel.production.toml"
#: an installed plugin whose schema file is missing (its entry point found on PYTHONPATH)
BROKEN = """
from backchannel import hookimpl
from backchannel.contracts import load_schema


class Plugin:
    @hookimpl
    def message_types(self, register):
        register("broken", schema=load_schema("backchannel_broken", "broken.schema.json"))
"""


@dataclass(frozen=True)
class Case:
    id: str
    #: the expected line after "backchannel: " ({tmp}: the case's directory)
    line: str
    #: TOML text of the config file (None: no file), or the production config's path
    toml: str | Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: put a module "trio" that cannot be imported first on the path
    no_trio: bool = False


SECRET_UNSET = "plugins.jwt.issuers[0].keys[0]: environment variable CHAT_JWT_SECRET is not set"
CASES = [
    Case("jwt-secret-unset", SECRET_UNSET, PRODUCTION),
    Case("jwt-secret-empty", SECRET_UNSET, PRODUCTION, {"CHAT_JWT_SECRET": ""}),
    Case(
        "jwt-secret-short",
        "plugins.jwt.issuers[0].keys[0]: the secret has 3 bytes; HS256 needs 32 "
        "(env CHAT_JWT_SECRET)",
        PRODUCTION,
        {"CHAT_JWT_SECRET": "abc"},
    ),
    Case(
        "jwt-key-file-missing",
        "plugins.jwt.issuers[0].keys[0]: cannot read key file '{tmp}/missing.pem': "
        "No such file or directory",
        """
        [plugins]
        enabled = ["jwt", "init", "text"]
        [[plugins.jwt.issuers]]
        issuer = "https://auth.example.com/"
        [[plugins.jwt.issuers.keys]]
        algorithms = ["RS256"]
        public_key_file = "{tmp}/missing.pem"
        """,
    ),
    Case(
        "plugin-schema-missing",
        "plugin 'broken' failed in hook 'message_types': FileNotFoundError: package "
        "'backchannel_broken' has no schemas/broken.schema.json (looked for "
        "{tmp}/site/backchannel_broken/schemas/broken.schema.json); was it built without "
        "its schemas?",
        '[plugins]\nenabled = ["init", "broken"]\n',
    ),
    Case(
        "workers-without-broker",
        'server.workers = 2 needs a shared broker: enable the redis plugin (add "redis" to '
        "plugins.enabled); the in-memory broker keeps sessions and rooms in one process",
        "[server]\nworkers = 2\n",
    ),
    Case(
        "trio-not-installed",
        'server.backend = "trio" needs Trio, which is not installed: '
        "pip install 'backchannel[trio]'",
        env={"BACKCHANNEL_SERVER__BACKEND": "trio"},
        no_trio=True,
    ),
    Case(
        "unknown-plugin-table",
        "invalid config: plugins.validaton: settings for a plugin that is neither enabled nor "
        "installed; did you mean 'validation'? (installed: {installed})",
        '[plugins]\nenabled = ["init", "text"]\n[plugins.validaton]\nmax_depth = 4\n',
    ),
    Case(
        "unknown-enabled-plugin",
        "plugin 'txt' is enabled in config but not installed; did you mean 'text'? (installed "
        "plugins: {installed}); install the distribution 'backchannel-txt' (pip install "
        "backchannel-txt) or remove it from plugins.enabled",
        '[plugins]\nenabled = ["init", "txt"]\n',
    ),
    Case(
        "env-one-underscore",
        "invalid config: BACKCHANNEL_SERVER_PORT is not a setting; did you mean "
        "BACKCHANNEL_SERVER__PORT? (levels are separated by __)",
        env={"BACKCHANNEL_SERVER_PORT": "9000"},
    ),
    Case(
        "env-not-an-integer",
        "invalid config: server.port (from BACKCHANNEL_SERVER__PORT): must be of type integer",
        env={"BACKCHANNEL_SERVER__PORT": "abc"},
    ),
    Case(
        "env-list-not-json",
        "invalid config: plugins.enabled (from BACKCHANNEL_PLUGINS__ENABLED): must be of type "
        "array; the environment gives lists and tables as JSON: BACKCHANNEL_PLUGINS__ENABLED="
        """'["init", "text", "ping", "system", "validation", "rooms"]'""",
        env={"BACKCHANNEL_PLUGINS__ENABLED": "init,text"},
    ),
]


def installed_plugins() -> str:
    """The standard plugins plus the broken one every case can see, as listed in errors."""
    from backchannel.plugins import installed

    return ", ".join(sorted([*installed(), "broken"]))


def prepare(case: Case, tmp: Path) -> tuple[list[str], dict[str, str]]:
    """The config argument and the environment of ``case``, files written under ``tmp``."""
    site = tmp / "site"
    package = site / "backchannel_broken"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(BROKEN)
    info = site / "backchannel_broken-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: backchannel-broken\nVersion: 0.1.0\n"
    )
    (info / "entry_points.txt").write_text(
        "[backchannel.plugins]\nbroken = backchannel_broken:Plugin\n"
    )
    paths = [str(site)]
    if case.no_trio:
        shim = tmp / "no-trio"
        shim.mkdir()
        (shim / "trio.py").write_text(
            "raise ModuleNotFoundError(\"No module named 'trio'\", name='trio')\n"
        )
        paths.insert(0, str(shim))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BACKCHANNEL_") and k not in ("CHAT_JWT_SECRET", "PYTHONPATH")
    }
    env |= {"PYTHONPATH": os.pathsep.join(paths), **case.env}
    if case.toml is None:
        return [], env
    if isinstance(case.toml, Path):
        return [str(case.toml)], env
    path = tmp / "backchannel.toml"
    path.write_text(textwrap.dedent(case.toml).format(tmp=tmp))
    return [str(path)], env


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_check_and_serve_refuse_with_the_same_line(case: Case, tmp_path: Path) -> None:
    config, env = prepare(case, tmp_path)
    serve_args = ["--config", *config] if config else []
    commands = {
        "check": [str(BACKCHANNEL), "check", *config],
        "serve": [str(BACKCHANNEL), "serve", *serve_args],
    }
    running = {
        name: subprocess.Popen(
            cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, cmd in commands.items()
    }
    expected = "backchannel: " + case.line.format(tmp=tmp_path, installed=installed_plugins())
    results = {}
    for name, process in running.items():
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"{name} did not refuse (still running after 60 s):\n{err}")
        results[name] = (process.returncode, out, err)
    assert results["check"] == (1, "", expected + "\n"), results["check"]
    code, out, err = results["serve"]
    assert (code, out, err) == (2, "", expected + "\n"), results["serve"]


def test_a_missing_schema_file_is_named_with_its_package() -> None:
    """``load_schema`` of a file a package does not ship names the package and the path."""
    with pytest.raises(FileNotFoundError) as excinfo:
        load_schema("backchannel", "nope.schema.json")
    message = str(excinfo.value)
    assert message.startswith("package 'backchannel' has no schemas/nope.schema.json (looked for ")
    assert message.endswith(
        "/backchannel/schemas/nope.schema.json); was it built without its schemas?"
    )
