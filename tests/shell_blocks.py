"""Shell commands printed in the docs, found and run as printed (helpers for the tests).

A fenced block whose language is ``sh``, ``bash`` or ``console`` is runnable. The line
just above its fence may hold directives for the docs test, in an HTML comment that
Markdown does not show::

    <!-- docs-test: server "uv run backchannel serve"; not "uv run pytest" (why) -->

- ``server "CMD"``: start CMD (a ``backchannel serve``) before the block, stop it after;
- ``not "PREFIX" ...``: lines starting with PREFIX are not run (say why in parentheses);
- ``by tests/test_x.py``: that test runs the block as printed (so the docs test does not);
- ``skip (why)``: the block is not run at all.

A block whose lines start with ``$`` is a transcript: ``$ command``, then ``> input``
lines written to its stdin, then ``< output`` lines it must print (``…`` matches any text).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUNNABLE = {"sh", "bash", "console"}
DIRECTIVES = {"server", "not", "by", "skip"}
_FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_COMMENT = re.compile(r"<!--\s*docs-test:(.*?)-->\s*$")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\x1b[78]")


@dataclass
class Block:
    """A runnable fenced block of a Markdown file."""

    path: Path
    line: int  # of the opening fence, 1-based
    text: str
    directives: dict[str, list[str]] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"

    @property
    def transcript(self) -> bool:
        return self.text.lstrip().startswith("$ ")


def parse_directives(comment: str) -> dict[str, list[str]]:
    """``server "a"; not "b" "c" (why)`` -> ``{"server": ["a"], "not": ["b", "c"]}``."""
    found: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in comment.split(";"))):
        keyword, _, rest = part.partition(" ")
        if keyword not in DIRECTIVES:
            raise ValueError(f"unknown docs-test directive {keyword!r} in {comment!r}")
        args = re.findall(r'"([^"]*)"', rest)
        if keyword == "by":
            args = rest.split("(")[0].split()
        found.setdefault(keyword, []).extend(args)
    return found


def blocks(path: Path) -> list[Block]:
    """The runnable blocks of ``path``, with their directives."""
    text = path.read_text()
    found = []
    for match in _FENCE.finditer(text):
        if match[1] not in RUNNABLE:
            continue
        start = text.count("\n", 0, match.start())
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        comment = _COMMENT.search(before)
        directives = parse_directives(comment[1]) if comment else {}
        found.append(Block(path, start + 1, match[2], directives))
    return found


def section_block(path: Path, heading: str) -> Block:
    """The first runnable block under the Markdown heading ``heading`` (``### Packaging it``)."""
    text = path.read_text()
    start = text.index(f"\n{heading}\n")
    level = heading.split(" ")[0]
    end = text.find(f"\n{level} ", start + len(heading) + 2)
    first = text.count("\n", 0, start)
    last = text.count("\n", 0, end if end != -1 else len(text))
    (block, *_) = [b for b in blocks(path) if first < b.line <= last]
    return block


def logical_lines(text: str) -> list[str]:
    """The block's command lines, continuation lines (``\\`` at the end) joined."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        if pending:
            raw = pending + raw.lstrip()
            pending = ""
        if raw.endswith("\\"):
            pending = raw[:-1].rstrip() + " "
            continue
        lines.append(raw)
    return lines


#: a trailing shell comment (no quote after the ``#``, so not one inside a string)
COMMENT = re.compile(r"\s+#[^'\"]*$")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")


def strict(lines: list[str]) -> list[str]:
    """Make a failure anywhere in a command line fail the script: ``set -e`` does not stop
    at a failing command before ``&&`` (``a && b`` with ``a`` failing goes on), so every
    command line gets ``|| exit $?`` (its trailing comment dropped). Lines in the background
    (``&``), comments and here-document bodies stay as they are. (So a block holds one
    command per line, which is what docs print anyway: no multi-line ``if``/``for``.)"""
    result = []
    body_end: str | None = None
    for line in lines:
        if body_end is not None:
            result.append(line)
            if line.strip() == body_end:
                body_end = None
            continue
        heredoc = _HEREDOC.search(line)
        if heredoc:
            body_end = heredoc[2]
        code = COMMENT.sub("", line).rstrip()
        if not code or code.lstrip().startswith(("#", ":")) or code.endswith("&"):
            result.append(line)
        else:
            result.append(f"{code} || exit $?")
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Ran:
    code: int | None  # None: killed at the time limit
    output: str


def spawn(command: str, cwd: Path, env: dict[str, str], stdout: Any, stdin: Any = None) -> Any:
    """``bash -c command`` in a process group of its own (stopped with :func:`stop_group`),
    its stderr with its stdout."""
    return subprocess.Popen(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL if stdin is None else stdin,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def run_script(script: str, cwd: Path, env: dict[str, str], timeout: float) -> Ran:
    """Run ``script`` with ``bash -euo pipefail``, bounded by ``timeout``; whatever it left
    running (servers it put in the background) is stopped when it ends."""
    with tempfile.TemporaryFile("w+") as out:
        process = spawn("set -euo pipefail\n" + script, cwd, env, out)
        try:
            code: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            stop_group(process.pid, reap=process.poll)
            process.wait()
        out.seek(0)
        return Ran(code, out.read())


def stop_group(pgid: int, grace: float = 15.0, reap: Callable[[], object] = lambda: None) -> None:
    """Interrupt every process of group ``pgid`` as Ctrl-C in a terminal does (SIGINT to the
    group: ``uv run`` leaves it to its child, which gets it once); SIGKILL what is left
    ``grace`` s later. ``reap``: collect our own child of the group (a zombie stays in it)."""
    try:
        os.killpg(pgid, signal.SIGINT)
    except ProcessLookupError:
        return
    # The group's processes are not our children: polling the group is all there is.
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap()
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def strip_ansi(text: str) -> str:
    """Output without the terminal control sequences an interactive client prints."""
    return _ANSI.sub("", text)


def pattern(expected: str) -> re.Pattern[str]:
    """A printed line as a pattern: ``…`` matches any text."""
    return re.compile(".*?".join(re.escape(part) for part in expected.split("…")))
