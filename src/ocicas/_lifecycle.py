"""An engine's life: operations in flight, and a close that never pulls resources from under them.

Every engine call runs as an :meth:`Lifecycle.operation`: it is refused with
:class:`~ocicas.EngineClosedError` once :meth:`Lifecycle.close` began, counted
while it runs, bound to its :class:`~ocicas.Context`, and run in a cancel scope
that ``close()`` cancels. ``close()`` therefore:

1. refuses new operations at once;
2. cancels the running ones: each raises ``EngineClosedError`` in its caller at its
   next checkpoint (worker threads check between chunks, see ``_threads``);
3. waits until every one has left, and only then releases the engine's
   resources (file descriptors, connections) and every reader still open.

A closed engine's descriptors are thus never touched again: the number of a
closed fd is reused by the next ``open`` at once, possibly for another directory.
If the closing task is itself cancelled while it waits, the last operation to
leave does the release.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Protocol

import anyio

from ._context import Context, bound
from ._errors import EngineClosedError
from ._tasks import bounded_shield
from ._threads import current_ctx

__all__ = ["Lifecycle", "Releasable"]

#: The lifecycles whose operations the current task runs inside (a close() from within one
#: of them must not wait for itself).
_inside: ContextVar[tuple[int, ...]] = ContextVar("ocicas_inside_operations", default=())


class Releasable(Protocol):
    """Something an engine hands out that holds a resource until released (a blob reader)."""

    async def _release(self) -> None: ...


class Lifecycle:
    """Counts an engine's operations in flight and closes it safely (see the module doc)."""

    def __init__(self, owner: object, release: Callable[[], Awaitable[None]]) -> None:
        self._owner = weakref.ref(owner)
        self._release = release
        self._closing = False
        self._released = False
        self._in_flight = 0
        self._scopes: set[anyio.CancelScope] = set()
        self._changed: anyio.Event | None = None  # set when an operation leaves, for a waiting close()
        self._closers = 0  # close() calls waiting for operations to leave
        self._resources: weakref.WeakSet[Releasable] = weakref.WeakSet()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` began: no new operation is accepted."""
        return self._closing

    def _error(self) -> EngineClosedError:
        return EngineClosedError(f"{self._owner()!r} is closed")

    def check(self) -> None:
        """Raise :class:`EngineClosedError` if the engine is closing or closed."""
        if self._closing:
            raise self._error()

    def adopt(self, resource: Releasable) -> None:
        """Release ``resource`` when the engine closes (unless it was released before)."""
        self.check()
        self._resources.add(resource)

    @asynccontextmanager
    async def operation(self, ctx: Context | None) -> AsyncIterator[None]:
        """Run the body as one operation of the engine (see the module doc)."""
        if self._closing:
            raise self._error()
        scope = anyio.CancelScope()
        self._scopes.add(scope)
        self._in_flight += 1
        token = current_ctx.set(ctx)
        inside = _inside.set((*_inside.get(), id(self)))
        try:
            with scope:
                async with bound(ctx):
                    yield
        finally:
            _inside.reset(inside)
            current_ctx.reset(token)
            self._scopes.discard(scope)
            self._in_flight -= 1
            if self._changed is not None:
                self._changed.set()
            if self._in_flight == 0 and self._closing and not self._closers:
                # the closer stopped waiting (it was cancelled): the last one out releases
                with anyio.CancelScope(shield=True):
                    await self._release_once()
        if scope.cancelled_caught:
            raise self._error()

    async def close(self) -> None:
        """Refuse new operations, cancel and wait for the running ones, then release. Idempotent."""
        if not self._closing:
            self._closing = True
            for scope in list(self._scopes):
                scope.cancel()
        own = _inside.get().count(id(self))  # closed from inside one of its own operations
        self._closers += 1
        try:
            while self._in_flight > own:
                changed = self._changed = (
                    self._changed if self._changed and not self._changed.is_set() else anyio.Event()
                )
                await changed.wait()
        finally:
            self._closers -= 1
        with anyio.CancelScope(shield=True):
            await self._release_once()

    async def _release_once(self) -> None:
        if self._released:
            return
        self._released = True
        for resource in list(self._resources):
            with bounded_shield():
                await resource._release()
        await self._release()
