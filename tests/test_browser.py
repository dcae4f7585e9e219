"""The browser side: backchannel.js and the demo page, served by the kernel, in headless Chromium.

Chromium is Debian's (``apt-get install -y chromium``; ``.ci/run`` installs it),
driven by Playwright's Python package with ``executable_path`` — Playwright's own
browser downloads are never used. Without Chromium these tests skip locally and
fail in CI (``CI`` set). Playwright's async API needs asyncio, so the browser
tests run on that backend only; the plain-HTTP tests run on both.

Screenshots of every browser test go to ``test-artifacts/`` (git-ignored).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from backchannel import App
from conftest import ROOT, STANDARD, make_app, serving

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"
STATIC = ROOT / "core" / "backchannel" / "static"
#: the standard plugins with and without rooms
WITH_ROOMS = STANDARD if "rooms" in STANDARD else [*STANDARD, "rooms"]
NO_ROOMS = [name for name in STANDARD if name != "rooms"]


def chromium_path() -> str:
    """Debian's chromium; skip without it, or fail in CI, where ``.ci/run`` installs it."""
    path = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    if path is None:
        why = "chromium is not installed (Debian: apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must install it (.ci/run does)")
        pytest.skip(f"{why}; CI runs these tests")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the playwright package is missing: uv sync installs the dev group")
        pytest.skip("the playwright package is missing (uv sync installs the dev group)")
    return path


@asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A headless Chromium (Playwright ``Browser``), closed on exit."""
    executable = chromium_path()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


class Page:
    """A demo page in its own browser context, with the errors it logged."""

    def __init__(self, page: Any, label: str) -> None:
        self.page = page
        self.label = label
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on(
            "console",
            lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None,
        )

    async def state(self, *states: str, timeout: float = 10) -> str:
        """Wait until the state badge shows one of ``states``; return it."""
        wanted = "|".join(re.escape(s) for s in states)
        from playwright.async_api import expect

        badge = self.page.locator("#state")
        await expect(badge).to_have_attribute(
            "data-state", re.compile(f"^({wanted})$"), timeout=timeout * 1000
        )
        return str(await badge.get_attribute("data-state"))

    async def say(self, text: str) -> None:
        """Type a message and press Enter, as a person would."""
        await self.page.locator("#text").fill(text)
        await self.page.locator("#text").press("Enter")

    async def messages(self) -> list[str]:
        """The chat as shown: "name: text" per delivered message, in page order."""
        rows: list[list[str]] = await self.page.eval_on_selector_all(
            "#messages .msg",
            "items => items.map(li => [li.querySelector('.who').textContent,"
            " li.querySelector('.text').textContent])",
        )
        return [f"{who}: {text}" for who, text in rows]

    async def wait_messages(self, count: int, timeout: float = 10) -> list[str]:
        """Wait until ``count`` messages are shown (fails on more); return them."""
        with anyio.fail_after(timeout):
            while len(shown := await self.messages()) < count:
                await anyio.sleep(0.05)
        assert len(shown) == count, f"{self.label} shows {shown}"
        return shown

    async def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        await self.page.screenshot(path=str(ARTIFACTS / f"{name}-{self.label}.png"), full_page=True)


async def open_page(browser: Any, app: App, query: str = "", label: str = "a") -> Page:
    """Open the demo page of ``app`` in a fresh context (its own storage, as a second window)."""
    context = await browser.new_context(viewport={"width": 900, "height": 640})
    context.set_default_timeout(10_000)
    page = Page(await context.new_page(), label)
    response = await page.page.goto(f"http://127.0.0.1:{app.port}/{query}")
    assert response is not None and response.status == 200
    return page


def kill_every_connection(app: App) -> int:
    """Close every connection server-side, as a crash of the connection layer would."""
    connections = app.connections()
    for connection in connections:
        connection.close(1011)
    return len(connections)


# ------------------------------------------------------------------ plain HTTP (both backends)


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """A bare HTTP/1.1 GET (the server answers with ``Connection: close``)."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    async with stream:
        await stream.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        with anyio.fail_after(5):
            while True:
                try:
                    data += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
                head, sep, body = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                if sep and length and len(body) >= int(length.group(1)):
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def test_packaged_client_is_a_relative_link_to_clients_js() -> None:
    """static/backchannel.js is the one file in clients/js (no copy that could drift)."""
    link = STATIC / "backchannel.js"
    assert link.is_symlink()
    target = os.readlink(link)
    assert not os.path.isabs(target), target
    assert link.resolve() == (ROOT / "clients" / "js" / "backchannel.js").resolve()


@pytest.mark.anyio
async def test_server_serves_the_client_always_and_the_demo_only_when_enabled() -> None:
    client_js = (ROOT / "clients" / "js" / "backchannel.js").read_bytes()
    async with serving(make_app()) as app:
        status, headers, body = await http_get(app.port, "/static/backchannel.js")
        assert (status, headers["content-type"], body) == (200, "application/javascript", client_js)
        assert (await http_get(app.port, "/"))[0] == 404
    async with serving(make_app({"server": {"demo": True}})) as app:
        status, headers, body = await http_get(app.port, "/")
        assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
        assert body == (STATIC / "demo.html").read_bytes()
        assert b'from "/static/backchannel.js"' in body


# ------------------------------------------------------------------------ in the browser


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_demo_page_loads_the_module_and_connects() -> None:
    async with serving(make_app({"server": {"demo": True}})) as app, chromium() as browser:
        context = await browser.new_context()
        context.set_default_timeout(10_000)
        loaded: list[tuple[str, int, str]] = []
        context.on(
            "response",
            lambda r: loaded.append((r.url, r.status, r.headers.get("content-type", ""))),
        )
        page = Page(await context.new_page(), "load")
        await page.page.goto(f"http://127.0.0.1:{app.port}/")
        assert await page.state("connected") == "connected"
        assert await page.page.title() == "backchannel demo chat"
        base = f"http://127.0.0.1:{app.port}"
        assert (f"{base}/static/backchannel.js", 200, "application/javascript") in loaded
        assert len(app.connections()) == 1
        await page.screenshot("demo-connected")
        assert page.errors == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_js_client_request_reply_and_errors_in_the_browser() -> None:
    """The module, imported by a page, against the real server: reply, typed error, pong."""
    app = make_app({"server": {"demo": True}})
    received: list[tuple[str, dict[str, Any], str]] = []
    app.on("message_received")(
        lambda message, connection: received.append(
            (message.type, dict(message.content), connection.request.target)
        )
    )
    async with serving(app), chromium() as browser:
        page = await open_page(browser, app)
        await page.state("connected")
        result = await page.page.evaluate(
            """async () => {
                const { connect, BackchannelError } = await import("/static/backchannel.js");
                const states = [];
                const url = `ws://${location.host}/ws`;
                const onState = (s) => states.push(s);
                const client = await connect(url, { token: "t0k3n", onState });
                const echo = await client.request("text", { text: "hello from the browser" });
                let error = null;
                try {
                    await client.request("no.such.type", {});
                } catch (e) {
                    error = { code: e.code, typed: e instanceof BackchannelError };
                }
                const pong = await client.request("ping", { clientTime: 42 });
                const principal = client.principal;
                client.close();
                return { echo, error, pong, states, principal };
            }"""
        )
        assert result["echo"] == {"text": "hello from the browser", "from": result["principal"]}
        assert result["principal"].startswith("anonymous:")
        assert result["error"]["code"] == "unknown_type" and result["error"]["typed"] is True
        assert result["pong"]["clientTime"] == 42 and "serverTime" in result["pong"]
        assert result["states"] == ["connecting", "connected", "closed"]
        inits = [(content, target) for kind, content, target in received if kind == "init"]
        with_token = [(c, t) for c, t in inits if c.get("token") == "t0k3n"]
        assert len(with_token) == 1, inits  # the token travels in init...
        assert all("t0k3n" not in target for _, target in inits)  # ...never in the URL
        assert with_token[0][0]["client"]["name"] == "backchannel.js"
        assert page.errors == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_demo_without_rooms_plugin_echoes_and_says_so() -> None:
    """On a server without the rooms plugin the page still works: an echo chat."""
    app = make_app({"server": {"demo": True}}, plugins=NO_ROOMS)
    async with serving(app), chromium() as browser:
        page = await open_page(browser, app, "?name=alice&room=lobby")
        await page.state("connected")
        await page.page.wait_for_selector("body[data-joined=echo]")
        await page.say("hello")
        assert await page.wait_messages(1) == ["alice: hello"]
        notices = await page.page.locator("#notices").inner_text()
        assert "no rooms plugin" in notices
        await page.screenshot("demo-echo")
        assert page.errors == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_page_reconnects_after_the_server_drops_it() -> None:
    """Killed server-side, the page shows reconnecting, comes back, and chats again."""
    async with serving(make_app({"server": {"demo": True}})) as app, chromium() as browser:
        page = await open_page(browser, app, "?name=alice")
        await page.state("connected")
        await page.page.wait_for_selector("body[data-joined]")
        await page.say("before")
        await page.wait_messages(1)
        assert kill_every_connection(app) == 1
        # A full-jitter first retry may come within milliseconds; either state proves it noticed.
        await page.state("reconnecting", "resumed", "resynced")
        state = await page.state("resumed", "resynced")
        await page.say("after")
        assert await page.wait_messages(2) == ["alice: before", "alice: after"]
        assert len(app.connections()) == 1
        await page.screenshot(f"demo-reconnected-{state}")
        assert page.errors == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_two_pages_chat_in_a_room() -> None:
    app = make_app({"server": {"demo": True}}, plugins=WITH_ROOMS)
    async with serving(app), chromium() as browser:
        alice = await open_page(browser, app, "?name=alice&room=lobby", "alice")
        bob = await open_page(browser, app, "?name=bob&room=lobby", "bob")
        for page in (alice, bob):
            await page.state("connected")
            await page.page.wait_for_selector("body[data-joined=lobby]")
        await alice.say("hi bob")
        assert await bob.wait_messages(1) == ["alice: hi bob"]
        await bob.say("hi alice")
        for page in (alice, bob):
            assert await page.wait_messages(2) == ["alice: hi bob", "bob: hi alice"]
        # presence: both pages list two members
        for page in (alice, bob):
            await page.page.wait_for_function(
                "document.querySelectorAll('#members li').length === 2"
            )
        await alice.screenshot("room-chat")
        await bob.screenshot("room-chat")
        assert alice.errors == [] and bob.errors == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_room_away_is_caught_up_by_its_rejoin_from_room_frames() -> None:
    """Issue 13: room messages ride room frames (``room``, ``offset``, ``epoch``, no
    ``seq``) and are kept in no outbox. A browser client whose connection drops resumes
    its session, is told which rooms to re-join, joins them again with ``since`` and
    shows what was published meanwhile once, in order (``a`` publishes while ``b`` is
    away and while it re-joins)."""
    app = make_app({"server": {"demo": True}}, plugins=WITH_ROOMS)
    async with serving(app), chromium() as browser:
        page = await open_page(browser, app)
        await page.state("connected")
        result = await page.page.evaluate(
            """async () => {
                const { connect } = await import("/static/backchannel.js");
                const url = `ws://${location.host}/ws`;
                const until = async (check) => {
                    for (let i = 0; i < 500 && !check(); i++) {
                        await new Promise((r) => setTimeout(r, 10));
                    }
                    return check();
                };
                const got = [], frames = [], states = [];
                const onState = (s) => states.push(s);
                const b = await connect(url, { onState });
                await b.subscribe("away", (m, f) => { got.push(m.text); frames.push(f); });
                const a = await connect(url);
                const room = await a.subscribe("away", () => {});
                await room.publish("one");
                await until(() => got.length === 1);
                b._conn.ws.close(); // the browser drops b's connection
                await room.publish("two");
                await room.publish("three");
                await until(() => states.includes("resumed") && got.length === 3);
                await new Promise((r) => setTimeout(r, 300)); // a duplicate would be here now
                a.close();
                b.close();
                return {
                    got,
                    states,
                    frames: frames.map((f) => [f.room, f.offset, typeof f.epoch, "seq" in f]),
                };
            }"""
        )
        assert result["got"] == ["one", "two", "three"], result
        assert result["frames"] == [["away", n, "string", False] for n in (1, 2, 3)]
        assert "resumed" in result["states"], result
        assert page.errors == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_every_message_once_in_order_after_the_server_kills_every_connection() -> None:
    """Issue 3 item 8: both pages show every message exactly once, in order, after reconnect.

    ``a3`` is typed just before the kill, so its reply may be lost with the connection (the
    client re-sends it with the same id; the server must not publish it twice); ``b2`` is typed
    while the page is reconnecting (queued, sent after ``init``).
    """
    app = make_app({"server": {"demo": True}}, plugins=WITH_ROOMS)
    async with serving(app), chromium() as browser:
        alice = await open_page(browser, app, "?name=alice&room=lobby", "alice")
        bob = await open_page(browser, app, "?name=bob&room=lobby", "bob")
        for page in (alice, bob):
            await page.state("connected")
            await page.page.wait_for_selector("body[data-joined=lobby]")
        before = ["alice: a1", "bob: b1", "alice: a2"]
        for count, line in enumerate(before, 1):
            who, text = line.split(": ")
            await (alice if who == "alice" else bob).say(text)
            for page in (alice, bob):
                await page.wait_messages(count)

        await alice.say("a3")
        assert kill_every_connection(app) == 2
        await bob.state("reconnecting", "resumed", "resynced")
        await bob.say("b2")

        shown = {}
        for page in (alice, bob):
            await page.state("resumed", "resynced")
            shown[page.label] = await page.wait_messages(5, timeout=15)
            await anyio.sleep(0.3)  # a duplicate would arrive now: still exactly five?
            assert await page.messages() == shown[page.label]
            await page.screenshot("after-kill")
        assert shown["alice"] == shown["bob"], "both pages show the room in the same order"
        assert shown["alice"][:3] == before
        assert sorted(shown["alice"][3:]) == ["alice: a3", "bob: b2"]
        for page in (alice, bob):  # same principal, session still in its ttl: resumed
            assert await page.state("resumed", timeout=1) == "resumed"
        assert alice.errors == [] and bob.errors == []
