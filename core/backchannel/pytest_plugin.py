"""pytest plugin: no traceback reachable from outside (issue 11).

Fails every test during which a ``backchannel.*`` or ``asyncio`` logger emitted an
ERROR record carrying a traceback: whatever a client sends, the server answers with
a documented error frame, close code or HTTP status, and a traceback in its log is a
bug (asyncio's "Task exception was never retrieved" and "Fatal error:
protocol.data_received() call failed" are such records). A test that makes a
server-side component crash on purpose (a handler, a hook, a route) says so with
``@pytest.mark.server_fault``; its tracebacks are expected.

Enable it with ``-p backchannel.pytest_plugin`` (or import :func:`no_traceback_logged`
into a ``conftest.py``, as this repository's ``tests/conftest.py`` does) and register the
marker in the pytest configuration.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator

import pytest

__all__ = ["MARKER", "WATCHED", "no_traceback_logged"]

#: the marker of tests whose server-side tracebacks are expected
MARKER = "server_fault"
#: loggers whose ERROR records with a traceback fail a test
WATCHED = ("backchannel", "asyncio")


class _Tracebacks(logging.Handler):
    """Collects ERROR records that carry a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.exc_text or record.stack_info:
            self.records.append(record)


@pytest.fixture(autouse=True)
def no_traceback_logged(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if a watched logger logged a traceback during it (setup and teardown
    of the test's other fixtures included), unless it is marked ``server_fault``."""
    catcher = _Tracebacks()
    loggers = [logging.getLogger(name) for name in WATCHED]
    for logger in loggers:
        logger.addHandler(catcher)
    try:
        yield
        gc.collect()  # asyncio reports unretrieved task exceptions when tasks are collected
    finally:
        for logger in loggers:
            logger.removeHandler(catcher)
    if catcher.records and request.node.get_closest_marker(MARKER) is None:
        shown = "\n".join(
            f"{r.name} {r.levelname}: {r.getMessage()}\n{_traceback(r)}"
            for r in catcher.records[:3]
        )
        pytest.fail(
            f"{len(catcher.records)} traceback(s) logged by the server (mark the test "
            f"@pytest.mark.{MARKER} if it makes a server-side component crash on purpose):\n"
            f"{shown}",
            pytrace=False,
        )


def _traceback(record: logging.LogRecord) -> str:
    if record.exc_info:
        return logging.Formatter().formatException(record.exc_info)
    return record.exc_text or record.stack_info or ""
