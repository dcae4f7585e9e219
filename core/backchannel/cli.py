"""The ``backchannel`` command: ``serve``, ``plugins``, ``check``, plus plugin commands."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import signal
import sys
from typing import Any

import anyio
import pluggy

from . import config as config_mod
from . import hookspecs, plugins
from .errors import StartupError

__all__ = ["main"]


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    server: dict[str, Any] = {}
    for key in ("host", "port", "backend"):
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


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import App

    try:
        cfg = config_mod.load(args.config, overrides=_overrides(args))
        _setup_logging(cfg["log"]["level"], cfg["log"]["format"], args.log_level)
        app = App(cfg)
    except StartupError as exc:
        print(f"backchannel: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    logging.getLogger("backchannel.app").info(
                        "received %s, shutting down", signal.Signals(signum).name
                    )
                    await app.stop()
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_on_signal)
            await app.serve_forever()
            tg.cancel_scope.cancel()

    backend = cfg["server"]["backend"]
    options: dict[str, Any] = {}
    if backend == "asyncio" and cfg["server"]["uvloop"]:
        try:
            import uvloop  # noqa: F401

            options["use_uvloop"] = True
        except ImportError:
            pass
    try:
        anyio.run(main, backend=backend, backend_options=options)
    except StartupError as exc:
        print(f"backchannel: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"backchannel: cannot listen: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .app import App

    source = args.config or "(defaults)"
    try:
        app = App(args.config)
    except StartupError as exc:
        print(f"{source}: {exc}", file=sys.stderr)
        return 1
    print(f"{source}: OK (plugins: {', '.join(app.config['plugins']['enabled'])})")
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
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            pm.register(plugins.load(name, {name: info}), name=name)
            row["hooks"] = sorted(h.name for h in pm.get_hookcallers(pm.get_plugin(name)) or [])
        except StartupError as exc:
            row["error"] = str(exc)
        rows.append(row)
    json.dump(rows, sys.stdout, indent=2)
    print()
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
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check", help="validate a config file and its plugins without starting")
    check.add_argument("config", nargs="?", help="TOML config file")
    check.set_defaults(func=cmd_check)

    listing = sub.add_parser("plugins", help="list installed plugins as JSON")
    listing.add_argument("--config", "-c", help="config deciding which are enabled")
    listing.set_defaults(func=cmd_plugins)

    if plugin_commands:
        _plugin_commands(sub)
    return parser


def _plugin_commands(sub: Any) -> None:
    """Let every installed plugin implementing ``cli_commands`` add its sub-commands."""
    available = plugins.installed()
    for name, info in available.items():
        module, _, _ = info.entry_point.value.partition(":")
        try:
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            obj = plugins.load(name, {name: info})
            if not hasattr(obj, "cli_commands"):
                continue
            pm.register(obj, name=name)
            pm.hook.cli_commands(subparsers=sub)
        except Exception as exc:  # a broken plugin must not break the CLI
            print(f"backchannel: plugin {name!r} ({module}): {exc}", file=sys.stderr)


_BUILTIN = {"serve", "check", "plugins"}


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
