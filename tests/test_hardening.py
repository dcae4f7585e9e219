"""Handshake hardening over real sockets (issue 4 item 4): compression, bounded handshakes.

What ``test_server.py`` already covers is not repeated here: a silent or dribbling
client dropped at ``handshake_timeout`` (``test_handshake_timeout_disconnects_silent_and_
dribbling_clients``), 1 MB of headers ending only that connection
(``test_a_megabyte_of_headers_is_rejected_without_harm``) and the Origin allow-list
(``test_origin_allow_list_rejects_with_403_at_handshake``). This file adds the answer
each refused handshake gets, its log line and counter, the total size bound, and the
timeout's edges.
"""

from __future__ import annotations

import os
import struct
import sys
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import anyio
import anyio.abc
import pytest

from backchannel import App
from backchannel.testing import opening_handshake
from backchannel.websocket import MAX_HANDSHAKE_SIZE
from conftest import make_app, serving, ws_connect

pytestmark = pytest.mark.anyio


class Raw:
    """A bare TCP client: sends what it is given, reads what comes back."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def send(self, data: bytes) -> None:
        with suppress(anyio.BrokenResourceError, OSError):  # the server may stop listening
            await self.stream.send(data)

    async def head(self) -> tuple[int, dict[str, str]]:
        """The HTTP response's status and headers (lower-cased names)."""
        with anyio.fail_after(5):
            while b"\r\n\r\n" not in self.buf:
                self.buf += await self.stream.receive(1 << 16)
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        status_line, *lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        return int(status_line.split(" ", 2)[1]), headers

    async def frame(self) -> tuple[int, bytes]:
        """One server frame: ``(opcode, payload)`` (servers never mask)."""
        while len(self.buf) < 2:
            self.buf += await self.stream.receive(1 << 16)
        length = self.buf[1] & 0x7F
        start = 2 + {126: 2, 127: 8}.get(length, 0)
        while len(self.buf) < start:
            self.buf += await self.stream.receive(1 << 16)
        if length == 126:
            (length,) = struct.unpack("!H", self.buf[2:4])
        elif length == 127:
            (length,) = struct.unpack("!Q", self.buf[2:10])
        while len(self.buf) < start + length:
            self.buf += await self.stream.receive(1 << 16)
        opcode, payload = self.buf[0] & 0x0F, bytes(self.buf[start : start + length])
        del self.buf[: start + length]
        return opcode, payload

    async def eof(self) -> bool:
        """Read until the server ends the TCP connection."""
        with anyio.fail_after(5):
            try:
                while True:
                    await self.stream.receive(1 << 16)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return True


@asynccontextmanager
async def raw(app: App) -> AsyncIterator[Raw]:
    assert app.port is not None
    stream = await anyio.connect_tcp("127.0.0.1", app.port)
    try:
        yield Raw(stream)
    finally:
        await stream.aclose()


def logged(caplog: pytest.LogCaptureFixture, *texts: str) -> bool:
    return any(all(t in r.getMessage() for t in texts) for r in caplog.records)


# --------------------------------------------------------------------- compression


async def test_permessage_deflate_offered_by_the_client_is_not_negotiated() -> None:
    """A client offering permessage-deflate (as every browser does) gets no extension: the
    server never inflates client data, so a compression bomb has nothing to expand."""
    offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"
    async with serving(make_app()) as app:
        async with raw(app) as r:
            await r.send(opening_handshake(offer))
            status, headers = await r.head()
            assert status == 101
            assert "sec-websocket-extensions" not in headers
            assert headers["sec-websocket-protocol"] == "backchannel.v1"
        async with ws_connect(app.port, compression="deflate") as c:
            assert c.ws.protocol.extensions == []
            assert (await c.request("ping", {}))["type"] == "pong"


async def test_a_compressed_frame_without_negotiation_closes_1002() -> None:
    """A frame with RSV1 (the "compressed" bit) set anyway is a protocol error, not inflated."""
    async with serving(make_app()) as app, raw(app) as r:
        await r.send(opening_handshake())
        assert (await r.head())[0] == 101
        payload = b"\xf2H\xcd\xc9\xc9\x07\x00"  # "Hello", deflated
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await r.send(bytes([0x80 | 0x40 | 0x1, 0x80 | len(payload)]) + mask + masked)
        with anyio.fail_after(5):
            opcode, body = await r.frame()
        assert opcode == 0x8 and struct.unpack("!H", body[:2])[0] == 1002
        assert await r.eof()


DEFLATE = {"server": {"compression": "deflate"}}
OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"


async def test_permessage_deflate_when_enabled_is_negotiated_and_round_trips() -> None:
    """With ``compression = "deflate"`` the offer is accepted and messages of every size go
    both ways compressed (the reply's text is the request's, so inflation was lossless)."""
    async with serving(make_app(DEFLATE)) as app:
        async with raw(app) as r:
            await r.send(opening_handshake(OFFER))
            status, headers = await r.head()
            assert status == 101
            assert headers["sec-websocket-extensions"].startswith("permessage-deflate")
        async with ws_connect(app.port, compression="deflate") as c:
            assert [e.name for e in c.ws.protocol.extensions] == ["permessage-deflate"]
            for text in ["hi", "a" * 5000, os.urandom(1500).hex()]:
                reply = await c.request("text", {"text": text})
                assert reply["content"]["text"] == text
        async with ws_connect(app.port, compression=None) as plain:  # not offering it is fine
            assert plain.ws.protocol.extensions == []
            assert (await plain.request("ping", {}))["type"] == "pong"


def _bomb(size: int) -> bytes:
    """``size`` zero bytes as one permessage-deflate payload (RFC 7692 §7.2.1: the trailing
    empty block's 00 00 ff ff removed), compressed in 1 MiB steps to keep this process small."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    data = b"".join(deflater.compress(chunk) for _ in range(size // len(chunk)))
    data += deflater.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


def _masked_frame(first_byte: int, payload: bytes) -> bytes:
    """A client frame: ``first_byte`` (FIN, RSV, opcode) then a masked ``payload``."""
    length = len(payload)
    if length < 126:
        head = bytes([first_byte, 0x80 | length])
    elif length < 1 << 16:
        head = bytes([first_byte, 0x80 | 126]) + struct.pack("!H", length)
    else:
        head = bytes([first_byte, 0x80 | 127]) + struct.pack("!Q", length)
    mask = os.urandom(4)
    key = int.from_bytes(mask * (length // 4 + 1), "big") >> (8 * (-length % 4))
    return head + mask + (int.from_bytes(payload, "big") ^ key).to_bytes(length, "big")


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc peak RSS")
async def test_compression_bomb_closes_1009_without_a_memory_spike(
    caplog_bc: pytest.LogCaptureFixture,
) -> None:
    """16 MiB of zeros deflated to ~16 KB (under max_message_size, so only the decompressed
    size can trip the limit) closes 1009, logged and counted, while the server process's
    peak RSS grows by far less than the bomb would inflate to; others keep being served."""
    inflated = 16 << 20
    max_size = 65536
    bomb = _bomb(inflated)
    assert len(bomb) < max_size < inflated // 100
    frame = _masked_frame(0x80 | 0x40 | 0x1, bomb)  # FIN, RSV1 (compressed), text
    app = make_app({"server": {"compression": "deflate", "max_message_size": max_size}})
    async with serving(app), ws_connect(app.port, compression="deflate") as other:
        async with raw(app) as r:
            await r.send(opening_handshake(OFFER))
            status, headers = await r.head()
            assert status == 101 and "permessage-deflate" in headers["sec-websocket-extensions"]
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
            before = _peak_rss_kib()
            await r.send(frame)
            with anyio.fail_after(5):
                opcode, body = await r.frame()
            assert opcode == 0x8 and struct.unpack("!H", body[:2])[0] == 1009
            await r.send(_masked_frame(0x88, body[:2]))  # complete the closing handshake
            assert await r.eof()
            growth = _peak_rss_kib() - before
        assert growth < 8 * 1024, f"peak RSS grew by {growth} KiB"
        with anyio.fail_after(5):
            while app.metrics()["closes"].get("1009") != 1:
                await anyio.sleep(0.01)
        assert logged(caplog_bc, "closed conn=", "code=1009")
        assert (await other.request("text", {"text": "still here"}))["type"] == "text"
        assert len(app.connections()) == 1


# ------------------------------------------------------------------- size limits

_LINE = "X-Pad-{}: " + "a" * 8000  # one header line within websockets' 8 KB line limit

REFUSED = [
    pytest.param(opening_handshake("X-Big: " + "a" * (1 << 20)), "431", id="1MB-header-line"),
    pytest.param(
        opening_handshake(*(f"X-Many-{i}: a" for i in range(129))), "431", id="129-headers"
    ),
    pytest.param(
        opening_handshake(*(_LINE.format(i) for i in range(MAX_HANDSHAKE_SIZE // 8000 + 1))),
        "431",
        id="lines-within-limits-over-total",
    ),
    pytest.param(opening_handshake(path="/ws?" + "q" * 9000), "414", id="9KB-request-line"),
    pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", "bad_request", id="not-http"),
]


@pytest.mark.parametrize(("request_bytes", "reason"), REFUSED)
async def test_oversized_or_broken_handshake_is_answered_logged_and_counted(
    request_bytes: bytes, reason: str, caplog_bc: pytest.LogCaptureFixture
) -> None:
    """Past a size limit the client gets 414/431 (garbage: no answer, the TCP connection ends),
    the server logs a line and counts it by reason, and keeps serving everyone else."""
    async with serving(make_app()) as app, ws_connect(app.port) as other:
        async with raw(app) as r:
            await r.send(request_bytes)
            if reason == "bad_request":
                assert await r.eof() and not r.buf  # nothing answered to a non-HTTP peer
            else:
                status, _ = await r.head()
                assert status == int(reason)
                assert await r.eof()
        assert app.metrics()["handshakes"]["rejected"] == {reason: 1}
        assert logged(caplog_bc, "handshake rejected", "127.0.0.1")
        assert len(app.connections()) == 1  # the refused one never became a connection
        assert (await other.request("ping", {}))["type"] == "pong"
        async with ws_connect(app.port) as fresh:
            assert (await fresh.request("ping", {}))["type"] == "pong"


async def test_a_large_handshake_within_every_limit_is_accepted() -> None:
    """The bounds leave room for real clients: ~56 KB of cookies in 7 lines connects."""
    cookies = [f"Cookie: c{i}=" + "v" * 8000 for i in range(7)]
    request = opening_handshake(*cookies)
    assert 56_000 < len(request) <= MAX_HANDSHAKE_SIZE
    async with serving(make_app()) as app, raw(app) as r:
        await r.send(request)
        assert (await r.head())[0] == 101
        assert app.metrics()["handshakes"]["rejected"] == {}


# ----------------------------------------------------------------------- timeout


async def test_dribbling_handshake_is_closed_at_the_timeout_not_before(
    caplog_bc: pytest.LogCaptureFixture,
) -> None:
    """The timeout bounds the whole handshake, not the gap between bytes: a client sending a
    byte every 0.2 s (never idle for the 1 s timeout) is still dropped, and not before 1 s."""
    timeout = 1.0
    app = make_app({"server": {"handshake_timeout": timeout}})
    async with serving(app):
        started = time.monotonic()  # before connecting: the server's clock starts on accept
        async with raw(app) as r, anyio.create_task_group() as tg:

            async def dribble() -> None:
                for byte in opening_handshake():
                    await r.send(bytes([byte]))
                    await anyio.sleep(0.2)

            tg.start_soon(dribble)
            assert await r.eof()
            elapsed = time.monotonic() - started
            tg.cancel_scope.cancel()
        assert elapsed >= timeout, elapsed  # a lower bound only: never closed early
        assert app.metrics()["handshakes"]["rejected"] == {"timeout": 1}
        assert logged(caplog_bc, "handshake timeout")


async def test_a_slow_handshake_completed_within_the_timeout_is_accepted() -> None:
    """A handshake arriving in pieces over 0.3 s, within a 2 s timeout, connects and works."""
    app = make_app({"server": {"handshake_timeout": 2.0}})
    request = opening_handshake()
    async with serving(app), raw(app) as r:
        for i in range(0, len(request), len(request) // 3 + 1):
            await r.send(request[i : i + len(request) // 3 + 1])
            await anyio.sleep(0.1)
        assert (await r.head())[0] == 101
        assert app.metrics()["handshakes"]["rejected"] == {}
