"""``index.json``: the parsed-index cache, the cross-process lock and the durable rewrite.

Reads are served from a cache keyed on the file's identity (device, inode, size,
mtime), and the cached file is kept open: a file that was replaced and freed
could otherwise hand its inode to a new ``index.json`` of the same size written
within the same tick of a coarse file clock, which would read as unchanged (a
stale read, and a lost update when the stale index is rewritten).

Changes are a read-modify-write under an exclusive ``flock`` on the layout
directory, so processes tagging at once lose nothing: the new index is written
to a temporary file, fsynced, renamed over ``index.json`` and the directory
fsynced, so readers never see a torn file.
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

from .._descriptor import Descriptor
from .._errors import InvalidError
from .._layout_format import IndexDocument
from .._threads import checkpoint, run_sync
from .fs import open_dir, open_regular, read_open, try_flock, write_file

__all__ = ["IndexStore"]

_INDEX_LIMIT: Final = 256 << 20


class IndexStore:
    """The ``index.json`` of the layout whose directory is open as ``root``."""

    def __init__(self, root: int, where: str, temp_dir: Callable[[], int]) -> None:
        self._root = root
        self._where = where
        self._temp_dir = temp_dir
        self._lock = anyio.Lock()  # one rewrite at a time in this process; flock for the others
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
        return await run_sync(self.load)

    async def update(self, changes: Mapping[str, Descriptor | None], replace: bool) -> None:
        """Apply ``changes`` under the layout's exclusive lock, in this process and across processes."""
        async with self._lock:
            lock_fd = await run_sync(open_dir, ".", self._root, "the layout")  # the layout, not the working directory
            try:
                delay = 0.001
                while not await run_sync(try_flock, lock_fd, fcntl.LOCK_EX):
                    await anyio.sleep(delay)  # another process holds the lock: wait, cancellably
                    delay = min(delay * 2, 0.05)
                await run_sync(self._rewrite, changes, replace)
            finally:
                os.close(lock_fd)  # releases the flock

    def _rewrite(self, changes: Mapping[str, Descriptor | None], replace: bool) -> None:
        updated = self.load().apply(changes, replace=replace)
        if updated is None:
            return
        checkpoint()
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
        os.fsync(self._root)

    def release(self) -> None:
        """Close the cached file (the engine is closing)."""
        with self._held_lock:
            held, self._held, self._cache = self._held, None, None
        if held is not None:
            os.close(held)
