"""The transport edge over real sockets: regressions of issue 11 items 3 and 4.

Item 3: ``GET /healthz`` followed by junk, or by a pipelined second request, got no answer
and logged two asyncio tracebacks (on Trio it ended the whole listener). A connection now
serves one HTTP request and ignores what follows it; non-GET requests to a route get 405.
Item 4: a client sending pings without reading made the server queue a pong per ping
without bound. While the peer does not read, only the latest ping is answered, once it
reads again (RFC 6455 §5.5.3). Every test here runs on asyncio and Trio, and the
``backchannel.pytest_plugin`` guard fails any of them that makes the server log a traceback.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import anyio
import pytest

from backchannel import App
from backchannel.testing import opening_handshake, raw_connect
from conftest import make_app, serving, ws_connect

pytestmark = pytest.mark.anyio

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA


def _port(app: App) -> int:
    assert app.port is not None
    return app.port


async def exchange(port: int, data: bytes, *, then: bytes = b"", half_close: bool = False) -> bytes:
    """Send ``data`` on a fresh TCP connection, and ``then`` once the answer's head came
    back (then FIN, with ``half_close``); return everything the server sends until it ends
    the connection."""
    received = bytearray()
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        with anyio.fail_after(5):
            try:
                if then:
                    while b"\r\n\r\n" not in received:
                        received += await stream.receive()
                    await stream.send(then)
                if half_close:
                    await stream.send_eof()
                while True:
                    received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    return bytes(received)


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The HTTP responses in ``raw``: ``(status, headers with lower-cased names, body)``."""
    found = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {raw[:200]!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        length = int(headers["content-length"])
        assert len(rest) >= length, "incomplete body"
        found.append((int(status_line.split(" ", 2)[1]), headers, rest[:length]))
        raw = rest[length:]
    return found


async def assert_serves(app: App) -> None:
    async with ws_connect(_port(app)) as c:
        assert (await c.request("ping", {}))["type"] == "pong"


# ------------------------------------------------------------- item 3: one request per connection

TRAILING = [
    pytest.param(b"xx", id="two-junk-bytes"),
    pytest.param(HEALTHZ, id="pipelined-request"),
    pytest.param(HEALTHZ * 50, id="50-pipelined-requests"),
    pytest.param(opening_handshake(), id="pipelined-websocket-handshake"),
    pytest.param(b"\x88\x80\0\0\0\0", id="a-close-frame"),
    pytest.param(bytes(range(256)) * 64, id="16KB-of-binary"),
]


@pytest.mark.parametrize("trailing", TRAILING)
@pytest.mark.parametrize("after_answer", [False, True], ids=["same-write", "after-the-answer"])
async def test_bytes_after_a_request_are_ignored_and_the_request_answered_once(
    trailing: bytes, after_answer: bool
) -> None:
    """``GET /healthz`` and then anything, in the same write or once the answer came: exactly
    one 200 with the health document, then the server ends the connection; no traceback."""
    async with serving(make_app()) as app:
        if after_answer:
            raw = await exchange(_port(app), HEALTHZ, then=trailing)
        else:
            raw = await exchange(_port(app), HEALTHZ + trailing)
        [(status, headers, body)] = responses(raw)
        assert status == 200 and headers["connection"] == "close"
        assert b'"status":"ok"' in body
        await assert_serves(app)


async def test_a_request_followed_by_a_half_close_is_still_answered() -> None:
    """A client may send its request and shut down its side (``nc -N``): it gets the answer."""
    async with serving(make_app()) as app:
        [(status, _, body)] = responses(await exchange(_port(app), HEALTHZ, half_close=True))
        assert status == 200 and b'"status":"ok"' in body
        [(status, _, _)] = responses(await exchange(_port(app), HEALTHZ + b"junk", half_close=True))
        assert status == 200
        await assert_serves(app)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
async def test_methods_other_than_get_on_a_route_get_405_with_allow(method: str) -> None:
    """A route answers GET only: any other method gets 405 with ``Allow: GET`` (as the ASGI
    adapter does), on the routes and on the WebSocket path; an unknown path stays 404."""
    async with serving(make_app()) as app:
        port = _port(app)
        for path in ("/healthz", "/readyz", "/ws"):
            request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
            [(status, headers, _)] = responses(await exchange(port, request))
            assert (status, headers["allow"]) == (405, "GET"), path
        [(status, _, _)] = responses(await exchange(port, b"POST /nowhere HTTP/1.1\r\n\r\n"))
        assert status == 404
        [(status, _, _)] = responses(await exchange(port, HEALTHZ))
        assert status == 200


@pytest.mark.parametrize(
    "extra", ["Content-Length: 5", "Transfer-Encoding: chunked"], ids=["length", "chunked"]
)
async def test_a_request_with_a_body_is_closed_unanswered_and_counted(extra: str) -> None:
    """Routes take no body: such a request is not HTTP this server speaks (as for any request
    websockets cannot parse): no answer, the connection ends, ``bad_request`` is counted."""
    async with serving(make_app()) as app:
        request = f"POST /healthz HTTP/1.1\r\nHost: x\r\n{extra}\r\n\r\nhello".encode()
        assert await exchange(_port(app), request) == b""
        assert app.metrics()["handshakes"]["rejected"] == {"bad_request": 1}
        await assert_serves(app)


async def test_frames_sent_right_behind_the_handshake_are_served() -> None:
    """A client that does not wait for the 101 (the handshake and a request in one write)
    is served: after an accepted handshake, what followed the request head is frames."""
    payload = b'{"id":"r1","type":"ping","content":{}}'
    request_frame = bytes([0x81, 0x80 | len(payload)]) + bytes(4) + payload  # zero mask
    async with serving(make_app()) as app, raw_connect(_port(app)) as raw:
        await raw.stream.send(opening_handshake() + request_frame)
        with anyio.fail_after(5):
            while b"\r\n\r\n" not in raw.buf:
                await raw._fill()
        head, _, rest = bytes(raw.buf).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        raw.buf = bytearray(rest)
        with anyio.fail_after(5):
            answer = await raw.next_message()
        assert isinstance(answer, dict) and answer["type"] == "pong"
        assert answer["replyTo"] == "r1"


async def test_bytes_after_a_refused_handshake_are_ignored() -> None:
    """A handshake refused (403, Origin not allowed) followed by junk: one 403, then EOF."""
    app = make_app({"server": {"origins": ["https://chat.example"]}})
    async with serving(app):
        refused = opening_handshake("Origin: https://evil.example")
        [(status, _, _)] = responses(await exchange(_port(app), refused + b"\x81\xff junk"))
        assert status == 403
        assert app.metrics()["handshakes"]["rejected"] == {"403": 1}


# ------------------------------------------------------------------- item 4: bounded pongs


def _ping(payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | OP_PING, 0x80 | len(payload)]) + mask + masked


@pytest.mark.parametrize("bytewise", [False, True], ids=["one-write", "byte-by-byte"])
async def test_every_ping_of_a_reading_client_is_answered_in_order(bytewise: bool) -> None:
    """A client that reads gets a pong for each of its pings, with the ping's payload and in
    order, for pings sent back to back in one write or a byte at a time (Autobahn cases
    2.10, 2.11); a ping between the fragments of a request is answered before the request
    (Autobahn 5.6)."""
    payloads = [f"payload-{i}".encode() for i in range(10)]
    request = b'{"id":"r1","type":"ping","content":{}}'
    fragmented = (
        bytes([OP_TEXT, 0x80 | 10]) + bytes(4) + request[:10]  # FIN unset, zero mask
        + _ping(b"between")
        + bytes([0x80, 0x80 | (len(request) - 10)]) + bytes(4) + request[10:]
    )  # fmt: skip
    async with serving(make_app()) as app, raw_connect(_port(app)) as raw:
        assert await raw.handshake() == 101
        data = b"".join(_ping(p) for p in payloads) + fragmented
        if bytewise:
            for byte in data:
                await raw.stream.send(bytes([byte]))
        else:
            await raw.stream.send(data)
        got: list[tuple[int, bytes]] = []
        with anyio.fail_after(5):
            while len(got) < len(payloads) + 2:
                got.append(await raw.read_frame())
        assert got[: len(payloads) + 1] == [(OP_PONG, p) for p in [*payloads, b"between"]]
        opcode, answer = got[-1]
        assert opcode == OP_TEXT and b'"replyTo":"r1"' in answer


def _kernel_buffered_pongs() -> int:
    """How many 125-byte pongs the kernel can hold between a server that writes and a client
    that never reads: the sender's send buffer grows up to ``tcp_wmem``'s maximum, the
    receiver's stays at ``tcp_rmem``'s default (it grows only as the application reads)."""
    wmem = Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()
    rmem = Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()
    return (int(wmem[2]) + 2 * int(rmem[1])) // 127


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/sys/net")
async def test_a_ping_flood_from_a_client_that_never_reads_queues_one_pong() -> None:
    """A client sends pings (four times more than the kernel can buffer pongs for it; 200,000
    with Linux defaults, 26 MB) and reads nothing. The server answers them while the socket
    takes the pongs, then keeps just the latest (RFC 6455 §5.5.3) and closes the client 1013
    after ``slow_consumer_timeout``. Reading at last, the client finds at most what the
    kernel held plus the driver's 64 KiB buffer (before issue 11 every ping had its pong
    queued in the server), then the 1013; another client is served throughout."""
    bound = _kernel_buffered_pongs() + 2000  # the driver's buffer: 64 KiB + one turn's pongs
    pings = max(200_000, 4 * bound)
    app = make_app(
        {
            "connection": {"slow_consumer_timeout": 0.5},
            "heartbeat": {"interval": 60, "timeout": 60},
        }
    )
    async with serving(app), ws_connect(_port(app)) as other:
        async with raw_connect(_port(app)) as raw:
            assert await raw.handshake() == 101
            flood = _ping(bytes(125)) * 1000
            with anyio.fail_after(30):
                for _ in range(pings // 1000):
                    await raw.stream.send(flood)
                assert (await other.request("ping", {}))["type"] == "pong"
                while not app.counters.errors.get("slow_consumer"):
                    await anyio.sleep(0.01)
            pongs = 0
            with anyio.fail_after(20):
                while True:
                    opcode, payload = await raw.read_frame()
                    if opcode == OP_CLOSE:
                        break
                    assert opcode == OP_PONG and payload == bytes(125)
                    pongs += 1
            assert struct.unpack("!H", payload[:2])[0] == 1013
        assert 0 < pongs <= bound, (pongs, bound, pings)
        assert (await other.request("ping", {}))["type"] == "pong"


async def test_an_endless_fragmented_message_holds_its_bytes_not_its_fragments() -> None:
    """Empty continuation frames never end a message nor reach ``max_message_size``: the
    server holds the message's bytes (here none), not one object per fragment (before issue
    11 a list grew by one entry per fragment, without bound). A ping between fragments is
    answered, and the message, once ended, is served."""
    async with serving(make_app()) as app, raw_connect(_port(app)) as raw:
        assert await raw.handshake() == 101
        start = bytes([OP_TEXT, 0x80]) + bytes(4)  # text, FIN unset, empty, zero mask
        empty = bytes([0x00, 0x80]) + bytes(4)  # continuation, FIN unset, empty
        payload = b'{"id":"r1","type":"ping","content":{}}'
        last = bytes([0x80, 0x80 | len(payload)]) + bytes(4) + payload  # FIN continuation
        await raw.stream.send(start)
        with anyio.fail_after(20):
            for _ in range(20):
                await raw.stream.send(empty * 10_000)
            await raw.stream.send(_ping(b"after 200,000 fragments"))
            assert await raw.read_frame() == (OP_PONG, b"after 200,000 fragments")
            [conn] = app.connections()
            driver = app._hub.outputs[conn.id]._transport  # (white box: the driver's wire)
            assert len(driver.wire._parts) == 0  # type: ignore[attr-defined]
            await raw.stream.send(last)
            answer = await raw.next_message()
        assert isinstance(answer, dict) and answer["replyTo"] == "r1"
