"""``index.json``: the parsed-index cache, the cross-process lock and the durable rewrite.

Reads are served from a cache keyed on the file's identity (device, inode, size,
mtime), and the cached file is kept open: a file that was replaced and freed
could otherwise hand its inode to a new ``index.json`` of the same size written
within the same tick of a coarse file clock, which would read as unchanged (a
stale read, and a lost update when the stale index is rewritten).

Changes are a read-modify-write under an exclusive ``flock`` on the layout
directory, so processes tagging at once lose nothing: the new index is written
to a temporary file, fsynced, renamed over ``index.json`` and the directory
fsynced, so readers never see a torn file. A failure before the rename (the write,
the file's fsync, the rename itself) leaves ``index.json`` as it was and fails the
sets of that rewrite with the system's error; once renamed, the sets are visible
(and the next rewrite starts from them), so a failed directory fsync raises
:class:`~ocicas.NotDurableError` instead: applied, but perhaps not durable. A second
fsync cannot tell (the kernel may drop the failed writeback and report success the
next time), so the index is then marked unsynced: every rewrite writes and renames
``index.json`` again, changed or not (a caller's retry included), dirtying the
directory anew, until a directory fsync that followed such a rename succeeds. A
rewrite whose directory fsync overlapped a failing one is not durable either. That
state is the layout directory's in this process, shared by its engines (a retry
through a reopened engine renames too); another process's failures are not known.

A group commit, run by the worker threads themselves: each update is one thread
hop, which first runs the caller's check (a tag's content check, in parallel with
other callers'), then joins the list of ready updates. A hop that finds no rewrite
in progress takes every ready update and rewrites ``index.json`` once for all of
them; the others wait in their threads for the rewrite that takes theirs. The next
rewrite may start while the previous one syncs the directory, so a tag waits for
at most the rewrite in progress and its own, and never for the event loop between
two rewrites.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import functools
import os
import secrets
import stat
import threading
from collections.abc import Callable, Mapping
from typing import Final

import anyio
import anyio.lowlevel

from .._descriptor import Descriptor
from .._errors import InvalidError, NotDurableError
from .._layout_format import IndexDocument
from .._threads import POLL_INTERVAL, QuickLimiter, checkpoint, metadata_hops, run_sync, wait_for
from .fs import PerDirectory, open_dir, open_regular, read_open, try_flock, write_all

__all__ = ["IndexStore"]

_INDEX_LIMIT: Final = 256 << 20
#: Updates in flight in worker threads at once, per event loop: each holds its thread while it waits for a rewrite.
_UPDATE_THREADS: Final = 32


def _copy_of(error: BaseException) -> BaseException:
    """Another instance of ``error`` (same type and arguments), caused by it: one exception raised by many
    callers at once would have its traceback written by each."""
    try:
        other = copy.copy(error)
    except Exception:
        return error
    other.__cause__ = error
    return other


class _Request:
    """One caller's change set, waiting for a rewrite of ``index.json`` to apply or refuse it.

    Its fields change only under the store's condition, in worker threads.
    """

    __slots__ = ("abandoned", "changes", "error", "pending", "ready", "replace")

    def __init__(self, changes: Mapping[str, Descriptor | None], replace: bool) -> None:
        self.changes = changes
        self.replace = replace
        self.ready = False  # in the list of updates the next rewrite takes
        self.pending = True
        self.error: BaseException | None = None
        # its caller left (cancelled) while a rewrite held it: that rewrite may land it, under the running
        # caller's protection (the collector's shared lock), but no later one may, unprotected
        self.abandoned = False

    def settle(self, error: BaseException | None) -> None:
        self.error = error
        self.pending = False


class _DirectorySyncs:
    """What this process knows of a layout directory's fsyncs after ``index.json`` rewrites, shared by every
    engine of the layout in the process: a retry through a reopened engine renames too (see the module doc)."""

    __slots__ = ("__weakref__", "failure", "failures", "lock", "unsynced")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # a directory fsync failed and no rename followed by a successful one since: rewrites rename, changed or not
        self.unsynced = False
        self.failures = 0  # directory fsyncs that failed: a rewrite's fsync overlapping one cannot vouch
        self.failure: OSError | None = None  # the last of them


#: Kept alive while unsynced, so that an engine opened later finds it.
_directory_syncs: Final = PerDirectory(_DirectorySyncs)


class IndexStore:
    """The ``index.json`` of the layout whose directory is open as ``root``."""

    def __init__(self, root: int, where: str, temp_dir: Callable[[], int]) -> None:
        self._root = root
        self._where = where
        self._temp_dir = temp_dir
        self._threads: tuple[object, QuickLimiter] | None = None
        # the group commit's state, shared by the worker threads (never touched on the event loop)
        self._changed = threading.Condition()  # a request was settled, or the rewrite in progress ended
        self._queue: list[_Request] = []  # ready updates, in arrival order, for the next rewrite
        self._committing = False  # a rewrite is in progress (in this process; the flock covers others)
        self._lock_fd: int | None = None  # the layout directory, open for its flock (used by the rewrite only)
        self._syncs: _DirectorySyncs | None = None  # the layout directory's, in this process (see _directory_syncs)
        self._cache: tuple[tuple[int, int, int, int], IndexDocument] | None = None
        self._held: int | None = None  # the cached file, open (see the module doc)
        self._held_lock = threading.Lock()

    def _hold(self, fd: int, st: os.stat_result, document: IndexDocument) -> None:
        """Cache ``document`` as the content of the file open as ``fd``, and keep that file open."""
        with self._held_lock:
            released, self._held = self._held, fd
            self._cache = ((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), document)
        if released is not None:
            with contextlib.suppress(OSError):  # after a rename: the change is on disk whatever close says
                os.close(released)

    def load(self) -> IndexDocument:
        """The parsed ``index.json``, re-read only when the file's identity changed (worker thread)."""
        cached = self._cache
        if cached is not None:
            # one stat: the cached file is held open, so no new index.json can take its inode
            try:
                st = os.stat("index.json", dir_fd=self._root, follow_symlinks=False)
            except FileNotFoundError:
                pass  # reported below
            else:
                if stat.S_ISREG(st.st_mode) and cached[0] == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns):
                    return cached[1]
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

    async def update(
        self,
        changes: Mapping[str, Descriptor | None],
        replace: bool,
        check: Callable[[], bool] | None = None,
    ) -> bool:
        """Apply ``changes`` under the layout's exclusive lock, in this process and across processes.

        One thread hop: ``check`` (if given) runs first, in the worker thread; if it
        returns false nothing is applied and this returns ``False`` (the caller
        decides the slow way, then comes back without a check). Else the change set
        joins the next rewrite of ``index.json`` (a group commit), applied on top of
        the earlier ones in arrival order, all or nothing; a set that fails (a
        clobber) fails its caller only. Returns ``True`` once applied and durable;
        raises :class:`~ocicas.NotDurableError` if applied (visible) but the directory
        could not be synced.
        """
        request = _Request(changes, replace)
        if not await run_sync(self._join, request, check, limiter=self._limiter()):
            return False
        if request.error is not None:
            raise request.error
        return True

    def _limiter(self) -> QuickLimiter:
        """Threads of this index's own, so a tag never queues behind the blob I/O filling the default pool."""
        token = anyio.lowlevel.current_token()
        if self._threads is None or self._threads[0] is not token:
            self._threads = (token, QuickLimiter(_UPDATE_THREADS))
        return self._threads[1]

    def _join(self, request: _Request, check: Callable[[], bool] | None) -> bool:
        """Worker thread: check, then wait until a rewrite settled ``request``, running it if none runs."""
        if check is not None and not check():
            return False
        changed = self._changed
        with changed:
            checkpoint()  # cancelled before joining: never applied
            request.ready = True
            self._queue.append(request)
            while True:
                if not request.pending:
                    return True
                if request.ready and not self._committing:
                    # no rewrite in progress, and none took this request: run one for every ready update
                    self._committing = True
                    batch, self._queue = self._queue, []
                    for other in batch:
                        other.ready = False
                    break
                try:
                    checkpoint()
                except BaseException:
                    if request.ready:  # cancelled before a rewrite took it: never applied
                        request.ready = False
                        self._queue.remove(request)
                    else:  # a rewrite has it: it lands or fails without its caller
                        request.abandoned = True
                    raise
                changed.wait(POLL_INTERVAL)
        try:
            self._commit(batch, request)
        except BaseException:
            if request.pending:
                raise
            # settled before the rewrite failed (refused, say): its caller gets its own outcome
        return True

    def _commit(self, batch: list[_Request], own: _Request) -> None:
        """Rewrite ``index.json`` once for ``batch``, then fsync the directory; settle each request."""
        changed = self._changed
        try:
            syncs = self._syncs
            if syncs is None:  # before the flock: nothing between it and the try below may raise
                syncs = self._syncs = _directory_syncs(self._root)
            lock_fd = self._lock_fd
            if lock_fd is None:
                lock_fd = self._lock_fd = open_dir(".", self._root, "the layout")
            # another process may hold it: wait, cancellably
            wait_for(lambda: try_flock(lock_fd, fcntl.LOCK_EX))
            with syncs.lock:
                failures, unsynced = syncs.failures, syncs.unsynced
            try:
                applied = self._rewrite(batch, renew=unsynced)
            finally:
                self._unlock(lock_fd)
        except BaseException as exc:
            with changed:
                # those not settled (this rewrite was stopped first) go back, ahead of later ones, for the next
                # rewrite; this caller's own leaves with the error, and so do those whose callers left
                back = []
                for other in batch:
                    if other.pending and other is not own:
                        if other.abandoned:
                            other.settle(exc)  # nobody waits for it: never applied
                        else:
                            other.ready = True
                            back.append(other)
                self._queue[:0] = back
                self._committing = False
                changed.notify_all()
            raise
        with changed:
            self._committing = False  # the next rewrite may run while this one's directory syncs
            changed.notify_all()
        # even when nothing was written: a name found present may rest on another process's rename
        try:
            os.fsync(self._root)
        except OSError as failure:
            # The rename made the sets visible, and the next rewrite starts from them (the cache is the file on
            # disk): "not applied" would be untrue. Only their durability is unknown, and a second fsync would
            # not tell (the kernel may have dropped the failed writeback and report success the next time):
            # until a rename is followed by a successful fsync, each rewrite renames again (see the module doc).
            with syncs.lock:
                syncs.unsynced = True
                syncs.failures += 1
                syncs.failure = failure
                _directory_syncs.keep(syncs, True)
            self._settle(applied, failure, functools.partial(self._not_durable, failure))
            raise
        with syncs.lock:
            overlapped = syncs.failure if syncs.failures != failures else None
            if overlapped is None and unsynced:
                syncs.unsynced = False  # this rewrite renamed (renew), and nothing failed since: synced
                _directory_syncs.keep(syncs, False)
        if overlapped is not None:
            # another rewrite's directory fsync failed meanwhile: this success may hide that failure (the error
            # is reported once), and this rewrite's sets may rest on that rewrite's rename
            self._settle(applied, overlapped, functools.partial(self._not_durable, overlapped))
            return
        self._settle(applied, None)

    def _unlock(self, lock_fd: int) -> None:
        """Release the layout's ``flock``; if that fails, close its descriptor instead (which releases it)."""
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
        except OSError:  # never reported: the rewrite's own outcome is what its callers are told
            self._lock_fd = None
            with contextlib.suppress(OSError):
                os.close(lock_fd)

    def _not_durable(self, exc: OSError, request: _Request) -> NotDurableError:
        names = sorted(request.changes)
        shown = ", ".join(map(repr, names[:3])) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        error = NotDurableError(
            f"the change to {'reference' if len(names) == 1 else 'references'} {shown} is in the index.json of "
            f"{self._where} and visible, but syncing the layout directory failed ({exc.strerror or exc}): "
            "it may not survive a crash"
        )
        error.errno, error.strerror = exc.errno, exc.strerror
        error.__cause__ = exc
        return error

    def _settle(
        self,
        requests: list[_Request],
        error: BaseException | None,
        error_of: Callable[[_Request], BaseException] | None = None,
    ) -> None:
        """Settle ``requests`` with ``error``: each caller gets an instance of its own, raised in its own task."""
        with self._changed:
            for request in requests:
                if error_of is not None:
                    request.settle(error_of(request))
                else:
                    request.settle(None if error is None else _copy_of(error))
            self._changed.notify_all()

    def _rewrite(self, batch: list[_Request], *, renew: bool) -> list[_Request]:
        """Apply each request of ``batch`` in turn and write the result once; return those applied.

        ``renew``: write and rename ``index.json`` even if nothing changed (the index is marked unsynced).
        Refused requests are settled here; the applied ones once the directory is synced.
        """
        # the committing caller's cancellation or deadline stops it before anything is settled or written:
        # the batch goes back to the queue for the next rewrite
        checkpoint()
        current = self.load()
        updated = None
        applied = []
        refused = []
        for request in batch:
            try:
                result = (updated or current).apply(request.changes, replace=request.replace)
            except Exception as exc:
                refused.append((request, exc))
                continue
            if result is not None:
                updated = result
            applied.append(request)
        try:
            if updated is not None or renew:
                self._write(updated if updated is not None else current)
        except BaseException as exc:
            self._settle(applied, exc)
            raise
        finally:
            with self._changed:
                for request, error in refused:
                    request.settle(error)
        return applied

    def _write(self, updated: IndexDocument) -> None:
        temp = self._temp_dir()
        name = f"index-{secrets.token_hex(8)}"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=temp)
        try:
            write_all(fd, updated.serialize())
            os.fsync(fd)
            st = os.fstat(fd)
            os.rename(name, "index.json", src_dir_fd=temp, dst_dir_fd=self._root)
        except BaseException:
            # the write's own error is what is raised, whatever the cleanup meets
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=temp)
            raise
        self._hold(fd, st, updated)  # the written file stays open as the cached one

    def release(self) -> None:
        """Close the cached file and the lock's descriptor (the engine is closing)."""
        with self._held_lock:
            held, self._held, self._cache = self._held, None, None
        if held is not None:
            os.close(held)
        lock_fd, self._lock_fd = self._lock_fd, None
        if lock_fd is not None:
            os.close(lock_fd)
