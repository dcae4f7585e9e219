"""The ``backchannel`` command: ``serve``, ``check``, ``plugins``, ``new-plugin``, plus plugin
commands."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

from . import config as config_mod
from . import plugins
from .errors import StartupError
from .hooks import Gateway

if TYPE_CHECKING:
    from .app import App

__all__ = ["main"]

#: a worker dying this many times within RESTART_WINDOW seconds makes the supervisor give up
MAX_DEATHS = 5
RESTART_WINDOW = 10.0
#: a stop signal within this many seconds of the first is that same request delivered twice
#: (to the process group, and forwarded by a launcher: `uv run` without a terminal, systemd
#: stopping a control group), not a second one asking to kill the workers
REPEAT_WINDOW = 1.0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    server: dict[str, Any] = {}
    for key in ("host", "port", "backend", "workers"):
        value = getattr(args, key, None)
        if value is not None:
            server[key] = value
    result: dict[str, Any] = {"server": server} if server else {}
    if getattr(args, "log_level", None):
        result["log"] = {"level": args.log_level.upper()}
    return result


def _setup_logging(level: str, fmt: str = "console", explicit: str | None = None) -> None:
    """Structured, redacted logs (:mod:`backchannel.logs`): ``log.level`` and ``log.format``;
    ``--log-level`` (``explicit``), ``DEBUG=backchannel:*`` and ``BACKCHANNEL_LOG_LEVEL``."""
    from .logs import setup_logging

    setup_logging(level, fmt, explicit=explicit)


def _prepare(args: argparse.Namespace) -> App:
    """What ``serve`` and ``check`` both do first: read the config (file, environment, flags),
    load the enabled plugins and check their settings, and check that the event loop and
    ``server.workers`` can run this config. Raises :class:`StartupError`."""
    from .app import App

    app = App(args.config, overrides=_overrides(args))
    server = app.settings.server
    if server.backend == "trio":
        try:
            import trio  # noqa: F401
        except ImportError as exc:
            raise StartupError(
                'server.backend = "trio" needs Trio, which is not installed: '
                "pip install 'backchannel[trio]'"
            ) from exc
    if server.workers > 1:
        refusal = _cannot_supervise(app)
        if refusal is not None:
            raise StartupError(refusal)
    return app


def _run(app: App, main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` on the App's event loop (``server.backend``, uvloop when asked for)."""
    server = app.settings.server
    options: dict[str, Any] = {}
    if server.backend == "asyncio" and server.uvloop:
        try:
            import uvloop  # noqa: F401

            options["use_uvloop"] = True
        except ImportError:
            pass
    anyio.run(main, backend=server.backend, backend_options=options)


def _start_up(app: App) -> None:
    """Start the App and shut it down again without listening: every set-up hook, plugin
    resource (schemas, key files, secrets) and the broker, as ``serve`` starts them."""
    from .testing import serve_in_memory

    async def main() -> None:
        async with serve_in_memory(app):
            pass

    _run(app, main)


def _refused(failure: StartupError | OSError, code: int = 2) -> int:
    """Print why the server cannot start, as one plain line (the same for serve and check)."""
    what = "cannot listen: " if isinstance(failure, OSError) else ""
    print(f"backchannel: {what}{failure}", file=sys.stderr)
    return code


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        app = _prepare(args)
        if app.settings.server.workers > 1:
            # refuse once, here, what every worker would refuse at start-up
            _start_up(app)
    except Exception as exc:
        failure = _startup_failure(exc)
        if failure is None:
            raise
        return _refused(failure)
    cfg = app.config
    _setup_logging(cfg["log"]["level"], cfg["log"]["format"], args.log_level)
    if cfg["server"]["workers"] > 1:
        return _supervise(args, cfg)
    supervisor: int | None = getattr(args, "worker_of", None)  # set in _supervise's workers
    log = logging.getLogger("backchannel.app")

    async def main() -> None:
        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    await app.stop()
                    return

        async def stop_when_orphaned() -> None:
            """A worker whose supervisor died (SIGKILL) must not keep serving the port alone."""
            while os.getppid() == supervisor:
                await anyio.sleep(1)
            log.warning("supervisor (pid %s) is gone, shutting down", supervisor)
            await app.stop()

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_on_signal)
            if supervisor is not None:
                tg.start_soon(stop_when_orphaned)
            # a worker listens with SO_REUSEPORT beside the other workers
            await app.serve_forever(reuse_port=supervisor is not None)
            tg.cancel_scope.cancel()

    try:
        _run(app, main)
    except Exception as exc:
        # Exit 2 (a supervisor does not restart it) only when it never listened; from inside
        # the serving task group, the failure comes wrapped in an ExceptionGroup.
        failure = _startup_failure(exc) if app.port is None else None
        if failure is None:
            raise
        return _refused(failure)
    return 0


def _startup_failure(exc: BaseException) -> StartupError | OSError | None:
    """The StartupError or OSError (cannot listen) in ``exc``, maybe an ExceptionGroup."""
    if isinstance(exc, StartupError | OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _startup_failure(inner)
            if found is not None:
                return found
    return None


# ------------------------------------------------------------------ serve --workers N


def _cannot_supervise(app: App) -> str | None:
    """Why ``server.workers`` > 1 cannot work with this config (None: it can)."""
    server = app.config["server"]
    what = f"server.workers = {server['workers']}"
    if server["port"] == 0:
        return f"{what} needs a fixed port: with port 0 each worker would get a different one"
    if not hasattr(socket, "SO_REUSEPORT"):
        return f"{what} needs SO_REUSEPORT, which this platform lacks; run one process per port"
    if not any("broker" in hooks for hooks in app.plugins().values()):
        return (
            f'{what} needs a shared broker: enable the redis plugin (add "redis" to '
            "plugins.enabled); the in-memory broker keeps sessions and rooms in one process"
        )
    return None


def _worker_command(args: argparse.Namespace) -> list[str]:
    """A worker's command line: this command's config file and flags, one worker, reuse-port."""
    cmd = [sys.executable, "-m", "backchannel.cli", "serve", "--workers", "1"]
    cmd += ["--worker-of", str(os.getpid())]
    if args.config:
        cmd += ["--config", str(args.config)]
    for key in ("host", "port", "backend", "log_level"):
        value = getattr(args, key, None)
        if value is not None:
            cmd += ["--" + key.replace("_", "-"), str(value)]
    return cmd


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _supervise(args: argparse.Namespace, cfg: dict[str, Any]) -> int:
    """Run ``server.workers`` copies of ``serve`` on one port (SO_REUSEPORT) until SIGTERM or
    SIGINT, which each worker gets as SIGTERM (graceful: going-away, 1001). A worker that dies
    is restarted, with back-off; MAX_DEATHS within RESTART_WINDOW seconds: give up (exit 1).
    A worker exiting with 2 could not start (config, cannot listen): stop all, exit 2.
    A second stop signal (REPEAT_WINDOW seconds or more after the first) kills the workers."""
    log = logging.getLogger("backchannel.workers")
    count: int = cfg["server"]["workers"]
    cmd = _worker_command(args)
    workers: list[subprocess.Popen[bytes] | None] = [None] * count
    restart_at: dict[int, float] = {}
    deaths: deque[float] = deque()
    requested: list[tuple[int, float]] = []  # stop signals: (signal, when)

    # Signals wake the wait below through this pipe: no polling, no wake-up lost between
    # looking at the workers and waiting.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)

    def on_stop(signum: int, frame: object) -> None:
        requested.append((signum, time.monotonic()))

    def asked_again(seen: int) -> bool:
        """A stop signal came after the first ``seen`` ones that is not one of them again."""
        first = requested[0][1] if seen else -REPEAT_WINDOW
        return any(at - first >= REPEAT_WINDOW for _, at in requested[seen:])

    def on_child(signum: int, frame: object) -> None:
        pass  # only wakes the wait (through the wake-up fd)

    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, on_stop),
        signal.SIGTERM: signal.signal(signal.SIGTERM, on_stop),
        signal.SIGCHLD: signal.signal(signal.SIGCHLD, on_child),
    }
    old_wakeup = signal.set_wakeup_fd(wake_w)

    def wait(timeout: float) -> None:
        select.select([wake_r], [], [], max(timeout, 0.0))
        try:
            while os.read(wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def spawn(index: int) -> None:
        # A session of its own: a terminal's Ctrl+C reaches the supervisor only, which
        # forwards it once (a worker getting two would stop abruptly on the second).
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
        workers[index] = proc
        log.info("worker %d/%d started (pid %d)", index + 1, count, proc.pid)

    code: int | None = None
    try:
        server = cfg["server"]
        log.info(
            "supervisor (pid %d): %d workers on %s:%s",
            os.getpid(),
            count,
            server["host"],
            server["port"],
        )
        for index in range(count):
            spawn(index)
        while code is None and not requested:
            now = time.monotonic()
            for index, proc in enumerate(workers):
                if proc is None or proc.poll() is None:
                    continue
                workers[index] = None
                name = f"worker {index + 1}/{count} (pid {proc.pid})"
                if proc.returncode == 2:
                    log.error("%s could not start (exit code 2); stopping the others", name)
                    code = 2
                    break
                deaths.append(now)
                while now - deaths[0] > RESTART_WINDOW:
                    deaths.popleft()
                if len(deaths) >= MAX_DEATHS:
                    log.error(
                        "%s exited (%s): %d deaths within %g s, giving up",
                        name,
                        _exit_text(proc.returncode),
                        len(deaths),
                        RESTART_WINDOW,
                    )
                    code = 1
                    break
                delay = 0.0 if len(deaths) == 1 else min(2.0, 0.25 * 2 ** (len(deaths) - 2))
                log.warning(
                    "%s exited unexpectedly (%s); restarting it in %.2f s",
                    name,
                    _exit_text(proc.returncode),
                    delay,
                )
                restart_at[index] = now + delay
            if code is not None:
                break
            for index, at in list(restart_at.items()):
                if at <= now:
                    del restart_at[index]
                    spawn(index)
            wait(min(restart_at.values()) - time.monotonic() if restart_at else 5.0)

        live = [proc for proc in workers if proc is not None]
        if requested:
            log.info(
                "received %s, stopping %d workers", signal.Signals(requested[0][0]).name, len(live)
            )
        seen = len(requested)
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        # a worker's graceful stop takes shutdown.grace plus the close handshakes (<= 6 s)
        deadline = time.monotonic() + cfg["shutdown"]["grace"] + 15.0
        clean = True
        while any(proc.poll() is None for proc in live):
            if time.monotonic() >= deadline or asked_again(seen):
                why = "a second signal" if asked_again(seen) else "the time limit"
                log.error("killing the workers still running (%s)", why)
                for proc in live:
                    proc.kill()
                    proc.wait()
                clean = False
                break
            wait(deadline - time.monotonic())
        for proc in live:
            if proc.returncode not in (0, -signal.SIGTERM):
                clean = False
                log.warning("worker pid %d stopped with %s", proc.pid, _exit_text(proc.returncode))
        if code is None:
            code = 0 if clean else 1
        log.info("all workers stopped")
        return code
    finally:
        for proc in workers:  # only after an exception: the stop above waited for them all
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        signal.set_wakeup_fd(old_wakeup)
        for signum, handler in previous.items():
            # A stop signal repeated after the workers are gone (a launcher forwarding it
            # late) must not kill the supervisor on its way out: it is the same stop.
            stopping = requested and signum in (signal.SIGINT, signal.SIGTERM)
            signal.signal(signum, signal.SIG_IGN if stopping else handler)
        os.close(wake_r)
        os.close(wake_w)


def cmd_check(args: argparse.Namespace) -> int:
    """Everything ``serve`` does but listening: the same checks, the App's start-up and
    shutdown; what ``serve`` would refuse is refused with the same line."""
    source = args.config or "(defaults)"
    try:
        app = _prepare(args)
        _start_up(app)
    except Exception as exc:
        failure = _startup_failure(exc)
        if failure is None:
            raise
        return _refused(failure, 1)
    print(f"{source}: OK (plugins: {', '.join(app.config['plugins']['enabled'])})")
    return 0


def cmd_asyncapi(args: argparse.Namespace) -> int:
    """Print the AsyncAPI 3.0 document of the types this config's plugins register."""
    from .app import App, __version__
    from .asyncapi import document, dumps, registered_types

    try:
        app = App(args.config)
        types = registered_types(app)
    except StartupError as exc:
        print(f"backchannel: {exc}", file=sys.stderr)
        return 2
    server = app.settings.server
    host = "localhost" if server.host in ("", "0.0.0.0", "::") else server.host
    doc = document(types, host=f"{host}:{server.port}", path=server.path, version=__version__)
    sys.stdout.write(dumps(doc))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.load(args.config)
    except StartupError as exc:
        print(f"backchannel: {exc}", file=sys.stderr)
        return 2
    enabled = cfg["plugins"]["enabled"]
    rows = []
    for name, info in sorted(plugins.installed().items()):
        row: dict[str, Any] = {
            "name": name,
            "distribution": info.distribution,
            "version": info.version,
            "enabled": name in enabled,
        }
        try:
            gateway = Gateway()
            gateway.register(plugins.load(name, {name: info}), name)
            row["hooks"] = gateway.plugins()[name]
        except StartupError as exc:
            row["error"] = str(exc)
        rows.append(row)
    json.dump(rows, sys.stdout, indent=2)
    print()
    return 0


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .scaffold import new_plugin

    try:
        target = new_plugin(args.name, Path(args.directory))
    except StartupError as exc:
        print(f"backchannel: {exc}", file=sys.stderr)
        return 2
    print(f"{target}: the {args.name!r} plugin; next: cd {target} && uv run pytest")
    return 0


def build_parser(plugin_commands: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backchannel", description="Real-time chat server over WebSocket."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--config", "-c", help="TOML config file (default: built-in defaults)")
    serve.add_argument("--host", help="listen address (server.host)")
    serve.add_argument("--port", type=int, help="listen port (server.port)")
    serve.add_argument("--backend", choices=["asyncio", "trio"], help="event loop (server.backend)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (log.level)")
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes sharing the port (server.workers; more than 1 needs the redis plugin)",
    )
    serve.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)  # set by _supervise
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser(
        "check",
        help="everything serve does but listening: config, environment, plugins, start-up",
    )
    check.add_argument("config", nargs="?", help="TOML config file")
    check.set_defaults(func=cmd_check)

    scaffold = sub.add_parser(
        "new-plugin",
        help="write a plugin package (backchannel-NAME/): message type, schemas, tests, README",
    )
    scaffold.add_argument("name", help="the plugin's name (and its message type's)")
    scaffold.add_argument(
        "--directory", "-d", default=".", help="where to write backchannel-NAME/ (default: .)"
    )
    scaffold.set_defaults(func=cmd_new_plugin)

    listing = sub.add_parser("plugins", help="list installed plugins as JSON")
    listing.add_argument("--config", "-c", help="config deciding which are enabled")
    listing.set_defaults(func=cmd_plugins)

    asyncapi = sub.add_parser(
        "asyncapi", help="print the AsyncAPI 3.0 document of the enabled plugins' message types"
    )
    asyncapi.add_argument("--config", "-c", help="TOML config file (default: built-in defaults)")
    asyncapi.set_defaults(func=cmd_asyncapi)

    if plugin_commands:
        _plugin_commands(sub)
    return parser


def _plugin_commands(sub: Any) -> None:
    """Let every installed plugin implementing ``cli_commands`` add its sub-commands."""
    available = plugins.installed()
    for name, info in available.items():
        module, _, _ = info.entry_point.value.partition(":")
        try:
            obj = plugins.load(name, {name: info})
            if not hasattr(obj, "cli_commands"):
                continue
            gateway = Gateway()
            gateway.register(obj, name)
            gateway.setup("cli_commands", {"subparsers": sub})
        except Exception as exc:  # a broken plugin must not break the CLI
            print(f"backchannel: plugin {name!r} ({module}): {exc}", file=sys.stderr)


_BUILTIN = {"serve", "check", "plugins", "asyncapi", "new-plugin"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    builtin = bool(argv) and argv[0] in _BUILTIN
    # Plugin commands need their plugins imported: only when one may be asked for.
    parser = build_parser(plugin_commands=not builtin)
    args = parser.parse_args(argv)
    result = args.func(args)
    if inspect.isawaitable(result):
        result = anyio.run(lambda: result)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
