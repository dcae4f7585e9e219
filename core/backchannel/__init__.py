"""backchannel: real-time chat over WebSocket where every request gets exactly one answer.

The top level re-exports what applications and plugin authors need.
"""

from .app import App, __version__
from .errors import BackchannelError, CloseCode, ErrorCode, Reject, StartupError
from .hookspecs import hookimpl
from .hub import Connection, Session
from .model import Message, Principal, Reply, Stash, StashKey

__all__ = [
    "App",
    "BackchannelError",
    "CloseCode",
    "Connection",
    "ErrorCode",
    "Message",
    "Principal",
    "Reject",
    "Reply",
    "Session",
    "StartupError",
    "Stash",
    "StashKey",
    "__version__",
    "hookimpl",
]
