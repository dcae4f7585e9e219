"""The App: one kernel instance with its own plugin manager, config, hub and server.

Everything a plugin can do goes through hooks; ``App`` adds the seed's
convenience API on top (``@app.handler``, ``app.use``, ``@app.on``, ``app.send``,
``app.broadcast``, ``app.health()``, ``app.metrics()``) by registering small
in-process plugins, so an inline handler and an installed distribution are the
same thing to the kernel.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.abc
import pluggy
import sniffio

from . import config as config_mod
from . import hookspecs, plugins
from .broker import Broker
from .errors import CloseCode, StartupError
from .hooks import HookFailed, Hooks
from .http import HttpRequest, HttpResponse, RouteHandler, json_response
from .hub import Connection, Hub, holder_of, now_iso
from .memory import MemoryBroker
from .pipeline import Pipeline
from .server import ServerOptions, serve_anyio, serve_asyncio

if TYPE_CHECKING:
    import asyncio

    from .runtime import AsyncioRuntime

__all__ = ["App", "EVENTS", "__version__"]

__version__ = "0.1.0"
log = logging.getLogger("backchannel.app")
hookimpl = hookspecs.hookimpl

#: ``@app.on(event)`` names and the arguments their callbacks receive, in order.
EVENTS: dict[str, tuple[str, ...]] = {
    "connection_added": ("connection",),
    "connection_removed": ("connection", "code"),
    "message_received": ("message", "connection"),
    "message_sent": ("connection", "frame"),
    "error": ("connection", "message_id", "error"),
    "alert": ("name", "state", "details"),
}


def _observer(event: str, func: Callable[..., Any]) -> object:
    """A one-hook plugin object calling ``func`` positionally for ``event``."""
    args = EVENTS[event]
    namespace: dict[str, Any] = {}
    params = ", ".join(args)
    exec(f"def {event}({params}):\n    return func({params})\n", {"func": func}, namespace)
    return type(f"on_{event}", (), {event: staticmethod(hookimpl(namespace[event]))})()


class _TypePlugin:
    """What ``@app.handler`` registers: one message type with its handler."""

    def __init__(self, name: str, handler: Callable[..., Any], options: dict[str, Any]) -> None:
        self._name = name
        self._handler = handler
        self._options = options

    @hookimpl
    def message_types(self, register: Callable[..., None]) -> None:
        register(self._name, handler=self._handler, **self._options)


class App:
    """A backchannel application.

    Args:
        config: a config dict (as in ``backchannel.toml``), a path to a TOML file,
            or None for the defaults (plus ``BACKCHANNEL_*`` environment overrides).
        plugins: plugin names (installed) or plugin objects to use *instead of*
            ``plugins.enabled``; tests pass an explicit list so nothing is
            autoloaded.
    """

    def __init__(
        self,
        config: dict[str, Any] | str | os.PathLike[str] | None = None,
        *,
        plugins: Iterable[str | object] | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        if isinstance(config, dict):
            data = config_mod.merge({}, config)
            data = config_mod.merge(data, config_mod.env_overrides(environ or {}))
            if plugins is not None:
                names = [p for p in plugins if isinstance(p, str)]
                data.setdefault("plugins", {})["enabled"] = names
            self.config = config_mod.check(data)
        else:
            overrides: dict[str, Any] = {}
            if plugins is not None:
                overrides = {"plugins": {"enabled": [p for p in plugins if isinstance(p, str)]}}
            self.config = config_mod.load(config, environ=environ, overrides=overrides)
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._order: list[str] = []
        self.hooks = Hooks(self.pm, lambda: self._order)
        session = self.config["session"]
        #: the broker (the ``broker`` hook's, chosen at start-up; in-memory by default)
        self.broker: Broker = MemoryBroker(
            outbox_size=session["outbox_size"],
            outbox_max_bytes=session["outbox_max_bytes"],
            dedupe_window=session["dedupe_window"],
            dedupe_size=session["dedupe_size"],
        )
        self.hub = Hub(self)
        self.pipeline = Pipeline(self)
        self.started_at = time.time()
        self.port: int | None = None
        self.routes: dict[str, RouteHandler] = {}
        self._stop: anyio.Event | None = None
        self._ready = False
        self._inline = 0
        #: extra figures for :meth:`metrics`, by provider name (e.g. the monitoring plugin's):
        #: each returns a dict deep-merged into the kernel's counters.
        self.metrics_providers: dict[str, Callable[[], dict[str, Any]]] = {}
        self._background: list[Callable[[], Awaitable[Any]]] = []
        self._task_group: anyio.abc.TaskGroup | None = None
        enabled = self.config["plugins"]["enabled"]
        available = _installed() if enabled else {}
        for name in enabled:
            self._register(_load(name, available), name)
        for obj in plugins or ():
            if not isinstance(obj, str):
                self.use(obj)

    # ----------------------------------------------------------------- plugins

    def _register(self, plugin: object, name: str) -> None:
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise StartupError(f"plugin {name!r} is invalid: {exc}") from exc
        self._order.append(name)
        self.hooks.invalidate()
        schemas = [
            cast("dict[str, Any] | None", impl.function())
            for impl in self.pm.hook.config_schema.get_hookimpls()
            if impl.plugin_name == name
        ]
        config_mod.check_plugin(self.config, name, schemas[0] if schemas else None)

    def use(self, plugin: object, name: str | None = None) -> object:
        """Register an in-process plugin object (its hookimpls run after config plugins)."""
        self._inline += 1
        label = name or getattr(plugin, "name", None) or f"inline-{self._inline}"
        self._register(plugin, str(label))
        return plugin

    def handler(
        self,
        type: str,
        *,
        schema: dict[str, Any] | None = None,
        permission: str | None = None,
        timeout: float | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@app.handler("type")`` answers that message type.

        The function takes ``(message)`` or ``(message, connection)``; see the
        ``handle`` hookspec for what it may return.
        """

        def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
            options = {"schema": schema, "permission": permission, "timeout": timeout}
            self.use(_TypePlugin(type, func, options), f"handler:{type}")
            return func

        return decorate

    def on(self, event: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: observe ``event`` (one of :data:`EVENTS`); callbacks must be sync."""
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; one of {', '.join(EVENTS)}")

        def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
            self.use(_observer(event, func), f"on:{event}:{self._inline + 1}")
            return func

        return decorate

    def plugin_config(self, name: str) -> dict[str, Any]:
        """The checked ``[plugins.<name>]`` table, defaults filled in."""
        table: dict[str, Any] = self.config["plugins"].get(name, {})
        return table

    # ------------------------------------------------------------------ output

    def send(self, connection_id: str, type: str | dict[str, Any], content: Any = None) -> bool:
        """Send a frame to one connection, in this process or another sharing the broker.

        Takes ``(connection_id, type, content)`` or the seed's
        ``(connection_id, {"type": ..., "content": ...})``. True when the frame was
        sent here or handed to the broker for the process holding the connection
        (the connection id names it); False when no live connection has that id.
        """
        kind, body = _split(type, content)
        conn = self.hub.connections.get(connection_id)
        if conn is not None:
            conn.send(kind, body)
            return True
        holder = holder_of(connection_id)
        if holder is None or holder == self.broker.instance:
            return False
        self.broker.tell(
            holder, {"op": "send", "connection": connection_id, "type": kind, "content": body}
        )
        return True

    def broadcast(self, type: str | dict[str, Any], content: Any = None) -> int:
        """Send a frame to every connection of every process sharing the broker.

        Returns how many connections of this process got it (the other processes
        are told through the broker and send to theirs).
        """
        kind, body = _split(type, content)
        self.broker.tell(None, {"op": "broadcast", "type": kind, "content": body})
        return self.hub.broadcast(kind, body)

    def connections(self) -> list[Connection]:
        """The live connections of this process."""
        return list(self.hub.connections.values())

    # ---------------------------------------------------------- introspection

    def health(self) -> dict[str, Any]:
        """Liveness and readiness, shaped like the seed's ``getHealth``."""
        hub = self.hub
        status = "shutting_down" if hub.shutting_down else "ok" if self._ready else "starting"
        return {
            "status": status,
            # not ready while the broker cannot serve (e.g. Redis unreachable): /readyz 503
            "ready": self._ready and not hub.shutting_down and self.broker.ready,
            "uptime": round(time.time() - self.started_at, 3),
            "connections": hub.active,
            "version": __version__,
            "plugins": list(self._order),
            "timestamp": now_iso(),
        }

    def metrics(self) -> dict[str, Any]:
        """Counters since start (the monitoring plugin adds rates and latency)."""
        hub = self.hub
        uptime = max(time.time() - self.started_at, 1e-9)
        errors = sum(hub.errors.values())
        result: dict[str, Any] = {
            "connections": {"active": hub.active, "total": hub.total, "peak": hub.peak},
            "messages": {
                "received": hub.frames_received,
                "sent": hub.frames_sent,
                "perSecond": round(hub.frames_received / uptime, 3),
            },
            "errors": {
                "total": errors,
                "rate": round(errors / max(hub.frames_received, 1), 6),
                "byCode": dict(hub.errors),
            },
            "closes": {str(k): v for k, v in hub.closes.items()},
            "handshakes": {"rejected": dict(hub.rejected)},
            "pluginFailures": {f"{h}:{p}": n for (h, p), n in self.hooks.failures.items()},
            "broker": {
                "name": self.broker.name,
                "instance": self.broker.instance,
                "ready": self.broker.ready,
                # a networked broker's events (transitions, gaps, dropped writes, ...)
                "events": dict(getattr(self.broker, "counters", {})),
                "control": dict(hub.control),
            },
        }
        for provider in list(self.metrics_providers.values()):
            config_mod.merge(result, provider())
        return result

    def spawn(self, func: Callable[[], Awaitable[Any]]) -> None:
        """Run ``func()`` in the background while the App serves; cancelled at shutdown.

        For plugins: call it from ``startup`` (the task starts once the App serves) or
        later. An exception in ``func`` is logged; it never stops the server.
        """
        if self._task_group is not None:
            self._task_group.start_soon(self._guarded, func)
        else:
            self._background.append(func)

    def _start_background(self, tg: anyio.abc.TaskGroup) -> None:
        """Start what :meth:`spawn` was given before ``tg`` (the serving task group) existed."""
        self._task_group = tg
        waiting, self._background = self._background, []
        for func in waiting:
            tg.start_soon(self._guarded, func)

    async def _guarded(self, func: Callable[[], Awaitable[Any]]) -> None:
        try:
            await func()
        except Exception:
            log.exception("background task %r failed", func)

    def set_log_level(self, level: str | int) -> None:
        """Change the level of every ``backchannel.*`` logger at run time."""
        logging.getLogger("backchannel").setLevel(
            level.upper() if isinstance(level, str) else level
        )

    def slow_consumer(self, conn: Connection, why: str = "not reading") -> None:
        """Close a client that stopped reading (its session keeps what it missed)."""
        self.hub.count_error("slow_consumer")
        conn.close(CloseCode.TRY_AGAIN_LATER, f"slow consumer: {why}")

    # --------------------------------------------------------------- lifecycle

    async def _startup(self) -> None:
        try:
            await self.hooks.call_all("startup", app=self)
            chosen = await self.hooks.call_first("broker", app=self)
        except HookFailed as exc:
            raise StartupError(str(exc)) from exc
        if chosen is not None:
            self.broker = chosen
        self.broker.on_control(self.hub.on_control)
        await self.broker.start()
        self.pipeline.build()
        self.routes = {"/healthz": self._healthz, "/readyz": self._readyz}
        self.routes["/static/backchannel.js"] = _static("backchannel.js", "application/javascript")
        if self.config["server"]["demo"]:
            self.routes["/"] = _static("demo.html", "text/html; charset=utf-8")

        def add_route(method: str, path: str, handler: RouteHandler) -> None:
            if method.upper() != "GET":
                raise StartupError(f"route {method} {path}: only GET routes are served")
            if path in self.routes or path == self.config["server"]["path"]:
                raise StartupError(f"route {path} is already taken")
            self.routes[path] = handler

        try:
            self.hooks.call_sync("http_routes", register=add_route)
        except HookFailed as exc:
            raise StartupError(str(exc)) from exc

    def _healthz(self, request: HttpRequest) -> HttpResponse:
        return json_response(self.health())

    def _readyz(self, request: HttpRequest) -> HttpResponse:
        health = self.health()
        return json_response(health, 200 if health["ready"] else 503)

    def _server_options(self) -> ServerOptions:
        server = self.config["server"]
        runtime_endpoint = Connection

        def endpoint(request: HttpRequest, transport: Any, runtime: Any) -> Connection:
            return runtime_endpoint(self, request, transport, runtime)

        return ServerOptions(
            endpoint=endpoint,
            ws_path=server["path"],
            max_size=server["max_message_size"],
            origins=server["origins"],
            compression=server["compression"],
            handshake_timeout=server["handshake_timeout"],
            close_timeout=min(5.0, self.config["heartbeat"]["timeout"]),
            routes=self.routes,
            on_reject=self.hub.count_rejected,
        )

    @asynccontextmanager
    async def run(
        self, host: str | None = None, port: int | None = None, *, reuse_port: bool = False
    ) -> AsyncIterator[App]:
        """Serve inside ``async with``; on exit, shut down gracefully.

        ``app.port`` holds the bound port (useful with ``port=0``). ``reuse_port``: listen with
        SO_REUSEPORT, so several processes share the port (``backchannel serve --workers N``).
        """
        server_cfg = self.config["server"]
        host = server_cfg["host"] if host is None else host
        port = server_cfg["port"] if port is None else port
        listen_scope = anyio.CancelScope()
        asyncio_server: asyncio.Server | None = None
        runtime: AsyncioRuntime | None = None

        async def listen(tg: anyio.abc.TaskGroup) -> None:
            nonlocal asyncio_server, runtime
            options = self._server_options()
            if sniffio.current_async_library() == "asyncio":
                asyncio_server, runtime = await serve_asyncio(
                    options, host, port, reuse_port=reuse_port
                )
                self.port = asyncio_server.sockets[0].getsockname()[1]
            else:
                bound = anyio.Event()

                def started(p: int) -> None:
                    self.port = p
                    bound.set()

                async def serve() -> None:
                    with listen_scope:
                        await serve_anyio(
                            options, host, port, tg, started=started, reuse_port=reuse_port
                        )

                tg.start_soon(serve)
                await bound.wait()

        def stop_listening() -> None:
            if asyncio_server is not None:
                asyncio_server.close()
            listen_scope.cancel()

        def drained() -> None:
            if runtime is not None:
                for task in list(runtime.tasks):
                    task.cancel()

        async with self._lifecycle(listen, stop_listening, drained):
            log.info(
                "listening on ws://%s:%s%s (%s; plugins: %s)",
                host,
                self.port,
                server_cfg["path"],
                sniffio.current_async_library(),
                ", ".join(self._order),
            )
            yield self

    @asynccontextmanager
    async def _lifecycle(
        self,
        listen: Callable[[anyio.abc.TaskGroup], Awaitable[None]],
        stop_listening: Callable[[], None],
        drained: Callable[[], None],
    ) -> AsyncIterator[None]:
        """Start-up, ``listen``, the hub's background tasks; on exit, ``stop_listening``, the
        graceful drain, ``drained`` (cancel what is left), then the ``shutdown`` hooks.

        Shared by :meth:`run` (a TCP listener) and the ASGI adapter's lifespan
        (:mod:`backchannel.asgi`, whose connections come from the ASGI server).
        """
        if self._stop is None:  # else stop() came first (SIGTERM during start-up): honour it
            self._stop = anyio.Event()
        await self._startup()
        try:
            async with anyio.create_task_group() as tg:
                await listen(tg)
                tg.start_soon(self.hub.watch)
                tg.start_soon(self.hub.heartbeat)
                self._start_background(tg)
                self._ready = True
                try:
                    yield
                finally:
                    with anyio.CancelScope(shield=True):
                        stop_listening()
                        await self._drain()
                        drained()
                        tg.cancel_scope.cancel()
        finally:
            self._ready = False
            self._stop = None
            self._task_group = None
            await self.hooks.notify_async("shutdown", app=self)
            await self.broker.stop()

    async def _drain(self) -> None:
        await self.hub.drain(self.config["shutdown"]["grace"])
        with anyio.move_on_after(min(5.0, self.config["heartbeat"]["timeout"]) + 1):
            while self.hub.connections:
                await anyio.sleep(0.01)

    async def serve_forever(
        self, host: str | None = None, port: int | None = None, *, reuse_port: bool = False
    ) -> None:
        """Serve until :meth:`stop` (or SIGINT/SIGTERM when run from the CLI)."""
        async with self.run(host, port, reuse_port=reuse_port):
            assert self._stop is not None
            await self._stop.wait()

    async def stop(self) -> None:
        """Ask :meth:`serve_forever` to shut down gracefully (as soon as it is up, when called
        during start-up)."""
        if self._stop is None:
            self._stop = anyio.Event()
        self._stop.set()

    async def start(self, host: str | None = None, port: int | None = None) -> None:
        """Start serving in the background (asyncio only; on Trio use ``async with app.run()``)."""
        import asyncio

        if sniffio.current_async_library() != "asyncio":
            raise RuntimeError("App.start() needs asyncio; use 'async with app.run()' on Trio")
        ready = asyncio.Event()

        async def main() -> None:
            async with self.run(host, port):
                ready.set()
                assert self._stop is not None
                await self._stop.wait()

        self._task = asyncio.get_running_loop().create_task(main())
        waiter = asyncio.ensure_future(ready.wait())
        await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            self._task.result()  # re-raise the start-up error

    async def wait_stopped(self) -> None:
        """After :meth:`stop`, wait until the background server of :meth:`start` ended."""
        task = getattr(self, "_task", None)
        if task is not None:
            await task


def _static(name: str, content_type: str) -> RouteHandler:
    """A GET route serving ``backchannel/static/<name>``, read once at start-up."""
    body = files("backchannel").joinpath("static", name).read_bytes()
    response = HttpResponse(200, body, content_type, {"Cache-Control": "no-cache"})
    return lambda request: response


def _split(type: str | dict[str, Any], content: Any) -> tuple[str, Any]:
    if isinstance(type, dict):
        return str(type["type"]), type.get("content", {})
    return type, {} if content is None else content


_installed = plugins.installed
_load = plugins.load
