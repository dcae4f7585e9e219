"""Packaging: every distribution is ready to publish, and README's install commands work.

Schemas ship inside their owning package (relative links into ``schemas/``, made
regular files in every sdist and wheel); each distribution carries complete metadata
that ``twine check --strict`` accepts; the kernel has one version; and the commands of
README's "Installing outside this repository" are run as printed, in a fresh venv.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anyio
import pytest
from trove_classifiers import classifiers as known_classifiers

import backchannel
from backchannel.client import connect
from backchannel.contracts import load_schema
from conftest import ROOT, serve_process

SCHEMAS = ROOT / "schemas"
KERNEL_SCHEMAS = {
    "config.schema.json",
    "envelope.schema.json",
    "frame.schema.json",
    "error.schema.json",
    "cancel.schema.json",
}


def package_schema_dirs() -> dict[str, Path]:
    """Import name -> its ``schemas`` directory, for the kernel and every plugin."""
    dirs = {"backchannel": ROOT / "core" / "backchannel" / "schemas"}
    for path in sorted(ROOT.glob("plugins/*/backchannel_*/schemas")):
        dirs[path.parent.name] = path
    return dirs


def owners() -> dict[str, list[str]]:
    """Schema file name -> the packages whose ``schemas`` directory links to it."""
    found: dict[str, list[str]] = {}
    for package, directory in package_schema_dirs().items():
        for entry in directory.iterdir():
            found.setdefault(entry.resolve().name, []).append(package)
    return found


def test_every_packaged_schema_is_a_relative_symlink_to_a_file_in_schemas() -> None:
    """Each entry of a package's schemas/ is a relative link resolving to schemas/<same name>."""
    dirs = package_schema_dirs()
    assert len(dirs) >= 6 and all(d.is_dir() for d in dirs.values())
    for directory in dirs.values():
        entries = sorted(directory.iterdir())
        assert entries, f"{directory} ships no schema"
        for entry in entries:
            rel = entry.relative_to(ROOT)
            assert entry.is_symlink(), f"{rel} is a copy, not a link into schemas/"
            target = os.readlink(entry)
            assert not os.path.isabs(target), f"{rel} -> {target} is absolute"
            resolved = entry.resolve()
            assert resolved.is_file(), f"{rel} -> {target} is dangling"
            assert resolved.parent == SCHEMAS.resolve(), f"{rel} -> {target} leaves schemas/"
            assert resolved.name == entry.name, f"{rel} -> {target} renames the schema"


def test_git_stores_the_schema_links_as_symlinks() -> None:
    """A clone gets links (mode 120000), not copies that could drift from schemas/."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.fail("this test needs the git checkout")
    paths = [str(d.relative_to(ROOT)) for d in package_schema_dirs().values()]
    out = subprocess.run(
        ["git", "ls-files", "-s", "--", *paths], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    modes = {line.split("\t")[1]: line.split()[0] for line in out.stdout.splitlines()}
    assert modes, "no schema link is tracked by git"
    assert {p: m for p, m in modes.items() if m != "120000"} == {}


def test_every_schema_is_shipped_by_exactly_one_package() -> None:
    """Each file in schemas/ has one owner; the kernel owns exactly its five contracts."""
    shipped = owners()
    files = {p.name for p in SCHEMAS.glob("*.json")}
    assert set(shipped) == files, "schemas/ and the packages' links disagree"
    assert {name: pkgs for name, pkgs in shipped.items() if len(pkgs) != 1} == {}
    kernel = {name for name, pkgs in shipped.items() if pkgs == ["backchannel"]}
    assert kernel == KERNEL_SCHEMAS


def test_linked_schemas_load_through_their_package() -> None:
    """``load_schema(package, name)`` reads the same JSON as schemas/<name> (editable install)."""
    for name, (package,) in owners().items():
        assert load_schema(package, name) == json.loads((SCHEMAS / name).read_text()), name


# --------------------------------------------------------------------- metadata

#: The kernel's directory, then each plugin's: one distribution each.
DISTRIBUTIONS = [ROOT / "core", *sorted(p.parent for p in ROOT.glob("plugins/*/pyproject.toml"))]


def project(directory: Path) -> dict[str, Any]:
    """The ``[project]`` table of a distribution's pyproject.toml."""
    table: dict[str, Any] = tomllib.loads((directory / "pyproject.toml").read_text())["project"]
    return table


KERNEL = project(ROOT / "core")


@pytest.mark.parametrize("directory", DISTRIBUTIONS, ids=lambda d: d.name)
def test_every_distribution_declares_what_an_index_shows(directory: Path) -> None:
    """Name, readme, license file, requires-python, classifiers PyPI accepts, URLs, authors."""
    meta = project(directory)
    expected = "backchannel" if directory.name == "core" else f"backchannel-{directory.name}"
    assert meta["name"] == expected
    assert len(meta["description"]) > 20
    assert (directory / meta["readme"]).is_file()
    assert meta["requires-python"] == KERNEL["requires-python"] == ">=3.11"
    assert (meta["license"], meta["license-files"]) == ("MIT", ["LICENSE"])  # SPDX, PEP 639
    assert (directory / "LICENSE").resolve() == (ROOT / "LICENSE").resolve()
    assert (meta["authors"], meta["urls"]) == (KERNEL["authors"], KERNEL["urls"])
    assert all(url.startswith("https://") for url in meta["urls"].values())
    classifiers = set(meta["classifiers"])
    assert classifiers - known_classifiers == set()  # PyPI refuses an upload with unknown ones
    assert {c for c in classifiers if c.startswith("License ::")} == set()  # the expression says it
    assert "Programming Language :: Python :: 3 :: Only" in classifiers


def test_the_kernel_has_one_version_and_the_plugins_follow_it() -> None:
    """core/pyproject.toml's version is what Python (read from the installed metadata, never
    written in a .py file), /healthz and the JS client report; each standard plugin has that
    version and requires the kernel's minor series."""
    kernel = KERNEL["version"]
    # the installed metadata (uv sync after a bump) is what the package reports ...
    assert version("backchannel") == backchannel.__version__ == kernel
    # ... because no Python file of the kernel or a plugin writes a version of its own
    written = re.compile(r"^\s*__version__\s*=\s*[\"']", re.MULTILINE)
    sources = [*(ROOT / "core").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]
    assert [p.relative_to(ROOT) for p in sources if written.search(p.read_text())] == []
    js = (ROOT / "clients" / "js" / "backchannel.js").read_text()
    found = re.search(r'export const VERSION = "([^"]+)";', js)
    assert found is not None and found[1] == kernel
    assert json.loads((ROOT / "clients" / "js" / "package.json").read_text())["version"] == kernel
    major, minor = (int(part) for part in kernel.split(".")[:2])
    series = f"backchannel>={major}.{minor},<{major}.{minor + 1}"
    for directory in DISTRIBUTIONS[1:]:
        meta = project(directory)
        assert meta["version"] == kernel, meta["name"]
        assert series in meta["dependencies"], meta["name"]


# ---------------------------------------------------------------------- building


def run(args: list[str | Path], cwd: Path, env: dict[str, str]) -> str:
    """Run a command (bounded); fail the test with its output when it fails."""
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def clean_env() -> dict[str, str]:
    """This environment minus what would leak the workspace into the fresh venv."""
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "UV_PROJECT_ENVIRONMENT")
    env = {
        k: v for k, v in os.environ.items() if k not in drop and not k.startswith("BACKCHANNEL_")
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def archive_names(dist: Path, pattern: str) -> set[str]:
    """Regular files (no links) in the one sdist or wheel matching ``pattern``."""
    (path,) = dist.glob(pattern)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as zf:
            return {i.filename for i in zf.infolist() if not i.is_dir()}
    with tarfile.open(path) as tf:
        return {m.name.split("/", 1)[1] for m in tf.getmembers() if m.isfile()}


@pytest.mark.slow
def test_sdists_and_wheels_pass_twine_and_carry_their_schemas_and_license(tmp_path: Path) -> None:
    """``uv build --all-packages`` (each: sdist, then the wheel built from it) gives archives
    that ``twine check --strict`` accepts, each package's schemas as regular files in both
    (the links are dereferenced), and the license in both."""
    uv = shutil.which("uv")
    assert uv is not None, "uv is needed to build the distributions"
    dist = tmp_path / "dist"
    run([uv, "build", "--all-packages", "-o", dist, "--no-create-gitignore"], ROOT, clean_env())
    archives = sorted(dist.iterdir())
    assert len(archives) == 2 * len(DISTRIBUTIONS), [a.name for a in archives]
    run([sys.executable, "-m", "twine", "check", "--strict", *archives], ROOT, clean_env())
    kernel = KERNEL["version"]
    for package, directory in package_schema_dirs().items():
        schemas = {f"{package}/schemas/{entry.name}" for entry in directory.iterdir()}
        sdist = archive_names(dist, f"{package}-*.tar.gz")
        wheel = archive_names(dist, f"{package}-*.whl")
        assert schemas <= sdist and schemas <= wheel, f"{package}: schemas missing"
        assert "LICENSE" in sdist and f"{package}-{kernel}.dist-info/licenses/LICENSE" in wheel


# ------------------------------------------------- README: installing outside this repository

README_VENV = "/tmp/chat"  # the venv README's commands create; the test puts it in tmp


def readme_install_commands() -> list[str]:
    """The command lines of README's "Installing outside this repository" block."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Installing outside this repository\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None, "README's install section has no sh block"
    return [line for line in block[1].splitlines() if line.strip()]


def copy_checkout(dest: Path) -> Path:
    """The repository's files (tracked, or new and not ignored) as they are now, links kept."""
    listed = run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], ROOT, clean_env()
    )
    for rel in filter(None, listed.split("\0")):
        source = ROOT / rel
        if os.path.lexists(source):  # (a tracked file deleted in the work tree is gone)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel, follow_symlinks=False)
    return dest


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """README's install commands but the last (``serve``), run as printed (bash, ``set -e``) in
    a copy of the repository; returns the venv they made and the serve command."""
    *install, serve = readme_install_commands()
    tmp = tmp_path_factory.mktemp("outside")
    venv = tmp / "chat"
    script = "\n".join(["set -euo pipefail", *install]).replace(README_VENV, str(venv))
    run(["bash", "-c", script], copy_checkout(tmp / "repo"), clean_env())
    return venv, shlex.split(serve.replace(README_VENV, str(venv)), comments=True)


@pytest.mark.slow
def test_readme_install_gives_the_kernel_every_plugin_their_schemas_and_the_extras(
    outside: tuple[Path, list[str]],
) -> None:
    venv, _ = outside
    python, env = venv / "bin" / "python", clean_env()
    code = "import backchannel; print(backchannel.__file__, backchannel.__version__)"
    where, reported = run([python, "-c", code], venv, env).split()
    assert Path(where).is_relative_to(venv), where  # not the workspace's editable copy
    assert reported == KERNEL["version"]  # from the wheel's metadata
    rows = json.loads(run([venv / "bin" / "backchannel", "plugins"], venv, env))
    assert {row["distribution"] for row in rows} == {project(d)["name"] for d in DISTRIBUTIONS[1:]}
    pairs = sorted((package, name) for name, (package,) in owners().items())
    code = (
        "import json, sys; from backchannel.contracts import load_schema; "
        "print(json.dumps([load_schema(p, n) for p, n in json.loads(sys.argv[1])]))"
    )
    loaded = json.loads(run([python, "-c", code, json.dumps(pairs)], venv, env))
    assert loaded == [json.loads((SCHEMAS / name).read_text()) for _, name in pairs]
    run([python, "-c", "import trio, uvloop"], venv, env)  # backchannel[trio,uvloop]


@pytest.mark.slow
@pytest.mark.anyio
async def test_readme_install_serves_requests_on_each_backend(
    outside: tuple[Path, list[str]], anyio_backend: str
) -> None:
    """README's ``serve`` line, as printed, from the fresh venv (on a free port, with this
    test's backend), answers the Python client."""
    venv, serve = outside
    assert serve == [str(venv / "bin" / "backchannel"), "serve"]
    env = clean_env() | {"BACKCHANNEL_SERVER__PORT": "0"}
    env["BACKCHANNEL_SERVER__BACKEND"] = anyio_backend
    async with (
        serve_process(serve, env, cwd=venv) as served,
        connect(f"ws://127.0.0.1:{served.port}/ws") as client,
    ):
        with anyio.fail_after(10):
            assert (await client.request("text", {"text": "hi"}))["text"] == "hi"
    plugins = "init, text, ping, system, validation, rooms"
    assert f"({anyio_backend}; plugins: {plugins})".encode() in served.log, served.log.decode()
