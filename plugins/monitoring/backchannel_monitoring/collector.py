"""The Prometheus view of one App: a custom collector read at scrape time.

Nothing here runs per message: every family is built from the kernel's counters
(``app.counters``, ``app.metrics()``, ``app.hook_failures()``, ``app.broker``) and the plugin's
:class:`~backchannel_monitoring.stats.Stats` when ``/metrics`` is scraped.
Labels are bounded: message types come from the registered ones (others are
``unknown``), close codes from the documented set (others are ``other``), never
ids or room names.
"""

from __future__ import annotations

from collections.abc import Container, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from backchannel import __version__

if TYPE_CHECKING:
    from backchannel import App

    from .alerts import Alerts
    from .stats import Stats

__all__ = ["AppCollector", "CLOSE_CODES", "KERNEL_FRAMES", "registry_for"]

#: close codes exported as themselves (protocol.md); any other is "other"
CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 1015}
    | {4001, 4003, 4008, 4009}
)
#: frame types the kernel itself sends, besides the registered message types
KERNEL_FRAMES = frozenset({"ack", "error", "chunk", "system", "pong"})


def _bound(value: str, known: Container[str], other: str) -> str:
    return value if value in known else other


class AppCollector:
    """Yields every ``backchannel_*`` family of one App."""

    def __init__(self, app: App, stats: Stats, alerts: Alerts) -> None:
        self.app = app
        self.stats = stats
        self.alerts = alerts

    def collect(self) -> Iterator[Metric]:
        app, stats = self.app, self.stats
        counters = app.counters
        connections = app.connections()
        yield InfoMetricFamily("backchannel", "Server version.", value={"version": __version__})

        active = GaugeMetricFamily("backchannel_connections_active", "Live connections.")
        active.add_metric([], len(connections))
        yield active
        peak = GaugeMetricFamily("backchannel_connections_peak", "Most live connections at once.")
        peak.add_metric([], counters.connections_peak)
        yield peak
        opened = CounterMetricFamily("backchannel_connections_opened", "Connections accepted.")
        opened.add_metric([], counters.connections_total)
        yield opened
        closed = CounterMetricFamily(
            "backchannel_connections_closed", "Connections closed, by close code.", labels=["code"]
        )
        by_code: dict[str, int] = {}
        for code, n in counters.closes.items():
            label = str(code) if code in CLOSE_CODES else "other"
            by_code[label] = by_code.get(label, 0) + n
        for label, n in sorted(by_code.items()):
            closed.add_metric([label], n)
        yield closed
        rejected = CounterMetricFamily(
            "backchannel_handshakes_rejected",
            "WebSocket handshakes refused, by HTTP status or 'timeout'.",
            labels=["reason"],
        )
        for reason, n in sorted(counters.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        blocked = GaugeMetricFamily(
            "backchannel_connections_blocked",
            "Connections whose client is not reading (send buffer full).",
        )
        blocked.add_metric([], sum(1 for c in connections if c.blocked_since is not None))
        yield blocked

        figures = app.metrics()
        yield from self._messages(figures)
        yield from self._sessions(figures)

        failures = CounterMetricFamily(
            "backchannel_plugin_hook_failures",
            "Plugin hook failures (logged, answered or isolated), by plugin and hook.",
            labels=["plugin", "hook"],
        )
        for (hook, plugin), n in sorted(app.hook_failures().items()):
            failures.add_metric([plugin, hook], n)
        yield failures

        ready = GaugeMetricFamily(
            "backchannel_broker_ready", "1 when the broker can serve requests.", labels=["broker"]
        )
        ready.add_metric([app.broker.name], 1.0 if app.broker.ready else 0.0)
        yield ready
        events = CounterMetricFamily(
            "backchannel_broker_events",
            "Broker events (unavailable, recovered, gaps, epoch changes, dropped writes, "
            "control messages no process received...), by broker and event.",
            labels=["broker", "event"],
        )
        for event, n in sorted(getattr(app.broker, "counters", {}).items()):
            events.add_metric([app.broker.name, event], n)
        yield events
        control = CounterMetricFamily(
            "backchannel_control_messages",
            "Control messages from other instances handled here (send, broadcast, takeover).",
            labels=["op"],
        )
        for op, n in sorted(counters.control.items()):
            control.add_metric([op], n)
        yield control

        firing = GaugeMetricFamily(
            "backchannel_alert_firing", "1 while the alert fires.", labels=["alert"]
        )
        for name, rule in self.alerts.rules.items():
            firing.add_metric([name], 1.0 if rule.firing else 0.0)
        yield firing
        transitions = CounterMetricFamily(
            "backchannel_alert_transitions",
            "Alert state changes, by alert and new state.",
            labels=["alert", "state"],
        )
        for (name, state), n in sorted(self.alerts.transitions.items()):
            transitions.add_metric([name, state], n)
        yield transitions
        refused = CounterMetricFamily(
            "backchannel_monitoring_unauthorized",
            "Requests to the monitoring routes refused for a missing or wrong token, by route.",
            labels=["route"],
        )
        for route, n in sorted(stats.unauthorized.items()):
            refused.add_metric([route], n)
        yield refused

    def _messages(self, figures: dict[str, Any]) -> Iterator[Metric]:
        app, stats = self.app, self.stats
        counters = app.counters
        types = stats.types
        frames_in = CounterMetricFamily(
            "backchannel_frames_received", "WebSocket messages received (any content)."
        )
        frames_in.add_metric([], counters.frames_received)
        yield frames_in
        frames_out = CounterMetricFamily(
            "backchannel_frames_sent", "Frames sent to sessions (every type)."
        )
        frames_out.add_metric([], counters.frames_sent)
        yield frames_out

        received = CounterMetricFamily(
            "backchannel_messages_received",
            "Requests by type and outcome: 'ok' (reply or ack) or the error code answered.",
            labels=["type", "outcome"],
        )
        rows: dict[tuple[str, str], int] = {}
        for name, ts in stats.types.items():
            rows[(_bound(name, types, "unknown"), "ok")] = ts.ok
        for (name, code), n in stats.errors.items():
            key = (_bound(name, types, "unknown"), code)
            rows[key] = rows.get(key, 0) + n
        for (name, outcome), n in sorted(rows.items()):
            received.add_metric([name, outcome], n)
        yield received

        sent = CounterMetricFamily(
            "backchannel_messages_sent",
            "Frames by type and outcome ('delivered' to a connection, or 'queued' in the "
            "session outbox for a resume); only with sent_by_type.",
            labels=["type", "outcome"],
        )
        for (name, outcome), n in sorted(stats.sent.items()):
            sent.add_metric([name, outcome], n)
        yield sent
        chunks = CounterMetricFamily("backchannel_chunks_sent", "Chunks of streaming handlers.")
        chunks.add_metric([], stats.chunks)
        yield chunks

        errors = CounterMetricFamily(
            "backchannel_errors",
            "Error frames sent (and slow consumers), by code.",
            labels=["code"],
        )
        for code, n in sorted(counters.errors.items()):
            errors.add_metric([code], n)
        yield errors

        latency = HistogramMetricFamily(
            "backchannel_handler_duration_seconds",
            "Handler time until its terminal answer, by message type.",
            labels=["type"],
        )
        bounds = [f"{b:g}" for b in stats.bounds] + ["+Inf"]
        for name, ts in sorted(stats.types.items()):
            cumulative, running = [], 0
            for label, n in zip(bounds, ts.counts, strict=True):
                running += n
                cumulative.append((label, float(running)))
            latency.add_metric([_bound(name, types, "unknown")], cumulative, ts.sum)
        yield latency

        running_now = GaugeMetricFamily(
            "backchannel_requests_running", "Requests being handled asynchronously now."
        )
        running_now.add_metric([], figures["requests"]["running"])
        yield running_now
        retries = CounterMetricFamily(
            "backchannel_retries", "Retried requests answered again or attached (not run twice)."
        )
        retries.add_metric([], counters.retries)
        yield retries

    def _sessions(self, figures: dict[str, Any]) -> Iterator[Metric]:
        sessions = GaugeMetricFamily(
            "backchannel_sessions", "Sessions this process knows (attached or within their ttl)."
        )
        sessions.add_metric([], figures["sessions"]["known"])
        yield sessions
        resumes = CounterMetricFamily("backchannel_resumes", "Sessions resumed.")
        resumes.add_metric([], self.app.counters.resumes)
        yield resumes
        kept = figures.get("broker", {}).get("sessions")
        if kept is not None:  # a broker that reports its session sizes (the embedded one)
            for name, what, key in (
                (
                    "backchannel_outbox_frames",
                    "Frames kept in session outboxes for resume.",
                    "frames",
                ),
                (
                    "backchannel_outbox_bytes",
                    "Bytes sessions keep (outbox frames, remembered answers, fixed costs), as "
                    "session.total_max_bytes counts them.",
                    "bytes",
                ),
                ("backchannel_dedupe_entries", "Answers remembered for safe retries.", "dedupe"),
                (
                    "backchannel_sessions_detached",
                    "Sessions without a connection, within their ttl.",
                    "detached",
                ),
            ):
                gauge = GaugeMetricFamily(name, what)
                gauge.add_metric([], kept[key])
                yield gauge
            evicted = CounterMetricFamily(
                "backchannel_sessions_evicted",
                "Detached sessions evicted to stay within session.total_max_bytes.",
            )
            evicted.add_metric([], kept["evicted"])
            yield evicted


def registry_for(collector: AppCollector) -> CollectorRegistry:
    """A registry of its own (never the global one): the App's families plus process,
    platform and garbage-collector figures."""
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
