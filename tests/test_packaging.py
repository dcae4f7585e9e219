"""Packaging: schemas ship inside their owning package, and wheels install with plain pip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from backchannel.contracts import load_schema
from conftest import ROOT

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


# ----------------------------------------------------------------------- wheels


def run(args: list[str | Path], cwd: Path, env: dict[str, str]) -> str:
    """Run a command; fail the test with its output when it fails."""
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
def test_wheels_install_with_plain_pip_and_the_plugin_is_listed_and_its_schema_loads(
    tmp_path: Path,
) -> None:
    """uv builds sdist->wheel; pip installs kernel + text in a new venv; plugin and schema work."""
    started = time.monotonic()
    uv = shutil.which("uv")
    assert uv is not None, "uv is needed to build the wheels"
    env = clean_env()
    dist = tmp_path / "dist"
    for package in ("backchannel", "backchannel-text"):  # default: sdist, then wheel from it
        run([uv, "build", "--package", package, "-o", dist, "--no-create-gitignore"], ROOT, env)
    kernel_files = {f"backchannel/schemas/{name}" for name in KERNEL_SCHEMAS}
    text_files = {"backchannel_text/schemas/text.schema.json"}
    for pattern, expected in (
        ("backchannel-*.tar.gz", kernel_files),
        ("backchannel-*.whl", kernel_files),
        ("backchannel_text-*.tar.gz", text_files),
        ("backchannel_text-*.whl", text_files),
    ):
        assert expected <= archive_names(dist, pattern), f"{pattern} lacks dereferenced schemas"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path, env)
    python, bindir = venv / "bin" / "python", venv / "bin"
    wheels = sorted(dist.glob("*.whl"))
    assert len(wheels) == 2
    run([python, "-m", "pip", "install", "--quiet", *wheels], tmp_path, env)

    where = run([python, "-c", "import backchannel; print(backchannel.__file__)"], tmp_path, env)
    assert Path(where.strip()).is_relative_to(venv), where  # not the workspace's editable copy
    rows = json.loads(run([bindir / "backchannel", "plugins"], tmp_path, env))
    text = [row for row in rows if row["name"] == "text"]
    assert len(text) == 1 and text[0]["distribution"] == "backchannel-text", rows
    assert {row["distribution"] for row in rows} == {"backchannel-text"}  # only what we installed
    code = (
        "import json; from backchannel.contracts import load_schema as ls; "
        "print(json.dumps([ls('backchannel_text', 'text.schema.json'), "
        "ls('backchannel', 'envelope.schema.json')]))"
    )
    text_schema, envelope = json.loads(run([python, "-c", code], tmp_path, env))
    assert text_schema == json.loads((SCHEMAS / "text.schema.json").read_text())
    assert envelope == json.loads((SCHEMAS / "envelope.schema.json").read_text())
    print(f"build + venv + pip install + checks: {time.monotonic() - started:.1f} s")
