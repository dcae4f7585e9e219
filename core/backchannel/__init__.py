"""backchannel: real-time chat over WebSocket where every request gets exactly one answer.

The top level re-exports what applications and plugin authors need (docs/plugins.md
lists the public surface).
"""

from .app import App, __version__
from .connection import Connection, State
from .counters import Counters
from .errors import BackchannelError, CloseCode, ErrorCode, Reject, StartupError
from .hookspecs import hookimpl
from .model import DEFERRED, Message, MessageType, Principal, Reply, Stash, StashKey
from .session import Session

__all__ = [
    "App",
    "BackchannelError",
    "CloseCode",
    "Connection",
    "Counters",
    "DEFERRED",
    "ErrorCode",
    "Message",
    "MessageType",
    "Principal",
    "Reject",
    "Reply",
    "Session",
    "StartupError",
    "Stash",
    "StashKey",
    "State",
    "__version__",
    "hookimpl",
]
