"""How many blob fsyncs the process runs at once: few, so a tag's ``index.json`` commit never queues behind many.

A disk completes only so many flushes a second whatever the number in flight:
measured on the 2-core CI-class VM (ext4), 1,140-1,230 fsyncs/s with 4 in flight and
1,120 with 50, where one took p50 14 ms and p99 226 ms instead of 3 and 10. Fifty
builders storing small images keep that many in flight, and the two fsyncs of
the ``index.json`` commit their tags wait for (``_dir/index.py``) queued behind
them all. So every blob's final fsync (``PendingBlob._commit``, which puts, copies
and pulls all end in) passes :data:`BLOB_SYNCS` first: at most :func:`set_sync_limit`
of them (2 by default) run at once and the rest wait their turn, first come first
served, in their worker threads, cancellably. The ``index.json`` commit and the
directory fsyncs do not pass it: they are few (a directory's fsyncs are group
commits, at most two of an index in flight) and are what callers wait on. Nor do
the ``fdatasync`` calls a large put starts every 64 MiB beside its writer: few
and long, they are throughput, not a queue of small flushes. With 50 builders, in
paired runs on fresh directories, the gate cut tag p99 from 78-82 ms to 41-61 ms
at 3-25% fewer tags a second (``benchmarks/tag_phases.py 50``); a disk that
flushes in parallel (NVMe) may want a higher limit.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from ._checks import check_int
from ._threads import POLL_INTERVAL, checkpoint

__all__ = ["BLOB_SYNCS", "DEFAULT_SYNC_LIMIT", "SyncGate", "set_sync_limit"]

#: Blob fsyncs the process runs at once, by default.
DEFAULT_SYNC_LIMIT: Final = 2


class SyncGate:
    """A fair semaphore for worker threads whose wait stops when the operation is cancelled (``checkpoint``)."""

    def __init__(self, limit: int) -> None:
        self._lock = threading.Lock()
        self._limit = limit
        self._used = 0
        # one locked lock per waiting thread, in arrival order: a leaving holder unlocks the first (hands its slot)
        self._waiting: deque[threading.Lock] = deque()

    @property
    def limit(self) -> int:
        return self._limit

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one slot for the ``with`` block, waiting for it if all are out."""
        self._acquire()
        try:
            yield
        finally:
            self._release()

    def _acquire(self) -> None:
        with self._lock:
            if self._used < self._limit and not self._waiting:
                self._used += 1
                return
            handed = threading.Lock()
            handed.acquire()
            self._waiting.append(handed)
        while not handed.acquire(timeout=POLL_INTERVAL):  # _release unlocks it: its slot, still counted, is ours
            try:
                checkpoint()
            except BaseException:
                with self._lock:
                    granted = handed not in self._waiting
                    if not granted:
                        self._waiting.remove(handed)
                if granted:  # handed a slot while cancelled: pass it on
                    self._release()
                raise

    def _release(self) -> None:
        with self._lock:
            if self._waiting and self._used <= self._limit:
                self._waiting.popleft().release()
            else:
                self._used -= 1

    def set_limit(self, limit: int) -> int:
        """Change the limit and return the old one; waiters that now fit are let in (holders over a lowered
        limit finish first)."""
        with self._lock:
            before, self._limit = self._limit, limit
            while self._waiting and self._used < limit:
                self._used += 1
                self._waiting.popleft().release()
        return before


#: The gate of every directory-engine blob fsync in this process.
BLOB_SYNCS: Final = SyncGate(DEFAULT_SYNC_LIMIT)


def set_sync_limit(limit: int) -> int:
    """Let at most ``limit`` blob fsyncs of the directory engine run at once in this process; return the old limit.

    Default 2: a disk flushes only so many a second whatever the queue, and a short
    queue keeps the ``index.json`` commits that tags wait for (which never wait for
    this limit) fast. Raise it for a disk that flushes in parallel; it must be at
    least 1.
    """
    return BLOB_SYNCS.set_limit(check_int(limit, "limit", minimum=1))
