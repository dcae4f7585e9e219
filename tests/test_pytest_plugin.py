"""The guard that fails a test when the server logs a traceback (``backchannel.pytest_plugin``).

Run on a small test file in a separate pytest process: a traceback logged by a
``backchannel`` logger or by asyncio (an unretrieved task exception) fails the test that
caused it, unless the test is marked ``server_fault``; an ERROR without a traceback, or a
traceback from another logger, does not.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

CASES = """
import asyncio
import logging

import pytest

log = logging.getLogger("backchannel.somewhere")


def _crash():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("handler failed")


def test_traceback_fails():
    _crash()


@pytest.mark.server_fault
def test_traceback_in_a_server_fault_test_passes():
    _crash()


def test_error_without_traceback_passes():
    log.error("refused: bad input")


def test_other_loggers_pass():
    try:
        raise RuntimeError("client side")
    except RuntimeError:
        logging.getLogger("websockets.client").exception("client gave up")


def test_unretrieved_task_exception_fails():
    async def fail():
        raise RuntimeError("lost")

    async def main():
        asyncio.get_running_loop().create_task(fail())
        await asyncio.sleep(0.01)

    asyncio.run(main())
"""


def test_the_guard_fails_exactly_the_tests_that_log_a_server_traceback(tmp_path: Path) -> None:
    (tmp_path / "test_cases.py").write_text(textwrap.dedent(CASES))
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n    server_fault: crashes on purpose\n"
    )
    plugins = ["-p", "backchannel.pytest_plugin", "-p", "no:randomly", "-p", "no:cacheprovider"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *plugins, "-q", "-rE", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = set(re.findall(r"^ERROR \S*::(\w+)", run.stdout, re.MULTILINE))
    assert errors == {"test_traceback_fails", "test_unretrieved_task_exception_fails"}, run.stdout
    assert "5 passed, 2 errors" in run.stdout, run.stdout
    assert "mark the test @pytest.mark.server_fault" in run.stdout
