"""Monitoring: Prometheus metrics, ``/metrics.json``, alerts and a live dashboard.

Routes (``http_routes``), all behind ``token`` when one is configured:

* ``GET /metrics``: Prometheus text (``prometheus-client``, a registry per App);
* ``GET /metrics.json``: the seed's ``getMetrics`` figures, the same as ``app.metrics()``;
* ``GET /alerts.json``: firing alerts and recent transitions;
* ``GET /dashboard`` and its feed ``GET /dashboard.json`` (charts, plugins, alerts).

The only per-message cost is the latency wrapper (``wrap_handler``, outermost);
everything else is read from the kernel's counters when someone looks. A
background task (``app.spawn``) takes a snapshot every ``interval`` seconds: the
sliding ``window`` of rates and p99, the chart history, and the alert rules
(``alert`` hook, once per crossing and recovery, with hysteresis).
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import anyio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from backchannel import App, BackchannelError, Connection, Message, hookimpl
from backchannel.contracts import load_schema
from backchannel.http import HttpRequest, HttpResponse, json_response

from .alerts import Alerts, rules_from_config
from .collector import KERNEL_FRAMES, AppCollector, registry_for
from .stats import Figures, Snapshot, Stats, figures

__all__ = ["Plugin"]

_PKG = "backchannel_monitoring"
log = logging.getLogger("backchannel.monitoring")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class _SentObserver:
    """Counts every sent frame by type and outcome (only with ``sent_by_type``)."""

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin

    @hookimpl
    def message_sent(self, connection: Connection | None, frame: dict[str, Any]) -> None:
        plugin = self.plugin
        kind = frame["type"]
        if kind not in KERNEL_FRAMES and kind not in plugin.stats.types:
            kind = "other"
        key = (kind, "queued" if connection is None else "delivered")
        sent = plugin.stats.sent
        sent[key] = sent.get(key, 0) + 1


class Plugin:
    """Metrics, alerts and the dashboard of one App."""

    def __init__(self) -> None:
        self.app: App | None = None
        self.cfg: dict[str, Any] = {}
        self.stats = Stats(())  # replaced at start-up, with the configured buckets
        self.alerts = Alerts([], self._notify)
        self.snapshots: deque[Snapshot] = deque()
        self.series: deque[dict[str, Any]] = deque()
        #: this App's Prometheus registry (never the global one)
        self.registry = CollectorRegistry()
        #: evaluations so far (tests and the dashboard wait on it)
        self.tick_count = 0

    # set-up -----------------------------------------------------------------

    @hookimpl
    def config_schema(self) -> dict[str, Any]:
        return load_schema(_PKG, "monitoring.config.schema.json")

    @hookimpl
    def startup(self, app: App) -> None:
        self.app = app
        cfg = self.cfg = app.plugin_config("monitoring")
        self.stats = Stats(cfg["latency_buckets"])
        self.alerts = Alerts(rules_from_config(cfg["alerts"]), self._notify, cfg["recent_alerts"])
        keep = max(cfg["window"], cfg["history"]) / cfg["interval"]
        self.snapshots = deque(maxlen=math.ceil(keep) + 2)
        self.series = deque(maxlen=math.ceil(cfg["history"] / cfg["interval"]) + 1)
        self.registry = registry_for(AppCollector(app, self.stats, self.alerts))
        app.add_metrics("monitoring", self.figures)
        if cfg["sent_by_type"] and "monitoring:sent" not in app.plugins():
            app.use(_SentObserver(self), "monitoring:sent")
        app.spawn(self._evaluate_forever)

    @hookimpl(tryfirst=True)  # outermost: the time of every other middleware counts too
    def wrap_handler(self, type: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        return self.stats.wrap(type, handler)

    @hookimpl
    def http_routes(self, register: Callable[..., None]) -> None:
        metrics, dashboard = self.cfg.get("metrics", True), self.cfg.get("dashboard", True)
        if metrics:
            register("GET", "/metrics", self._guard(self._prometheus))
        if metrics or dashboard:  # the dashboard polls it too
            register("GET", "/metrics.json", self._guard(self._metrics_json))
        if dashboard:
            register("GET", "/alerts.json", self._guard(self._alerts_json))
            register("GET", "/dashboard.json", self._guard(self._dashboard_json))
            page = files(_PKG).joinpath("static", "dashboard.html").read_bytes()
            html = HttpResponse(
                200, page, "text/html; charset=utf-8", {"Cache-Control": "no-cache"}
            )
            register("GET", "/dashboard", self._guard(lambda request: html))

    # observers --------------------------------------------------------------

    @hookimpl
    def error(self, error: BackchannelError, message: Message | None) -> None:
        """Count the error answer under its request's type (a registered one), else
        ``unknown``."""
        kind = "unknown"
        if message is not None and message.type in self.stats.types:
            kind = message.type
        self.stats.count_error(kind, error.code.value)

    @hookimpl
    def shutdown(self, app: App) -> None:
        app.add_metrics("monitoring", None)

    # figures ----------------------------------------------------------------

    def _span(self) -> tuple[Snapshot, Snapshot]:
        """The sliding window: the newest snapshot at least ``window`` seconds old (else the
        oldest; before the first tick, the App's start) and a snapshot of now."""
        assert self.app is not None
        now = self.stats.snapshot(self.app)
        start = now.t - self.cfg.get("window", 60)
        old = None
        for snap in self.snapshots:
            if snap.t <= start or old is None:
                old = snap
            else:
                break
        if old is None:
            since = max(time.time() - self.app.started_at, 1e-9)
            old = Snapshot(now.t - since, self.app.started_at, 0, 0, [0] * len(now.counts), 0.0, 0)
        return old, now

    def window(self) -> Figures:
        """Rates, latency and error rate over the sliding window."""
        old, now = self._span()
        return figures(old, now, self.stats.bounds)

    def figures(self) -> dict[str, Any]:
        """What monitoring adds to ``app.metrics()`` (the seed's ``getMetrics`` figures)."""
        assert self.app is not None
        win = self.window()
        return {
            "messages": {
                "total": self.app.counters.frames_received,
                "perSecond": round(win.per_second, 3),
                "averageResponseTime": _ms(win.average),
                "p99ResponseTime": _ms(win.p99),
            },
            "errors": {
                "rate": round(win.error_rate, 6),
                "perSecond": round(win.errors_per_second, 3),
            },
            "window": round(win.seconds, 3),
            "uptime": round(time.time() - self.app.started_at, 3),
            "timestamp": self.app.now_iso(),
        }

    def tick(self) -> None:
        """One evaluation: snapshot, chart point, alert rules."""
        assert self.app is not None
        self.tick_count += 1
        snap = self.stats.snapshot(self.app)
        previous = self.snapshots[-1] if self.snapshots else None
        self.snapshots.append(snap)
        if previous is not None:
            step = figures(previous, snap, self.stats.bounds)
            self.series.append(
                {
                    "t": round(snap.wall * 1000),
                    "connections": snap.connections,
                    "messagesPerSecond": round(step.per_second, 3),
                    "p99": _ms(step.p99),
                    "errorsPerSecond": round(step.errors_per_second, 3),
                }
            )
        win = self.window()
        alerts_cfg = self.cfg["alerts"]
        values: dict[str, float | None] = {
            "error_rate": win.error_rate if win.received >= alerts_cfg["min_messages"] else None,
            "p99_latency": win.p99,
            "connections": float(snap.connections),
            "broker_down": 0.0 if self.app.broker.ready else 1.0,
        }
        self.alerts.evaluate(snap.t, values)

    async def _evaluate_forever(self) -> None:
        assert self.app is not None
        self.tick()
        while True:
            await anyio.sleep(self.cfg["interval"])
            try:
                self.tick()
            except Exception:
                log.exception("monitoring tick failed")

    def _notify(self, name: str, state: str, details: dict[str, Any]) -> None:
        if self.app is not None:
            self.app.alert(name, state, details)

    # routes -----------------------------------------------------------------

    def _guard(self, route: Callable[[HttpRequest], HttpResponse]) -> Callable[..., HttpResponse]:
        """``route`` behind the configured bearer token (header or ``?token=``): else 401."""

        def guarded(request: HttpRequest) -> HttpResponse:
            token = self.cfg.get("token")
            if token is not None and not _token_ok(request, token):
                path = request.path
                self.stats.unauthorized[path] = self.stats.unauthorized.get(path, 0) + 1
                log.warning(
                    "unauthorized %s from %s: missing or wrong monitoring token",
                    path,
                    request.remote[0] if request.remote else "?",
                )
                return HttpResponse(
                    401,
                    b"unauthorized: a monitoring token is required\n",
                    headers={"WWW-Authenticate": 'Bearer realm="backchannel-monitoring"'},
                )
            return route(request)

        return guarded

    def _prometheus(self, request: HttpRequest) -> HttpResponse:
        encode, content_type = choose_encoder(request.headers.get("accept", ""))  # or OpenMetrics
        return HttpResponse(200, encode(self.registry), content_type)

    def _metrics_json(self, request: HttpRequest) -> HttpResponse:
        assert self.app is not None
        return json_response(self.app.metrics())

    def _alerts_json(self, request: HttpRequest) -> HttpResponse:
        return json_response(self.alerts_view())

    def alerts_view(self) -> dict[str, Any]:
        return {
            "firing": self.alerts.firing(),
            "recent": list(self.alerts.recent),
            "rules": {
                r.name: {"threshold": r.threshold, "resolve": r.resolve, "for": r.hold}
                for r in self.alerts.rules.values()
            },
        }

    def _dashboard_json(self, request: HttpRequest) -> HttpResponse:
        assert self.app is not None
        app = self.app
        old, now = self._span()  # a plugin that failed within the window is unhealthy now
        failing = {p for p, n in now.failures.items() if n > old.failures.get(p, 0)}
        failures: dict[str, dict[str, int]] = {}
        for (hook, plugin), n in app.hook_failures().items():
            failures.setdefault(plugin, {})[hook] = n
        health = app.health()
        hooks = app.plugins()
        plugins = [
            {
                "name": name,
                "hooks": hooks.get(name, []),
                "failures": failures.get(name, {}),
                "status": "failing" if name in failing else "ok",
            }
            for name in health["plugins"]
        ]
        return json_response(
            {
                "health": health,
                "broker": {"name": app.broker.name, "ready": app.broker.ready},
                "interval": self.cfg["interval"],
                "series": list(self.series),
                "plugins": plugins,
                "alerts": self.alerts_view(),
            }
        )


def _token_ok(request: HttpRequest, token: str) -> bool:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    given = value.strip() if scheme.lower() == "bearer" else request.query.get("token")
    return given is not None and hmac.compare_digest(given.encode(), token.encode())
