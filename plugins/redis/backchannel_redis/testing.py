"""Test helpers for code that needs a real Redis (this plugin's tests, the broker contract).

Private servers, for tests that stop, pause or fail them (the shared Redis on 6379 is
never touched): :class:`RedisServer` (one ``redis-server`` on a free port) and
:class:`RedisCluster` (six nodes, 3 masters + 3 replicas, whose masters a test may
SIGKILL); :func:`redis_call` is a tiny blocking RESP client for admin commands.
:func:`redis_cluster_broker` is the broker contract's factory for a cluster: a
started broker in cluster mode on one private cluster shared by the test process.

``BACKCHANNEL_TEST_REDIS_URL`` names the Redis (default ``redis://127.0.0.1:6379/0``).
A test that needs it calls :func:`require_redis`: without a reachable Redis it is
skipped, unless the ``CI`` environment variable is set, where it fails (CI machines
run Redis, so its absence is a broken machine, not a reason to pass).
Every test uses its own key prefix (:func:`fresh_prefix`) and deletes its keys after
(:func:`delete_keys`), so tests never see each other's data and leave none behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import coredis
import pytest

from .broker import RedisBroker

__all__ = [
    "BOUND",
    "RedisCluster",
    "RedisServer",
    "delete_keys",
    "free_port",
    "fresh_prefix",
    "redis_broker",
    "redis_call",
    "redis_cluster_broker",
    "redis_url",
    "require_redis",
    "require_redis_server",
]

_checked: dict[str, str | None] = {}


def redis_url() -> str:
    return os.environ.get("BACKCHANNEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _probe(url: str) -> str | None:
    """None when a Redis answers PING at ``url``, else why not."""
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 6379), 1.0
        ) as s:
            s.settimeout(1.0)
            s.sendall(b"PING\r\n")
            answer = s.recv(64)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if answer.startswith((b"+PONG", b"-NOAUTH")) else f"unexpected answer {answer!r}"


def require_redis(url: str | None = None) -> str:
    """The Redis URL to test against; skips the test (fails it when ``CI`` is set)
    when no Redis answers there."""
    url = url or redis_url()
    if url not in _checked:
        _checked[url] = _probe(url)
    why = _checked[url]
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but no Redis answers at {url} ({why}); start redis-server")
        pytest.skip(f"no Redis at {url} ({why}); set BACKCHANNEL_TEST_REDIS_URL or start one")
    return url


def fresh_prefix() -> str:
    return "bctest-" + os.urandom(6).hex()


async def delete_keys(url: str, prefix: str) -> int:
    """Delete every key under ``prefix``; returns how many there were."""
    deleted = 0
    async with coredis.Redis.from_url(url) as client:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += await client.delete(batch)
                batch = []
        if batch:
            deleted += await client.delete(batch)
    return deleted


@asynccontextmanager
async def redis_broker(**options: Any) -> AsyncIterator[RedisBroker]:
    """A started :class:`RedisBroker` on a fresh prefix (keys deleted after it stops)."""
    url = require_redis()
    options.setdefault("key_prefix", fresh_prefix())
    broker = RedisBroker(url=url, **options)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()
        await delete_keys(url, broker.prefix)


#: seconds any single expected event may take (generous: ~1 core shared by everyone)
BOUND = 15.0


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports nothing listens on right now (held open until all are
    picked, so the OS cannot hand out one twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def require_redis_server() -> str:
    """The ``redis-server`` binary; skips the test without one (fails it when ``CI`` is
    set), the same rule as ``backchannel_redis.testing.require_redis``."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but redis-server is not on PATH; install Redis 7")
        pytest.skip("redis-server is not on PATH (these tests run their own Redis)")
    return binary


# ------------------------------------------------------------------ RESP


def _encode(args: Sequence[str | int | bytes]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def _parse(f: Any) -> Any:
    line = f.readline()
    if not line:
        raise ConnectionError("Redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(f"Redis error: {rest.decode()}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)[:-2]
        return data
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_parse(f) for _ in range(n)]
    raise RuntimeError(f"unexpected RESP reply {line!r}")


def redis_call(port: int, *args: str | int | bytes, timeout: float = 5.0) -> Any:
    """Send one command to the Redis on ``port`` and return its parsed reply."""
    with socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.settimeout(timeout)
        s.sendall(_encode(args))
        with s.makefile("rb") as f:
            return _parse(f)


# ----------------------------------------------------------- redis-server


def spawn_redis(
    binary: str, port: int, workdir: Path, log_path: Path, *options: str
) -> subprocess.Popen[bytes]:
    """A ``redis-server`` on ``port`` (loopback, no persistence, ``options`` added), its
    output appended to ``log_path``; returns once it answers PING (RuntimeError if it
    exits or does not answer within :data:`BOUND`: e.g. its port was taken)."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(workdir),
                *options,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + BOUND
    while True:
        with contextlib.suppress(OSError, RuntimeError):
            if redis_call(port, "PING", timeout=1.0) == "PONG":
                return process
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait(BOUND)
            raise RuntimeError(f"redis-server did not start on port {port} (log: {log_path})")
        time.sleep(0.02)


class RedisServer:
    """A private ``redis-server`` (no persistence) that tests may stop, restart, pause."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (again, on the same port) and wait until it answers PING."""
        self.starts += 1
        self.process = spawn_redis(
            self.binary, self.port, self.workdir, self.workdir / f"redis-{self.starts}.log"
        )

    def shutdown(self) -> None:
        """``SHUTDOWN NOSAVE``: Redis exits and forgets everything."""
        with contextlib.suppress(ConnectionError, OSError):
            redis_call(self.port, "SHUTDOWN", "NOSAVE")
        assert self.process is not None
        self.process.wait(BOUND)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(BOUND)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(BOUND)

    def call(self, *args: str | int | bytes) -> Any:
        return redis_call(self.port, *args)

    def call_for(self, key: str, *args: str | int | bytes) -> Any:
        """A command about ``key`` (as :meth:`RedisCluster.call_for`)."""
        return redis_call(self.port, *args)

    def keys(self, prefix: str) -> set[bytes]:
        """Every key under ``prefix`` (SCAN, which also drops keys whose time is up)."""
        found: set[bytes] = set()
        cursor = b"0"
        while True:
            cursor, batch = self.call("SCAN", cursor, "MATCH", f"{prefix}:*", "COUNT", 1000)
            found.update(batch)
            if cursor == b"0":
                return found

    def channels(self, prefix: str) -> dict[bytes, int]:
        """Pub/sub channels under ``prefix`` with their subscriber counts."""
        names = self.call("PUBSUB", "CHANNELS", f"{prefix}:*")
        if not names:
            return {}
        counts = self.call("PUBSUB", "NUMSUB", *names)
        return {counts[i]: counts[i + 1] for i in range(0, len(counts), 2)}


#: ``--cluster-node-timeout`` (ms) of :class:`RedisCluster`: a killed master's replica is
#: promoted ~2 timeouts after the kill (failure detection, then the election)
CLUSTER_NODE_TIMEOUT_MS = 1000


class RedisCluster:
    """A private Redis Cluster: 3 masters + 3 replicas on free loopback ports, no
    persistence. A test may SIGKILL a master, wait for its replica's promotion and
    start the killed node again (it rejoins as a replica of the new master)."""

    def __init__(self, binary: str, workdir: Path, node_timeout_ms: int = CLUSTER_NODE_TIMEOUT_MS):
        self.binary = binary
        self.cli = shutil.which("redis-cli") or str(Path(binary).with_name("redis-cli"))
        self.workdir = workdir
        self.node_timeout_ms = node_timeout_ms
        ports = free_ports(12)  # distinct: one by one, the OS may hand out a port twice
        self.ports = ports[:6]
        #: the cluster bus ports (by default port + 10000, which may be taken or > 65535)
        self.bus_ports = dict(zip(self.ports, ports[6:], strict=True))
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """A seed URL (the first node; the client discovers the others)."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def _spawn(self, port: int) -> None:
        self.processes[port] = spawn_redis(
            self.binary,
            port,
            self.workdir,
            self.workdir / f"redis-{port}.log",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.workdir / f"nodes-{port}.conf"),
            "--cluster-port",
            str(self.bus_ports[port]),
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            # a replica always stands for election (by default it refuses when its
            # master link was down "too long", e.g. during its first sync)
            "--cluster-replica-validity-factor",
            "0",
            "--repl-diskless-sync-delay",
            "0",
        )

    def start(self) -> None:
        """Start the six nodes, make them one cluster, wait until it is ok everywhere.
        A node that cannot start (its free port was taken meanwhile, e.g. as another
        connection's source port) is started again on other ports, at most twice."""
        for k in range(len(self.ports)):
            for attempt in range(3):
                try:
                    self._spawn(self.ports[k])
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
                    port, bus = free_ports(2)
                    self.ports[k], self.bus_ports[port] = port, bus
        subprocess.run(
            [self.cli, "--cluster", "create"]
            + [f"127.0.0.1:{port}" for port in self.ports]
            + ["--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=BOUND * 2,
        )
        self.wait_ok()

    def alive(self, port: int) -> bool:
        process = self.processes.get(port)
        return process is not None and process.poll() is None

    def call(self, port: int, *args: str | int | bytes) -> Any:
        return redis_call(port, *args)

    def call_for(self, key: str, *args: str | int | bytes) -> Any:
        """A command on the master serving ``key``."""
        return redis_call(self.port_for_key(key), *args)

    def nodes(self, port: int | None = None) -> list[dict[str, Any]]:
        """``CLUSTER NODES`` as seen by ``port`` (by default any live node): per node its
        id, port, flags, master id and slot ranges."""
        ports = [port] if port is not None else [p for p in self.ports if self.alive(p)]
        for asked in ports:
            try:
                text = redis_call(asked, "CLUSTER", "NODES", timeout=1.0)
            except (OSError, RuntimeError):
                continue
            out = []
            for line in text.decode().splitlines():
                fields = line.split()
                slots = []
                for part in fields[8:]:
                    if part.startswith("["):  # a slot being migrated
                        continue
                    first, _, last = part.partition("-")
                    slots.append((int(first), int(last or first)))
                out.append(
                    {
                        "id": fields[0],
                        "port": int(fields[1].split("@")[0].rsplit(":", 1)[1]),
                        "flags": set(fields[2].split(",")),
                        "master": None if fields[3] == "-" else fields[3],
                        "connected": fields[7] == "connected",
                        "slots": slots,
                    }
                )
            return out
        raise RuntimeError("no cluster node answers CLUSTER NODES")

    def masters(self) -> list[int]:
        """Ports of the masters that serve slots now, ordered by their first slot."""
        found = [
            n
            for n in self.nodes()
            if "master" in n["flags"] and "fail" not in n["flags"] and n["slots"]
        ]
        return [n["port"] for n in sorted(found, key=lambda n: n["slots"][0][0])]

    def replica_of(self, master_port: int) -> list[int]:
        nodes = self.nodes()
        ids = {n["id"] for n in nodes if n["port"] == master_port}
        return [n["port"] for n in nodes if n["master"] in ids]

    def slot_owner(self, slot: int) -> int:
        """The port of the master serving ``slot`` (as a live node sees it)."""
        for n in self.nodes():
            if "master" in n["flags"] and any(a <= slot <= b for a, b in n["slots"]):
                return int(n["port"])
        raise RuntimeError(f"no master serves slot {slot}")

    def port_for_key(self, key: str) -> int:
        slot = int(
            self.call(
                self.ports[0] if self.alive(self.ports[0]) else self._any(),
                "CLUSTER",
                "KEYSLOT",
                key,
            )
        )
        return self.slot_owner(slot)

    def _any(self) -> int:
        return next(p for p in self.ports if self.alive(p))

    def _ok_everywhere(self) -> bool:
        """Every live node says ``cluster_state:ok`` and sees all 16384 slots served by
        a master it considers healthy, and agrees with the others on who serves them."""
        views = set()
        for port in self.ports:
            if not self.alive(port):
                continue
            try:
                info = redis_call(port, "CLUSTER", "INFO", timeout=1.0).decode()
            except (OSError, RuntimeError):
                return False
            if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                return False
            replication = redis_call(port, "INFO", "replication", timeout=1.0).decode()
            if "role:slave" in replication and "master_link_status:up" not in replication:
                return False  # a replica still syncing could not take over
            nodes = self.nodes(port)
            view = tuple(
                sorted(
                    (n["port"], tuple(n["slots"]))
                    for n in nodes
                    if "master" in n["flags"]
                    and n["slots"]
                    and "fail" not in n["flags"]
                    and "fail?" not in n["flags"]
                )
            )
            if sum(b - a + 1 for _, ranges in view for a, b in ranges) != 16384:
                return False
            views.add(view)
        return len(views) == 1

    def wait_ok(self, bound: float = BOUND * 2) -> float:
        """Wait (bounded) until the cluster is ok on every live node; the seconds it took."""
        start = time.monotonic()
        while not self._ok_everywhere():
            if time.monotonic() - start > bound:
                raise RuntimeError(f"cluster not ok within {bound}s")
            time.sleep(0.02)
        return time.monotonic() - start

    def kill_master(self, port: int) -> None:
        """SIGKILL the master on ``port``: no shutdown, no failover handshake."""
        assert port in self.masters(), f"{port} is not a master"
        process = self.processes[port]
        process.send_signal(signal.SIGKILL)
        process.wait(BOUND)

    def wait_failover(self, old_port: int, bound: float = BOUND * 2) -> float:
        """Wait (bounded) until a replica of the killed master on ``old_port`` serves its
        slots and the cluster is ok on every live node; the seconds it took."""
        start = time.monotonic()
        while True:
            masters = self.masters() if self._ok_everywhere() else []
            if masters and old_port not in masters:
                return time.monotonic() - start
            if time.monotonic() - start > bound:
                raise RuntimeError(f"no failover of {old_port} within {bound}s")
            time.sleep(0.02)

    def restart(self, port: int) -> None:
        """Start the killed node again (same port and nodes file): it rejoins the cluster
        as a replica of the master that replaced it (after :meth:`wait_failover`);
        waits until every node sees it and the cluster is ok."""
        assert not self.alive(port), f"{port} is running"
        self._spawn(port)
        deadline = time.monotonic() + BOUND * 2
        while True:
            if self._rejoined(port) and self._ok_everywhere():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{port} did not rejoin as a replica")
            time.sleep(0.02)

    def _rejoined(self, port: int) -> bool:
        """Every live node sees ``port`` connected and healthy (a replica, or the master
        it was if it came back before its replica was promoted)."""
        for asked in self.ports:
            if not self.alive(asked):
                continue
            try:
                view = [n for n in self.nodes(asked) if n["port"] == port]
            except RuntimeError:
                return False
            if not view or not view[0]["connected"]:
                return False
            if view[0]["flags"] & {"fail", "fail?"}:
                return False
        return True

    def node_id(self, port: int) -> str:
        return str(self.call(port, "CLUSTER", "MYID").decode())

    def move_slot(self, slot: int, to_port: int) -> None:
        """Reshard: move ``slot`` with its keys to the master on ``to_port`` (the steps
        of ``redis-cli --cluster reshard``: IMPORTING/MIGRATING, MIGRATE the keys, then
        NODE on every master)."""
        source = self.slot_owner(slot)
        if source == to_port:
            return
        source_id, target_id = self.node_id(source), self.node_id(to_port)
        self.call(to_port, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        self.call(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := self.call(source, "CLUSTER", "GETKEYSINSLOT", slot, 100):
            self.call(source, "MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
        for port in self.masters():
            self.call(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        deadline = time.monotonic() + BOUND
        while self.slot_owner(slot) != to_port or not self._ok_everywhere():
            if time.monotonic() > deadline:
                raise RuntimeError(f"slot {slot} not moved to {to_port} within {BOUND}s")
            time.sleep(0.02)

    def ensure(self) -> None:
        """Every node running (a killed one started again) and the cluster ok."""
        for port in self.ports:
            if not self.alive(port):
                self.restart(port)
        self.wait_ok()

    def stop(self) -> None:
        """Kill every node by PID and remove the nodes files."""
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(BOUND)
        for port in self.ports:
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / f"nodes-{port}.conf").unlink()


_shared_cluster: RedisCluster | None = None


def shared_cluster() -> RedisCluster:
    """One private cluster for the test process, started on first use and stopped (by
    PID) at exit; tests that fail nodes start their own (``redis_cluster`` fixture)."""
    global _shared_cluster
    if _shared_cluster is None:
        cluster = RedisCluster(require_redis_server(), Path(tempfile.mkdtemp(prefix="bc-cluster-")))
        cluster.start()
        atexit.register(cluster.stop)
        _shared_cluster = cluster
    return _shared_cluster


@asynccontextmanager
async def redis_cluster_broker(**options: Any) -> AsyncIterator[RedisBroker]:
    """A started :class:`RedisBroker` in cluster mode on :func:`shared_cluster`, on a
    fresh prefix (the cluster is thrown away at exit: nothing to delete)."""
    cluster = shared_cluster()
    options.setdefault("key_prefix", fresh_prefix())
    broker = RedisBroker(url=cluster.url, cluster=True, **options)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()
