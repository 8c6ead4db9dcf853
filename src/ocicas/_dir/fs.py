"""File-system primitives of the directory engine.

Everything here runs on worker threads (``_threads.run_sync``) and works relative to
directory descriptors: opens that refuse symlinks and special files, durable
writes, the blob directory's ``flock`` that makes GC's age check and unlink atomic
with a writer's freshening in any process, and a group-committed directory fsync.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final, Generic, TypeVar

from .._errors import InvalidError
from .._threads import CHUNK_SIZE, wait_for

DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted at a blob path must not hang
READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

_T = TypeVar("_T")


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


#: The most one ``write`` of a large put takes through the page cache. Measured on ext4 (Linux 6.18, a VM): 1 MiB
#: writes at 1 MiB-aligned offsets, which the page cache takes in 1 MiB folios, cost 2-10 s of system time per
#: GiB; 512 KiB writes 0.3 s.
WRITE_SIZE: Final = 512 << 10


def write_pieces(fd: int, data: bytes | bytearray | memoryview) -> None:
    """:func:`write_all`, at most :data:`WRITE_SIZE` bytes a call."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), WRITE_SIZE):
        write_all(fd, view[start : start + WRITE_SIZE])


def write_file(dir_fd: int, name: str, data: bytes) -> None:
    """Create ``name`` with ``data``, durably (fsync)."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def open_dir(name: str, dir_fd: int, what: str) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except NotADirectoryError:
        raise InvalidError(f"{what} is not a directory (or is a symlink)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidError(f"{what} is a symlink") from None
        raise


def remove_temp_dir(parent_fd: int, name: str, fd: int) -> None:
    """Remove one of our temporary directories (flat: files only) opened as ``fd``."""
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                os.unlink(entry.name, dir_fd=fd)
            except FileNotFoundError:
                pass
    os.rmdir(name, dir_fd=parent_fd)


def open_regular(name: str, dir_fd: int, what: str) -> int:
    """Open a regular file for reading; raise :class:`InvalidError` for anything else, unopened.

    A symlink is never followed, and a device, socket or FIFO is never opened
    (opening a device can have effects; sockets and devices without a driver
    fail with ENXIO): the file's type is checked first. Callers still check the
    opened file's type, in case the path was swapped meanwhile.
    """
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        raise InvalidError(f"{what} is a symlink; refusing to follow it")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidError(f"{what} is not a regular file")
    try:
        return os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.ENODEV):  # swapped since the check
            raise InvalidError(f"{what} is not a regular file") from None
        raise


def read_small(dir_fd: int, name: str, limit: int, what: str) -> tuple[os.stat_result, bytes]:
    """Read a whole regular file that must not be a symlink or larger than ``limit``."""
    fd = open_regular(name, dir_fd, what)
    try:
        return read_open(fd, limit, what)
    finally:
        os.close(fd)


def read_open(fd: int, limit: int, what: str) -> tuple[os.stat_result, bytes]:
    """Read the whole regular file open as ``fd``, which must not be larger than ``limit``."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidError(f"{what} is not a regular file")
    if st.st_size > limit:
        raise InvalidError(f"{what} has {st.st_size} bytes, over the limit of {limit}")
    parts = []
    while chunk := os.read(fd, max(st.st_size, CHUNK_SIZE)):
        parts.append(chunk)
        if sum(map(len, parts)) > limit:
            raise InvalidError(f"{what} grew over the limit of {limit} bytes")
    return st, b"".join(parts)


class GroupSync:
    """fsync one directory on behalf of every thread that changed it before the fsync began.

    A put makes its change (renames its blob into place, or freshens a copy it found)
    inside :meth:`change`, then calls :meth:`Change.sync`: concurrent puts share one
    directory fsync, which covers every change made before it began. A directory
    fsync that fails may have lost any rename made before or while it ran, and a
    later fsync cannot tell (the kernel may drop the failed writeback and report
    success the next time; ``index.py`` reasons the same way). So a put fails if any
    fsync failed between the start of its change and the success of the fsync that
    covers it, each caller with an ``OSError`` of its own caused by the one failure;
    and every name being changed when an fsync fails becomes *suspect* until a put
    of it renames its copy over the blob (instead of freshening it) and that rename
    is covered with no failure in between. A freshening put syncs too: the copy it
    found may rest on a rename (by another put, or another process) not yet synced.
    There is one per directory in the process (:data:`group_sync`), whichever
    engine puts there, so a retry through another engine knows what failed.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._started = 0  # fsyncs begun
        self._done = 0  # the last fsync finished (they run one at a time, in order)
        self._running = False
        self._failures = 0  # fsyncs that failed
        self._failure: OSError | None = None  # the last of them
        self._changing: dict[str, int] = {}  # names inside change() -> how many callers
        # names whose last rename may not be durable -> fsyncs begun when they became suspect: only an fsync begun
        # after that covers a rename made before
        self._suspect: dict[str, int] = {}

    @contextmanager
    def change(self, name: str) -> Iterator[Change]:
        """Register a change of ``name`` for the ``with`` block: make it, then call the yielded ``sync``."""
        with self._cond:
            self._changing[name] = self._changing.get(name, 0) + 1
            change = Change(self, name, name in self._suspect, self._failures)
        try:
            yield change
        except BaseException:
            if change.renaming:
                with self._cond:
                    self._suspect[name] = self._started  # it may have been renamed and never synced
                    group_sync.keep(self, True)
            raise
        finally:
            with self._cond:
                left = self._changing[name] - 1
                if left:
                    self._changing[name] = left
                else:
                    del self._changing[name]

    def _sync(self, fd: int, change: Change) -> None:
        with self._cond:
            needed = self._started + 1  # one that begins after the change
            while self._done < needed:
                if self._running:
                    self._cond.wait()
                else:
                    self._run(fd)
            if self._failures == change.mark:
                if self._suspect.get(change.name, needed) < needed:  # a rename before it may have been lost
                    del self._suspect[change.name]
                    if not self._suspect:
                        group_sync.keep(self, False)
                return
            self._suspect[change.name] = self._started
            group_sync.keep(self, True)
            failure = self._failure
        assert failure is not None
        raise OSError(failure.errno, failure.strerror) from failure

    def _run(self, fd: int) -> None:
        """Under the condition: run the next fsync, with the condition released meanwhile."""
        self._running = True
        self._started += 1
        mine = self._started
        self._cond.release()
        failure: OSError | None = None
        try:
            os.fsync(fd)
        except OSError as exc:
            failure = exc
        except BaseException as exc:
            # CPython raises from fsync only once it returned an error (a MemoryError building the OSError, a
            # signal's exception after EINTR): a failure like any other for the callers it covered
            failure = OSError(errno.EIO, os.strerror(errno.EIO))
            failure.__cause__ = exc
            raise
        finally:
            self._cond.acquire()
            if failure is not None:
                self._failures += 1
                self._failure = failure
                # each may have renamed before or while this ran
                self._suspect.update(dict.fromkeys(self._changing, self._started))
                group_sync.keep(self, True)
            self._done = mine
            self._running = False
            self._cond.notify_all()


class PerDirectory(Generic[_T]):
    """One ``_T`` per directory in this process, found by the directory's identity (device, inode), whichever
    engine opened it: alive while something holds it, or while :meth:`keep` says (state a later engine must
    find: what failed)."""

    def __init__(self, factory: Callable[[], _T]) -> None:
        self._factory = factory
        self._items: weakref.WeakValueDictionary[tuple[int, int], _T] = weakref.WeakValueDictionary()
        self._kept: set[_T] = set()
        self._lock = threading.Lock()

    def __call__(self, fd: int) -> _T:
        """The one of the directory open as ``fd`` (a worker thread: ``fstat``)."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with self._lock:
            item = self._items.get(key)
            if item is None:
                item = self._items[key] = self._factory()
            return item

    def keep(self, item: _T, kept: bool) -> None:
        """Keep ``item`` alive even when nothing holds it, or no longer."""
        with self._lock:
            if kept:
                self._kept.add(item)
            else:
                self._kept.discard(item)


#: The directory fsync of each blob directory this process puts into: kept while it knows of suspect names.
group_sync: Final = PerDirectory(GroupSync)


class MadeDirs:
    """The subdirectories of one directory (``blobs/``) that puts make and must know durable: one at a time.

    :attr:`lock` is held while a subdirectory is made or its entry synced, so a put
    never finds one that another thread of the process is still making; a name is in
    :attr:`suspect` from its ``mkdir`` until an fsync of the parent after it succeeds.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.suspect: set[str] = set()


#: The made subdirectories of each ``blobs/`` this process puts into: kept while one is suspect.
made_dirs: Final = PerDirectory(MadeDirs)


class Change:
    """One put's change of a blob name in a :class:`GroupSync` directory (see :meth:`GroupSync.change`)."""

    __slots__ = ("_group", "mark", "name", "renaming", "suspect")

    def __init__(self, group: GroupSync, name: str, suspect: bool, mark: int) -> None:
        self._group = group
        self.name = name
        #: The name's last rename may not be durable: rename over it, do not freshen it.
        self.suspect = suspect
        self.mark = mark  # failures before the change began
        #: Set before the rename: a change left by an exception after it leaves its name suspect.
        self.renaming = False

    def sync(self, fd: int) -> None:
        """After the change: return once a directory fsync that began after it succeeded with no failure since
        the change began; else raise the system's error (the name is then suspect)."""
        self._group._sync(fd, self)


@contextmanager
def blobs_held(alg: int) -> Iterator[None]:
    """Hold the ``flock`` of the blob directory open as ``alg`` shared, as a writer does.

    A writer freshening or replacing blobs (``put_blob`` of present content,
    ``touch_blobs``) holds it shared; a collector holds it exclusively while it
    runs :func:`unlink_unused` over a round of blobs (``DirEngine._unlink_old``),
    so its age checks and unlinks are atomic with a writer's freshening in any
    process (one ``flock`` per round, not one per blob). Every holder opens the
    directory itself, so holders in one process exclude each other as holders in
    different processes do. The wait (a holder keeps it for milliseconds) stops
    when the operation is cancelled.
    """
    wait_for(lambda: try_flock(alg, fcntl.LOCK_SH))
    try:
        yield
    finally:
        fcntl.flock(alg, fcntl.LOCK_UN)


def open_blob(alg: int, name: str, what: str) -> int | None:
    """Open blob file ``name`` for reading; ``None`` if there is none.

    Call it under :func:`blobs_held`, so that no collector unlinks the blob while
    it is freshened. :class:`InvalidError` if the path holds anything but a
    regular file.
    """
    try:
        return open_regular(name, alg, what)
    except FileNotFoundError:
        return None


def try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def unlink_unused(alg: int, name: str, cutoff: int | None) -> os.stat_result | None:
    """Unlink blob file ``name`` unless written or freshened at or after ``cutoff`` (ns); its stat if removed.

    Call it with the blob directory's ``flock`` held exclusively (see
    :func:`blobs_held`), so never while a writer in any process freshens or
    replaces the blob: such a blob is kept. Anything but a regular file is left
    alone.
    """
    try:
        st = os.stat(name, dir_fd=alg, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or (cutoff is not None and st.st_mtime_ns >= cutoff):
        return None  # young, or not a blob of ours to remove
    try:
        os.unlink(name, dir_fd=alg)
    except FileNotFoundError:
        return None
    return st
