"""Rate limits and abuse limits: token buckets per connection, principal and client IP.

Why a plugin: limits are policy, and a deployment that does not want them pays
nothing. Every request passes the ``validate`` hook, which takes one token from
each bucket that applies to it (its connection's, its principal's, its IP's);
when any of them is empty, nothing is taken and the request is answered
``rate_limited`` with ``retryAfter``. A connection that keeps being refused (more
than ``abuse_rejections`` answers with a code in ``abuse_codes`` within
``abuse_window``: ``rate_limited``, but also ``validation_failed``,
``unauthorized``, ``unknown_type``, ...) is closed with 1008 right after that
answer; the kernel's ``error`` observer sees every error frame, so requests
refused before this plugin's ``validate`` (by the kernel or another plugin) count
too (issue 11). The ``connect`` hook caps open connections per client IP (1013).

The client IP is the peer address, or, only when the peer is one of
``trusted_proxies``, the right-most ``X-Forwarded-For`` entry that is not itself
a trusted proxy (entries further left are whatever the client chose to send).

State is per plugin instance, so per App. A connection's own buckets live in its
stash; principal and IP buckets live in bounded tables, where a bucket that has
refilled (idle) is indistinguishable from a new one and is dropped first.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from backchannel import (
    App,
    BackchannelError,
    CloseCode,
    Connection,
    ErrorCode,
    Message,
    Principal,
    Reject,
    StartupError,
    StashKey,
    hookimpl,
)
from backchannel.contracts import load_schema

__all__ = ["REFUSALS", "Bucket", "Limit", "Plugin", "Rule", "client_ip", "ip_key"]

log = logging.getLogger("backchannel.ratelimit")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_monotonic = time.monotonic
_RATE_LIMITED = ErrorCode.RATE_LIMITED
#: clock steps tried to find an idle bucket before a full table drops an active one
_CLOCK_STEPS = 8
UNKNOWN_IP = "unknown"
#: Error codes that refuse a request for what the client sent (or how often): the
#: ``abuse_codes`` a client may collect only so many of. Not ``timeout``,
#: ``handler_error``, ``overloaded`` or ``shutting_down`` (the server's trouble, which
#: clients are told to retry) nor ``cancelled`` (the client's own ``cancel``).
REFUSALS = frozenset(
    {
        ErrorCode.RATE_LIMITED,
        ErrorCode.BAD_JSON,
        ErrorCode.INVALID_ENVELOPE,
        ErrorCode.UNKNOWN_TYPE,
        ErrorCode.TYPE_NOT_ALLOWED,
        ErrorCode.VALIDATION_FAILED,
        ErrorCode.TOO_LARGE,
        ErrorCode.UNAUTHORIZED,
        ErrorCode.FORBIDDEN,
    }
)


# --------------------------------------------------------------------------- IPs


def _parse_hop(text: str) -> Address | None:
    """One X-Forwarded-For entry as an address (ports and IPv6 brackets removed)."""
    text = text.strip()
    if text.startswith("["):  # "[2001:db8::1]:443"
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:  # "203.0.113.9:1234"
        text = text.partition(":")[0]
    try:
        return _unmapped(ipaddress.ip_address(text))
    except ValueError:
        return None


def _unmapped(addr: Address) -> Address:
    """``::ffff:192.0.2.1`` (an IPv4 client on a dual-stack socket) as ``192.0.2.1``."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def client_ip(
    peer: str | None, forwarded: str | None, trusted: Sequence[Network]
) -> Address | None:
    """The client's address: ``peer``, unless ``peer`` is a trusted proxy.

    Then ``X-Forwarded-For`` (``forwarded``) is walked from the right, each hop
    believed only while the hop that reported it is trusted: the first untrusted
    (or unparsable) hop stops the walk. Without ``trusted`` the header is ignored.
    None when the peer address is unknown or not an IP (e.g. a Unix socket).
    """
    if peer is None:
        return None
    try:
        addr = _unmapped(ipaddress.ip_address(peer))
    except ValueError:
        return None
    if not forwarded or not trusted:
        return addr
    for hop in reversed(forwarded.split(",")):
        if not any(addr in net for net in trusted):
            break
        parsed = _parse_hop(hop)
        if parsed is None:  # garbage from the client or a broken proxy: stop at the proxy
            break
        addr = parsed
    return addr


def ip_key(addr: Address | None, ipv6_prefix: int = 64) -> str:
    """What one client IP is counted as: the IPv4 address, or its IPv6 network."""
    if addr is None:
        return UNKNOWN_IP
    if isinstance(addr, ipaddress.IPv6Address) and ipv6_prefix < 128:
        return str(ipaddress.IPv6Network((addr, ipv6_prefix), strict=False))
    return str(addr)


# ----------------------------------------------------------------------- buckets


@dataclass(frozen=True, slots=True)
class Limit:
    """``rate`` tokens per second into a bucket of ``burst``."""

    rate: float
    burst: int


@dataclass(frozen=True, slots=True)
class Rule:
    """The limits of one group of types: the default group ``"*"``, or one listed type."""

    group: str
    connection: Limit | None
    principal: Limit | None
    ip: Limit | None


class Bucket:
    """A token bucket; refilled lazily from ``stamp`` when it is looked at."""

    __slots__ = ("rate", "burst", "tokens", "stamp", "dropped")

    def __init__(self, limit: Limit, now: float) -> None:
        self.rate = limit.rate
        self.burst = float(limit.burst)
        self.tokens = self.burst
        self.stamp = now
        #: evicted from its table: holders must look the key up again
        self.dropped = False

    def level(self, now: float) -> float:
        """Tokens in the bucket at ``now``."""
        tokens = self.tokens + (now - self.stamp) * self.rate
        return tokens if tokens < self.burst else self.burst

    def idle(self, now: float) -> bool:
        """Full again: dropping it changes nothing (a new bucket starts full)."""
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class _Lane:
    """What one message type of one connection draws from (resolved once, cached)."""

    __slots__ = ("buckets", "scopes", "principal")

    def __init__(
        self, buckets: tuple[Bucket, ...], scopes: tuple[str, ...], principal: Principal | None
    ) -> None:
        self.buckets = buckets
        self.scopes = scopes
        self.principal = principal


class _State:
    """Per connection: its client IP, its own buckets, its lanes, its abuse budget."""

    __slots__ = ("ip", "own", "lanes", "abuse", "closed")

    def __init__(self, ip: str, abuse: Bucket | None) -> None:
        self.ip = ip
        self.own: dict[str, Bucket] = {}
        self.lanes: dict[str, _Lane] = {}
        #: refusals this connection may still collect (None: abuse closing is off)
        self.abuse = abuse
        self.closed = False


_STATE: StashKey[_State | None] = StashKey()


def _limit(value: dict[str, Any] | bool | None) -> Limit | None:
    """A ``{rate, burst}`` setting; ``false`` (TOML has no null) or null: no limit."""
    if not isinstance(value, dict):
        return None
    return Limit(float(value["rate"]), int(value["burst"]))


# ------------------------------------------------------------------------ plugin


class Plugin:
    """``validate`` (buckets, abuse), ``connect``/``disconnect`` (per-IP connections)."""

    def __init__(self) -> None:
        self.default = Rule("*", Limit(10, 50), Limit(20, 100), Limit(100, 500))
        self.rules: dict[str, Rule] = {}
        self.abuse: Limit | None = Limit(10, 100)
        self.abuse_codes: frozenset[ErrorCode] = REFUSALS
        self.max_per_ip: int | None = 100
        self.trusted: tuple[Network, ...] = ()
        self.ipv6_prefix = 64
        self.max_buckets = 100_000
        #: (principal id, group) -> bucket, oldest-checked first
        self.principals: OrderedDict[tuple[str, str], Bucket] = OrderedDict()
        #: (ip key, group) -> bucket, oldest-checked first
        self.ips: OrderedDict[tuple[str, str], Bucket] = OrderedDict()
        #: ip key -> ids of its accepted connections
        self.live: dict[str, set[str]] = {}
        #: ip key -> its connections past ``connect`` but not accepted yet, oldest-checked first
        self.admitting: OrderedDict[str, dict[str, Connection]] = OrderedDict()
        #: what happened, for tests and operators (the kernel counts errors and closes too)
        self.counts: dict[str, int] = {
            "rate_limited": 0,
            "rate_limited.connection": 0,
            "rate_limited.principal": 0,
            "rate_limited.ip": 0,
            "abuse_closed": 0,
            "ip_connections_rejected": 0,
            "buckets_dropped_idle": 0,
            "buckets_dropped_active": 0,
        }
        self._warned_full = 0.0

    # set-up -----------------------------------------------------------------

    @hookimpl
    def config_schema(self) -> dict[str, Any]:
        return load_schema("backchannel_ratelimit", "ratelimit.config.schema.json")

    @hookimpl
    def startup(self, app: App) -> None:
        cfg = app.plugin_config("ratelimit")
        default = Rule("*", _limit(cfg["connection"]), _limit(cfg["principal"]), _limit(cfg["ip"]))
        self.default = default
        self.rules = {
            name: Rule(
                name,
                _limit(over["connection"]) if "connection" in over else default.connection,
                _limit(over["principal"]) if "principal" in over else default.principal,
                _limit(over["ip"]) if "ip" in over else default.ip,
            )
            for name, over in cfg["types"].items()
        }
        n = cfg["abuse_rejections"]  # false or null: off (never 0: the schema says >= 1)
        self.abuse = Limit(n / cfg["abuse_window"], n) if n else None
        self.abuse_codes = frozenset(ErrorCode(code) for code in cfg["abuse_codes"])
        self.max_per_ip = cfg["max_connections_per_ip"] or None
        trusted = []
        for i, text in enumerate(cfg["trusted_proxies"]):
            try:
                trusted.append(ipaddress.ip_network(text, strict=False))
            except ValueError as exc:
                raise StartupError(
                    f"plugins.ratelimit.trusted_proxies[{i}]: {text!r} is not an IP network "
                    f"(CIDR such as 10.0.0.0/8 or 2001:db8::/32)"
                ) from exc
        self.trusted = tuple(trusted)
        self.ipv6_prefix = cfg["ipv6_prefix"]
        self.max_buckets = cfg["max_buckets"]

    # connections ------------------------------------------------------------

    def ip_of(self, connection: Connection) -> str:
        """The key ``connection``'s client IP is counted under (see :func:`client_ip`)."""
        remote = connection.remote
        forwarded = connection.request.headers.get("x-forwarded-for") if self.trusted else None
        addr = client_ip(remote[0] if remote else None, forwarded, self.trusted)
        return ip_key(addr, self.ipv6_prefix)

    def _state(self, connection: Connection) -> _State:
        abuse = self.abuse
        state = _State(self.ip_of(connection), Bucket(abuse, _monotonic()) if abuse else None)
        connection.stash[_STATE] = state
        return state

    @hookimpl(tryfirst=True)
    def connect(self, connection: Connection) -> None:
        """Past ``max_connections_per_ip`` open or admitting connections of its IP: 1013.

        First among ``connect`` hooks, so an excess connection costs no other plugin
        anything. The connection counts as admitting until ``connection_added``; one that
        a later hook rejects never gets there and is forgotten once it is closed.
        """
        state = self._state(connection)
        limit = self.max_per_ip
        if limit is None:
            return
        admitting = self.admitting
        if admitting:
            self._prune_step()
        ip = state.ip
        waiting = admitting.get(ip)
        if waiting:
            for cid, conn in list(waiting.items()):
                if conn.close_code is not None:
                    del waiting[cid]
        count = len(self.live.get(ip, ())) + len(waiting or ())
        if count >= limit:
            self.counts["ip_connections_rejected"] += 1
            log.info(
                "per-IP connection limit: conn=%s ip=%s has %d connections (max %d); closing 1013",
                connection.id,
                ip,
                count,
                limit,
                extra={"connection_id": connection.id, "close_code": 1013},
            )
            raise Reject(CloseCode.TRY_AGAIN_LATER, "too many connections from this address")
        if waiting is None:
            waiting = admitting[ip] = {}
        waiting[connection.id] = connection

    def _prune_step(self) -> None:
        """Look at the least recently checked IP still admitting: forget connections that
        closed there (rejected by a later hook), and the IP once it has none."""
        ip, waiting = self.admitting.popitem(last=False)
        for cid, conn in list(waiting.items()):
            if conn.close_code is not None:
                del waiting[cid]
        if waiting:
            self.admitting[ip] = waiting

    @hookimpl
    def connection_added(self, connection: Connection) -> None:
        """Admitted: from now on ``disconnect`` releases its place."""
        state = connection.stash.get(_STATE, None)
        if state is None or self.max_per_ip is None:
            return
        ip = state.ip
        waiting = self.admitting.get(ip)
        if waiting is not None:
            waiting.pop(connection.id, None)
            if not waiting:
                del self.admitting[ip]
        live = self.live.get(ip)
        if live is None:
            live = self.live[ip] = set()
        live.add(connection.id)

    @hookimpl
    def disconnect(self, connection: Connection, code: int) -> None:
        state = connection.stash.get(_STATE, None)
        if state is None:
            return
        live = self.live.get(state.ip)
        if live is not None:
            live.discard(connection.id)
            if not live:
                del self.live[state.ip]
        now = _monotonic()
        for table in (self.principals, self.ips):  # let idle buckets go as clients leave
            if table:
                self._clock(table, now, make_room=False)

    # requests ---------------------------------------------------------------

    @hookimpl
    def validate(self, message: Message, connection: Connection) -> None:
        """Take a token from every bucket of this request, or answer ``rate_limited``.

        The hot path: one stash lookup, one cached lane, a few float operations.
        """
        state = connection.stash.get(_STATE, None)
        if state is None:  # admitted before this plugin was in place (tests, App.use)
            state = self._state(connection)
        lane = state.lanes.get(message.type)
        if lane is None or lane.principal is not connection.principal:
            lane = self._lane(state, connection, message.type)
        now = _monotonic()
        ok = True
        for bucket in lane.buckets:
            if bucket.dropped:  # evicted meanwhile (it was idle): look the keys up again
                self._lane(state, connection, message.type)
                return self.validate(message, connection)
            tokens = bucket.tokens + (now - bucket.stamp) * bucket.rate
            if tokens > bucket.burst:
                tokens = bucket.burst
            bucket.tokens = tokens  # refilling up to now changes nothing: safe to keep
            bucket.stamp = now
            if tokens < 1.0:
                ok = False
        if ok:
            for bucket in lane.buckets:
                bucket.tokens -= 1.0
            return None
        self._reject(lane)

    def _reject(self, lane: _Lane) -> None:
        wait = 0.0
        scope = ""
        for bucket, name in zip(lane.buckets, lane.scopes, strict=True):
            if bucket.tokens < 1.0:
                needed = (1.0 - bucket.tokens) / bucket.rate
                if needed > wait:
                    wait, scope = needed, name
        counts = self.counts
        counts["rate_limited"] += 1
        counts["rate_limited." + scope] += 1
        retry = max(0.001, math.ceil(wait * 1000) / 1000)  # whole ms, never less than needed
        raise BackchannelError(
            _RATE_LIMITED,
            f"rate limit per {scope} exceeded; retry in {retry:g} s",
            extra={"retryAfter": retry},
        )

    def _lane(self, state: _State, connection: Connection, type: str) -> _Lane:
        rule = self.rules.get(type, self.default)
        now = _monotonic()
        principal = connection.principal
        buckets: list[Bucket] = []
        scopes: list[str] = []
        if rule.connection is not None:
            own = state.own.get(rule.group)
            if own is None:
                own = state.own[rule.group] = Bucket(rule.connection, now)
            buckets.append(own)
            scopes.append("connection")
        if rule.principal is not None and principal is not None and not principal.anonymous:
            key = (principal.id, rule.group)
            buckets.append(self._shared(self.principals, key, rule.principal, now))
            scopes.append("principal")
        if rule.ip is not None:
            buckets.append(self._shared(self.ips, (state.ip, rule.group), rule.ip, now))
            scopes.append("ip")
        lane = state.lanes[type] = _Lane(tuple(buckets), tuple(scopes), principal)
        return lane

    def _shared(
        self,
        table: OrderedDict[tuple[str, str], Bucket],
        key: tuple[str, str],
        limit: Limit,
        now: float,
    ) -> Bucket:
        bucket = table.get(key)
        if bucket is None:
            self._clock(table, now, make_room=len(table) >= self.max_buckets)
            bucket = table[key] = Bucket(limit, now)
        return bucket

    def _clock(
        self, table: OrderedDict[tuple[str, str], Bucket], now: float, make_room: bool
    ) -> None:
        """Second-chance eviction: drop the least recently checked bucket if idle, else move
        it to the back. To ``make_room`` in a full table, try a few; if every one is in use,
        drop the oldest anyway (its key starts over with a full bucket) and warn."""
        for _ in range(min(_CLOCK_STEPS if make_room else 1, len(table))):
            key, bucket = table.popitem(last=False)
            if bucket.idle(now):
                bucket.dropped = True
                self.counts["buckets_dropped_idle"] += 1
                if len(table) < self.max_buckets:
                    return
            else:
                table[key] = bucket
        if make_room and len(table) >= self.max_buckets:
            key, bucket = table.popitem(last=False)
            bucket.dropped = True
            self.counts["buckets_dropped_active"] += 1
            if now - self._warned_full > 60:
                self._warned_full = now
                log.warning(
                    "rate-limit table full (max_buckets=%d): dropping active buckets; "
                    "raise plugins.ratelimit.max_buckets",
                    self.max_buckets,
                )

    @hookimpl
    def error(
        self, connection: Connection, message_id: str | None, error: BackchannelError
    ) -> None:
        """A refused request (``error.code`` in ``abuse_codes``) takes one from its
        connection's abuse budget; the one that finds it empty has been answered (this
        observer runs after the frame went out): close 1008."""
        if error.code not in self.abuse_codes or connection.close_code is not None:
            return
        state = connection.stash.get(_STATE, None)
        if state is None:  # admitted before this plugin was in place (tests, App.use)
            state = self._state(connection)
        abuse = state.abuse
        if abuse is None or state.closed:
            return
        now = _monotonic()
        left = abuse.level(now)
        abuse.stamp = now
        if left >= 1.0:
            abuse.tokens = left - 1.0
            return
        abuse.tokens = left
        state.closed = True
        self.counts["abuse_closed"] += 1
        log.warning(
            "abuse: conn=%s ip=%s was refused more than %d requests within %g s (the last: "
            "%s); closing 1008",
            connection.id,
            state.ip,
            abuse.burst,
            abuse.burst / abuse.rate,
            error.code.value,
            extra={"connection_id": connection.id, "close_code": 1008},
        )
        connection.close(CloseCode.POLICY_VIOLATION, "too many refused requests")

    def stats(self) -> dict[str, Any]:
        """Counters and table sizes."""
        return {
            **self.counts,
            "principal_buckets": len(self.principals),
            "ip_buckets": len(self.ips),
            "ips_connected": len(self.live),
            "ips_admitting": len(self.admitting),
        }
