"""The one kernel module that imports ``websockets``: its Sans-I/O protocol, wrapped.

Drivers (:mod:`backchannel.server`) feed bytes in and write out what
:meth:`Wire.data_to_send` returns; the kernel sees only whole messages, its own
:class:`~backchannel.http.HttpRequest`, and close codes. Fragmented messages are
reassembled here, and text is checked as UTF-8 (RFC 6455 §8.1, close 1007).
:class:`ClientWire` does the same for the client side (:mod:`backchannel.client`).

Two things the server side does differently from websockets' own ``ServerProtocol``,
so that no bytes a client sends can make the server hold more than a bounded amount
or reach an inconsistent state (issue 11):

* one HTTP request per connection: websockets sees exactly one request head; bytes
  after it wait for its answer (frames, after a 101) or are ignored (after any other
  answer), so junk or a pipelined second request behind ``GET /healthz`` cannot start
  a second answer;
* pings are answered by the :class:`Wire`, not by websockets: at once, in order,
  while the peer reads; while the driver reports that it does not
  (:attr:`Wire.hold_pongs`), only the latest ping keeps a pong waiting, sent once it
  reads again (RFC 6455 §5.5.3), so a ping flood cannot queue pongs.
"""

from __future__ import annotations

import enum
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
_TEXT, _BINARY, _CONT, _PING, _PONG = (
    Opcode.TEXT,
    Opcode.BINARY,
    Opcode.CONT,
    Opcode.PING,
    Opcode.PONG,
)


#: frames of one connection handled in a row (messages handed to the kernel, pings,
#: fragments) before other connections get a turn
BATCH = 64
#: bytes given to websockets' parser at a time: a flood of tiny frames (6 bytes each) is
#: parsed at most ~680 frames (~2 ms) per turn, and at most that many wait in the backlog
FEED_SIZE = 4096
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

    def on_request(self, request: HttpRequest) -> None:
        """The request head: answer it with :meth:`Wire.accept` or :meth:`Wire.respond`."""

    def on_message(self, payload: str | bytes) -> None: ...

    def on_refused(self, status: int | None, why: str) -> None:
        """A request too large (``status`` 414/431, already answered) or not HTTP (None)."""


class _ServerProtocol(ServerProtocol):
    """websockets' ``ServerProtocol``, except that a ping is handed over as an event
    instead of being answered at once: :class:`Wire` answers it (see
    :attr:`Wire.hold_pongs`)."""

    def recv_frame(self, frame: Frame) -> None:
        if frame.opcode is _PING:
            self.events.append(frame)
        else:
            super().recv_frame(frame)


class _Stage(enum.Enum):
    """Where a server connection is, as far as the bytes it receives are concerned."""

    #: reading the request head: bytes go to websockets up to the blank line ending it
    HEAD = enum.auto()
    #: the request went to the sink; until it is answered, bytes are ignored and an EOF
    #: waits (a client may half-close after its request and still read the answer)
    ANSWERING = enum.auto()
    #: accepted (101): bytes are WebSocket frames
    WEBSOCKET = enum.auto()
    #: answered with plain HTTP, or refused: bytes are ignored until the peer closes
    DONE = enum.auto()


class _Side:
    """What both ends share: reassembly, UTF-8 checks, heartbeat pings, closing."""

    __slots__ = ("_protocol", "_parts", "_opcode", "ping_outstanding")

    _protocol: ServerProtocol | ClientProtocol

    def _init_side(self) -> None:
        #: the fragments of the message being reassembled: one buffer, so that a flood of
        #: empty fragments costs nothing (websockets bounds its size by max_size)
        self._parts = bytearray()
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
                self._parts = bytearray(frame.data)
                return None
            data = bytes(frame.data)
        elif opcode is _CONT:
            self._parts += frame.data
            if not frame.fin:
                return None
            data = bytes(self._parts)
            self._parts = bytearray()
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
    """One server-side WebSocket connection's protocol state (no I/O).

    One HTTP request per connection: its head is parsed, handed to the sink, and answered
    with a WebSocket handshake (:meth:`accept`) or plain HTTP (:meth:`respond`); what the
    client sends after the head is ignored unless the answer is a 101 (then it is frames).
    """

    __slots__ = (
        "_sink",
        "_request",
        "subprotocol",
        "_stage",
        "_head",
        "_tail",
        "_eof_waiting",
        "_backlog",
        "_unfed",
        "_pong",
        "hold_pongs",
    )

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
        self._protocol = _ServerProtocol(
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
        self._stage = _Stage.HEAD
        self._head = 0  # bytes of the request head received
        self._tail = b""  # its last 3 bytes (the blank line ending it may span two reads)
        self._eof_waiting = False  # the peer half-closed before what it sent was handled
        #: bytes received and not given to the parser yet (see FEED_SIZE)
        self._unfed = memoryview(b"")
        self._pong: bytes | None = None  # the payload of the latest ping held unanswered
        #: set by the driver while the peer is not reading (its send buffer is full): then
        #: pings are not answered one by one, the latest one waits for its pong
        self.hold_pongs = False

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

    @property
    def answering(self) -> bool:
        """The request was handed to the sink and is not answered yet."""
        return self._stage is _Stage.ANSWERING

    # --------------------------------------------------------------- incoming

    def receive_data(self, data: bytes) -> bool:
        """Feed bytes from the network; complete events go to the sink.

        At most :data:`BATCH` frames are handled per call, parsed :data:`FEED_SIZE` bytes
        at a time; True means more wait, to be handled by :meth:`deliver` once other
        connections had a turn (one read can hold thousands of small frames).
        """
        stage = self._stage
        if stage is _Stage.HEAD:
            return self._receive_head(data)
        if stage is not _Stage.WEBSOCKET:  # one request per connection: the rest is ignored
            return False
        if self._unfed or len(data) > FEED_SIZE:
            self._unfed = memoryview(bytes(self._unfed) + data if self._unfed else data)
            return self.deliver()
        protocol = self._protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        if len(events) == 1 and not self._backlog:
            # the common case, one message per read: no backlog bookkeeping
            message = self._message(events[0])  # type: ignore[arg-type]  # (a frame)
            if message is not None:
                self._sink.on_message(message)
            return False
        self._backlog.extend(events)
        return self.deliver()

    def _receive_head(self, data: bytes) -> bool:
        """Give websockets the request head, and nothing after it: what follows is frames
        once the handshake is accepted (a client may send them without waiting for the
        101), and ignored otherwise."""
        protocol = self._protocol
        window = self._tail + data
        end = window.find(b"\r\n\r\n")  # the first blank line ends the head (RFC 9112 §2.1)
        if end < 0:
            head, rest = data, b""
            self._tail = window[-3:]
        else:
            cut = end + 4 - len(self._tail)
            head, rest = data[:cut], data[cut:]
        self._head += len(head)
        if self._head > MAX_HANDSHAKE_SIZE:  # websockets' line limits alone let ~1 MB in
            self._stage = _Stage.DONE
            why = f"request head larger than {MAX_HANDSHAKE_SIZE} bytes"
            protocol.send_response(
                protocol.reject(431, f"Failed to open a WebSocket connection: {why}.\n")
            )
            self._sink.on_refused(431, why)
            return False
        protocol.receive_data(head)
        self._backlog.extend(protocol.events_received())
        more = self.deliver()  # the request, if complete: the sink answers it or will
        exc = protocol.handshake_exc
        if self._stage is _Stage.HEAD and exc is not None:  # websockets could not parse it
            self._stage = _Stage.DONE
            self._sink.on_refused(_TOO_LARGE.get(type(exc).__name__), str(exc))
        if rest and self._stage is _Stage.WEBSOCKET:
            more = self.receive_data(rest) or more
        return more

    def deliver(self) -> bool:
        """Handle up to :data:`BATCH` waiting frames; True when more wait."""
        backlog = self._backlog
        handled = 0
        while True:
            while backlog:
                event = backlog.popleft()
                if isinstance(event, Request):
                    self._request = event
                    self._stage = _Stage.ANSWERING
                    headers = {k.lower(): v for k, v in event.headers.raw_items()}
                    self._sink.on_request(HttpRequest(event.method, event.path, headers))
                elif isinstance(event, Frame):  # (a server never receives a Response)
                    message = self._message(event)
                    if message is not None:
                        self._sink.on_message(message)
                    handled += 1
                    if handled >= BATCH and (backlog or self._unfed):
                        return True
            unfed = self._unfed
            if not unfed:
                return False
            self._unfed = unfed[FEED_SIZE:]
            protocol = self._protocol
            protocol.receive_data(bytes(unfed[:FEED_SIZE]))
            backlog.extend(protocol.events_received())
            if not self._unfed and self._eof_waiting:
                super().receive_eof()

    def _message(self, frame: Frame) -> str | bytes | None:
        if frame.opcode is _PING:
            self._pong = bytes(frame.data)
            if not self.hold_pongs:
                self._send_pong()
            return None
        return super()._message(frame)

    def _send_pong(self) -> None:
        payload, self._pong = self._pong, None
        protocol = self._protocol
        if payload is not None and protocol.state is State.OPEN and not protocol.eof_sent:
            protocol.send_pong(payload)  # (closing: no answer needed)

    def receive_eof(self) -> None:
        """The peer closed its side of the TCP connection (taken once what it sent before
        is parsed, and its request answered)."""
        if self._stage is _Stage.ANSWERING or self._unfed:
            self._eof_waiting = True
        else:
            super().receive_eof()

    # --------------------------------------------------------------- outgoing

    def data_to_send(self) -> list[bytes]:
        """Bytes to write, in order; an empty bytes object means half-close (EOF). Once
        :attr:`hold_pongs` is cleared, the pong held for the latest ping comes last."""
        if self._pong is not None and not self.hold_pongs:
            self._send_pong()
        return self._protocol.data_to_send()

    def accept(self, extra_headers: dict[str, str] | None = None) -> HttpResponse | None:
        """Answer the handshake; return the rejection sent instead, if any (origin, bad request)."""
        assert self._request is not None and self._stage is _Stage.ANSWERING
        response = self._protocol.accept(self._request)
        if extra_headers:
            for name, value in extra_headers.items():
                response.headers[name] = value
        self._request = None
        self._answer(response)
        if response.status_code != 101:
            return HttpResponse(response.status_code, bytes(response.body or b""))
        self.subprotocol = response.headers.get("Sec-WebSocket-Protocol")
        return None

    def respond(self, response: HttpResponse) -> None:
        """Answer the request with plain HTTP instead of a WebSocket handshake (nothing
        happens if it is answered already)."""
        if self._stage is not _Stage.ANSWERING:
            return
        status = http.HTTPStatus(response.status)
        headers = Headers()
        headers["Content-Type"] = response.content_type
        headers["Content-Length"] = str(len(response.body))
        headers["Connection"] = "close"
        for name, value in response.headers.items():
            headers[name] = value
        self._request = None
        self._answer(Response(status.value, status.phrase, headers, response.body))

    def _answer(self, response: Response) -> None:
        self._protocol.send_response(response)  # anything but a 101 half-closes
        self._stage = _Stage.WEBSOCKET if response.status_code == 101 else _Stage.DONE
        if self._eof_waiting:
            super().receive_eof()

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
