"""Installed-but-disabled plugins: N dummy distributions that entry-point discovery sees.

``make_dummies(root, n)`` writes, for k = 1..n, a module ``backchannel_dummyk.py`` and a
``backchannel_dummyk-0.1.dist-info/`` (METADATA, entry_points.txt with
``[backchannel.plugins] dummyk = backchannel_dummyk:Plugin``) into ``root``. Put ``root`` on
PYTHONPATH and ``importlib.metadata`` finds them like pip-installed plugins. Importing a dummy
module drops a marker file ``imported-dummyk`` into ``root``: a disabled plugin must never be
imported by ``serve``, and ``imported_markers()`` tells whether one was.

``verify(root, n)`` runs ``uv run backchannel plugins`` with that PYTHONPATH and checks that
all n dummies are listed, enabled false (that command itself imports every installed plugin to
list its hooks, so it clears the markers afterwards).

    python benchmarks/dummies.py DIR [-n 20]     # create, verify, print the listing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

MODULE = '''"""Dummy backchannel plugin {name} (benchmark fixture): no hooks."""

from pathlib import Path

(Path(__file__).parent / "imported-{name}").touch()


class Plugin:
    """Registers nothing."""
'''


def make_dummies(root: Path, n: int = 20) -> list[str]:
    """Write ``n`` dummy plugin distributions into ``root``; return their plugin names."""
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(1, n + 1):
        name, mod = f"dummy{k}", f"backchannel_dummy{k}"
        (root / f"{mod}.py").write_text(MODULE.format(name=name))
        info = root / f"{mod}-0.1.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: backchannel-dummy{k}\nVersion: 0.1\n"
        )
        (info / "entry_points.txt").write_text(f"[backchannel.plugins]\n{name} = {mod}:Plugin\n")
        (info / "top_level.txt").write_text(f"{mod}\n")
        names.append(name)
    return names


def env_with(root: Path) -> dict[str, str]:
    """Return the extra environment that makes ``root``'s dummies visible to a child process."""
    old = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(root) + (os.pathsep + old if old else "")}


def imported_markers(root: Path) -> list[str]:
    """Names of dummies whose module has been imported since the markers were last cleared."""
    return sorted(p.name.removeprefix("imported-") for p in root.glob("imported-*"))


def clear_markers(root: Path) -> None:
    for p in root.glob("imported-*"):
        p.unlink()


def verify(root: Path, n: int = 20, argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Check via ``uv run backchannel plugins`` (or ``argv``) that all dummies are listed, off."""
    out = subprocess.run(
        argv or ["uv", "run", "backchannel", "plugins"],
        cwd=REPO,
        env=os.environ | env_with(root),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows: list[dict[str, Any]] = json.loads(out)
    clear_markers(root)  # `plugins` imports every plugin to list its hooks; `serve` must not
    dummies = {r["name"]: r for r in rows if r["name"].startswith("dummy")}
    want = {f"dummy{k}" for k in range(1, n + 1)}
    if set(dummies) != want:
        raise SystemExit(f"discovery saw dummies {sorted(dummies)}, expected {sorted(want)}")
    bad = [r for r in dummies.values() if r["enabled"] is not False or "error" in r]
    if bad:
        raise SystemExit(f"dummy plugins not listed as disabled and loadable: {bad}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("-n", type=int, default=20)
    args = parser.parse_args()
    make_dummies(args.dir, args.n)
    rows = verify(args.dir, args.n)
    for r in rows:
        print(f"{r['name']:12} {r['distribution']:24} {r['version']:6} enabled={r['enabled']}")


if __name__ == "__main__":
    main()
