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
    """A readers-writer lock for tasks of one event loop, writers first."""

    def __init__(self) -> None:
        self._condition = anyio.Condition()
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        """Hold the lock shared (many at once, never with an exclusive holder)."""
        async with self._condition:
            while self._exclusive or self._exclusive_waiting:
                await self._condition.wait()
            self._shared += 1
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                async with self._condition:
                    self._shared -= 1
                    self._condition.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the lock alone."""
        async with self._condition:
            self._exclusive_waiting += 1
            try:
                while self._exclusive or self._shared:
                    await self._condition.wait()
            finally:
                self._exclusive_waiting -= 1
                if not self._exclusive and (self._shared or self._exclusive_waiting == 0):
                    self._condition.notify_all()  # a cancelled waiter lets the queued shared holders in
            self._exclusive = True
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                async with self._condition:
                    self._exclusive = False
                    self._condition.notify_all()
