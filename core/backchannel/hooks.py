"""The hook gateway: the one place the kernel calls plugin hooks.

Every call applies the policy its hookspec declares (:data:`~backchannel.hookspecs.SPECS`):
results are combined (all, or the first non-None) and checked against what the spec
allows; awaitables are awaited (bounded by ``hooks.timeout``); a failure is handled by
kind — set-up hooks stop start-up (:class:`~backchannel.errors.StartupError`, one line
naming plugin and hook), gatekeepers raise :class:`HookFailed` for the caller to reject
the connection or message, observers are logged and counted and never raise.
Registration is checked here too: an implementation whose name is no hookspec, or
that asks to be a pluggy wrapper, fails start-up naming the plugin.

Implementations run in plugin order (see :mod:`backchannel.hookspecs`), resolved once
per hook and cached. The hot path (``validate`` and ``handle``) gets callables bound
once at start-up (:meth:`Gateway.gate` and :meth:`Gateway.implementation`), so a
message costs direct calls, not pluggy dispatch.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio
import pluggy
from pluggy import HookImpl

from . import hookspecs
from .broker import Broker
from .errors import BackchannelError, Reject, StartupError
from .hookspecs import SPECS, HookSpec

__all__ = ["Gateway", "HookFailed", "bind", "new_manager"]

log = logging.getLogger("backchannel.hooks")
_isawaitable = inspect.isawaitable


class HookFailed(Exception):
    """A plugin's hook failed (raised, returned what its spec does not allow, or timed out);
    names the plugin and the hook for the log line and the metric."""

    def __init__(self, hook: str, plugin: str, cause: BaseException, why: str = "") -> None:
        self.hook = hook
        self.plugin = plugin
        self.cause = cause
        self.why = why or f"{type(cause).__name__}: {cause}"
        super().__init__(f"plugin {plugin!r} failed in hook {hook!r}: {self.why}")

    @property
    def raised(self) -> bool:
        """Whether the plugin raised (a traceback is worth logging), rather than returned
        something wrong or ran out of time."""
        return not isinstance(self.cause, _Broken)


class _Broken(Exception):
    """Not an exception the plugin raised: a wrong result or a time-out."""


def new_manager() -> pluggy.PluginManager:
    """A plugin manager that knows backchannel's hookspecs (one per App, or per CLI run)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def bind(impl: HookImpl, argnames: Sequence[str]) -> Callable[..., Any]:
    """Return ``impl``'s function callable positionally with ``argnames``.

    pluggy lets an implementation accept a subset of the spec's arguments; this
    adapts it once so the hot path calls it without keyword juggling.
    """
    func = impl.function
    wanted = tuple(impl.argnames)
    if wanted == tuple(argnames):
        return func
    positions = [argnames.index(name) for name in wanted]
    return lambda *args: func(*(args[i] for i in positions))


def _wrong(spec: HookSpec, result: Any) -> str | None:
    """Why ``result`` (not None) is not what ``spec`` allows, or None when it is."""
    expected = spec.returns
    if expected is None:
        return None
    if expected == "callable":
        ok, what = callable(result), "a callable"
    elif expected == "broker":
        ok, what = isinstance(result, Broker), "a Broker"
    else:
        assert not isinstance(expected, str)
        ok = isinstance(result, expected)
        kinds = expected if isinstance(expected, tuple) else (expected,)
        what = " or ".join(k.__name__ for k in kinds)
    return None if ok else f"returned {type(result).__name__}, expected {what} or None"


def _discard(result: Any) -> None:
    """Close a coroutine nobody will await (no 'never awaited' warning)."""
    if inspect.iscoroutine(result):
        result.close()


class Gateway:
    """Calls the hooks of one plugin manager, in plugin order, with each hook's policy."""

    def __init__(self, pm: pluggy.PluginManager | None = None, timeout: float = 10.0) -> None:
        self._pm = pm if pm is not None else new_manager()
        self._order: list[str] = []
        self._cache: dict[str, list[HookImpl]] = {}
        #: seconds an awaitable result may take (``hooks.timeout``)
        self.timeout = timeout
        #: failures by (hook, plugin); read by metrics
        self.failures: dict[tuple[str, str], int] = {}

    # ------------------------------------------------------------ registration

    def register(self, plugin: object, name: str) -> None:
        """Register ``plugin`` as ``name``; a mistake fails start-up with one line.

        Refused: a name already taken, arguments a hookspec does not have, an
        implementation whose name is no hookspec (with the closest one suggested), and
        pluggy wrappers (``wrapper=True``/``hookwrapper=True``).
        """
        if self._pm.get_plugin(name) is not None:
            raise StartupError(f"plugin {name!r} is registered twice")
        try:
            self._pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            text = " ".join(str(exc).split())
            raise StartupError(f"plugin {name!r} is invalid: {text}") from exc
        except ValueError as exc:  # pluggy: the same object under another name
            raise StartupError(f"plugin {name!r}: {exc}") from exc
        problem = self._mistake(plugin, name)
        if problem is not None:
            self._pm.unregister(plugin)
            raise StartupError(problem)
        self._order.append(name)
        self._cache.clear()

    def _mistake(self, plugin: object, name: str) -> str | None:
        for caller in self._pm.get_hookcallers(plugin) or ():
            if caller.name not in SPECS:
                close = difflib.get_close_matches(caller.name, SPECS, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                return (
                    f"plugin {name!r} implements {caller.name!r}, which is not a backchannel "
                    f"hook{hint} (the hooks are listed in backchannel.hookspecs)"
                )
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and (impl.wrapper or impl.hookwrapper):
                    return (
                        f"plugin {name!r}: hook {caller.name!r} is a pluggy wrapper "
                        "(wrapper=True/hookwrapper=True), which backchannel refuses: it would "
                        "wrap the creation of an awaitable, not its run; use wrap_handler for "
                        "middleware"
                    )
        return None

    def plugin(self, name: str) -> object | None:
        return self._pm.get_plugin(name) if name in self._order else None

    def plugins(self) -> dict[str, list[str]]:
        """Registered plugin names, in call order, with the hooks each implements."""
        return {
            name: sorted(c.name for c in self._pm.get_hookcallers(self._pm.get_plugin(name)) or ())
            for name in self._order
        }

    def impls(self, name: str) -> list[HookImpl]:
        """Implementations of hook ``name`` in call order."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        order = {plugin: i for i, plugin in enumerate(self._order)}

        def key(impl: HookImpl) -> tuple[int, int]:
            rank = 0 if impl.tryfirst else 2 if impl.trylast else 1
            return rank, order.get(impl.plugin_name, len(order))

        result = sorted(getattr(self._pm.hook, name).get_hookimpls(), key=key)
        self._cache[name] = result
        return result

    def has(self, name: str) -> bool:
        """Whether any plugin implements hook ``name``."""
        return bool(self.impls(name))

    # --------------------------------------------------------------- failures

    def count(self, failure: HookFailed) -> None:
        key = (failure.hook, failure.plugin)
        self.failures[key] = self.failures.get(key, 0) + 1

    def report(self, failure: HookFailed, context: str = "", **extra: Any) -> None:
        """Count a failure and log it as one line naming plugin and hook (with the
        traceback when the plugin raised: server-side only)."""
        self.count(failure)
        log.error(
            "plugin %r failed in hook %r%s: %s",
            failure.plugin,
            failure.hook,
            f" {context}" if context else "",
            failure.why,
            exc_info=failure.cause if failure.raised else None,
            extra={"plugin": failure.plugin, "hook": failure.hook, **extra},
        )

    def _failed(self, spec: HookSpec, impl: HookImpl, exc: BaseException) -> HookFailed:
        return HookFailed(spec.name, impl.plugin_name, exc)

    def _broken(self, spec: HookSpec, impl: HookImpl, why: str) -> HookFailed:
        return HookFailed(spec.name, impl.plugin_name, _Broken(why), why)

    async def _await(self, spec: HookSpec, impl: HookImpl, result: Any) -> Any:
        """Await a hook's awaitable within ``hooks.timeout``."""
        with anyio.move_on_after(self.timeout) as scope:
            return await result
        if scope.cancelled_caught:
            raise self._broken(spec, impl, f"did not finish within {self.timeout:g} s")
        return None  # pragma: no cover (the scope returns or is caught)

    def _invoke(
        self,
        spec: HookSpec,
        impl: HookImpl,
        kwargs: Mapping[str, Any],
        passthrough: tuple[type[BaseException], ...],
    ) -> Any:
        """Call one implementation: a raise is a :class:`HookFailed` (``passthrough``
        exceptions are the caller's), and so is an awaitable from a sync-only hook."""
        try:
            result = impl.function(*[kwargs[n] for n in impl.argnames])
        except passthrough:
            raise
        except Exception as exc:
            raise self._failed(spec, impl, exc) from exc
        if result is not None and not spec.awaitable and _isawaitable(result):
            _discard(result)
            raise self._broken(spec, impl, "returned an awaitable, but it is sync only")
        return result

    def _checked(self, spec: HookSpec, impl: HookImpl, result: Any) -> Any:
        """``result``, if the spec allows it; else a :class:`HookFailed`."""
        why = None if result is None else _wrong(spec, result)
        if why is not None:
            raise self._broken(spec, impl, why)
        return result

    def _call_sync(
        self,
        spec: HookSpec,
        impl: HookImpl,
        kwargs: Mapping[str, Any],
        passthrough: tuple[type[BaseException], ...],
    ) -> Any:
        """One implementation of a sync-only hook, its result checked."""
        return self._checked(spec, impl, self._invoke(spec, impl, kwargs, passthrough))

    async def _call(
        self,
        spec: HookSpec,
        impl: HookImpl,
        kwargs: Mapping[str, Any],
        passthrough: tuple[type[BaseException], ...],
    ) -> Any:
        """One implementation, its awaitable awaited (within ``hooks.timeout``), its result
        checked; any failure is a :class:`HookFailed`."""
        result = self._invoke(spec, impl, kwargs, passthrough)
        if result is not None and _isawaitable(result):
            try:
                result = await self._await(spec, impl, result)
            except passthrough:
                raise
            except HookFailed:
                raise
            except Exception as exc:
                raise self._failed(spec, impl, exc) from exc
        return self._checked(spec, impl, result)

    # ----------------------------------------------------------------- set-up

    def setup(
        self,
        name: str,
        kwargs: Mapping[str, Any] | Callable[[str], Mapping[str, Any]],
        *,
        plugin: str | None = None,
    ) -> list[tuple[str, Any]]:
        """Call a sync set-up hook (every implementation, or ``plugin``'s only); the
        non-None results as ``(plugin, result)``. ``kwargs`` may be made per plugin (a
        ``register`` that knows who calls it). A failure is a :class:`StartupError`."""
        spec = SPECS[name]
        results = []
        for impl in self.impls(name):
            if plugin is not None and impl.plugin_name != plugin:
                continue
            args = kwargs(impl.plugin_name) if callable(kwargs) else kwargs
            try:
                result = self._call_sync(spec, impl, args, (StartupError,))
            except HookFailed as exc:
                raise StartupError(str(exc)) from exc.cause
            if result is not None:
                results.append((impl.plugin_name, result))
                if spec.first_result:
                    break
        return results

    async def setup_async(self, name: str, **kwargs: Any) -> list[Any]:
        """Call a set-up hook that may return awaitables (``startup``, ``broker``)."""
        spec = SPECS[name]
        results = []
        for impl in self.impls(name):
            try:
                result = await self._call(spec, impl, kwargs, (StartupError,))
            except HookFailed as exc:
                raise StartupError(str(exc)) from exc.cause
            if result is not None:
                results.append(result)
                if spec.first_result:
                    break
        return results

    def wrap(self, type: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        """Compose the ``wrap_handler`` implementations around ``handler`` (first plugin
        outermost); each gets the previous one's result."""
        spec = SPECS["wrap_handler"]
        for impl in reversed(self.impls("wrap_handler")):
            try:
                wrapped = self._call_sync(spec, impl, {"type": type, "handler": handler}, ())
            except HookFailed as exc:
                raise StartupError(
                    f"plugin {exc.plugin!r} failed in hook 'wrap_handler' for type {type!r}: "
                    f"{exc.why}"
                ) from exc.cause
            if wrapped is not None:
                handler = wrapped
        return handler

    # ------------------------------------------------------------ gatekeepers

    async def gate(self, name: str, **kwargs: Any) -> Any:
        """Call a gatekeeper hook (``authenticate``: the first non-None result; ``connect``:
        every one). :class:`~backchannel.Reject` and :class:`~backchannel.BackchannelError`
        pass through; any other failure is a :class:`HookFailed` for the caller to reject."""
        spec = SPECS[name]
        for impl in self.impls(name):
            result = await self._call(spec, impl, kwargs, (Reject, BackchannelError))
            if result is not None and spec.first_result:
                return result
        return None

    def gatekeeper(
        self, name: str, argnames: Sequence[str]
    ) -> Callable[..., Awaitable[None] | None] | None:
        """A caller of every implementation of gatekeeper ``name`` for the hot path
        (``validate``), or None when no plugin implements it.

        The caller returns None when every implementation answered synchronously, else
        an awaitable that finishes the rest (the caller bounds its time). It raises
        :class:`~backchannel.BackchannelError` (the plugin's answer) or
        :class:`HookFailed` (an exception, or a result other than None).
        """
        spec = SPECS[name]
        impls = [(impl, bind(impl, argnames)) for impl in self.impls(name)]
        if not impls:
            return None

        async def finish(index: int, pending: Awaitable[Any], args: tuple[Any, ...]) -> None:
            impl = impls[index][0]
            try:
                result = await pending
                if result is not None:
                    raise self._broken(spec, impl, _not_none(result))
                for impl, func in impls[index + 1 :]:
                    result = func(*args)
                    if result is not None and _isawaitable(result):
                        result = await result
                    if result is not None:
                        raise self._broken(spec, impl, _not_none(result))
            except (BackchannelError, HookFailed):
                raise
            except Exception as exc:
                raise self._failed(spec, impl, exc) from exc

        if len(impls) == 1:  # the common case: one direct call
            only_impl, only = impls[0]

            def call_one(*args: Any) -> Awaitable[None] | None:
                try:
                    result = only(*args)
                except BackchannelError:
                    raise
                except Exception as exc:
                    raise self._failed(spec, only_impl, exc) from exc
                if result is None:
                    return None
                if _isawaitable(result):
                    return finish(0, result, args)
                raise self._broken(spec, only_impl, _not_none(result))

            return call_one

        def call(*args: Any) -> Awaitable[None] | None:
            for index, (impl, func) in enumerate(impls):
                try:
                    result = func(*args)
                except BackchannelError:
                    raise
                except Exception as exc:
                    raise self._failed(spec, impl, exc) from exc
                if result is not None:
                    if _isawaitable(result):
                        return finish(index, result, args)
                    raise self._broken(spec, impl, _not_none(result))
            return None

        return call

    # --------------------------------------------------------------- dispatch

    def implementation(self, name: str, plugin: str, argnames: Sequence[str]) -> Callable[..., Any]:
        """``plugin``'s implementation of ``name`` (``handle``), bound for the hot path; the
        pipeline applies the dispatch policy to what it does."""
        for impl in self.impls(name):
            if impl.plugin_name == plugin:
                return bind(impl, argnames)
        raise LookupError(f"plugin {plugin!r} does not implement {name!r}")

    # -------------------------------------------------------------- observers

    def notify(self, name: str, /, **kwargs: Any) -> None:
        """Call sync observers; a failure is logged and counted, never raised."""
        spec = SPECS[name]
        for impl in self.impls(name):
            try:
                self._call_sync(spec, impl, kwargs, ())
            except HookFailed as exc:
                self.report(exc)

    async def notify_async(self, name: str, /, **kwargs: Any) -> None:
        """Call observers that may return awaitables (``disconnect``, ``session_resumed``,
        ``shutdown``), each within ``hooks.timeout``; failures are logged and counted."""
        spec = SPECS[name]
        for impl in self.impls(name):
            try:
                await self._call(spec, impl, kwargs, ())
            except HookFailed as exc:
                self.report(exc)

    def first(self, name: str, /, **kwargs: Any) -> Any:
        """An observer whose first valid non-None result wins (``on_error``); a failing
        implementation is logged and counted, and the next one is asked."""
        spec = SPECS[name]
        for impl in self.impls(name):
            try:
                result = self._call_sync(spec, impl, kwargs, ())
            except HookFailed as exc:
                self.report(exc)
                continue
            if result is not None:
                return result
        return None


def _not_none(result: Any) -> str:
    return f"returned {type(result).__name__}, expected None (raise to reject)"
