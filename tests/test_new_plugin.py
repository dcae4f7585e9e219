"""``backchannel new-plugin``: from nothing to a plugin installed, enabled and answering.

The scaffold's files are checked here; CONTRIBUTING's "Packaging it" commands are run as
printed against a fresh venv made by README's "Installing outside this repository"
(the kernel's and the standard plugins' wheels): scaffold, the generated tests, build,
install, ``check``, ``serve``, a streamed request over a real socket, stop.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from backchannel import cli
from backchannel.scaffold import new_plugin
from conftest import ROOT
from shell_blocks import free_port, run_script, section_block
from test_packaging import README_VENV, archive_names, clean_env, outside

__all__ = ["outside"]  # the fixture, shared with test_packaging (built once per module)

CONTRIBUTING = ROOT / "CONTRIBUTING.md"


def test_the_scaffold_writes_a_package_its_schemas_and_tests(tmp_path: Path) -> None:
    target = new_plugin("weather", tmp_path)
    assert target == tmp_path / "backchannel-weather"
    written = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert written == [
        ".gitignore",
        "README.md",
        "backchannel_weather/__init__.py",
        "backchannel_weather/py.typed",
        "backchannel_weather/schemas/weather.config.schema.json",
        "backchannel_weather/schemas/weather.schema.json",
        "pyproject.toml",
        "tests/test_weather.py",
    ]
    for path in target.rglob("*"):
        if path.is_file():
            assert "{{" not in path.read_text(), f"{path}: a placeholder left"
    project = tomllib.loads((target / "pyproject.toml").read_text())
    assert project["project"]["version"] == "0.1.0"
    assert project["project"]["dependencies"] == ["backchannel>=0.1,<0.2"]
    entry_points = project["project"]["entry-points"]["backchannel.plugins"]
    assert entry_points == {"weather": "backchannel_weather:Plugin"}
    assert project["build-system"]["build-backend"] == "hatchling.build"
    # the workspace's kernel is an editable install of core/: uv is pointed at it
    assert project["tool"]["uv"]["sources"]["backchannel"] == {"path": str(ROOT / "core")}
    for schema in (target / "backchannel_weather" / "schemas").iterdir():
        assert json.loads(schema.read_text())["type"] == "object"


def test_the_scaffold_names_a_hyphenated_plugin_consistently(tmp_path: Path) -> None:
    target = new_plugin("shop-cart", tmp_path)
    assert (target / "backchannel_shop_cart" / "schemas" / "shop-cart.schema.json").is_file()
    assert (target / "tests" / "test_shop_cart.py").is_file()
    project = tomllib.loads((target / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["backchannel.plugins"] == {
        "shop-cart": "backchannel_shop_cart:Plugin"
    }


@pytest.mark.parametrize(
    ("name", "why"),
    [("Weather", "lower-case letters"), ("9lives", "starting with a letter"), ("a b", "digits")],
)
def test_new_plugin_refuses_a_bad_name(
    name: str, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["new-plugin", name, "--directory", str(tmp_path)]) == 2
    assert why in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_new_plugin_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "backchannel-weather").mkdir()
    assert cli.main(["new-plugin", "weather", "-d", str(tmp_path)]) == 2
    assert "exists already" in capsys.readouterr().err


@pytest.mark.slow
def test_contributing_from_new_plugin_to_a_streamed_answer_over_a_socket(
    outside: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """CONTRIBUTING's commands as printed (the venv and the port replaced by the test's)."""
    venv, _ = outside
    block = section_block(CONTRIBUTING, "### Packaging it")
    assert block.directives == {"by": ["tests/test_new_plugin.py"]}
    port = free_port()
    script = block.text.replace(README_VENV, str(venv)).replace("8765", str(port))
    env = clean_env() | {"BACKCHANNEL_SERVER__PORT": str(port)}
    ran = run_script(script, tmp_path, env, timeout=600)
    assert ran.code == 0, ran.output
    lines = ran.output.splitlines()
    assert "(defaults): OK (plugins: init, text, weather)" in lines, ran.output
    chunks = [line for line in lines if line.startswith("{'word'")]
    assert chunks == [
        "{'word': 'sunny', 'index': 0}",
        "{'word': 'then', 'index': 1}",
        "{'word': 'rain', 'index': 2}",
    ], ran.output
    assert " 7 passed" in ran.output  # the generated tests, on asyncio and Trio
    plugin = tmp_path / "backchannel-weather"
    schemas = {
        "backchannel_weather/schemas/weather.schema.json",
        "backchannel_weather/schemas/weather.config.schema.json",
    }
    for archive in ("*.whl", "*.tar.gz"):  # hatchling's include rules ship them in both
        assert schemas <= archive_names(plugin / "dist", archive), archive
    project = tomllib.loads((plugin / "pyproject.toml").read_text())
    (kernel_wheel,) = (venv.parent / "repo" / "dist").glob("backchannel-*.whl")
    assert project["tool"]["uv"]["sources"]["backchannel"] == {"path": str(kernel_wheel)}
