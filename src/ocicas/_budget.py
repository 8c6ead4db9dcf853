"""A process-wide budget of bytes that puts may hold in memory at once.

Every chunk a streaming ``put_blob`` takes from its source is counted against
:data:`PUT_BUDGET` until it has been written, so a hundred concurrent uploads
hold at most the budget (plus one chunk each, the one the source just produced)
rather than a pipeline's worth each. A put whose chunk does not fit waits, first
come first served; a single chunk larger than the whole budget is let through
alone. Acquire and release happen on the event loop's thread.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Final

import anyio

__all__ = ["DEFAULT_PUT_BUDGET", "PUT_BUDGET", "ByteBudget"]

#: Bytes all puts of the process may buffer at once, by default.
DEFAULT_PUT_BUDGET: Final = 48 << 20


class ByteBudget:
    """A counting semaphore of bytes, fair (first come first served), for tasks of any anyio backend."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[tuple[int, anyio.Event]] = deque()
        self._lock = threading.Lock()

    def try_acquire(self, n: int) -> bool:
        """Take ``n`` bytes if they fit now (and nobody waits); whether they were taken."""
        with self._lock:
            if not self._waiters and self._fits(n):
                self.used += n
                return True
            return False

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


#: The budget every directory-engine put draws on; ``PUT_BUDGET.limit`` may be changed at any time.
PUT_BUDGET: Final = ByteBudget(DEFAULT_PUT_BUDGET)
