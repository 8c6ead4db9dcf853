"""The collector's lock, in one process: exclusive for a collection, shared for what must not be collected under.

:func:`ocicas.gc` holds it exclusively from its first look at the roots to its
last unlink. Writers whose work a collection must never cut in half hold it
shared: a tag's check that its content is present and the write of the tag, and
a leased put and its record in the lease. A waiting collection goes first: new
shared holders queue behind it, so a stream of taggers cannot starve it.
The directory engine adds the same lock across processes (``flock`` on ``blobs/``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

__all__ = ["SharedExclusiveLock"]


class SharedExclusiveLock:
    """A readers-writer lock for tasks of one event loop, writers first.

    Plain counters, changed only between awaits: taking or dropping it when it
    is free never waits for a turn, so a stream of shared holders (every tag,
    every leased put) makes no convoy. Waiters sleep on one event, set whenever
    the lock may have become free, and look again.
    """

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0
        self._waiters = 0
        self._changed: anyio.Event | None = None

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        changed = self._changed
        self._waiters += 1
        try:
            await changed.wait()
        finally:
            self._waiters -= 1
            if not self._waiters and self._changed is changed:
                self._changed = None  # nobody waits on it: the next waiter makes its own

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        """Hold the lock shared (many at once, never with an exclusive holder)."""
        while self._exclusive or self._exclusive_waiting:
            await self._wait()
        self._shared += 1
        try:
            yield
        finally:
            self._shared -= 1
            if not self._shared:
                self._notify()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the lock alone."""
        self._exclusive_waiting += 1
        try:
            while self._exclusive or self._shared:
                await self._wait()
        finally:
            self._exclusive_waiting -= 1
            self._notify()  # a cancelled waiter lets the queued shared holders in
        self._exclusive = True
        try:
            yield
        finally:
            self._exclusive = False
            self._notify()
