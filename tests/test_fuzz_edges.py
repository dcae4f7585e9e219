"""Fuzzing the edges (issue 11): random and mutated bytes against a real ``backchannel serve``.

Hypothesis feeds the HTTP/handshake layer (valid requests mutated, truncated, oversized,
pipelined, followed by junk) and an open WebSocket (random frame sequences: control frames,
fragments, bad UTF-8, unmasked frames, reserved opcodes and bits, lengths in every
encoding, interleavings), on one connection per example, against a server process per
backend (asyncio, Trio, and asyncio with ``server.compression = "deflate"``). After every
example:

* the server logged no traceback and nothing at ERROR or above;
* a well-behaved client is answered (a WebSocket ``ping`` request);
* the server's VmRSS stays within :data:`RSS_BOUND_KIB` of what it was after start-up.

Bounded for CI: :data:`EXAMPLES` examples per test and backend (about 10 s in all), each
under a deadline, every wait with a timeout (a hang fails the example).
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backchannel.testing import opening_handshake

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from floods import Server, rss_kib, serve
from floods import frame as client_frame

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

#: examples per test and backend (``FUZZ_EXAMPLES=5000`` for a longer hunt)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
#: how far the server's VmRSS may grow over its size after start-up, in KiB
RSS_BOUND_KIB = 16 * 1024
#: seconds any single wait on the server may take
WAIT = 5.0

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=3 * WAIT),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Watched:
    """The server under fuzzing, and what it was like after start-up."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.port = server.port
        self.log_offset = 0
        self.rss_start = 0

    def check(self) -> None:
        """The properties that must hold after every example."""
        with self.server.log.open("rb") as log:
            log.seek(self.log_offset)
            new = log.read()
            self.log_offset += len(new)
        text = new.decode(errors="replace")
        bad = any(word in text for word in ("Traceback", " ERROR ", " CRITICAL "))
        assert not bad, text
        assert well_behaved_round_trip(self.port) == b"pong"
        growth = rss_kib(self.server.pid) - self.rss_start
        assert growth < RSS_BOUND_KIB, f"server RSS grew by {growth} KiB"


@pytest.fixture(scope="module", params=["asyncio", "trio", "asyncio-deflate"])
def server(request: pytest.FixtureRequest) -> Iterator[Watched]:
    backend, _, compression = request.param.partition("-")
    settings = {
        "BACKCHANNEL_SERVER__HANDSHAKE_TIMEOUT": str(WAIT),
        "BACKCHANNEL_SERVER__COMPRESSION": compression or "off",
        # sessions of closed connections go at once: what stays is the transport's doing
        "BACKCHANNEL_SESSION__TTL": "0",
    }
    with serve(backend, settings) as running:
        watched = Watched(running)
        well_behaved_round_trip(watched.port)  # warm: allocations of a served connection
        watched.rss_start = rss_kib(running.pid)
        yield watched


# ----------------------------------------------------------------------- a plain client


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.settimeout(WAIT)
    return sock


def _recv_until(sock: socket.socket, buf: bytearray, n: int) -> None:
    while len(buf) < n:
        chunk = sock.recv(65536)
        assert chunk, "the server ended the connection"
        buf += chunk


def well_behaved_round_trip(port: int) -> bytes:
    """Handshake, one ``ping`` request, its answer's type; then a clean close."""
    with _connect(port) as sock:
        sock.sendall(opening_handshake())  # (no permessage-deflate offered: plain frames)
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            _recv_until(sock, buf, len(buf) + 1)
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        buf = bytearray(rest)
        sock.sendall(client_frame(0x1, b'{"id":"w1","type":"ping","content":{}}'))
        while True:
            _recv_until(sock, buf, 2)
            length, start = buf[1] & 0x7F, 2
            if length == 126:
                _recv_until(sock, buf, 4)
                (length,), start = struct.unpack("!H", buf[2:4]), 4
            _recv_until(sock, buf, start + length)
            opcode, payload = buf[0] & 0x0F, bytes(buf[start : start + length])
            del buf[: start + length]
            if opcode == 0x1 and b'"replyTo":"w1"' in payload:
                sock.sendall(client_frame(0x8, struct.pack("!H", 1000)))
                return b"pong" if b'"type":"pong"' in payload else payload


def send_and_end(port: int, chunks: list[bytes], ending: str) -> None:
    """Send ``chunks`` (each its own write) on a fresh connection, then end it: ``"eof"``
    half-closes and reads until the server ends the connection (within :data:`WAIT`),
    ``"close"`` closes, ``"reset"`` closes with a TCP RST."""
    with _connect(port) as sock:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return  # the server ended it first: fine
        if ending == "eof":
            try:
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
            except ConnectionResetError:
                pass  # (unread bytes in the server's receive buffer make its close a reset)
            except TimeoutError:
                pytest.fail(f"the server did not end the connection within {WAIT} s")
        elif ending == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


ENDINGS = st.sampled_from(["eof", "close", "reset"])


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a] or [data]


# --------------------------------------------------------------------- the HTTP edge

REQUESTS = [
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /readyz HTTP/1.0\r\n\r\n",
    b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"GET /nowhere?x=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /static/backchannel.js HTTP/1.1\r\n\r\n",
    opening_handshake(),
    opening_handshake("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"),
    opening_handshake(path="/ws?token=abc&x=%ff"),
]

BYTES = st.binary(max_size=64)
HEADER_LINE = st.builds(
    lambda name, value: name + b": " + value + b"\r\n",
    st.sampled_from([b"X-A", b"Host", b"Upgrade", b"Connection", b"Content-Length", b"Origin"])
    | st.binary(min_size=1, max_size=12),
    st.binary(max_size=40),
)


@st.composite
def mutated_request(draw: st.DrawFn) -> bytes:
    """A request from :data:`REQUESTS`, mutated: bytes replaced, inserted or cut, header
    lines added (one of them huge, sometimes), the end cut off."""
    data = bytearray(draw(st.sampled_from(REQUESTS)))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["replace", "insert", "delete", "header", "huge", "cut"]))
        if kind == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(BYTES)
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "header":
            line_end = data.find(b"\r\n") + 2
            data[line_end:line_end] = draw(HEADER_LINE)
        elif kind == "huge":
            line_end = data.find(b"\r\n") + 2
            size = draw(st.sampled_from([8190, 8200, 70_000, 200_000]))
            data[line_end:line_end] = b"X-Huge: " + b"a" * size + b"\r\n"
        elif kind == "cut":
            del data[at:]
    return bytes(data)


@FUZZ
@given(
    before=st.one_of(st.just(b""), BYTES),
    request=mutated_request(),
    after=st.one_of(
        st.just(b""),
        BYTES,
        st.sampled_from(REQUESTS),  # a pipelined second request
        st.binary(min_size=1000, max_size=20_000),
    ),
    cuts=st.lists(st.integers(0, 1 << 20), max_size=4),
    ending=ENDINGS,
)
def test_any_bytes_on_the_http_edge(
    server: Watched, before: bytes, request: bytes, after: bytes, cuts: list[int], ending: str
) -> None:
    """Junk before a request, a mutated request (truncated, oversized, bad bytes), junk or a
    second request after it, in any split of writes, ended any way."""
    send_and_end(server.port, _chunked(before + request + after, cuts), ending)
    server.check()


@FUZZ
@given(data=st.binary(max_size=2048), cuts=st.lists(st.integers(0, 4096), max_size=3))
def test_random_bytes_instead_of_a_request(server: Watched, data: bytes, cuts: list[int]) -> None:
    send_and_end(server.port, _chunked(data, cuts), "eof")
    server.check()


# ------------------------------------------------------------------ an open WebSocket

REQUEST_JSON = st.builds(
    lambda i, t: b'{"id":"f%d","type":"%s","content":{}}' % (i, t),
    st.integers(0, 99),
    st.sampled_from([b"ping", b"text", b"nope", b"init"]),
)
PAYLOADS = st.one_of(
    st.just(b""),
    st.binary(max_size=200),
    REQUEST_JSON,
    st.sampled_from([b"\xff\xfe", b"\xed\xa0\x80", b"\xc3", b"caf\xc3\xa9", b"\xf4\x90\x80\x80"]),
    st.binary(min_size=126, max_size=70_000),  # 16- and 64-bit lengths, past max_message_size
)
CLOSE_PAYLOADS = st.one_of(
    st.just(b""),
    st.just(b"\x03"),  # one byte: invalid
    st.builds(
        lambda code, reason: struct.pack("!H", code) + reason,
        st.sampled_from([1000, 1001, 1002, 1005, 1006, 1011, 1015, 999, 3000, 4999, 5000, 65535]),
        st.one_of(st.binary(max_size=123), st.just(b"\xff")),
    ),
)


@st.composite
def any_frame(draw: st.DrawFn) -> bytes:
    """One frame as a client might send it, or get wrong: any opcode (reserved ones too),
    FIN, RSV bits, masked or not, payload lengths in minimal or oversized encodings."""
    opcode = draw(st.sampled_from([0x0, 0x1, 0x2, 0x8, 0x9, 0xA]) | st.integers(0, 15))
    if opcode == 0x8:
        payload = draw(CLOSE_PAYLOADS)
    elif opcode in (0x9, 0xA):
        payload = draw(st.binary(max_size=130))  # >125: a protocol error
    else:
        payload = draw(PAYLOADS)
    fin = draw(st.booleans())
    rsv = draw(st.sampled_from([0, 0, 0, 0, 0x40, 0x20, 0x10, 0x70]))
    masked = draw(st.sampled_from([True, True, True, False]))
    n = len(payload)
    encoding = draw(st.sampled_from(["minimal", "16", "64", "lie"]))
    if encoding == "16" or (encoding == "minimal" and 126 <= n < 1 << 16):
        length = bytes([126]) + struct.pack("!H", n & 0xFFFF)
    elif encoding == "64" or (encoding == "minimal" and n >= 1 << 16):
        length = bytes([127]) + struct.pack("!Q", n)
    elif encoding == "lie":  # a length other than the payload's (frames run into each other)
        length = bytes([127]) + struct.pack("!Q", draw(st.sampled_from([0, 1, 1 << 20, 1 << 63])))
    else:
        length = bytes([n])
    key = draw(st.binary(min_size=4, max_size=4)) if masked else b""
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if masked else payload
    first = (0x80 if fin else 0) | rsv | opcode
    return bytes([first, (0x80 if masked else 0) | length[0]]) + length[1:] + key + body


FRAME_SEQUENCES = st.lists(
    st.one_of(
        any_frame(),
        any_frame().map(lambda f: f[: max(1, len(f) // 2)]),  # a truncated frame
        st.binary(min_size=1, max_size=32),  # raw junk between frames
        st.builds(  # a well-formed fragmented request, interleaved with control frames
            lambda req, ping: (
                client_frame(0x1, req[:5], fin=False)
                + client_frame(0x9, ping)
                + client_frame(0x0, req[5:], fin=True)
            ),
            REQUEST_JSON,
            st.binary(max_size=125),
        ),
    ),
    min_size=1,
    max_size=12,
)


DEFLATE = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"


@FUZZ
@given(
    frames=FRAME_SEQUENCES,
    cuts=st.lists(st.integers(0, 1 << 20), max_size=3),
    ending=ENDINGS,
    deflate=st.booleans(),
)
def test_any_frames_on_an_open_websocket(
    server: Watched, frames: list[bytes], cuts: list[int], ending: str, deflate: bool
) -> None:
    """After a valid handshake (offering permessage-deflate or not; the ``asyncio-deflate``
    server accepts it, so frames with RSV1 set are inflated): a random sequence of frames,
    in any split of writes."""
    handshake = opening_handshake(DEFLATE) if deflate else opening_handshake()
    send_and_end(server.port, [handshake, *_chunked(b"".join(frames), cuts)], ending)
    server.check()
