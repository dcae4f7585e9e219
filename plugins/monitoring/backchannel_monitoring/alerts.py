"""Alert rules with hysteresis: each crossing and each recovery is reported once.

A rule fires when its value reaches ``threshold`` and resolves only when the value
is back at or below ``resolve`` (lower than ``threshold``), each condition having
held for ``for`` seconds: a value hovering around the threshold cannot make the
alert flap. Values come from the plugin's sliding window at every tick.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = ["Alerts", "Rule", "rules_from_config"]

log = logging.getLogger("backchannel.monitoring")

Notify = Callable[[str, str, dict[str, Any]], None]


@dataclass(slots=True)
class Rule:
    """One alert: fire at ``threshold``, resolve at ``resolve``, after ``hold`` seconds."""

    name: str
    threshold: float
    resolve: float
    hold: float = 0.0
    unit: str = ""
    firing: bool = False
    pending_since: float | None = None
    value: float | None = None
    since: str | None = None


def rules_from_config(cfg: dict[str, Any]) -> list[Rule]:
    """The enabled rules of ``[plugins.monitoring.alerts]``; resolve must be below threshold."""
    from backchannel import StartupError

    rules = []
    units = {"error_rate": "ratio", "p99_latency": "s", "connections": "connections"}
    for name, unit in units.items():
        rule = cfg[name]
        if not rule.get("enabled", True):
            continue
        if rule["resolve"] >= rule["threshold"]:
            raise StartupError(
                f"invalid config:\n  plugins.monitoring.alerts.{name}.resolve: must be below "
                f"threshold ({rule['threshold']:g}), or the alert would flap"
            )
        rules.append(Rule(name, rule["threshold"], rule["resolve"], rule.get("for", 0.0), unit))
    broker = cfg["broker_down"]
    if broker.get("enabled", True):
        rules.append(Rule("broker_down", 1.0, 0.0, broker.get("for", 5.0), "down"))
    return rules


class Alerts:
    """The rules' states, the recent transitions, and who hears about them."""

    def __init__(self, rules: list[Rule], notify: Notify, recent: int = 50) -> None:
        self.rules = {rule.name: rule for rule in rules}
        self.notify = notify
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        #: transitions by (alert, state), for the Prometheus counter
        self.transitions: dict[tuple[str, str], int] = {}

    def firing(self) -> list[dict[str, Any]]:
        return [
            {"name": r.name, "value": r.value, "threshold": r.threshold, "since": r.since}
            for r in self.rules.values()
            if r.firing
        ]

    def evaluate(self, now: float, values: dict[str, float | None]) -> list[dict[str, Any]]:
        """Feed the current values (None: no data, counts as clear); return the transitions."""
        changed = []
        for name, rule in self.rules.items():
            value = values.get(name)
            rule.value = value
            if rule.firing:
                wanted = not (value is None or value <= rule.resolve)
            else:
                wanted = value is not None and value >= rule.threshold
            if wanted == rule.firing:
                rule.pending_since = None
                continue
            if rule.pending_since is None:
                rule.pending_since = now
            if now - rule.pending_since >= rule.hold:
                changed.append(self._transition(rule, wanted))
        return changed

    def _transition(self, rule: Rule, firing: bool) -> dict[str, Any]:
        rule.firing = firing
        rule.pending_since = None
        state = "firing" if firing else "resolved"
        at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        rule.since = at if firing else None
        details = {
            "value": rule.value,
            "threshold": rule.threshold,
            "resolve": rule.resolve,
            "for": rule.hold,
            "unit": rule.unit,
        }
        record = {"name": rule.name, "state": state, "time": at, **details}
        self.recent.appendleft(record)
        key = (rule.name, state)
        self.transitions[key] = self.transitions.get(key, 0) + 1
        log.log(
            logging.WARNING if firing else logging.INFO,
            "alert %s %s: value %s (threshold %g, resolve %g)",
            rule.name,
            state,
            "n/a" if rule.value is None else f"{rule.value:.6g}",
            rule.threshold,
            rule.resolve,
            extra={"alert": rule.name, "state": state},
        )
        self.notify(rule.name, state, details)
        return record
