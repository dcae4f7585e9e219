"""Calling hooks: the kernel's one place for combination rules and failure policy.

pluggy's own ``firstresult`` cannot see through an un-awaited coroutine, so the
kernel walks the implementations itself: :meth:`Hooks.call_all` (every result,
awaited), :meth:`Hooks.call_first` (first non-None, awaited), :meth:`Hooks.notify`
(sync observers, failures isolated). Implementations run in plugin order (see
:mod:`backchannel.hookspecs`), resolved once per hook and cached.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import pluggy
from pluggy import HookImpl

__all__ = ["Hooks", "HookFailed", "bind"]

log = logging.getLogger("backchannel.hooks")


class HookFailed(Exception):
    """A plugin's hook raised; carries the plugin's name for the log and the metric."""

    def __init__(self, hook: str, plugin: str, cause: BaseException) -> None:
        super().__init__(f"plugin {plugin!r} failed in hook {hook!r}: {cause!r}")
        self.hook = hook
        self.plugin = plugin
        self.cause = cause


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


class Hooks:
    """Hook caller bound to one plugin manager and its plugin order."""

    def __init__(self, pm: pluggy.PluginManager, order: Callable[[], list[str]]) -> None:
        self._pm = pm
        self._order = order
        self._cache: dict[str, list[HookImpl]] = {}
        #: failures of observer hooks, by (hook, plugin); read by metrics.
        self.failures: dict[tuple[str, str], int] = {}

    def invalidate(self) -> None:
        """Forget cached orders (after a plugin is registered or removed)."""
        self._cache.clear()

    def impls(self, name: str) -> list[HookImpl]:
        """Implementations of hook ``name`` in call order."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        order = {plugin: i for i, plugin in enumerate(self._order())}
        hook = getattr(self._pm.hook, name)

        def key(impl: HookImpl) -> tuple[int, int]:
            rank = 0 if impl.tryfirst else 2 if impl.trylast else 1
            return rank, order.get(impl.plugin_name, len(order))

        result = sorted(hook.get_hookimpls(), key=key)
        self._cache[name] = result
        return result

    def has(self, name: str) -> bool:
        """Whether any plugin implements hook ``name``."""
        return bool(self.impls(name))

    @staticmethod
    def _args(impl: HookImpl, kwargs: dict[str, Any]) -> list[Any]:
        return [kwargs[n] for n in impl.argnames]

    async def _call(self, name: str, kwargs: dict[str, Any], first: bool) -> list[Any]:
        """Call implementations in order, awaiting awaitables; keep non-None results.

        An exception is re-raised as :class:`HookFailed` naming the plugin, except
        the kernel's own exceptions meant for the caller (``Reject``,
        ``BackchannelError``), which pass through unchanged. With ``first``, stop at
        the first non-None result.
        """
        from .errors import BackchannelError, Reject

        results = []
        for impl in self.impls(name):
            try:
                result = impl.function(*self._args(impl, kwargs))
                if inspect.isawaitable(result):
                    result = await result
            except (Reject, BackchannelError):
                raise
            except Exception as exc:
                raise HookFailed(name, impl.plugin_name, exc) from exc
            if result is not None:
                results.append(result)
                if first:
                    break
        return results

    async def call_all(self, name: str, /, **kwargs: Any) -> list[Any]:
        """Call every implementation; the non-None results, in call order."""
        return await self._call(name, kwargs, first=False)

    async def call_first(self, name: str, /, **kwargs: Any) -> Any:
        """Call implementations in order until one returns (or awaits to) non-None."""
        results = await self._call(name, kwargs, first=True)
        return results[0] if results else None

    def call_sync(self, name: str, /, **kwargs: Any) -> list[Any]:
        """Call every implementation of a sync set-up hook; failures name the plugin."""
        results = []
        for impl in self.impls(name):
            try:
                result = impl.function(*self._args(impl, kwargs))
            except Exception as exc:
                raise HookFailed(name, impl.plugin_name, exc) from exc
            if result is not None:
                results.append(result)
        return results

    def notify(self, name: str, /, **kwargs: Any) -> None:
        """Call sync observers; a failure is logged and counted, never raised."""
        for impl in self.impls(name):
            try:
                impl.function(*self._args(impl, kwargs))
            except Exception:
                self.record_failure(name, impl.plugin_name)

    def count_failure(self, hook: str, plugin: str) -> None:
        """Count a plugin failure (the caller logs it)."""
        key = (hook, plugin)
        self.failures[key] = self.failures.get(key, 0) + 1

    def record_failure(self, hook: str, plugin: str) -> None:
        """Count a plugin failure and log it with its traceback (server-side only)."""
        self.count_failure(hook, plugin)
        log.exception("plugin %r failed in hook %r", plugin, hook)

    async def notify_async(self, name: str, /, **kwargs: Any) -> None:
        """Call observers that may return awaitables (``disconnect``, ``shutdown``)."""
        for impl in self.impls(name):
            try:
                result = impl.function(*self._args(impl, kwargs))
                if inspect.isawaitable(result):
                    await result
            except Exception:
                self.record_failure(name, impl.plugin_name)
