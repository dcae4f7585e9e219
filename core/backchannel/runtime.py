"""The few primitives the connection code needs from its event loop, per backend.

The asyncio fast path uses futures and ``Task.cancel`` directly (an anyio cancel
scope costs about 6 µs per message there); the anyio path (Trio, and anything
anyio runs on) uses events and cancel scopes. Both give the same semantics.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import anyio

__all__ = ["AnyioRuntime", "AsyncioRuntime", "Interrupt", "Interruptible", "Runtime", "Signal"]


class Interrupt(enum.Enum):
    """Why running work was stopped from outside."""

    #: past its deadline (``message.timeout``)
    TIMEOUT = "timeout"
    #: a ``cancel`` request named it
    CANCELLED = "cancelled"
    #: the server shut down before it finished (after ``shutdown.grace``)
    SHUTTING_DOWN = "shutting_down"
    #: its session expired
    EXPIRED = "expired"


class Signal(Protocol):
    """A level-free wake-up: ``set()`` wakes the one task in ``wait()``."""

    def set(self) -> None: ...

    async def wait(self) -> None: ...


class Interruptible:
    """A piece of work that another task may interrupt with a reason."""

    __slots__ = ("reason", "handle")

    def __init__(self) -> None:
        self.reason: Interrupt | None = None
        self.handle: Any = None


class Runtime(Protocol):
    def signal(self) -> Signal: ...

    def spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None: ...

    async def run(
        self, work: Interruptible, func: Callable[..., Awaitable[None]], *args: Any
    ) -> bool: ...

    def interrupt(self, work: Interruptible, reason: Interrupt) -> None: ...


class _FutureSignal:
    __slots__ = ("_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class AsyncioRuntime:
    """asyncio-native primitives (futures, tasks)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[Any]] = set()

    def signal(self) -> Signal:
        return _FutureSignal(self.loop)

    def spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        task: asyncio.Task[Any] = self.loop.create_task(func(*args))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(
        self, work: Interruptible, func: Callable[..., Awaitable[None]], *args: Any
    ) -> bool:
        """Run ``func(*args)``; False when :meth:`interrupt` stopped it."""
        if work.reason is not None:  # interrupted before it started
            return False
        task = asyncio.current_task()
        work.handle = task
        try:
            await func(*args)
            if work.reason is not None and task is not None and task.cancelling():
                task.uncancel()  # the handler swallowed our cancellation
            return work.reason is None
        except asyncio.CancelledError:
            if work.reason is None or task is None:
                raise
            task.uncancel()
            return False
        finally:
            work.handle = None

    def interrupt(self, work: Interruptible, reason: Interrupt) -> None:
        if work.reason is None:
            work.reason = reason
            if work.handle is not None:
                work.handle.cancel()


class _EventSignal:
    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def set(self) -> None:
        if self._event is not None:
            self._event.set()

    async def wait(self) -> None:
        self._event = anyio.Event()
        try:
            await self._event.wait()
        finally:
            self._event = None


class AnyioRuntime:
    """anyio primitives (Trio and any anyio backend); ``spawn`` uses a task group."""

    def __init__(self, task_group: anyio.abc.TaskGroup) -> None:
        self.task_group = task_group

    def signal(self) -> Signal:
        return _EventSignal()

    def spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        self.task_group.start_soon(func, *args)

    async def run(
        self, work: Interruptible, func: Callable[..., Awaitable[None]], *args: Any
    ) -> bool:
        if work.reason is not None:  # interrupted before it started
            return False
        with anyio.CancelScope() as scope:
            work.handle = scope
            try:
                await func(*args)
            finally:
                work.handle = None
        return work.reason is None

    def interrupt(self, work: Interruptible, reason: Interrupt) -> None:
        if work.reason is None:
            work.reason = reason
            if work.handle is not None:
                work.handle.cancel()
