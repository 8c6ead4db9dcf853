"""The bytes that streamed puts may hold in memory: all puts of the process together, and each alone.

A directory-engine ``put_blob`` of a stream or a file counts every chunk it has
taken from its source against :data:`PUT_BUDGET` until the chunk is written and
no longer referenced, and counts the newest chunk for as long as the put runs
(the source may still hold it). A put is admitted with room for one chunk,
first come first served; it takes more only when it fits at once, else it
waits for its own writes, so a hundred concurrent uploads hold at most the
budget rather than a pipeline's worth each, and no put waits on another while
holding room. A chunk larger than the room reserved for it is counted at once
(a source that grows its chunks may overshoot by that difference); a chunk larger
than the whole budget is let through alone. :func:`set_put_budget` sets both bounds.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Final, NamedTuple

import anyio

from ._checks import check_int

__all__ = [
    "DEFAULT_PER_PUT",
    "DEFAULT_PUT_BUDGET",
    "MIN_PUT_BUDGET",
    "PUT_BUDGET",
    "ByteBudget",
    "PutBudget",
    "set_put_budget",
]

#: Bytes all streamed puts of the process may buffer at once, by default.
DEFAULT_PUT_BUDGET: Final = 16 << 20
#: Bytes one streamed put may buffer, by default (never more than the process-wide budget).
DEFAULT_PER_PUT: Final = 16 << 20
#: The least either bound may be set to.
MIN_PUT_BUDGET: Final = 64 << 10


class ByteBudget:
    """A counting semaphore of bytes, fair (first come first served), for tasks of any anyio backend."""

    def __init__(self, limit: int, per_holder: int | None = None) -> None:
        self.limit = limit
        #: What one holder may take (see :attr:`holder_limit`).
        self.per_holder = limit if per_holder is None else per_holder
        self.used = 0
        self._waiters: deque[tuple[int, anyio.Event]] = deque()
        self._lock = threading.Lock()

    @property
    def holder_limit(self) -> int:
        """The most one holder may take: ``per_holder``, within ``limit``."""
        return min(self.per_holder, self.limit)

    def try_acquire(self, n: int) -> bool:
        """Take ``n`` bytes if they fit now (and nobody waits); whether they were taken."""
        with self._lock:
            if not self._waiters and self._fits(n):
                self.used += n
                return True
            return False

    def take(self, n: int) -> None:
        """Take ``n`` bytes at once, even over the limit (for a chunk already in memory); others wait meanwhile."""
        with self._lock:
            self.used += n

    async def acquire(self, n: int) -> None:
        """Wait until ``n`` more bytes fit (a chunk over the whole limit waits until nothing is held)."""
        with self._lock:
            if not self._waiters and self._fits(n):
                self.used += n
                return
            entry = (n, anyio.Event())
            self._waiters.append(entry)
        try:
            await entry[1].wait()
        except BaseException:
            with self._lock:
                granted = entry not in self._waiters
                if not granted:
                    self._waiters.remove(entry)
            if granted:
                self.release(n)
            else:
                self._wake()  # we may have been the head of the line holding others back
            raise

    def release(self, n: int) -> None:
        """Give back ``n`` bytes acquired earlier."""
        with self._lock:
            self.used -= n
        self._wake()

    def set_limits(self, limit: int, per_holder: int) -> None:
        """Change both bounds; waiters that now fit are let in."""
        with self._lock:
            self.limit = limit
            self.per_holder = per_holder
        self._wake()

    def _fits(self, n: int) -> bool:
        return self.used + n <= self.limit or self.used == 0

    def _wake(self) -> None:
        woken = []
        with self._lock:
            while self._waiters and self._fits(self._waiters[0][0]):
                n, event = self._waiters.popleft()
                self.used += n
                woken.append(event)
        for event in woken:
            event.set()


#: The budget every directory-engine put of a stream draws on.
PUT_BUDGET: Final = ByteBudget(DEFAULT_PUT_BUDGET, DEFAULT_PER_PUT)


class PutBudget(NamedTuple):
    """How many bytes streamed puts may buffer: ``total`` for the whole process, ``per_put`` for one put."""

    total: int
    per_put: int


def set_put_budget(total: int | None = None, per_put: int | None = None) -> PutBudget:
    """Bound the memory of the directory engine's streamed ``put_blob``; return the bounds as they were.

    ``total`` caps the bytes all puts of the process hold at once (default 16 MiB),
    ``per_put`` those one put holds (default 16 MiB; never more than ``total``).
    A put always has room for the chunk its source just produced; more room lets
    its reading, hashing and writing overlap. Both must be at least 64 KiB; one left
    as ``None`` is kept, so ``set_put_budget(*before)`` restores earlier bounds.
    ``put_blob`` of ``bytes`` is not counted: those bytes are held already.
    """
    new_total = check_int(total, "total", minimum=MIN_PUT_BUDGET, optional=True)
    new_per_put = check_int(per_put, "per_put", minimum=MIN_PUT_BUDGET, optional=True)
    before = PutBudget(PUT_BUDGET.limit, PUT_BUDGET.per_holder)
    PUT_BUDGET.set_limits(
        before.total if new_total is None else new_total, before.per_put if new_per_put is None else new_per_put
    )
    return before
