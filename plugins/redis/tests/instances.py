"""Real processes for the multi-instance fault tests (``test_instances.py``).

* :class:`RedisServer`, :class:`RedisCluster`, :func:`redis_call` (private Redis
  servers and an admin client): from ``backchannel_redis.testing``, re-exported;
* :class:`Instance`: a ``backchannel serve`` child process with its own TOML config;
* :class:`RoundRobinProxy`: a TCP load balancer without sticky sessions: each new
  connection goes to the next backend, skipping dead ones, so a client whose
  instance died reconnects to a live one;
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
from backchannel_redis.testing import (
    BOUND,
    RedisCluster,
    RedisServer,
    free_port,
    redis_call,
    require_redis_server,
)

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
