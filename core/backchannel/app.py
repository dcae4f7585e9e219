"""The App: one kernel instance, and the documented surface plugins and applications use.

Everything a plugin can do goes through hooks and the public methods of :class:`App`
(documented in docs/plugins.md): find a connection or session, send, read plugin
config, register metrics and raise alerts, reach the broker, list registered types.
The seed's convenience API (``@app.handler``, ``app.use``, ``@app.on``) registers
small in-process plugins, so an inline handler and an installed distribution are the
same thing to the kernel. Its internals (plugin manager, hook gateway, hub, pipeline)
are private: ``dir(app)`` shows what a plugin may use.

One lifecycle: :meth:`App.serving` starts and stops the App around a
:class:`Listener` — the standalone server's TCP listener (:meth:`App.run`), the ASGI
adapter's lifespan, or the test kit's in-memory one — with the same start-up,
heartbeat, expiry, drain and shutdown in every case.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from importlib import metadata
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc
import sniffio

from . import config as config_mod
from . import plugins as discovery
from .broker import Broker
from .config import Settings
from .connection import Connection, Transport
from .contracts import encode
from .counters import Counters
from .errors import ErrorCode
from .hooks import Gateway, new_manager
from .http import HttpRequest, RouteHandler
from .hub import Hub, holder_of
from .inline import EVENTS, TypePlugin, observer
from .memory import MemoryBroker
from .model import MessageType
from .pipeline import Pipeline
from .routes import route_table
from .runtime import Runtime
from .session import Session

if TYPE_CHECKING:
    import asyncio

__all__ = ["App", "EVENTS", "Listener", "__version__"]

#: the installed distribution's version: core/pyproject.toml's ``version``, the one source
__version__ = metadata.version("backchannel")
log = logging.getLogger("backchannel.app")


class Listener(Protocol):
    """Where connections come from while an App serves (see :meth:`App.serving`)."""

    async def listen(self, app: App, group: anyio.abc.TaskGroup) -> None:
        """Start accepting connections (tasks go in ``group``); return once accepting."""

    def stop(self) -> None:
        """Stop accepting (the graceful drain follows)."""

    def abandon(self) -> None:
        """After the drain: cancel what is left of the connections' tasks."""


class App:
    """A backchannel application.

    Args:
        config: a config dict (shaped like ``backchannel.toml``), a path to a TOML file,
            or None for the defaults; ``BACKCHANNEL_*`` environment variables override
            any of the three the same way.
        plugins: plugin names (installed) or plugin objects to use *instead of*
            ``plugins.enabled``; tests pass an explicit list so nothing is
            autoloaded. An object is registered under its ``name`` attribute, else the
            name of the installed plugin it is an instance of, so its settings table
            and defaults apply.
        environ: the environment to read instead of ``os.environ``.
        overrides: settings that beat the file and the environment (``backchannel serve``'s
            flags), shaped like the config.
    """

    def __init__(
        self,
        config: dict[str, Any] | str | os.PathLike[str] | None = None,
        *,
        plugins: Iterable[str | object] | None = None,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        settings = config_mod.merge({}, overrides or {})
        if plugins is not None:
            plugins = list(plugins)
            names = [p for p in plugins if isinstance(p, str)]
            config_mod.merge(settings, {"plugins": {"enabled": names}})
        self._environ = os.environ if environ is None else environ
        #: the checked configuration, shaped like ``backchannel.toml`` (defaults filled in)
        self.config: dict[str, Any] = config_mod.load(
            config, environ=self._environ, overrides=settings
        )
        #: the kernel's settings, typed (``app.settings.session.ttl``)
        self.settings = Settings.from_config(self.config)
        #: what the kernel counted since start (connections, frames, errors, closes, ...)
        self.counters = Counters()
        self._gateway = Gateway(new_manager(), self.settings.hooks.timeout)
        session = self.settings.session
        #: the broker (the ``broker`` hook's, chosen at start-up; in-memory by default)
        self.broker: Broker = MemoryBroker(
            outbox_size=session.outbox_size,
            outbox_max_bytes=session.outbox_max_bytes,
            dedupe_window=session.dedupe_window,
            dedupe_size=session.dedupe_size,
            total_max_bytes=session.total_max_bytes,
        )
        self._pipeline = Pipeline(self.settings, self._gateway)
        self._hub = Hub(
            self, self.settings, self._gateway, self._pipeline, self.broker, self.counters
        )
        #: when the App was made (``time.time()``)
        self.started_at = time.time()
        #: the port it listens on, once listening
        self.port: int | None = None
        self._routes: dict[str, RouteHandler] = {}
        self._metrics: dict[str, Callable[[], dict[str, Any]]] = {}
        self._stop: anyio.Event | None = None
        self._ready = False
        self._inline = 0
        self._background: list[Callable[[], Awaitable[Any]]] = []
        self._task_group: anyio.abc.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        enabled = self.settings.plugins
        available = discovery.installed() if enabled else {}
        for name in enabled:
            self._register(discovery.load(name, available), name)
        for obj in plugins or ():
            if not isinstance(obj, str):
                self.use(obj)

    # ----------------------------------------------------------------- plugins

    def _register(self, plugin: object, name: str) -> None:
        self._gateway.register(plugin, name)
        schemas = self._gateway.setup("config_schema", {}, plugin=name)
        schema = schemas[0][1] if schemas else None
        config_mod.check_plugin(self.config, name, schema, self._environ)

    def use(self, plugin: object, name: str | None = None) -> object:
        """Register an in-process plugin object (its hookimpls run after config plugins).

        Its name: ``name``, else its ``name`` attribute, else the name of the installed
        plugin whose class it is an instance of, else ``inline-N``.
        """
        self._inline += 1
        label = name or getattr(plugin, "name", None) or discovery.name_of(plugin)
        self._register(plugin, str(label or f"inline-{self._inline}"))
        return plugin

    def handler(
        self,
        type: str,
        *,
        schema: dict[str, Any] | None = None,
        permission: str | None = None,
        timeout: float | None = None,
        reply: dict[str, Any] | str | None = None,
        reply_type: str | None = None,
        chunks: dict[str, Any] | None = None,
        errors: Iterable[ErrorCode | str] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@app.handler("type")`` answers that message type.

        The function takes ``(message)`` or ``(message, connection)``; see the
        ``handle`` hookspec for what it may return. ``reply``, ``reply_type``,
        ``chunks`` and ``errors`` describe its answer, as in the ``message_types`` hookspec.
        """

        def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
            options: dict[str, Any] = {"schema": schema, "permission": permission}
            options |= {"timeout": timeout, "reply": reply, "reply_type": reply_type}
            options |= {"chunks": chunks, "errors": errors}
            self.use(TypePlugin(type, func, options), f"handler:{type}")
            return func

        return decorate

    def on(self, event: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: observe ``event`` (one of :data:`EVENTS`); callbacks must be sync."""
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; one of {', '.join(EVENTS)}")

        def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
            self.use(observer(event, func), f"on:{event}:{self._inline + 1}")
            return func

        return decorate

    def plugin_config(self, name: str) -> dict[str, Any]:
        """The checked ``[plugins.<name>]`` table, defaults filled in."""
        table: dict[str, Any] = self.config["plugins"].get(name, {})
        return table

    def plugin(self, name: str) -> object | None:
        """The registered plugin object named ``name`` (its instance), or None."""
        return self._gateway.plugin(name)

    def plugins(self) -> dict[str, list[str]]:
        """Registered plugins by name, in call order, with the hooks each implements."""
        return self._gateway.plugins()

    def message_types(self) -> dict[str, MessageType]:
        """The registered message types by name: once started, those it serves; before,
        what the plugins' ``message_types`` hooks register now (no ``startup`` hook runs)."""
        pipeline = self._pipeline
        if not pipeline.types:
            pipeline = Pipeline(self.settings, self._gateway)
            pipeline.build()
        return {name: entry.describe() for name, entry in pipeline.types.items()}

    # ------------------------------------------------------------------ lookup

    def connection(self, connection_id: str) -> Connection | None:
        """The live connection ``connection_id`` of this process, or None."""
        return self._hub.connections.get(connection_id)

    def connections(self) -> list[Connection]:
        """The live connections of this process."""
        return list(self._hub.connections.values())

    def session(self, session_id: str) -> Session | None:
        """The session ``session_id`` if this process holds it (attached, or detached
        within ``session.ttl``), else None."""
        return self._hub.sessions.get(session_id)

    # ------------------------------------------------------------------ output

    def send(self, connection_id: str, type: str | dict[str, Any], content: Any = None) -> bool:
        """Send a frame to one connection, in this process or another sharing the broker.

        Takes ``(connection_id, type, content)`` or the seed's
        ``(connection_id, {"type": ..., "content": ...})``. True when the frame was
        sent here or handed to the broker for the process holding the connection
        (the connection id names it); False when no live connection has that id.
        """
        kind, body = _split(type, content)
        conn = self._hub.connections.get(connection_id)
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
        return self._hub.broadcast(kind, body)

    def encode_frame(self, type: str, content: Any, **fields: Any) -> bytes:
        """One server frame that no session numbers (no ``seq``): a fresh ``id``, ``type``,
        ``content``, then ``fields`` (a room frame: ``room``, ``offset``, ``epoch``) and
        the ``timestamp``, encoded once, to be written to any number of connections with
        :meth:`Connection.deliver`. Raises ``TypeError`` when ``content`` is not JSON."""
        clock = self._hub.clock
        frame: dict[str, Any] = {"id": clock.frame_id(), "type": type, "content": content}
        frame.update(fields)
        frame["timestamp"] = clock.now_iso()
        data: bytes = encode(frame)
        return data

    # ---------------------------------------------------------- introspection

    @property
    def ready(self) -> bool:
        """Serving, not shutting down, and the broker can serve (``/readyz``)."""
        return self._ready and not self._hub.shutting_down and self.broker.ready

    def now_iso(self) -> str:
        """UTC time with milliseconds, as frames carry it (``2026-11-25T10:00:00.123Z``)."""
        return self._hub.clock.now_iso()

    def health(self) -> dict[str, Any]:
        """Liveness and readiness, shaped like the seed's ``getHealth``."""
        hub = self._hub
        status = "shutting_down" if hub.shutting_down else "ok" if self._ready else "starting"
        return {
            "status": status,
            # not ready while the broker cannot serve (e.g. Redis unreachable): /readyz 503
            "ready": self.ready,
            "uptime": round(time.time() - self.started_at, 3),
            "connections": len(hub.connections),
            "version": __version__,
            "plugins": list(self.plugins()),
            "timestamp": self.now_iso(),
        }

    def metrics(self) -> dict[str, Any]:
        """Counters since start, plus what plugins add (:meth:`add_metrics`)."""
        counters = self.counters
        uptime = max(time.time() - self.started_at, 1e-9)
        errors = sum(counters.errors.values())
        received = counters.frames_received
        result: dict[str, Any] = {
            "connections": {
                "active": len(self._hub.connections),
                "total": counters.connections_total,
                "peak": counters.connections_peak,
            },
            "messages": {
                "received": received,
                "sent": counters.frames_sent,
                "perSecond": round(received / uptime, 3),
            },
            "errors": {
                "total": errors,
                "rate": round(errors / max(received, 1), 6),
                "byCode": dict(counters.errors),
            },
            "closes": {str(k): v for k, v in counters.closes.items()},
            "sessions": {"known": len(self._hub.sessions), "resumes": counters.resumes},
            "requests": {"running": len(self._hub.running), "retries": counters.retries},
            "handshakes": {"rejected": dict(counters.rejected)},
            "pluginFailures": {f"{h}:{p}": n for (h, p), n in self.hook_failures().items()},
            "broker": {
                "name": self.broker.name,
                "instance": self.broker.instance,
                "ready": self.broker.ready,
                # a networked broker's events (transitions, gaps, dropped writes, ...)
                "events": dict(getattr(self.broker, "counters", {})),
                "control": dict(counters.control),
            },
        }
        sizes = getattr(self.broker, "sizes", None)  # a broker that can tell what it keeps
        if sizes is not None:
            result["broker"]["sessions"] = sizes()
        for provider in list(self._metrics.values()):
            config_mod.merge(result, provider())
        return result

    def hook_failures(self) -> dict[tuple[str, str], int]:
        """Plugin hook failures so far, by ``(hook, plugin)``."""
        return dict(self._gateway.failures)

    def add_metrics(self, name: str, provider: Callable[[], dict[str, Any]] | None) -> None:
        """Deep-merge ``provider()`` into every :meth:`metrics` result (None removes it)."""
        if provider is None:
            self._metrics.pop(name, None)
        else:
            self._metrics[name] = provider

    def alert(self, name: str, state: str, details: dict[str, Any] | None = None) -> None:
        """Tell ``alert`` observers that alert ``name`` is ``"firing"`` or ``"resolved"``."""
        self._gateway.notify("alert", name=name, state=state, details=details or {})

    def spawn(self, func: Callable[[], Awaitable[Any]]) -> None:
        """Run ``func()`` in the background while the App serves; cancelled at shutdown.

        For plugins: call it from ``startup`` (the task starts once the App serves) or
        later. An exception in ``func`` is logged; it never stops the server.
        """
        if self._task_group is not None:
            self._task_group.start_soon(self._guarded, func)
        else:
            self._background.append(func)

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

    # -------------------------------------------------------- the transport side

    @property
    def routes(self) -> dict[str, RouteHandler]:
        """HTTP GET routes served beside the WebSocket, by path (built at start-up)."""
        return self._routes

    def accept(self, request: HttpRequest, transport: Transport, runtime: Runtime) -> Connection:
        """A new connection for a completed WebSocket handshake (for transports: the
        standalone drivers, the ASGI adapter, the test kit). The transport runs its
        ``run()`` as a task and feeds it ``on_message`` / ``on_closed``."""
        return Connection(self, self._hub, request, transport, runtime)

    # --------------------------------------------------------------- lifecycle

    def _check_tables(self) -> None:
        """Every ``[plugins.<name>]`` table names a plugin registered here or installed (a
        misspelt table would otherwise be ignored silently)."""
        tables = set(self.config["plugins"]) - {"enabled"} - set(self.plugins())
        if tables:
            known = [*self.plugins(), *discovery.installed()]
            problems = config_mod.unknown_tables(self.config, known, self._environ)
            if problems:
                raise config_mod.invalid(problems)

    async def _startup(self) -> None:
        self._check_tables()
        gateway = self._gateway
        await gateway.setup_async("startup", app=self)
        chosen = await gateway.setup_async("broker", app=self)
        if chosen:
            self.broker = self._hub.broker = chosen[0]
        self.broker.on_control(self._hub.on_control)
        await self.broker.start()
        self._pipeline.build()
        self._hub.observe()
        self._routes = route_table(self, gateway)

    @asynccontextmanager
    async def serving(self, listener: Listener) -> AsyncIterator[App]:
        """Serve while inside: start-up, ``listener.listen``, the periodic checks
        (heartbeat, handler deadlines, slow consumers, session expiry) and what plugins
        gave :meth:`spawn`; on exit ``listener.stop``, the graceful drain,
        ``listener.abandon``, then the ``shutdown`` hooks. The one lifecycle of the
        standalone server (:meth:`run`), the ASGI adapter and the test kit.
        """
        if self._stop is None:  # else stop() came first (SIGTERM during start-up): honour it
            self._stop = anyio.Event()
        self._hub.shutting_down = False  # (an App may serve again after a shutdown)
        await self._startup()
        try:
            async with anyio.create_task_group() as tg:
                await listener.listen(self, tg)
                tg.start_soon(self._hub.watch)
                tg.start_soon(self._hub.heartbeat)
                self._task_group = tg
                waiting, self._background = self._background, []
                for func in waiting:
                    tg.start_soon(self._guarded, func)
                self._ready = True
                try:
                    yield self
                finally:
                    with anyio.CancelScope(shield=True):
                        listener.stop()
                        await self._drain()
                        listener.abandon()
                        tg.cancel_scope.cancel()
        finally:
            self._ready = False
            self._stop = None
            self._task_group = None
            await self._gateway.notify_async("shutdown", app=self)
            await self.broker.stop()

    async def _drain(self) -> None:
        await self._hub.drain(self.settings.shutdown.grace)
        with anyio.move_on_after(min(5.0, self.settings.heartbeat.timeout) + 1):
            while self._hub.connections:
                await anyio.sleep(0.01)

    @asynccontextmanager
    async def run(
        self, host: str | None = None, port: int | None = None, *, reuse_port: bool = False
    ) -> AsyncIterator[App]:
        """Serve on TCP inside ``async with``; on exit, shut down gracefully.

        ``app.port`` holds the bound port (useful with ``port=0``). ``reuse_port``: listen with
        SO_REUSEPORT, so several processes share the port (``backchannel serve --workers N``).
        """
        from .server import TcpListener

        server = self.settings.server
        host = server.host if host is None else host
        port = server.port if port is None else port
        async with self.serving(TcpListener(host, port, reuse_port=reuse_port)):
            log.info(
                "listening on ws://%s:%s%s (%s; plugins: %s)",
                host,
                self.port,
                server.path,
                sniffio.current_async_library(),
                ", ".join(self.plugins()),
            )
            yield self

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

        self._task = task = asyncio.get_running_loop().create_task(main())
        waiter = asyncio.ensure_future(ready.wait())
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # re-raise the start-up error

    async def wait_stopped(self) -> None:
        """After :meth:`stop`, wait until the background server of :meth:`start` ended."""
        if self._task is not None:
            await self._task


def _split(type: str | dict[str, Any], content: Any) -> tuple[str, Any]:
    if isinstance(type, dict):
        return str(type["type"]), type.get("content", {})
    return type, {} if content is None else content
