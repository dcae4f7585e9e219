"""``backchannel serve --workers N``: a supervisor and its workers as real processes on one
port (SO_REUSEPORT), sharing a real Redis (a fresh key prefix per test).

Which worker holds a connection is read from ``/proc`` (the server side of the TCP
connection is a socket of exactly one worker), so "both workers serve" and "resumed on
the other worker" are facts, not odds. Every wait is bounded.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from backchannel_redis import RedisBroker
from backchannel_redis.testing import delete_keys, fresh_prefix, require_redis
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from backchannel import StartupError, cli
from backchannel import config as config_mod
from conftest import ROOT, check_frame

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; SO_REUSEPORT balancing is Linux's"
)

PLUGINS = ["init", "text", "ping", "rooms", "redis"]
#: seconds any expected event may take (processes start slowly on a busy machine)
BOUND = 30.0
STARTED = re.compile(r"worker (\d+)/(\d+) started \(pid (\d+)\)")
T = TypeVar("T")


# ------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env() -> dict[str, str]:
    """This environment without any ``BACKCHANNEL_*`` setting of the developer's shell."""
    return {k: v for k, v in os.environ.items() if not k.startswith(config_mod.ENV_PREFIX)}


@pytest.fixture
def redis_env() -> Iterator[dict[str, str]]:
    """Environment for a server using the redis plugin on a fresh key prefix (deleted after)."""
    url = require_redis()
    prefix = fresh_prefix()
    env = base_env()
    env["BACKCHANNEL_PLUGINS__ENABLED"] = json.dumps(PLUGINS)
    env["BACKCHANNEL_PLUGINS__REDIS__URL"] = url
    env["BACKCHANNEL_PLUGINS__REDIS__KEY_PREFIX"] = prefix
    yield env
    anyio.run(delete_keys, url, prefix)


def wait_for(condition: Callable[[], T | None], what: str, bound: float = BOUND) -> T:
    """Poll ``condition()`` until it is truthy (returned), at most ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (within {bound}s)")
        time.sleep(0.02)


def _tcp_sockets() -> list[tuple[int, int, str, int]]:
    """``(local port, remote port, state, inode)`` of every TCP socket (``/proc/net/tcp*``)."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            local, remote = int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16)
            rows.append((local, remote, f[3], int(f[9])))
    return rows


def _socket_inodes(pid: int) -> set[int]:
    found: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        return found
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            found.add(int(link[8:-1]))
    return found


def listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a socket listening on ``port``."""
    inodes = _socket_inodes(pid)
    return any(lp == port and st == "0A" and i in inodes for lp, _, st, i in _tcp_sockets())


def owner(ws: ClientConnection, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the server side of ``ws``'s TCP connection."""
    mine, theirs = ws.socket.getsockname()[1], ws.socket.getpeername()[1]
    inodes = [i for lp, rp, st, i in _tcp_sockets() if (lp, rp, st) == (theirs, mine, "01")]
    for pid in pids:
        if inodes and inodes[0] in _socket_inodes(pid):
            return pid
    return None


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not reaped yet, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def ws_connect(port: int) -> ClientConnection:
    return connect(
        f"ws://127.0.0.1:{port}/ws",
        subprotocols=["backchannel.v1"],  # type: ignore[list-item]
        max_size=None,
        open_timeout=BOUND,
    )


@contextmanager
def connect_to(port: int, pid: int, tries: int = 100) -> Iterator[ClientConnection]:
    """A connection the kernel gave to worker ``pid`` (it picks one by hash: try again)."""
    for _ in range(tries):
        with ws_connect(port) as ws:
            if owner(ws, [pid]) == pid:
                yield ws
                return
    raise AssertionError(f"{tries} connections, none to worker {pid}")


def recv(ws: ClientConnection) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(ws.recv(timeout=BOUND))
    return check_frame(frame)


def request(
    ws: ClientConnection, ident: str, type: str, content: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Send a request; its answer and the frames that came before it."""
    ws.send(json.dumps({"id": ident, "type": type, "content": content}))
    before: list[dict[str, Any]] = []
    while True:
        frame = recv(ws)
        if frame.get("replyTo") == ident:
            return frame, before
        before.append(frame)


def http_get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "backchannel.cli", "serve", "--host", "127.0.0.1", *args]


def serve_once(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``serve`` expected to exit by itself (a refusal): its exit code and output."""
    return subprocess.run(
        serve_cmd(*args),
        cwd=ROOT,
        env=base_env() if env is None else env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BOUND * 2,
    )


class Supervisor:
    """``backchannel serve --workers N`` running; its stderr (the workers' too) collected."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            serve_cmd(*args),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self._lines.append(line)

    @property
    def output(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def workers(self) -> dict[int, int]:
        """The latest pid of each worker, by number (1..N), from the supervisor's log."""
        return {int(m[1]): int(m[3]) for m in STARTED.finditer(self.output)}

    def drained(self) -> str:
        """Everything written, once the supervisor and all its workers have exited."""
        self._reader.join(BOUND)
        assert not self._reader.is_alive(), "a process still holds the supervisor's stderr"
        return self.output

    def every_pid(self) -> set[int]:
        return {int(m[3]) for m in STARTED.finditer(self.output)}

    def wait_listening(self, port: int, count: int) -> dict[int, int]:
        """Wait until ``count`` workers were started and each listens on ``port``."""

        def up() -> dict[int, int] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited {self.proc.returncode}:\n{self.output}")
            pids = self.workers()
            if len(pids) == count and all(listening(p, port) for p in pids.values()):
                return pids
            return None

        return wait_for(up, f"{count} workers listening on {port}:\n{self.output}")

    def stop(self) -> None:
        """SIGTERM (bounded), else SIGKILL the supervisor and every worker it started."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(BOUND)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.every_pid():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._reader.join(BOUND)


@contextmanager
def supervisor(args: list[str], env: dict[str, str]) -> Iterator[Supervisor]:
    running = Supervisor(args, env)
    try:
        yield running
    finally:
        running.stop()


def stored_seq(env: dict[str, str], session: str, seq: int) -> None:
    """Wait until Redis holds ``session`` up to ``seq`` (workers flush in the background)."""

    async def wait() -> None:
        broker = RedisBroker(
            url=env["BACKCHANNEL_PLUGINS__REDIS__URL"],
            key_prefix=env["BACKCHANNEL_PLUGINS__REDIS__KEY_PREFIX"],
        )
        await broker.start()
        try:
            with anyio.fail_after(BOUND):
                while True:
                    record = await broker.find_session(session)
                    if record is not None and record.last_seq >= seq:
                        return
                    await anyio.sleep(0.05)
        finally:
            await broker.stop()

    anyio.run(wait)


# ------------------------------------------------------------------ setting and refusals


def test_workers_comes_from_file_environment_and_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``server.workers``: default 1, the file, ``BACKCHANNEL_SERVER__WORKERS``, ``--workers``
    (highest); below 1 is a config error naming the key."""
    for name in list(os.environ):
        if name.startswith(config_mod.ENV_PREFIX):
            monkeypatch.delenv(name)
    path = tmp_path / "bc.toml"
    path.write_text("[server]\nworkers = 3\n")
    assert config_mod.load(None, environ={})["server"]["workers"] == 1
    assert config_mod.load(path, environ={})["server"]["workers"] == 3
    environ = {"BACKCHANNEL_SERVER__WORKERS": "4"}
    assert config_mod.load(path, environ=environ)["server"]["workers"] == 4
    with pytest.raises(
        StartupError, match=r"server\.workers \(from BACKCHANNEL_SERVER__WORKERS\): less than 1"
    ):
        config_mod.load(None, environ={"BACKCHANNEL_SERVER__WORKERS": "0"})
    # the flag reaches the refusal (port 0), so it was read: nothing is started
    monkeypatch.setattr(cli, "_setup_logging", lambda *args: None)
    assert cli.main(["serve", "--config", str(path), "--workers", "2", "--port", "0"]) == 2
    assert "server.workers = 2 needs a fixed port" in capsys.readouterr().err


def test_refuses_several_workers_without_so_reuseport(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A platform without SO_REUSEPORT (simulated: the constant removed): exit 2, one line."""
    monkeypatch.setenv("BACKCHANNEL_PLUGINS__ENABLED", json.dumps(PLUGINS))
    monkeypatch.setattr(cli, "_setup_logging", lambda *args: None)
    monkeypatch.delattr(socket, "SO_REUSEPORT")
    assert cli.main(["serve", "--workers", "2", "--port", str(free_port())]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "backchannel: server.workers = 2 needs SO_REUSEPORT, which this platform lacks; "
        "run one process per port"
    )


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_serve_on_a_port_taken_exits_2(backend: str) -> None:
    """What the supervisor relies on: a ``serve`` that cannot listen exits 2 with one line
    (not a traceback of the task group it failed in)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = serve_once("--port", str(port), "--backend", backend)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("backchannel: cannot listen: ")
    assert "Traceback" not in done.stderr


def test_refuses_several_workers_with_the_in_memory_broker() -> None:
    """No ``broker`` hook (the redis plugin is not enabled): exit 2, one line naming it,
    and no worker started (nothing listens on the port)."""
    port = free_port()
    done = serve_once("--workers", "2", "--port", str(port))
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("backchannel: server.workers = 2 needs a shared broker"), line
    assert "enable the redis plugin" in line
    assert "started" not in done.stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_refuses_several_workers_on_port_0() -> None:
    """Port 0 (each worker would get its own port): exit 2, one line; here the worker count
    comes from ``BACKCHANNEL_SERVER__WORKERS`` (the redis plugin is enabled: not the reason)."""
    env = base_env()
    env["BACKCHANNEL_PLUGINS__ENABLED"] = json.dumps(PLUGINS)
    env["BACKCHANNEL_SERVER__WORKERS"] = "3"
    done = serve_once("--port", "0", env=env)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("backchannel: server.workers = 3 needs a fixed port"), line


# ------------------------------------------------------------------ serving


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_two_workers_share_the_port_and_a_session_resumes_on_the_other(
    redis_env: dict[str, str], backend: str
) -> None:
    """Both workers accept on the one port; a session started on one resumes on the other
    with the frames it missed (through Redis), and gets the room messages it missed by
    joining the room again with ``since``."""
    port = free_port()
    with supervisor(
        ["--workers", "2", "--port", str(port), "--backend", backend], redis_env
    ) as sup:
        pids = list(sup.wait_listening(port, 2).values())
        status, health = http_get(port, "/readyz")
        assert status == 200 and health["ready"] is True, health
        with ExitStack() as stack:
            clients = [stack.enter_context(ws_connect(port)) for _ in range(40)]
            owners = Counter(owner(c, pids) for c in clients)
            assert set(owners) == set(pids), owners  # both serve; none unaccounted for
            for n, c in enumerate(clients[:4]):
                assert request(c, f"p{n}", "ping", {})[0]["type"] == "pong"

        with ws_connect(port) as first:
            home = owner(first, pids)
            assert home is not None
            init = request(first, "i1", "init", {})[0]["content"]
            joined, _ = request(first, "j1", "join", {"room": "lobby"})
            last_seq = joined["seq"]
            # a request whose answer the client never reads: a frame it misses
            first.send(json.dumps({"id": "away", "type": "ping", "content": {}}))
        other = next(p for p in pids if p != home)
        sent = []
        with connect_to(port, other) as member:  # the room's messages come from the other one
            request(member, "m0", "join", {"room": "lobby"})
            for n in range(3):
                reply, _ = request(member, f"m{n + 1}", "text", {"room": "lobby", "text": f"{n}"})
                sent.append(reply["content"])
        session = init["sessionId"]
        stored_seq(redis_env, session, last_seq + 1)  # the home worker kept the answer

        with connect_to(port, other) as again:
            resume = {"sessionId": session, "lastSeq": last_seq, "epoch": init["epoch"]}
            resumed, replayed = request(again, "i2", "init", resume)
            assert resumed["content"]["resumed"] is True, resumed
            assert [(f["replyTo"], f["type"], f["seq"]) for f in replayed] == [
                ("away", "pong", last_seq + 1)
            ]
            assert resumed["content"]["missed"] == 1 and resumed["seq"] == last_seq + 2
            # room messages are in no outbox: a join with since gets them from the room
            position = joined["content"]
            since = {"offset": position["offset"], "epoch": position["epoch"]}
            rejoined, missed = request(again, "j2", "join", {"room": "lobby", "since": since})
            assert rejoined["content"]["recovered"] is True, rejoined
            assert [f["content"] for f in missed if f["type"] == "text"] == sent
    assert sup.proc.returncode == 0, sup.output


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_sigterm_stops_everything_gracefully(
    redis_env: dict[str, str],
) -> None:
    """SIGKILL a worker: the supervisor logs it and starts a new one, which serves. SIGTERM
    to the supervisor: every client gets going-away and 1001; exit 0; no worker left."""
    port = free_port()
    with supervisor(["--workers", "2", "--port", str(port)], redis_env) as sup:
        victim = sup.wait_listening(port, 2)[1]
        os.kill(victim, signal.SIGKILL)
        died = f"worker 1/2 (pid {victim}) exited unexpectedly (signal SIGKILL)"
        wait_for(lambda: died in sup.output, f"no word of the killed worker:\n{sup.output}")
        wait_for(lambda: sup.workers()[1] != victim, f"not restarted:\n{sup.output}")
        pids = sup.wait_listening(port, 2)
        assert pids[1] != victim and not alive(victim)

        with ExitStack() as stack:
            clients = [stack.enter_context(connect_to(port, pid)) for pid in pids.values()]
            for n, c in enumerate(clients):
                assert request(c, f"p{n}", "ping", {})[0]["type"] == "pong"
            started = time.monotonic()
            sup.proc.send_signal(signal.SIGTERM)
            for c in clients:
                notice = recv(c)
                assert notice["type"] == "system", notice
                assert notice["content"]["event"] == "going_away"
                with pytest.raises(ConnectionClosed) as closed:
                    recv(c)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            assert sup.proc.wait(BOUND) == 0, sup.output
            took = time.monotonic() - started
        assert took < BOUND
        assert not any(alive(pid) for pid in sup.every_pid())
        output = sup.drained()
        assert "received SIGTERM, stopping 2 workers" in output
        assert output.count("received SIGTERM, shutting down") == 2  # each worker, once
        assert "all workers stopped" in output


@pytest.mark.slow
def test_a_worker_that_keeps_dying_makes_the_supervisor_give_up(
    redis_env: dict[str, str],
) -> None:
    """Worker 2 killed as soon as it starts, again and again: restarted with back-off, and
    its 5th death within 10 s makes the supervisor stop worker 1 and exit 1."""
    port = free_port()
    killed: list[int] = []
    with supervisor(["--workers", "2", "--port", str(port)], redis_env) as sup:

        def gave_up() -> bool:
            pid = sup.workers().get(2)
            if pid is not None and pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            return sup.proc.poll() is not None

        wait_for(gave_up, f"the supervisor never gave up:\n{sup.output}")
        output = sup.drained()
        assert sup.proc.returncode == 1, output
        assert len(killed) == 5, output
        assert "5 deaths within 10 s, giving up" in output
        assert "restarting it in 0.00 s" in output  # the first death: at once
        assert "restarting it in 1.00 s" in output  # the 4th: backed off
        assert not any(alive(pid) for pid in sup.every_pid())


@pytest.mark.slow
def test_a_worker_that_cannot_listen_stops_the_supervisor_with_2(
    redis_env: dict[str, str],
) -> None:
    """The port is held by a socket without SO_REUSEPORT: the workers cannot listen (exit
    2), so the supervisor stops them all and exits 2 instead of restarting them."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with supervisor(["--workers", "2", "--port", str(port)], redis_env) as sup:
            assert sup.proc.wait(BOUND * 2) == 2, sup.output
            output = sup.drained()
            assert "cannot listen" in output
            assert "could not start (exit code 2); stopping the others" in output
            assert "restarting" not in output
            assert not any(alive(pid) for pid in sup.every_pid())


@pytest.mark.slow
def test_workers_stop_when_the_supervisor_is_killed(redis_env: dict[str, str]) -> None:
    """A SIGKILLed supervisor cannot forward anything: its workers notice (their parent is
    gone) and stop on their own, so no orphan keeps the port."""
    port = free_port()
    with supervisor(["--workers", "2", "--port", str(port)], redis_env) as sup:
        pids = sup.wait_listening(port, 2).values()
        sup.proc.kill()
        sup.proc.wait()
        wait_for(lambda: not any(alive(pid) for pid in pids), f"orphans:\n{sup.output}")
        output = sup.drained()
        assert output.count(f"supervisor (pid {sup.proc.pid}) is gone") == 2, output
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_a_stop_signal_delivered_twice_is_one_graceful_stop(redis_env: dict[str, str]) -> None:
    """SIGINT to the supervisor, and 0.2 s later again (what a launcher that also forwards it
    does: ``uv run`` without a terminal, systemd stopping a control group): one graceful stop,
    every worker exits on its own, none is killed."""
    port = free_port()
    with supervisor(["--workers", "2", "--port", str(port)], redis_env) as sup:
        sup.wait_listening(port, 2)
        sup.proc.send_signal(signal.SIGINT)
        time.sleep(0.2)  # the forwarded copy comes later (uv waits 200 ms)
        sup.proc.send_signal(signal.SIGINT)
        assert sup.proc.wait(BOUND) == 0, sup.output
        output = sup.drained()
    assert "received SIGINT, stopping 2 workers" in output
    assert "killing the workers" not in output and "SIGKILL" not in output, output
    assert output.count("received SIGTERM, shutting down") == 2
