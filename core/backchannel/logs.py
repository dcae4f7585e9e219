"""Structured logs for the ``backchannel.*`` logger hierarchy (issue 6 item 3).

:func:`setup_logging` installs one handler with a JSON or console formatter
(``log.format``). Every line carries ``connection_id``, ``session_id`` and
``message_id`` where known: from the ``extra=`` the kernel passes, else lifted
from the ``conn=``/``session=``/``msg=`` words of the kernel's messages. Every line
is redacted on its way out: ``token=`` (and other secret) parameters,
``Authorization`` values, ``"token": ...`` fields and JWT-shaped strings never
reach the output, whoever logged them (a plugin logging a request target too).

The level, strongest first: an explicit ``--log-level``; ``DEBUG=backchannel:*``
(the npm ``debug`` convention seed users know); ``BACKCHANNEL_LOG_LEVEL``;
``log.level`` (config file or ``BACKCHANNEL_LOG__LEVEL``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import IO, Any

import orjson

from .errors import StartupError

__all__ = [
    "ConsoleFormatter",
    "JsonFormatter",
    "LEVELS",
    "debug_enabled",
    "redact",
    "resolve_level",
    "setup_logging",
]

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: the context fields every line carries when known, in output order
ID_FIELDS = ("connection_id", "session_id", "message_id")
_WORDS = {"conn": "connection_id", "session": "session_id", "msg": "message_id"}
_ID_WORD = re.compile(r"\b(conn|session|msg)=([^\s,;:]+)")
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}

_SECRET_NAMES = (
    r"access_token|refresh_token|id_token|client_secret|api_key|apikey|password|passwd"
    r"|secret|token|jwt"
)
_REDACTIONS = [
    # query strings and key=value words: ?token=abc, &access_token=abc, password=abc
    (re.compile(rf"(?i)\b({_SECRET_NAMES})=([^&\s\"'<>#,;]+)"), r"\1=[REDACTED]"),
    # "token": "abc" and 'token': 'abc' (dicts, JSON)
    (
        re.compile(rf"(?i)([\"'](?:{_SECRET_NAMES})[\"']\s*:\s*[\"'])([^\"']*)"),
        r"\1[REDACTED]",
    ),
    # Authorization: Bearer abc / Basic abc, wherever the scheme appears
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]+"), r"\1\2[REDACTED]"),
    # Authorization: abc (no scheme), ('authorization', 'abc'), {"authorization": "abc"}
    (
        re.compile(
            r"(?i)\b((?:proxy-)?authorization[\"']?\s*[:=,]\s*[\"']?)(?!bearer|basic|\[)"
            r"([^\s\"',;)]+)"
        ),
        r"\1[REDACTED]",
    ),
    # JWTs, wherever they are
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "[REDACTED]"),
]


def redact(text: str) -> str:
    """``text`` without secrets (tokens, passwords, Authorization values, JWTs)."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def debug_enabled(value: str | None) -> bool:
    """Whether a ``DEBUG`` variable (``backchannel:*``, ``*``, ``-backchannel:*``) names us."""
    if not value:
        return False
    names = ("backchannel", "backchannel:app")
    patterns = [p for p in re.split(r"[\s,]+", value) if p]
    if any(fnmatchcase(n, p[1:]) for p in patterns if p.startswith("-") for n in names):
        return False
    return any(fnmatchcase(n, p) for p in patterns if not p.startswith("-") for n in names)


def resolve_level(
    configured: str,
    environ: Mapping[str, str] | None = None,
    explicit: str | None = None,
) -> str:
    """The level of the ``backchannel`` logger (see the module docstring for the order)."""
    env = os.environ if environ is None else environ
    candidates = [
        ("--log-level", explicit),
        ("DEBUG", "DEBUG" if debug_enabled(env.get("DEBUG")) else None),
        ("BACKCHANNEL_LOG_LEVEL", env.get("BACKCHANNEL_LOG_LEVEL")),
        ("log.level", configured),
    ]
    for source, value in candidates:
        if value:
            level = value.strip().upper()
            if level not in LEVELS:
                raise StartupError(f"{source}: {value!r} is not one of {', '.join(LEVELS)}")
            return level
    return "INFO"


def _context(record: logging.LogRecord, message: str) -> dict[str, Any]:
    """Ids and other ``extra=`` fields of ``record``; ids also from the message's words."""
    fields: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_") and value is not None:
            fields[key] = value
    if not all(k in fields for k in ID_FIELDS):
        for word, value in _ID_WORD.findall(message):
            if value != "None":
                fields.setdefault(_WORDS[word], value)
    return fields


def _iso(created: float) -> str:
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, ids, extras, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        message = redact(record.getMessage())
        line: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": message,
        }
        context = _context(record, message)
        for key in ID_FIELDS:
            if key in context:
                line[key] = context.pop(key)
        for key, value in context.items():
            line[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exc"] = redact(record.exc_text)
        data = orjson.dumps(line, default=lambda v: redact(str(v)), option=orjson.OPT_NON_STR_KEYS)
        return data.decode()


class ConsoleFormatter(logging.Formatter):
    """``time LEVEL logger: message`` plus the ids the message does not already name."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        message = record.getMessage()
        context = _context(record, message)
        extra = [f"{k}={context[k]}" for k in ID_FIELDS if k in context]
        missing = [word for word in extra if str(word.split("=", 1)[1]) not in message]
        if missing:
            head, sep, tail = text.partition("\n")  # ids before a traceback
            text = f"{head} [{' '.join(missing)}]{sep}{tail}"
        return redact(text)


class _Installed(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`setup_logging` installs (replaced when it is called again)."""


def setup_logging(
    level: str = "INFO",
    fmt: str = "console",
    *,
    stream: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
    explicit: str | None = None,
) -> logging.Handler:
    """Log to ``stream`` (stderr) in ``fmt`` (``console`` or ``json``), redacted.

    ``level`` is the configured ``log.level``; the environment and ``explicit`` (the
    ``--log-level`` flag) may override it (:func:`resolve_level`). Other libraries log
    at WARNING and above. Calling it again replaces the handler.
    """
    if fmt not in ("console", "json"):
        raise StartupError(f"log.format: {fmt!r} is not one of console, json")
    resolved = resolve_level(level, environ, explicit)
    handler = _Installed(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Installed)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("backchannel").setLevel(resolved)
    return handler
