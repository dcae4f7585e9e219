"""The one kernel module that imports ``websockets``: its Sans-I/O protocol, wrapped.

Drivers (:mod:`backchannel.server`) feed bytes in and write out what
:meth:`Wire.data_to_send` returns; the kernel sees only whole messages, its own
:class:`~backchannel.http.HttpRequest`, and close codes. Fragmented messages are
reassembled here, and text is checked as UTF-8 (RFC 6455 §8.1, close 1007).
:class:`ClientWire` does the same for the client side (:mod:`backchannel.client`).
"""

from __future__ import annotations

import http
import logging
import os
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Protocol

from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from .http import HttpRequest, HttpResponse

__all__ = ["COMPRESSIONS", "SUBPROTOCOL", "ClientWire", "Wire", "WireSink"]

SUBPROTOCOL = "backchannel.v1"
_log = logging.getLogger("backchannel.websocket")
_log.setLevel(logging.WARNING)  # websockets logs every open/close at INFO
_TEXT, _BINARY, _CONT, _PONG, _CLOSE = (
    Opcode.TEXT,
    Opcode.BINARY,
    Opcode.CONT,
    Opcode.PONG,
    Opcode.CLOSE,
)


#: messages of one connection handed to the kernel in a row before others get a turn
BATCH = 64
#: bytes of request line and headers accepted (nginx allows 32 KB, Node.js 16 KB)
MAX_HANDSHAKE_SIZE = 65536
#: websockets' handshake size limits (8 KB per line, 128 headers) -> the status it answered
_TOO_LARGE = {"RequestLineTooLong": 414, "HeaderLineTooLong": 431, "TooManyHeaders": 431}


#: values of ``server.compression``
COMPRESSIONS = ("off", "deflate")


def _extensions(compression: str) -> list[ServerExtensionFactory]:
    """Server extensions for ``server.compression``.

    The deflate parameters are websockets' own memory-conscious defaults (4 KiB windows,
    memLevel 5: ~64 KiB of zlib state per connection instead of ~320 KiB). Inflation is
    bounded by ``max_size``: websockets decompresses with ``max_length`` and raises
    PayloadTooBig (close 1009) past the limit, so a bomb never expands in memory.
    """
    if compression == "off":
        return []
    if compression == "deflate":
        return [
            ServerPerMessageDeflateFactory(
                server_max_window_bits=12,
                client_max_window_bits=12,
                compress_settings={"memLevel": 5},
            )
        ]
    raise ValueError(f"unknown compression {compression!r}; allowed: {', '.join(COMPRESSIONS)}")


class _Framing:
    """Server text frames (unmasked, FIN, no extension) with the last one kept: a room
    frame is written to every member connection in a row, so it is framed once, not
    once per member (issue 13). Answers, each its own payload, are framed as before."""

    __slots__ = ("payload", "frame")

    def __init__(self) -> None:
        self.payload = b""
        self.frame = Frame(_TEXT, b"").serialize(mask=False, extensions=[])

    def text(self, payload: bytes) -> bytes:
        if payload is not self.payload:  # identity: the same object, written again
            self.frame = Frame(_TEXT, payload).serialize(mask=False, extensions=[])
            self.payload = payload
        return self.frame


_framing = _Framing()


def _select_subprotocol(protocol: ServerProtocol, offered: Sequence[str]) -> str | None:
    # Offer backchannel.v1 when asked, but accept clients that ask for nothing.
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


class WireSink(Protocol):
    """What the wire calls with complete incoming events."""

    def on_request(self, request: HttpRequest) -> None: ...

    def on_message(self, payload: str | bytes) -> None: ...

    def on_refused(self, status: int | None, why: str) -> None:
        """A request too large (``status`` 414/431, already answered) or not HTTP (None)."""


class _Side:
    """What both ends share: reassembly, UTF-8 checks, heartbeat pings, closing."""

    __slots__ = ("_protocol", "_parts", "_opcode", "ping_outstanding")

    _protocol: ServerProtocol | ClientProtocol

    def _init_side(self) -> None:
        self._parts: list[bytes] = []
        self._opcode: Opcode | None = None
        #: payload of the last ping without a pong yet (heartbeat).
        self.ping_outstanding: bytes | None = None

    @property
    def is_open(self) -> bool:
        """The handshake succeeded and no close frame was sent or received yet."""
        return self._protocol.state is State.OPEN

    @property
    def is_closed(self) -> bool:
        return self._protocol.state is State.CLOSED

    @property
    def close_code(self) -> int | None:
        """The close code once closed (1006 when no close frame was received)."""
        return self._protocol.close_code

    def data_to_send(self) -> list[bytes]:
        """Bytes to write, in order; an empty bytes object means half-close (EOF)."""
        return self._protocol.data_to_send()

    def close_expected(self) -> bool:
        """Whether the TCP connection should be closed soon (after a timeout)."""
        return self._protocol.close_expected()

    def receive_eof(self) -> None:
        """The peer closed its side of the TCP connection."""
        self._protocol.receive_eof()
        self._protocol.events_received()

    def _message(self, frame: Frame) -> str | bytes | None:
        """The complete message ``frame`` finishes, if any (text checked as UTF-8)."""
        opcode = frame.opcode
        if opcode is _TEXT or opcode is _BINARY:
            if not frame.fin:
                self._opcode = opcode
                self._parts = [bytes(frame.data)]
                return None
            data = bytes(frame.data)
        elif opcode is _CONT:
            self._parts.append(bytes(frame.data))
            if not frame.fin:
                return None
            data = b"".join(self._parts)
            self._parts = []
            opcode = self._opcode  # type: ignore[assignment]
        else:
            if opcode is _PONG and frame.data == self.ping_outstanding:
                self.ping_outstanding = None
            return None
        if opcode is not _TEXT:
            return data
        try:
            return data.decode()
        except UnicodeDecodeError:  # RFC 6455 §8.1
            self._protocol.fail(1007, "invalid UTF-8 in a text message")
            return None

    def send_text(self, data: bytes) -> bool:
        """Queue one text message (UTF-8 encoded); False once closing (nothing is sent)."""
        if self._protocol.state is not State.OPEN:
            return False
        self._protocol.send_text(data)
        return True

    def ping(self) -> bool:
        """Send a heartbeat ping; False if the previous one got no pong."""
        if self.ping_outstanding is not None:
            return False
        if self._protocol.state is State.OPEN:
            self.ping_outstanding = os.urandom(4)
            self._protocol.send_ping(self.ping_outstanding)
        return True

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (no-op unless open)."""
        if self._protocol.state is State.OPEN:
            self._protocol.send_close(code, reason[:120])


class Wire(_Side):
    """One server-side WebSocket connection's protocol state (no I/O)."""

    __slots__ = ("_sink", "_request", "subprotocol", "_parsed", "_head", "_backlog")

    _protocol: ServerProtocol

    def __init__(
        self,
        sink: WireSink,
        *,
        max_size: int | None,
        origins: Sequence[str] | None = None,
        compression: str = "off",
    ) -> None:
        allowed: list[str | None] | None = None
        if origins is not None:
            allowed = [None if o == "null" else o for o in origins]
        self._protocol = ServerProtocol(
            origins=allowed,  # type: ignore[arg-type]
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            select_subprotocol=_select_subprotocol,  # type: ignore[arg-type]
            extensions=_extensions(compression),
            max_size=max_size,  # bounds the decompressed size too
            logger=_log,
        )
        self._init_side()
        self._sink = sink
        self._request: Request | None = None
        self.subprotocol: str | None = None
        self._backlog: deque[Request | Frame | Response] = deque()  # events not handed over yet
        self._parsed = False  # a request was parsed, or the failure to parse one reported
        self._head = 0  # bytes received before the request was parsed

    def send_text(self, data: bytes) -> bool:
        """Queue one text message (UTF-8 encoded); False once closing (nothing is sent).

        Without a negotiated extension the frame bytes do not depend on the connection,
        so they are made once per payload (``_Framing``) and queued as
        ``ServerProtocol.send_frame`` would queue them (its ``writes``); with
        permessage-deflate each connection compresses its own."""
        protocol = self._protocol
        if protocol.state is not State.OPEN:
            return False
        if protocol.extensions:
            protocol.send_text(data)
        else:
            protocol.writes.append(_framing.text(data))
        return True

    @property
    def close_code(self) -> int | None:
        """The close code once closed: the server's when it closed first (e.g. 1009 for a
        message past max_size, which websockets reports as 1006 because it stops parsing
        after failing the connection), else the peer's; 1006 when no close frame was sent."""
        protocol = self._protocol
        sent = protocol.close_sent
        closed = protocol.state is State.CLOSED
        if closed and sent is not None and not protocol.close_rcvd_then_sent:
            return sent.code
        return protocol.close_code

    # --------------------------------------------------------------- incoming

    def receive_data(self, data: bytes) -> bool:
        """Feed bytes from the network; complete events go to the sink.

        At most :data:`BATCH` messages are handed over per call; True means more
        wait, to be handed over by :meth:`deliver` once other connections had a turn
        (one read can hold thousands of small requests).
        """
        protocol = self._protocol
        if not self._parsed:
            self._head += len(data)
            if self._head > MAX_HANDSHAKE_SIZE:  # websockets' line limits alone let ~1 MB in
                self._parsed = True
                why = f"request head larger than {MAX_HANDSHAKE_SIZE} bytes"
                protocol.send_response(
                    protocol.reject(431, f"Failed to open a WebSocket connection: {why}.\n")
                )
                self._sink.on_refused(431, why)
                return False
        protocol.receive_data(data)
        events = protocol.events_received()
        if len(events) == 1 and not self._backlog and isinstance(events[0], Frame):
            # the common case, one message per read: no backlog bookkeeping
            message = self._message(events[0])
            if message is not None:
                self._sink.on_message(message)
            return False
        self._backlog.extend(events)
        more = self.deliver()
        exc = protocol.handshake_exc
        if exc is not None and not self._parsed:  # websockets refused what it could not parse
            self._parsed = True
            self._sink.on_refused(_TOO_LARGE.get(type(exc).__name__), str(exc))
        return more

    def deliver(self) -> bool:
        """Hand up to :data:`BATCH` waiting messages to the sink; True when more wait."""
        backlog = self._backlog
        handed = 0
        while backlog:
            event = backlog.popleft()
            if isinstance(event, Request):
                self._request = event
                self._parsed = True
                headers = {k.lower(): v for k, v in event.headers.raw_items()}
                self._sink.on_request(HttpRequest("GET", event.path, headers))
            elif isinstance(event, Frame):  # (a server never receives a Response)
                message = self._message(event)
                if message is not None:
                    self._sink.on_message(message)
                    handed += 1
                    if handed >= BATCH and backlog:
                        return True
        return False

    # --------------------------------------------------------------- outgoing

    def accept(self, extra_headers: dict[str, str] | None = None) -> HttpResponse | None:
        """Answer the handshake; return the rejection sent instead, if any (origin, bad request)."""
        assert self._request is not None
        response = self._protocol.accept(self._request)
        if extra_headers:
            for name, value in extra_headers.items():
                response.headers[name] = value
        self._protocol.send_response(response)
        self._request = None
        if response.status_code != 101:
            return HttpResponse(response.status_code, bytes(response.body or b""))
        self.subprotocol = response.headers.get("Sec-WebSocket-Protocol")
        return None

    def respond(self, response: HttpResponse) -> None:
        """Answer the request with plain HTTP instead of a WebSocket handshake."""
        status = http.HTTPStatus(response.status)
        headers = Headers()
        headers["Content-Type"] = response.content_type
        headers["Content-Length"] = str(len(response.body))
        headers["Connection"] = "close"
        for name, value in response.headers.items():
            headers[name] = value
        self._protocol.send_response(Response(status.value, status.phrase, headers, response.body))

    def send_binary(self, data: bytes) -> bool:
        """Queue one binary message (the conformance fixture's echo only)."""
        if self._protocol.state is not State.OPEN:
            return False
        self._protocol.send_binary(data)
        return True


class ClientWire(_Side):
    """One client WebSocket connection's protocol state (no I/O), for :mod:`backchannel.client`.

    The caller opens the TCP (or TLS) stream to :attr:`host`:attr:`port`, writes
    what :meth:`data_to_send` returns (the handshake request first) and feeds what
    it reads to :meth:`receive_data`, which returns complete text messages.
    """

    __slots__ = ("host", "port", "secure")

    _protocol: ClientProtocol

    def __init__(
        self, url: str, *, headers: Mapping[str, str] | None = None, max_size: int | None = None
    ) -> None:
        uri = parse_uri(url)
        self.host, self.port, self.secure = uri.host, uri.port, uri.secure
        self._protocol = ClientProtocol(
            uri, subprotocols=[Subprotocol(SUBPROTOCOL)], max_size=max_size, logger=_log
        )
        request = self._protocol.connect()
        for name, value in (headers or {}).items():
            request.headers[name] = value
        self._protocol.send_request(request)
        self._init_side()

    @property
    def handshake_error(self) -> str | None:
        """Why the server refused the handshake (e.g. its HTTP status), else None."""
        exc = self._protocol.handshake_exc
        return None if exc is None else str(exc)

    @property
    def close_reason(self) -> str | None:
        return self._protocol.close_reason

    def receive_data(self, data: bytes) -> list[str]:
        """Feed bytes from the network; return the complete text messages they finish.

        Fragments are reassembled; binary messages (not part of v1) are dropped.
        """
        self._protocol.receive_data(data)
        messages: list[str] = []
        for event in self._protocol.events_received():
            if isinstance(event, Frame):  # (not the handshake Response)
                message = self._message(event)
                if type(message) is str:
                    messages.append(message)
        return messages
