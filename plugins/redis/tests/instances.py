"""Real processes for the multi-instance fault tests (``test_instances.py``).

* :class:`RedisServer`: a private ``redis-server`` on a free port, which a test may
  shut down, start again on the same port, or pause (the shared Redis on 6379 is
  never touched);
* :class:`RedisCluster`: six private ``redis-server`` nodes (3 masters, 3 replicas) made
  one Redis Cluster, whose masters a test may SIGKILL and bring back as replicas;
* :class:`Instance`: a ``backchannel serve`` child process with its own TOML config;
* :class:`RoundRobinProxy`: a TCP load balancer without sticky sessions: each new
  connection goes to the next backend, skipping dead ones, so a client whose
  instance died reconnects to a live one;
* :func:`redis_call`: a tiny blocking RESP client for admin commands (``SHUTDOWN``,
  ``CLIENT PAUSE``, ``DBSIZE``, ``PUBSUB``), independent of any event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

__all__ = [
    "Instance",
    "RedisCluster",
    "RedisServer",
    "RoundRobinProxy",
    "free_port",
    "http_status",
    "redis_call",
    "require_redis_server",
    "wait_for",
]

#: seconds any single expected event may take (generous: ~1 core shared by everyone)
BOUND = 15.0


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
        log = (self.workdir / f"redis-{self.starts}.log").open("wb")
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + BOUND
        while True:
            try:
                if redis_call(self.port, "PING", timeout=1.0) == "PONG":
                    return
            except (OSError, RuntimeError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

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
        self.ports = [free_port() for _ in range(6)]
        #: the cluster bus ports (by default port + 10000, which may be taken or > 65535)
        self.bus_ports = {port: free_port() for port in self.ports}
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """A seed URL (the first node; the client discovers the others)."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def _spawn(self, port: int) -> None:
        log = (self.workdir / f"redis-{port}.log").open("ab")
        self.processes[port] = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self.workdir / f"nodes-{port}.conf"),
                "--cluster-port",
                str(self.bus_ports[port]),
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                # a replica always stands for election (by default it refuses when
                # its master link was down "too long", e.g. during its first sync)
                "--cluster-replica-validity-factor",
                "0",
                "--repl-diskless-sync-delay",
                "0",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + BOUND
        while True:
            with contextlib.suppress(OSError, RuntimeError):
                if redis_call(port, "PING", timeout=1.0) == "PONG":
                    return
            if self.processes[port].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cluster node did not start on port {port}")
            time.sleep(0.02)

    def start(self) -> None:
        """Start the six nodes, make them one cluster, wait until it is ok everywhere."""
        for port in self.ports:
            self._spawn(port)
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
        found = [n for n in self.nodes() if "master" in n["flags"] and "fail" not in n["flags"]]
        return [n["port"] for n in sorted(found, key=lambda n: n["slots"][0][0]) if n["slots"]]

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


# --------------------------------------------------------- backchannel serve


def instance_config(redis_url: str, key_prefix: str, **sections: dict[str, Any]) -> str:
    """TOML for one instance: the standard plugins plus redis, fast Redis health checks."""
    tables: dict[str, dict[str, Any]] = {
        "plugins": {"enabled": ["init", "text", "ping", "system", "rooms", "redis"]},
        "plugins.redis": {
            "url": redis_url,
            "key_prefix": key_prefix,
            "timeout": 0.5,
            "health_interval": 0.2,
            "reconnect_min_delay": 0.05,
            "reconnect_max_delay": 0.5,
        },
        "log": {"level": "WARNING"},
    }
    for name, values in sections.items():
        tables.setdefault(name.replace("__", "."), {}).update(values)

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {value(v)}" for key, v in values.items()]
        lines.append("")
    return "\n".join(lines)


class Instance:
    """One ``backchannel serve`` child process on its own port."""

    def __init__(self, name: str, workdir: Path, config: str) -> None:
        self.name = name
        self.port = free_port()
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(config)
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backchannel.cli",
                "serve",
                "--config",
                str(self.config_path),
                "--port",
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    async def wait_ready(self, bound: float = BOUND) -> None:
        """Until ``/readyz`` answers 200 (the process listens and Redis is reachable)."""
        deadline = time.monotonic() + bound
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.process.returncode}):\n{self.tail()}"
                )
            with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
                if await http_status(self.port, "/readyz") == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready within {bound}s:\n{self.tail()}")
            await anyio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush, no goodbye."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(BOUND)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(BOUND)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(BOUND)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_kib(self) -> int:
        """Resident set size (``VmRSS`` of ``/proc/<pid>/status``), KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS for {self.name}")

    def cpu_seconds(self) -> float:
        """User + system CPU time the process used so far (``/proc/<pid>/stat``)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


async def http_status(port: int, path: str, timeout: float = 2.0) -> int:
    """The status of ``GET path`` on ``port`` (one short-lived connection)."""
    with anyio.fail_after(timeout):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(
                f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
            )
            head = await stream.receive()
    return int(head.split(b" ", 2)[1])


async def wait_for(
    condition: Callable[[], Any], what: str | Callable[[], str], bound: float = BOUND
) -> float:
    """Poll ``condition`` (maybe async) until true; return the seconds it took.
    ``what`` (or what it returns, then) says what did not happen."""
    start = time.monotonic()
    while True:
        result = condition()
        if hasattr(result, "__await__"):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > bound:
            raise AssertionError(
                f"{what if isinstance(what, str) else what()} (not within {bound}s)"
            )
        await anyio.sleep(0.02)


# ------------------------------------------------------------------ proxy


class RoundRobinProxy:
    """A TCP load balancer (asyncio): every new connection goes to the next backend;
    a backend that refuses is skipped. No sticky sessions."""

    def __init__(self, ports: Sequence[int]) -> None:
        self.ports = list(ports)
        self.port = 0
        #: connections made to each backend port
        self.routed: dict[int, int] = dict.fromkeys(self.ports, 0)
        self.refused = 0
        self._next: Iterator[int] = itertools.cycle(range(len(self.ports)))
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def __aenter__(self) -> RoundRobinProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for _ in range(len(self.ports)):
            port = self.ports[next(self._next)]
            try:
                upstream = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                self.refused += 1
                continue
            self.routed[port] += 1
            break
        try:
            if upstream is None:
                return
            up_reader, up_writer = upstream
            self._writers.add(up_writer)
            to_up = asyncio.ensure_future(self._pipe(reader, up_writer))
            to_client = asyncio.ensure_future(self._pipe(up_reader, writer))
            await asyncio.wait({to_up, to_client}, return_when=asyncio.FIRST_COMPLETED)
            for task in (to_up, to_client):
                task.cancel()
            up_writer.close()
            self._writers.discard(up_writer)
        finally:
            writer.close()
            self._writers.discard(writer)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
