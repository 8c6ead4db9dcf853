"""The one way into a worker thread.

Every blocking call ocicas makes (file I/O, hashing large buffers, ``flock``
waits) goes through :func:`run_sync`. Work sent there calls :func:`checkpoint`
between chunks, which raises if the operation's :class:`~ocicas.Context` is done
*or* the host task was cancelled (``anyio.from_thread.check_cancelled``): a cancel
scope around any call stops a long copy at its next chunk, not at its end. Waits
inside a thread (a lock another process holds) poll with :func:`wait_for`, which
checks the same way at least every :data:`POLL_INTERVAL`. Loops of Python over
many items (listings, the collector's bookkeeping) call :func:`share_gil` between
items, so that the event loop never waits long for the GIL behind them. A stream
of work items (a put's batches) goes through a :class:`ThreadStage`: one worker
thread at a time, which takes the next item without a turn of the event loop.

The context of the running engine operation travels in :data:`current_ctx`
(set by the engine's lifecycle for the duration of each call), so no thread
function needs to be handed one.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Final, Generic, TypeVar, cast

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from ._context import Context
from ._digest import Verifier
from ._tasks import loop_caller, task_group

__all__ = [
    "CHUNK_SIZE",
    "GIL_SLICE",
    "METADATA_THREADS",
    "POLL_INTERVAL",
    "THREAD_HASH_SIZE",
    "QuickLimiter",
    "ThreadStage",
    "checkpoint",
    "current_ctx",
    "hash_into",
    "metadata_hops",
    "run_split",
    "run_sync",
    "share_gil",
    "shared",
    "wait_for",
]

_T = TypeVar("_T")
_K = TypeVar("_K")
_V = TypeVar("_V")

#: Bytes moved per worker-thread hop, and the largest chunk a reader yields: large
#: enough that the ≈100 µs hop is noise next to hashing it (≈2.5 ms), small enough
#: that a cancelled operation stops within a few milliseconds.
CHUNK_SIZE: Final = 4 << 20
#: Chunks at least this big are hashed in a worker thread (≈0.6 ms of hashing): smaller ones on the loop.
THREAD_HASH_SIZE: Final = 1 << 20
#: The longest a thread waits (for a lock) between two cancellation checks, in seconds.
POLL_INTERVAL: Final = 0.02
#: The longest a worker thread running Python holds the GIL before it lets a waiting thread in (:func:`share_gil`).
GIL_SLICE: Final = 0.001
#: How long it stands aside then: a real sleep, long enough for a woken thread to take the GIL.
_GIL_GAP: Final = 0.00002

#: Worker threads for small metadata hops (a tag's lock, manifest reads and stats), apart from anyio's
#: default pool, which bulk blob I/O can fill: a tag's hops never queue behind other tasks' blob writes.
METADATA_THREADS: Final = 8

#: The Context of the engine operation running in this task (or thread), if any.
current_ctx: ContextVar[Context | None] = ContextVar("ocicas_current_ctx", default=None)

_metadata: ContextVar[bool] = ContextVar("ocicas_metadata_hops", default=False)
_metadata_limiter: anyio.lowlevel.RunVar[QuickLimiter] = anyio.lowlevel.RunVar("ocicas_metadata_limiter")


class QuickLimiter:
    """A capacity limiter for small hops that takes a free token without a turn of the event loop.

    anyio's and trio's limiters yield to the loop on every acquire, free or not; under
    load a turn costs milliseconds, and a tag's hop would wait several. This one waits
    (cancellably, first come first served) only while every token is out. Pass it as
    :func:`run_sync`'s ``limiter``: it speaks anyio's ``async with`` and trio's
    ``acquire_on_behalf_of`` / ``release_on_behalf_of``.
    """

    def __init__(self, total: int) -> None:
        self.total_tokens = total
        self._used = 0
        self._waiting: deque[anyio.Event] = deque()

    @property
    def available_tokens(self) -> int:
        return self.total_tokens - self._used

    async def acquire(self) -> None:
        if self._used < self.total_tokens and not self._waiting:
            self._used += 1
            return
        handed = anyio.Event()
        self._waiting.append(handed)
        try:
            await handed.wait()  # release() hands its token over, still counted
        except BaseException:
            if handed.is_set():
                self.release()  # handed a token while cancelled: pass it on
            else:
                self._waiting.remove(handed)
            raise

    def release(self) -> None:
        if self._waiting:
            self._waiting.popleft().set()
        else:
            self._used -= 1

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await self.acquire()

    def release_on_behalf_of(self, borrower: object) -> None:
        self.release()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


_local = threading.local()


async def run_sync(
    func: Callable[..., _T], *args: object, limiter: anyio.CapacityLimiter | QuickLimiter | None = None
) -> _T:
    """Run ``func(*args)`` in a worker thread, where :func:`checkpoint` sees this task's cancellation.

    Without ``limiter``: anyio's default one, or the metadata threads' inside :func:`metadata_hops`.
    """
    if limiter is None and _metadata.get():
        limiter = _metadata_threads()
    ctx = current_ctx.get()
    job: list[Any] = [func, args]  # emptied once run: an idle worker thread keeps its last job's callable

    def call() -> _T:
        work, arguments = job
        job.clear()
        _local.ctx = ctx
        _local.hosted = True
        _local.shared = time.perf_counter()
        try:
            return work(*arguments)  # type: ignore[no-any-return]
        finally:
            _local.ctx = None
            _local.hosted = False

    return await _run_in_thread(call, limiter=cast(anyio.CapacityLimiter | None, limiter))  # QuickLimiter: duck-typed


@contextmanager
def metadata_hops() -> Iterator[None]:
    """Send this task's (and its children's) hops without a limiter of their own to the metadata threads."""
    token = _metadata.set(True)
    try:
        yield
    finally:
        _metadata.reset(token)


def _metadata_threads() -> QuickLimiter:
    try:
        return _metadata_limiter.get()
    except LookupError:
        limiter = QuickLimiter(METADATA_THREADS)
        _metadata_limiter.set(limiter)
        return limiter


#: What :func:`run_sync` hands its work to (tests wrap it to count and interrupt every hop).
_run_in_thread = anyio.to_thread.run_sync


async def hash_into(verifier: Verifier, chunk: bytes | bytearray | memoryview) -> None:
    """Feed ``chunk`` to ``verifier``: in a worker thread if it is large, else right here."""
    if len(chunk) >= THREAD_HASH_SIZE:
        await run_sync(verifier.update, chunk)
    else:
        verifier.update(chunk)


def checkpoint() -> None:
    """In a worker thread: raise if the operation's Context is done or the host task was cancelled.

    Outside :func:`run_sync` (a synchronous call on the event loop thread, in
    tests) it checks only :data:`current_ctx`.
    """
    if getattr(_local, "hosted", False):
        ctx = _local.ctx
        if ctx is not None:
            ctx.check()
        anyio.from_thread.check_cancelled()
    else:
        ctx = current_ctx.get()
        if ctx is not None:
            ctx.check()


def share_gil() -> None:
    """In a worker thread running Python: let a thread waiting for the GIL (the event loop) in, if it is time.

    CPython hands the GIL to a waiting thread only once the holder has run for the
    switch interval (5 ms), and a release for a quick system call (a ``stat``, a
    directory read) starts that wait over: the releasing thread takes the GIL back
    before the woken one runs. A loop of Python between quick system calls can so
    keep the event loop waiting for seconds (measured: 2.7 s, for 0.5 ms of Python
    between two ``stat`` calls). Called between the items of such a loop, this sleeps
    a moment once :data:`GIL_SLICE` has passed since the thread last did: a real
    sleep gives the core up, and the waiting thread takes the GIL. Elsewhere (on the
    event loop's thread) it does nothing.
    """
    if getattr(_local, "hosted", False) and time.perf_counter() - _local.shared >= GIL_SLICE:
        time.sleep(_GIL_GAP)
        _local.shared = time.perf_counter()


def shared(items: Iterable[_T], every: int = 32) -> Iterator[_T]:
    """``items``, calling :func:`share_gil` every ``every`` of them: for a worker thread's loop of Python."""
    if every < 1:
        raise ValueError(f"every must be at least 1, not {every}")
    for n, item in enumerate(items):
        if not n % every:
            share_gil()
        yield item


def wait_for(attempt: Callable[[], bool]) -> None:
    """In a worker thread: call ``attempt`` until it returns true, backing off, checking for cancellation."""
    delay = 0.0002
    while not attempt():
        checkpoint()
        time.sleep(delay)
        delay = min(delay * 2, POLL_INTERVAL)


async def run_split(func: Callable[[list[_K]], dict[_K, _V]], items: list[_K], parts: int = 2) -> dict[_K, _V]:
    """Run ``func`` over ``parts`` slices of ``items`` in as many threads; merge the results.

    For syscall-bound loops over many blobs: the system calls run in parallel
    while only the Python between them takes turns on the GIL.
    """
    if len(items) < 256:
        return await run_sync(func, items)
    results: list[dict[_K, _V]] = []

    async def part(index: int) -> None:
        results.append(await run_sync(func, items[index::parts]))

    async with task_group() as tg:
        for index in range(parts):
            tg.start_soon(part, index)
    return {k: v for result in results for k, v in result.items()}


class ThreadStage(Generic[_T]):
    """Items worked on in order by one worker thread (:func:`run_sync`) at a time, for a task running :meth:`serve`.

    Handing an item over (:meth:`put`, from the event loop or from any thread) never
    waits. The thread takes the next item as soon as it is done with one, with no
    turn of the event loop in between (a round trip through a busy loop costs
    0.3-0.7 ms on a 2-core machine: a sixth of hashing 4 MiB) unless ``work`` makes
    one itself, and stops when none is left; the next item wakes :meth:`serve`,
    which starts one again. So a stage holds a thread, and its limiter's token, only
    while it has work: a slow source never pins one, and stages can never deadlock
    on tokens (stages living as long as their puts could: with every token taken by
    one stage of each put, their other stages would wait forever). Other thread
    work may wait longer for a token than it did for per-item hops: a stage with
    work queued keeps its token from item to item. ``work`` calls :func:`checkpoint`
    as any thread work does; if it raises, so does :meth:`serve`.
    """

    def __init__(self, work: Callable[[_T], None]) -> None:
        self._work = work
        self._items: deque[_T] = deque()
        self._lock = threading.Lock()
        self._running = False  # a thread is on its way or working: put() need not wake serve()
        self._closed = False
        self._wake = anyio.Event()
        self._loop_thread = threading.get_ident()
        self._call_soon = loop_caller()

    def put(self, item: _T) -> None:
        """Queue ``item``; wake :meth:`serve` if no thread is working. From another thread, raise
        :class:`RuntimeError` if the event loop is closed (the item stays queued, unserved)."""
        with self._lock:
            self._items.append(item)
            if self._running:
                return
            self._running = True
            wake = self._wake
        if threading.get_ident() == self._loop_thread:
            wake.set()
            return
        try:
            self._call_soon(wake.set)
        except BaseException:
            with self._lock:
                self._running = False  # no thread is coming: a later put tries again
            raise

    def close(self) -> None:
        """On the event loop: let :meth:`serve` return once every item is done."""
        self._closed = True
        self._wake.set()

    async def serve(self) -> None:
        """Start a thread for the items each time some come, until :meth:`close`."""
        while not (self._closed and not self._running):
            await self._wake.wait()
            self._wake = anyio.Event()  # the next put after this thread stops sets this one
            if self._running:  # else close() woke it
                await run_sync(self._drain)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._items:
                    self._running = False
                    return
                item = self._items.popleft()
            self._work(item)
            del item  # nothing of it is held while the next is awaited
            # A thread that goes from item to item never blocks: without this, the event loop, woken by its timer
            # while both cores run such threads, waits for a core (lag p99 6.4-7.1 ms, against 5.3-6.2 ms when each
            # item took a round trip through the loop; 4.9-5.8 ms with this yield, no slower).
            os.sched_yield()
