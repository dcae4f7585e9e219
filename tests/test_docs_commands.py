"""Every shell command printed in README.md, CONTRIBUTING.md and docs/*.md runs as printed.

Each runnable block (```sh, ```bash, ```console; see :mod:`shell_blocks` for the
``<!-- docs-test: ... -->`` directives that start a server first, leave out a line or
hand the block to another test) runs with ``bash -euo pipefail`` in a copy of the
checkout in a temporary directory, bounded in time. Two things differ from a reader's
terminal, both to let it run beside other servers: port 8765 is replaced by a free port
(also given as ``BACKCHANNEL_SERVER__PORT``), and the redis plugin gets a fresh key
prefix. A ``backchannel serve`` printed in the foreground is started in the background
and probed (``/readyz``) instead of waited for; whatever a block leaves running is
stopped when it ends.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

import pytest

from conftest import ROOT
from shell_blocks import (
    COMMENT,
    Block,
    blocks,
    free_port,
    logical_lines,
    parse_directives,
    pattern,
    run_script,
    spawn,
    stop_group,
    strict,
    strip_ansi,
)
from test_packaging import clean_env, copy_checkout

DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [block for path in DOCS for block in blocks(path)]
#: a block's time limit, in seconds (uv sync, npm ci and a wheel build fit in it)
LIMIT = 600
#: how long a server may take to answer /readyz (the first `uv run` syncs the venv)
READY = 180
_SERVE = re.compile(r"(?:^|[\s/])backchannel serve\b")


def test_the_docs_have_runnable_blocks() -> None:
    """The parametrized test below is not vacuous: README's and the docs' blocks are found."""
    where = {block.path.name for block in BLOCKS}
    assert {"README.md", "CONTRIBUTING.md", "scaling.md", "security.md"} <= where
    assert len(BLOCKS) >= 8


HANDED = [block for block in BLOCKS if "by" in block.directives]


@pytest.mark.parametrize("block", HANDED, ids=lambda b: b.where)
def test_a_block_handed_to_another_test_is_run_there(block: Block) -> None:
    """``by tests/test_x.py``: that test exists and reads this document."""
    (name,) = block.directives["by"]
    test = ROOT / name
    assert test.is_file(), f"{block.where}: {name} does not exist"
    assert block.path.name in test.read_text(), f"{name} does not read {block.path.name}"


# ----------------------------------------------------------------- the runner itself


def test_a_failing_command_before_and_fails_the_block(tmp_path: Path) -> None:
    """``set -e`` alone lets ``false && true`` pass and goes on; each line is made strict."""
    lines = ["false && true", "echo after"]
    assert run_script("\n".join(lines), tmp_path, clean_env(), 30).code == 0  # bash's rule
    ran = run_script("\n".join(strict(lines)), tmp_path, clean_env(), 30)
    assert (ran.code, ran.output) == (1, "")


def test_strict_leaves_background_lines_comments_and_heredoc_bodies_alone() -> None:
    lines = ["a &", "# note", "python - <<'EOF'", "print(1)  # x", "EOF", "b   # why"]
    assert strict(lines) == [
        "a &",
        "# note",
        "python - <<'EOF' || exit $?",
        "print(1)  # x",
        "EOF",
        "b || exit $?",
    ]


def test_a_foreground_serve_is_backgrounded_and_probed_and_left_out_lines_are_not_run() -> None:
    text = "X=1 \\\n  uv run backchannel serve --port 8765   # listens\nuv run pytest  # all\n"
    block = Block(Path("doc.md"), 1, text, {"not": ["uv run pytest"]})
    assert script(block, 9999).splitlines() == [
        "X=1 uv run backchannel serve --port 9999 &",
        probe(9999) + " || exit $?",
        ": left out by the docs test: 'uv run pytest  # all'",
    ]


def test_a_stale_or_unknown_directive_fails() -> None:
    block = Block(Path("doc.md"), 1, "echo hi\n", {"not": ["uv run pytest"]})
    with pytest.raises(AssertionError, match="a stale directive"):
        script(block, 1)
    with pytest.raises(ValueError, match="unknown docs-test directive 'sikp'"):
        parse_directives("sikp (typo)")
    assert parse_directives('server "uv run backchannel serve"; not "a" "b" (why)') == {
        "server": ["uv run backchannel serve"],
        "not": ["a", "b"],
    }


# ----------------------------------------------------------------- the docs


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's files in a temporary directory (no venv, no node_modules)."""
    return copy_checkout(tmp_path_factory.mktemp("docs") / "repo")


def environment(port: int) -> dict[str, str]:
    return clean_env() | {
        "BACKCHANNEL_SERVER__PORT": str(port),
        "BACKCHANNEL_PLUGINS__REDIS__KEY_PREFIX": f"docs-{uuid.uuid4().hex[:8]}",
    }


def probe(port: int) -> str:
    """A shell line that waits (bounded) until the server on ``port`` is ready."""
    return (
        f"curl -sf -o /dev/null --retry {READY} --retry-connrefused --retry-delay 1 "
        f"--max-time 5 http://127.0.0.1:{port}/readyz"
    )


def script(block: Block, port: int) -> str:
    """The block's commands as bash runs them: the port replaced, left-out lines commented
    out, a foreground ``backchannel serve`` put in the background and probed."""
    left_out = block.directives.get("not", [])
    for prefix in left_out:
        assert any(line.strip().startswith(prefix) for line in block.text.splitlines()), (
            f"{block.where}: no line starts with {prefix!r} (a stale directive)"
        )
    lines = []
    for line in logical_lines(block.text.replace("8765", str(port))):
        code = COMMENT.sub("", line).rstrip()
        if any(line.strip().startswith(prefix) for prefix in left_out):
            lines.append(f": left out by the docs test: {line.strip()!r}")
        elif _SERVE.search(code) and not code.endswith("&"):
            lines += [f"{code} &", probe(port)]
        else:
            lines.append(line)
    return "\n".join(strict(lines))


@contextmanager
def server(command: str, cwd: Path, env: dict[str, str], port: int) -> Iterator[None]:
    """Run ``command`` (a ``backchannel serve``) until the block is done; fail if it never
    answers ``/readyz``."""
    with open(cwd.parent / f"server-{port}.log", "w+") as log:
        process = spawn(command.replace("8765", str(port)), cwd, env, log)
        try:
            deadline = time.monotonic() + READY
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"{command!r} did not get ready:\n{log.read()}")
                url = f"http://127.0.0.1:{port}/readyz"
                with suppress(OSError), urllib.request.urlopen(url, timeout=2):
                    break
                time.sleep(0.2)
            yield
        finally:
            stop_group(process.pid, reap=process.poll)
            process.wait()


def transcript(block: Block, cwd: Path, env: dict[str, str], port: int) -> None:
    """``$ command``, ``> input`` lines, ``< output`` lines: write the input, wait (bounded)
    until every output line was printed, then end the input."""
    text = block.text.replace("8765", str(port))
    lines = text.strip().splitlines()
    assert lines[0].startswith("$ ")
    inputs = [line[2:] for line in lines[1:] if line.startswith("> ")]
    expected = [pattern(line) for line in lines[1:] if line.startswith("< ")]
    process = spawn(lines[0][2:], cwd, env, subprocess.PIPE, stdin=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    seen = ""
    try:
        process.stdin.write("".join(f"{line}\n" for line in inputs).encode())
        process.stdin.flush()
        deadline = time.monotonic() + READY
        while not all(p.search(seen) for p in expected):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([process.stdout], [], [], max(left, 0))
            chunk = os.read(process.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                pytest.fail(f"{block.where}: not every '<' line came:\n{strip_ansi(seen)}")
            seen += chunk.decode(errors="replace")
            seen = strip_ansi(seen)
        process.stdin.close()
    finally:
        stop_group(process.pid, reap=process.poll)
        process.wait()


RUN = [b for b in BLOCKS if not {"by", "skip"} & set(b.directives)]


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN, ids=lambda b: b.where)
def test_a_printed_command_block_runs_as_printed(block: Block, checkout: Path) -> None:
    port = free_port()
    env = environment(port)
    servers = block.directives.get("server", [])
    assert len(servers) <= 1, f"{block.where}: one server per block"
    with server(servers[0], checkout, env, port) if servers else nullcontext():
        if block.transcript:
            transcript(block, checkout, env, port)
            return
        ran = run_script(script(block, port), checkout, env, LIMIT)
    assert ran.code == 0, f"{block.where} (exit {ran.code}):\n{ran.output}"
