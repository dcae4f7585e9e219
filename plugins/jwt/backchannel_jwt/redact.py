"""Keep tokens out of every log record, not only out of the kernel's own handler.

The kernel's formatters (:mod:`backchannel.logs`) redact what *they* print. A token
passed as a query parameter is part of the request target, which ``websockets``'
debug log, a proxy-aware plugin or an application's own handler may see before
or without those formatters (pytest's capture is one). So this plugin also
redacts at the source, with the kernel's :func:`backchannel.logs.redact`: a
log-record factory that cleans the message, string ``extra=`` fields and the
traceback of every record, for every logger and handler, including handlers
added later. It wraps whatever factory was installed before, once per process.
"""

from __future__ import annotations

import logging
from typing import Any

from backchannel.logs import redact

__all__ = ["install", "redact"]

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)))
_MARK = "_backchannel_redacts"


def _redact_record(record: logging.LogRecord) -> None:
    try:
        text = record.getMessage()
    except Exception:  # a bad format string: leave it to the handler to report
        return
    clean = redact(text)
    if clean != text:
        record.msg, record.args = clean, None
    for name, value in list(vars(record).items()):
        if name not in _STANDARD and isinstance(value, str):
            cleaned = redact(value)
            if cleaned != value:
                setattr(record, name, cleaned)
    if record.exc_info and not record.exc_text:
        trace = logging.Formatter().formatException(record.exc_info)
        cleaned = redact(trace)
        if cleaned != trace:
            record.exc_text = cleaned


def install() -> None:
    """Redact every log record created from now on, in this process (idempotent)."""
    current = logging.getLogRecordFactory()
    if getattr(current, _MARK, False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = current(*args, **kwargs)
        _redact_record(record)
        return record

    setattr(factory, _MARK, True)
    logging.setLogRecordFactory(factory)
