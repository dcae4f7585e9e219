"""The small in-process plugins ``App`` registers for ``@app.handler`` and ``@app.on``.

An inline handler or observer is a plugin like any other to the kernel: these build the
plugin object, so the gateway calls it with the same rules as an installed one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .hookspecs import hookimpl

__all__ = ["EVENTS", "TypePlugin", "observer"]

#: ``@app.on(event)`` names and the arguments their callbacks receive, in order.
EVENTS: dict[str, tuple[str, ...]] = {
    "connection_added": ("connection",),
    "connection_removed": ("connection", "code"),
    "message_received": ("message", "connection"),
    "message_sent": ("connection", "frame"),
    "error": ("connection", "message_id", "error"),
    "alert": ("name", "state", "details"),
}


def observer(event: str, func: Callable[..., Any]) -> object:
    """A one-hook plugin object calling ``func`` positionally for ``event``."""
    args = EVENTS[event]
    namespace: dict[str, Any] = {}
    params = ", ".join(args)
    exec(f"def {event}({params}):\n    return func({params})\n", {"func": func}, namespace)
    return type(f"on_{event}", (), {event: staticmethod(hookimpl(namespace[event]))})()


class TypePlugin:
    """What ``@app.handler`` registers: one message type with its handler."""

    def __init__(self, name: str, handler: Callable[..., Any], options: dict[str, Any]) -> None:
        self._name = name
        self._handler = handler
        self._options = options

    @hookimpl
    def message_types(self, register: Callable[..., None]) -> None:
        register(self._name, handler=self._handler, **self._options)
