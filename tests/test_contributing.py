"""CONTRIBUTING.md's example plugin and its test run as written (docs stay true), here and
in a fresh project (no conftest, no pytest configuration) as a plugin author has it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT

pytestmark = pytest.mark.anyio


def _blocks() -> list[str]:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


async def test_contributing_example_plugin_and_test_pass() -> None:
    plugin_code, test_code = _blocks()[:2]
    namespace: dict[str, Any] = {}
    exec(compile(plugin_code, "CONTRIBUTING.md:plugin", "exec"), namespace)
    exec(compile(test_code, "CONTRIBUTING.md:test", "exec"), namespace)
    await namespace["test_roll"]()


async def test_contributing_example_denies_without_permission() -> None:
    from backchannel import App
    from backchannel.testing import connect, serve_in_memory

    namespace: dict[str, Any] = {}
    exec(compile(_blocks()[0], "CONTRIBUTING.md:plugin", "exec"), namespace)
    plugin = namespace["Plugin"]()
    app = App({"auth": {"anonymous_permissions": ["text"]}}, plugins=[plugin])
    async with serve_in_memory(app), connect(app) as client:
        reply = await client.request("roll", {"sides": 6})
        assert reply["content"]["code"] == "forbidden"
        assert plugin.rolls == 0
        unlucky = await client.request("roll", {"sides": 13})
        assert unlucky["content"]["code"] == "forbidden"


def test_contributing_test_passes_in_a_fresh_project(tmp_path: Path) -> None:
    """The plugin and its test as printed, in one file of an empty directory: pytest runs
    the async test (anyio marker) without this repository's conftest or configuration."""
    plugin_code, test_code = _blocks()[:2]
    (tmp_path / "test_dice.py").write_text(plugin_code + "\n\n" + test_code)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:randomly", "test_dice.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"=+ \d+ passed in .* =+", summary), done.stdout
