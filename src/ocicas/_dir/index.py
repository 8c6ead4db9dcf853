"""``index.json``: the parsed-index cache, the cross-process lock and the durable rewrite.

Reads are served from a cache keyed on the file's identity (device, inode, size,
mtime), and the cached file is kept open: a file that was replaced and freed
could otherwise hand its inode to a new ``index.json`` of the same size written
within the same tick of a coarse file clock, which would read as unchanged (a
stale read, and a lost update when the stale index is rewritten).

Changes are a read-modify-write under an exclusive ``flock`` on the layout
directory, so processes tagging at once lose nothing: the new index is written
to a temporary file, fsynced, renamed over ``index.json`` and the directory
fsynced, so readers never see a torn file. Updates arriving while a rewrite runs
join the next one (a group commit): one thread hop takes the lock, rewrites, releases
the lock and fsyncs the directory for every caller in the batch.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import threading
from collections.abc import Callable, Mapping
from typing import Final

import anyio
import anyio.lowlevel

from .._descriptor import Descriptor
from .._errors import InvalidError
from .._layout_format import IndexDocument
from .._threads import checkpoint, metadata_hops, run_sync
from .fs import open_dir, open_regular, read_open, try_flock, write_file

__all__ = ["IndexStore"]

_INDEX_LIMIT: Final = 256 << 20


class _Request:
    """One caller's change set, waiting for a rewrite of ``index.json`` to apply or refuse it."""

    __slots__ = ("changes", "error", "pending", "replace")

    def __init__(self, changes: Mapping[str, Descriptor | None], replace: bool) -> None:
        self.changes = changes
        self.replace = replace
        self.pending = True
        self.error: BaseException | None = None

    def settle(self, error: BaseException | None) -> None:
        self.error = error
        self.pending = False


class IndexStore:
    """The ``index.json`` of the layout whose directory is open as ``root``."""

    def __init__(self, root: int, where: str, temp_dir: Callable[[], int]) -> None:
        self._root = root
        self._where = where
        self._temp_dir = temp_dir
        self._committing: anyio.Event | None = None  # while a rewrite runs in this process (flock for others)
        self._threads: tuple[object, anyio.CapacityLimiter] | None = None
        self._queue: list[_Request] = []  # updates waiting for the next rewrite, in arrival order
        self._cache: tuple[tuple[int, int, int, int], IndexDocument] | None = None
        self._held: int | None = None  # the cached file, open (see the module doc)
        self._held_lock = threading.Lock()

    def _hold(self, fd: int, st: os.stat_result, document: IndexDocument) -> None:
        """Cache ``document`` as the content of the file open as ``fd``, and keep that file open."""
        with self._held_lock:
            released, self._held = self._held, fd
            self._cache = ((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), document)
        if released is not None:
            os.close(released)

    def load(self) -> IndexDocument:
        """The parsed ``index.json``, re-read only when the file's identity changed (worker thread)."""
        try:
            fd = open_regular("index.json", self._root, "index.json")
        except FileNotFoundError:
            raise InvalidError(f"not a layout: {self._where} has no index.json") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidError("index.json is a symlink") from None
            raise
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._cache
            if cached is not None and cached[0] == key:
                return cached[1]
            st, data = read_open(fd, _INDEX_LIMIT, "index.json")
            document = IndexDocument.parse(data)
            self._hold(fd, st, document)
            fd = -1  # held by the cache now
            return document
        finally:
            if fd >= 0:
                os.close(fd)

    async def read(self) -> IndexDocument:
        with metadata_hops():
            return await run_sync(self.load)

    async def update(self, changes: Mapping[str, Descriptor | None], replace: bool) -> None:
        """Apply ``changes`` under the layout's exclusive lock, in this process and across processes.

        A group commit: updates arriving while a rewrite runs wait for it, then
        the first of them rewrites ``index.json`` once for all of them (waiters
        wake together, none waits for another's turn at a lock). Each
        caller's change set is applied on top of the previous ones in arrival
        order, all or nothing; a set that fails (a clobber) fails its caller only.
        """
        request = _Request(changes, replace)
        self._queue.append(request)
        try:
            while request.pending:
                if self._committing is not None:  # a rewrite runs: wait for its end, then look again
                    await self._committing.wait()
                    continue
                # no rewrite runs and none took this request: lead one for everything queued
                self._committing = ended = anyio.Event()
                batch, self._queue = self._queue, []
                try:
                    await self._commit(batch)
                finally:
                    # those not reached (we were stopped first) go back, ahead of later ones, for the next leader
                    self._queue[:0] = [other for other in batch if other.pending]
                    self._committing = None
                    ended.set()  # every waiter wakes at once: the settled return, the first other one leads
        finally:
            if request.pending and request in self._queue:
                self._queue.remove(request)  # cancelled before any rewrite took it: never applied
        if request.pending:
            raise RuntimeError("index update was neither applied nor refused")  # pragma: no cover
        if request.error is not None:
            raise request.error

    async def _commit(self, batch: list[_Request]) -> None:
        limiter = self._limiter()
        if await run_sync(self._try_rewrite, batch, limiter=limiter):  # uncontended: one thread hop
            return
        lock_fd = await run_sync(open_dir, ".", self._root, "the layout", limiter=limiter)
        try:
            delay = 0.001
            while not await run_sync(try_flock, lock_fd, fcntl.LOCK_EX, limiter=limiter):
                await anyio.sleep(delay)  # another process holds the lock: wait, cancellably
                delay = min(delay * 2, 0.05)
            applied = await run_sync(self._rewrite, batch, limiter=limiter)
        finally:
            os.close(lock_fd)  # releases the flock
        await run_sync(self._make_durable, applied, limiter=limiter)

    def _limiter(self) -> anyio.CapacityLimiter:
        """Threads of this index's own, so a tag never queues behind the blob I/O filling the default pool."""
        token = anyio.lowlevel.current_token()
        if self._threads is None or self._threads[0] is not token:
            self._threads = (token, anyio.CapacityLimiter(2))
        return self._threads[1]

    def _try_rewrite(self, batch: list[_Request]) -> bool:
        """Rewrite under the layout's ``flock`` if it is free now, then sync the directory; whether it was."""
        lock_fd = open_dir(".", self._root, "the layout")
        try:
            if not try_flock(lock_fd, fcntl.LOCK_EX):
                return False
            applied = self._rewrite(batch)
        finally:
            os.close(lock_fd)  # releases the flock
        self._make_durable(applied)
        return True

    def _make_durable(self, applied: list[_Request]) -> None:
        """fsync the layout directory, outside the ``flock``, and settle the ``applied`` requests."""
        # even when nothing was written: a name found present may rest on another process's rename
        try:
            os.fsync(self._root)
        except BaseException as exc:
            for request in applied:
                request.settle(exc)
            raise
        for request in applied:
            request.settle(None)

    def _rewrite(self, batch: list[_Request]) -> list[_Request]:
        """Apply each request of ``batch`` in turn and write the result once; return those applied.

        Refused requests are settled here; the applied ones once the directory is synced.
        """
        # the leader's own cancellation or deadline stops it before anything is settled or written:
        # the batch goes back to the queue for the next caller to lead
        checkpoint()
        current = self.load()
        updated = None
        applied = []
        for request in batch:
            try:
                result = (updated or current).apply(request.changes, replace=request.replace)
            except Exception as exc:
                request.settle(exc)
                continue
            if result is not None:
                updated = result
            applied.append(request)
        try:
            if updated is not None:
                self._write(updated)
        except BaseException as exc:
            for request in applied:
                request.settle(exc)
            raise
        return applied

    def _write(self, updated: IndexDocument) -> None:
        temp = self._temp_dir()
        name = f"index-{secrets.token_hex(8)}"
        held = -1
        try:
            write_file(temp, name, updated.serialize())
            held = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=temp)
            st = os.fstat(held)
            os.rename(name, "index.json", src_dir_fd=temp, dst_dir_fd=self._root)
        except BaseException:
            if held >= 0:
                os.close(held)
            try:
                os.unlink(name, dir_fd=temp)
            except FileNotFoundError:
                pass
            raise
        self._hold(held, st, updated)

    def release(self) -> None:
        """Close the cached file (the engine is closing)."""
        with self._held_lock:
            held, self._held, self._cache = self._held, None, None
        if held is not None:
            os.close(held)
