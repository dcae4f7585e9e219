"""The ``monitoring`` plugin: Prometheus metrics, /metrics.json, alerts, token, dashboard.

HTTP and WebSocket tests run on real sockets (127.0.0.1, port 0), on asyncio and
Trio; handler timing and alert rules also run in memory. The dashboard is checked
in headless Chromium (Debian's, through Playwright), on asyncio only. Waits are on
conditions with bounds (the plugin's evaluation ticks are observable).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from backchannel_monitoring import Plugin as Monitoring
from backchannel_monitoring.stats import Stats, _Timed, quantile
from prometheus_client.parser import text_string_to_metric_families

from backchannel import App, BackchannelError, ErrorCode, StartupError, hookimpl
from backchannel.memory import MemoryBroker
from backchannel.testing import connect, serve_in_memory, websocket

pytestmark = pytest.mark.anyio

BASE = ["init", "text", "ping", "validation"]
ROOT = Path(__file__).resolve().parents[3]
ARTIFACTS = ROOT / "test-artifacts"
ID_LIKE = re.compile(r"^(c-|s-|anonymous:)|[0-9a-f]{12,}")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_app(settings: dict[str, Any] | None = None, plugins: list[Any] | None = None) -> App:
    """An App with monitoring (settings as ``[plugins.monitoring]``) on a free port."""
    cfg: dict[str, Any] = {"server": {"port": 0}, "log": {"level": "DEBUG"}}
    cfg["plugins"] = {"monitoring": {"interval": 0.05, **(settings or {})}}
    names = [*BASE, "monitoring"] if plugins is None else plugins
    return App(cfg, plugins=names)


def monitoring(app: App) -> Monitoring:
    plugin = app.plugin("monitoring")
    assert isinstance(plugin, Monitoring)
    return plugin


@asynccontextmanager
async def serving(app: App) -> AsyncIterator[App]:
    async with app.run(host="127.0.0.1", port=0):
        yield app


class Ws:
    """A real WebSocket client (websockets' client for the running backend)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.n = 0

    async def request(self, type: str, content: Any = None, raw: str | None = None) -> Any:
        self.n += 1
        ident = f"r{self.n}"
        await self.ws.send(raw or json.dumps({"id": ident, "type": type, "content": content or {}}))
        with anyio.fail_after(5):
            while True:
                frame = json.loads(await self.ws.recv())
                if raw is not None or (frame.get("replyTo") == ident and frame["type"] != "chunk"):
                    return frame


@asynccontextmanager
async def ws_connect(port: int) -> AsyncIterator[Ws]:
    async with websocket(port) as ws:
        yield Ws(ws)


async def http_get(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A bare HTTP/1.1 GET (the server answers with ``Connection: close``)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    stream = await anyio.connect_tcp("127.0.0.1", port)
    async with stream:
        await stream.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
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
    parsed = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), parsed, body


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int, headers: dict[str, str] | None = None) -> Samples:
    """GET /metrics, parsed with prometheus-client's own parser."""
    status, _, body = await http_get(port, "/metrics", headers)
    assert status == 200, body
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (bounded) for ``condition``, checking between event-loop turns."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


async def ticks(plugin: Monitoring, n: int = 3) -> None:
    """Wait until the plugin evaluated ``n`` more times."""
    target = plugin.tick_count + n
    await until(lambda: plugin.tick_count >= target)


# ------------------------------------------------------------------ Prometheus


async def test_metrics_count_traffic_by_type_outcome_and_code_with_bounded_labels() -> None:
    async with serving(make_app()) as app:
        async with ws_connect(app.port) as ws:
            for _ in range(3):
                assert (await ws.request("text", {"text": "hi"}))["type"] == "text"
            assert (await ws.request("ping", {}))["type"] == "pong"
            assert (await ws.request("nope", {}))["content"]["code"] == "unknown_type"
            bad = await ws.request("text", {"text": 5})
            assert bad["content"]["code"] == "validation_failed"
            assert (await ws.request("", raw="not json"))["content"]["code"] == "bad_json"
            samples = await scrape(app.port)
        await until(lambda: len(app.connections()) == 0)
        closed = await scrape(app.port)

    received = "backchannel_messages_received_total"
    assert value(samples, received, type="text", outcome="ok") == 3
    assert value(samples, received, type="ping", outcome="ok") == 1
    assert value(samples, received, type="text", outcome="validation_failed") == 1
    assert value(samples, received, type="unknown", outcome="unknown_type") == 1
    assert value(samples, received, type="unknown", outcome="bad_json") == 1
    assert value(samples, "backchannel_errors_total", code="validation_failed") == 1
    assert value(samples, "backchannel_frames_received_total") == 7
    assert value(samples, "backchannel_frames_sent_total") == 7
    assert value(samples, "backchannel_connections_active") == 1
    assert value(samples, "backchannel_connections_opened_total") == 1
    assert value(samples, "backchannel_broker_ready", broker="memory") == 1
    assert value(samples, "backchannel_sessions") == 1
    assert value(samples, "backchannel_outbox_frames") == 7
    assert value(samples, "backchannel_sessions_evicted_total") == 0
    # the handler ran for the three valid texts only; each bucket is cumulative
    hist = "backchannel_handler_duration_seconds"
    assert value(samples, f"{hist}_count", type="text") == 3
    assert value(samples, f"{hist}_bucket", type="text", le="+Inf") == 3
    assert 0 < value(samples, f"{hist}_sum", type="text") < 1
    assert value(samples, "process_resident_memory_bytes") > 0  # the process collector
    # bounded labels: registered types or "unknown", never an id
    registered = set(app.message_types()) | {"unknown"}
    for (name, labels), _ in samples.items():
        for key, label in labels:
            assert not ID_LIKE.search(label), (name, key, label)
            if key == "type":
                assert label in registered, (name, label)
    assert value(closed, "backchannel_connections_active") == 0
    assert value(closed, "backchannel_connections_closed_total", code="1000") == 1


async def test_each_app_has_its_own_registry() -> None:
    first, second = make_app(), make_app()
    async with serving(first), serving(second):
        async with ws_connect(first.port) as ws:
            await ws.request("text", {"text": "only on the first"})
        one = await scrape(first.port)
        two = await scrape(second.port)
    received = "backchannel_messages_received_total"
    assert value(one, received, type="text", outcome="ok") == 1
    assert value(two, received, type="text", outcome="ok") == 0
    assert monitoring(first).registry is not monitoring(second).registry


async def test_sent_by_type_counts_every_frame_when_enabled() -> None:
    app = make_app({"sent_by_type": True})
    async with serving(app), ws_connect(app.port) as ws:
        await ws.request("text", {"text": "hi"})
        await ws.request("nope", {})
        await ws.request("ping", {})
        samples = await scrape(app.port)
    sent = "backchannel_messages_sent_total"
    assert value(samples, sent, type="text", outcome="delivered") == 1
    assert value(samples, sent, type="error", outcome="delivered") == 1
    assert value(samples, sent, type="pong", outcome="delivered") == 1


@pytest.mark.server_fault
async def test_plugin_hook_failures_are_counted_by_plugin() -> None:
    class Flaky:
        @hookimpl
        def message_received(self, message: Any, connection: Any) -> None:
            raise RuntimeError("observer bug")

    app = make_app(plugins=[*BASE, "monitoring", Flaky()])
    async with serving(app):
        async with ws_connect(app.port) as ws:
            assert (await ws.request("text", {"text": "still answered"}))["type"] == "text"
        samples = await scrape(app.port)
        status, _, body = await http_get(app.port, "/dashboard.json")
    name = "backchannel_plugin_hook_failures_total"
    assert value(samples, name, plugin="inline-1", hook="message_received") == 1
    assert status == 200
    plugins = {p["name"]: p for p in json.loads(body)["plugins"]}
    assert plugins["inline-1"]["status"] == "failing"
    assert plugins["inline-1"]["failures"] == {"message_received": 1}
    assert plugins["text"]["status"] == "ok"


# ------------------------------------------------------------- handler timing


class Handlers:
    """Types answered by every kind of handler the kernel accepts."""

    @hookimpl
    def message_types(self, register: Callable[..., None]) -> None:
        register("sync", handler=lambda message: {"ok": True})
        register("slow", handler=self.slow)
        register("stream", handler=self.stream)
        register("lazy", handler=lambda message: self.slow(message))  # sync, returns a coroutine
        register("fails", handler=self.fails)
        register("refuses", handler=self.refuses)
        register("hangs", handler=self.hangs, timeout=0.1)

    async def slow(self, message: Any) -> dict[str, Any]:
        await anyio.sleep(0.05)
        return {"slow": True}

    async def stream(self, message: Any) -> Any:
        for i in range(3):
            await anyio.sleep(0.02)
            yield {"i": i}

    def fails(self, message: Any) -> None:
        raise RuntimeError("handler bug")

    def refuses(self, message: Any) -> None:
        raise BackchannelError(ErrorCode.FORBIDDEN, "no")

    async def hangs(self, message: Any) -> None:
        await anyio.sleep(10)


@pytest.mark.server_fault
async def test_latency_is_measured_until_the_terminal_answer_for_every_handler_kind() -> None:
    app = make_app(plugins=["monitoring", Handlers()])
    async with serve_in_memory(app), connect(app) as client:
        for kind in ("sync", "slow", "stream", "lazy", "fails", "refuses", "hangs"):
            await client.request(kind, {})
        stats = monitoring(app).stats
    types = stats.types
    assert {k: sum(t.counts) for k, t in types.items()} == dict.fromkeys(
        ["sync", "slow", "stream", "lazy", "fails", "refuses", "hangs"], 1
    )
    assert types["sync"].sum < 0.05
    assert 0.05 <= types["slow"].sum < 1 and 0.05 <= types["lazy"].sum < 1
    assert 0.06 <= types["stream"].sum < 1
    assert 0.1 <= types["hangs"].sum < 1  # interrupted at its timeout
    assert {k: t.ok for k, t in types.items() if t.ok} == {
        "sync": 1,
        "slow": 1,
        "stream": 1,
        "lazy": 1,
    }
    assert stats.chunks == 3
    assert stats.errors == {
        ("fails", "handler_error"): 1,
        ("refuses", "forbidden"): 1,
        ("hangs", "timeout"): 1,
    }


def test_a_timed_awaitable_dropped_unstarted_closes_the_handler_coroutine() -> None:
    """A request cancelled before it ran: no "coroutine was never awaited" warning."""

    async def handler() -> None:
        return None

    stats = Stats([0.1])
    timed = stats.wrap("t", lambda message, connection: handler())(None, None)
    assert isinstance(timed, _Timed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del timed
        gc.collect()
    assert [w for w in caught if issubclass(w.category, RuntimeWarning)] == []


def test_p99_interpolates_inside_its_bucket_like_histogram_quantile() -> None:
    bounds = [0.1, 0.2, 0.4]
    assert quantile(0.99, [0, 0, 0, 0], bounds) is None
    assert quantile(0.5, [100, 0, 0, 0], bounds) == pytest.approx(0.05)
    assert quantile(0.99, [90, 0, 10, 0], bounds) == pytest.approx(0.2 + 0.2 * 0.9)
    assert quantile(0.99, [0, 0, 0, 5], bounds) == 0.4  # in +Inf: the highest bound


# ------------------------------------------------------------ metrics.json


async def test_metrics_json_is_app_metrics_in_the_seed_shape_and_follows_traffic() -> None:
    async with serving(make_app()) as app:
        status, headers, body = await http_get(app.port, "/metrics.json")
        before = json.loads(body)
        assert status == 200 and headers["content-type"] == "application/json"
        async with ws_connect(app.port) as ws:
            for _ in range(5):
                await ws.request("text", {"text": "hi"})
            await ws.request("nope", {})
            _, _, body = await http_get(app.port, "/metrics.json")
            after = json.loads(body)
            direct = app.metrics()
    for figures in (before, after, direct):
        assert set(figures["connections"]) >= {"active", "total", "peak"}
        assert set(figures["messages"]) >= {
            "total",
            "perSecond",
            "averageResponseTime",
            "p99ResponseTime",
        }
        assert set(figures["errors"]) >= {"total", "rate"}
    assert before["messages"]["total"] == 0 and before["messages"]["p99ResponseTime"] is None
    assert after["connections"] == {"active": 1, "total": 1, "peak": 1}
    assert after["messages"]["total"] == 6
    assert after["messages"]["perSecond"] > 0
    assert 0 < after["messages"]["p99ResponseTime"] < 1000
    assert 0 < after["messages"]["averageResponseTime"] <= after["messages"]["p99ResponseTime"]
    assert after["errors"]["total"] == 1
    assert after["errors"]["rate"] == pytest.approx(1 / 6, abs=1e-5)
    assert direct.keys() == after.keys()
    assert direct["messages"]["total"] == after["messages"]["total"]


def test_without_the_plugin_app_metrics_has_only_the_kernel_counters() -> None:
    app = App({"server": {"port": 0}}, plugins=BASE)
    assert "p99ResponseTime" not in app.metrics()["messages"]
    assert "monitoring" not in App({}).config["plugins"]["enabled"]  # not on by default


# ----------------------------------------------------------------- alerts


def record_alerts(app: App) -> list[tuple[str, str, dict[str, Any]]]:
    seen: list[tuple[str, str, dict[str, Any]]] = []
    app.on("alert")(lambda name, state, details: seen.append((name, state, details)))
    return seen


async def test_connection_alert_fires_once_holds_between_thresholds_and_resolves_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="backchannel.monitoring")
    app = make_app({"alerts": {"connections": {"threshold": 2, "resolve": 0}}})
    seen = record_alerts(app)
    plugin = monitoring(app)
    async with serving(app):
        async with ws_connect(app.port) as first:
            async with ws_connect(app.port) as second:
                await first.request("ping", {})
                await second.request("ping", {})
                await until(lambda: len(seen) == 1)
                await ticks(plugin)
            await until(lambda: len(app.connections()) == 1)
            await ticks(plugin, 5)  # 1 connection: above resolve, below threshold: no change
            assert [(n, s) for n, s, _ in seen] == [("connections", "firing")]
        await until(lambda: len(seen) == 2)
        await ticks(plugin, 5)
        _, _, body = await http_get(app.port, "/alerts.json")
    assert [(n, s) for n, s, _ in seen] == [("connections", "firing"), ("connections", "resolved")]
    assert seen[0][2]["value"] == 2 and seen[0][2]["threshold"] == 2
    alerts = json.loads(body)
    assert alerts["firing"] == []
    assert [(a["name"], a["state"]) for a in alerts["recent"]] == [
        ("connections", "resolved"),
        ("connections", "firing"),
    ]
    lines = [r for r in caplog.records if r.name == "backchannel.monitoring"]
    assert [(r.levelname, r.getMessage().split(":")[0]) for r in lines] == [
        ("WARNING", "alert connections firing"),
        ("INFO", "alert connections resolved"),
    ]


async def test_error_rate_alert_over_a_sliding_window() -> None:
    app = make_app(
        {
            "window": 0.3,
            "alerts": {
                "error_rate": {"threshold": 0.5, "resolve": 0.1},
                "min_messages": 4,
                "connections": {"enabled": False, "threshold": 1, "resolve": 0},
            },
        }
    )
    seen = record_alerts(app)
    plugin = monitoring(app)
    async with serving(app), ws_connect(app.port) as ws:
        await ws.request("text", {"text": 1})
        await ticks(plugin)
        assert seen == []  # one error among too few messages
        for _ in range(4):
            await ws.request("text", {"text": 1})
        await until(lambda: len(seen) == 1)
        assert seen[0][0:2] == ("error_rate", "firing") and seen[0][2]["value"] >= 0.5
        for _ in range(40):  # good traffic pushes the errors out of the window
            await ws.request("text", {"text": "ok"})
        await until(lambda: len(seen) == 2)
    assert [(n, s) for n, s, _ in seen] == [("error_rate", "firing"), ("error_rate", "resolved")]


async def test_p99_latency_alert() -> None:
    app = make_app(
        {"window": 0.3, "alerts": {"p99_latency": {"threshold": 0.04, "resolve": 0.01}}},
        plugins=["monitoring", Handlers()],
    )
    seen = record_alerts(app)
    async with serve_in_memory(app), connect(app) as client:
        await client.request("slow", {})
        await until(lambda: len(seen) == 1)
        assert seen[0][0:2] == ("p99_latency", "firing") and seen[0][2]["value"] >= 0.04
        for _ in range(20):
            await client.request("sync", {})
        await until(lambda: len(seen) == 2)
    assert [(n, s) for n, s, _ in seen] == [("p99_latency", "firing"), ("p99_latency", "resolved")]


class FlakyBroker(MemoryBroker):
    up = True

    @property
    def ready(self) -> bool:
        return self.up


async def test_broker_down_alert_and_gauge() -> None:
    broker = FlakyBroker()

    class Provides:
        @hookimpl
        def broker(self, app: App) -> MemoryBroker:
            return broker

    app = make_app(
        {"alerts": {"broker_down": {"for": 0.1}}}, plugins=[*BASE, "monitoring", Provides()]
    )
    seen = record_alerts(app)
    plugin = monitoring(app)
    async with serving(app):
        await ticks(plugin)
        broker.up = False
        await until(lambda: len(seen) == 1)
        down = await scrape(app.port)
        broker.up = True
        await until(lambda: len(seen) == 2)
        up = await scrape(app.port)
    assert [(n, s) for n, s, _ in seen] == [("broker_down", "firing"), ("broker_down", "resolved")]
    assert value(down, "backchannel_broker_ready", broker="memory") == 0
    assert value(down, "backchannel_alert_firing", alert="broker_down") == 1
    assert value(up, "backchannel_alert_firing", alert="broker_down") == 0
    assert (
        value(up, "backchannel_alert_transitions_total", alert="broker_down", state="firing") == 1
    )


def test_resolve_must_be_below_threshold() -> None:
    app = make_app({"alerts": {"connections": {"threshold": 5, "resolve": 5}}})
    with pytest.raises(StartupError, match=r"alerts\.connections\.resolve: must be below"):
        monitoring(app).startup(app)
    with pytest.raises(StartupError, match=r"plugins\.monitoring\.windw: unknown key"):
        make_app({"windw": 5})


# ------------------------------------------------------------- token, routes

ROUTES = ["/metrics", "/metrics.json", "/alerts.json", "/dashboard.json", "/dashboard"]


async def test_every_route_needs_the_token_when_one_is_configured(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="backchannel")
    async with serving(make_app({"token": "s3cret-t0ken"})) as app:
        port = app.port
        for path in ROUTES:
            status, headers, _ = await http_get(port, path)
            assert status == 401, path
            assert headers["www-authenticate"].startswith("Bearer")
            assert (await http_get(port, path + "?token=wrong"))[0] == 401
            wrong = {"Authorization": "Bearer s3cret-t0keN"}
            assert (await http_get(port, path, wrong))[0] == 401
            good = {"Authorization": "Bearer s3cret-t0ken"}
            assert (await http_get(port, path, good))[0] == 200, path
            assert (await http_get(port, path + "?token=s3cret-t0ken"))[0] == 200, path
        assert (await http_get(port, "/healthz"))[0] == 200  # the kernel's routes stay open
        samples = await scrape(port, {"Authorization": "Bearer s3cret-t0ken"})
    refused = "backchannel_monitoring_unauthorized_total"
    assert value(samples, refused, route="/metrics") == 3
    assert value(samples, refused, route="/dashboard") == 3
    warnings_ = [r.getMessage() for r in caplog.records if "unauthorized" in r.getMessage()]
    assert len(warnings_) == 3 * len(ROUTES)
    assert not any("s3cret" in m for m in warnings_)


async def test_routes_can_be_switched_off() -> None:
    async with serving(make_app({"dashboard": False, "metrics": False})) as app:
        for path in ROUTES:
            assert (await http_get(app.port, path))[0] == 404, path
    async with serving(make_app({"dashboard": False})) as app:
        assert (await http_get(app.port, "/metrics"))[0] == 200
        assert (await http_get(app.port, "/dashboard"))[0] == 404
    async with serving(make_app({"metrics": False})) as app:
        assert (await http_get(app.port, "/metrics"))[0] == 404
        assert (await http_get(app.port, "/dashboard"))[0] == 200
        assert (await http_get(app.port, "/metrics.json"))[0] == 200  # the dashboard's feed


# ---------------------------------------------------------- the dashboard


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


async def text_of(page: Any, selector: str) -> str:
    return str(await page.locator(selector).inner_text())


async def wait_for(probe: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while not await probe():
            await anyio.sleep(0.05)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_dashboard_shows_live_figures_plugins_and_alerts_in_a_browser() -> None:
    executable = chromium_path()
    from playwright.async_api import async_playwright

    app = make_app(
        {
            "token": "dash-t0ken",
            "interval": 0.2,
            "alerts": {"connections": {"threshold": 2, "resolve": 0}},
        }
    )
    async with serving(app), async_playwright() as pw:
        port = app.port
        assert (await http_get(port, "/dashboard"))[0] == 401
        browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1100, "height": 900})
            context.set_default_timeout(10_000)
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            response = await page.goto(f"http://127.0.0.1:{port}/dashboard?token=dash-t0ken")
            assert response is not None and response.status == 200
            assert await page.title() == "backchannel monitoring"
            await page.wait_for_selector("body:not([data-polls='0'])")
            assert "token" not in page.url  # taken out of the address bar
            assert await text_of(page, "#messages-total") == "0"
            rows = await page.eval_on_selector_all(
                "#plugins tbody tr", "rs => rs.map(r => r.dataset.plugin)"
            )
            assert rows == [*BASE, "monitoring"]

            # traffic from two clients: figures change, the connection alert fires
            async with ws_connect(port) as one, ws_connect(port) as two:
                for i in range(30):
                    await (one if i % 2 else two).request("text", {"text": f"m{i}"})
                await one.request("nope", {})
                await wait_for(lambda: _shows(page, "#messages-total", "31"))
                await wait_for(lambda: _shows(page, "#connections-active", "2"))
                await page.wait_for_selector(
                    "#alerts tr[data-alert=connections][data-state=firing]"
                )
                assert await text_of(page, "#errors-total") == "1"
                assert float(await text_of(page, "#p99")) > 0
                await wait_for(lambda: _points(page, "#chart-messages", 2))
                max_rate = await page.eval_on_selector("#chart-messages text", "t => t.textContent")
                assert float(max_rate.replace(",", "")) > 0
                ARTIFACTS.mkdir(exist_ok=True)
                await page.screenshot(
                    path=str(ARTIFACTS / "monitoring-dashboard.png"), full_page=True
                )
            await page.wait_for_selector("#alerts tr[data-alert=connections][data-state=resolved]")
            await wait_for(lambda: _shows(page, "#connections-active", "0"))
            assert "none firing" in await text_of(page, "#firing-count")
            await page.screenshot(
                path=str(ARTIFACTS / "monitoring-dashboard-resolved.png"), full_page=True
            )
            assert errors == []
        finally:
            await browser.close()


async def _shows(page: Any, selector: str, text: str) -> bool:
    return await text_of(page, selector) == text


async def _points(page: Any, selector: str, n: int) -> bool:
    return int(await page.eval_on_selector(selector, "s => s.dataset.points || '0'")) >= n


# ------------------------------------------- kernel facilities the plugin relies on


@pytest.mark.server_fault
async def test_app_spawn_runs_tasks_from_startup_on_and_survives_their_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="backchannel.app")
    app = App({"server": {"port": 0}}, plugins=BASE)
    ran: list[str] = []

    async def forever() -> None:
        ran.append("early")
        await anyio.sleep_forever()  # cancelled at shutdown

    async def fails() -> None:
        raise RuntimeError("task bug")

    async def late() -> None:
        ran.append("late")

    app.spawn(forever)
    app.spawn(fails)
    async with serving(app):
        await until(lambda: "early" in ran)
        app.spawn(late)
        await until(lambda: "late" in ran)
        assert (await http_get(app.port, "/healthz"))[0] == 200
    assert ran == ["early", "late"]
    assert any("background task" in r.getMessage() for r in caplog.records)
