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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from .._errors import InvalidError
from .._threads import CHUNK_SIZE, wait_for

DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted at a blob path must not hang
READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


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

    Concurrent puts each need their rename made durable; one directory fsync that
    starts after a rename covers it, so callers arriving while one runs share the
    next. A failed fsync fails every caller it covered, and every caller whose own
    fsync overlapped it, each with an ``OSError`` of its own (caused by the one
    failure): the failed writeback may have held their renames too, and a later
    fsync cannot tell (the kernel may drop it and report success the next time),
    as for ``index.json`` (``index.py``). Their names stay *suspect* until a rename
    of the name is covered by an fsync that succeeded with no failure in between:
    a put of present content renames its copy over a suspect blob instead of
    freshening it (:meth:`suspect`), and a freshening put first waits for the
    fsyncs of every rename made before it (:meth:`settle`).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._started = 0  # fsyncs begun
        self._done = 0  # fsyncs finished (they finish in the order they begin, one at a time)
        self._running = False
        self._last_needed = 0  # the fsync that covers the latest rename
        self._failures = 0  # fsyncs that failed
        self._failure: OSError | None = None  # the last of them
        self._renaming: dict[str, int] = {}  # names renamed and not yet covered -> callers waiting for them
        self._suspect: set[str] = set()  # names whose last rename may not be durable
        self._settling = 0  # freshening puts waiting in settle()

    def suspect(self, name: str) -> bool:
        """Whether ``name``'s last rename may not be durable: a put must rename over it, not freshen it."""
        with self._cond:
            return name in self._suspect

    def sync(self, fd: int, name: str) -> None:
        """After a rename of ``name``: return once an fsync of ``fd`` that began after it succeeded, with none
        failing in between; else raise (``name`` is then suspect)."""
        with self._cond:
            failures = self._failures
            needed = self._last_needed = self._started + 1  # one that begins after our change
            self._renaming[name] = self._renaming.get(name, 0) + 1
            try:
                self._wait(fd, needed)
            finally:
                left = self._renaming[name] - 1
                if left:
                    self._renaming[name] = left
                else:
                    del self._renaming[name]
            if self._failures == failures:
                self._suspect.discard(name)
                return
            self._suspect.add(name)
            failure = self._failure
        assert failure is not None
        raise OSError(failure.errno, failure.strerror) from failure

    def settle(self, fd: int, name: str) -> None:
        """Before a put of present content ``name`` returns: wait for the fsyncs of every rename made before
        (one of them may have made ``name``); raise if ``name`` turns out suspect."""
        with self._cond:
            self._settling += 1
            try:
                self._wait(fd, self._last_needed)
            finally:
                self._settling -= 1
            if name not in self._suspect:
                return
            failure = self._failure
        assert failure is not None
        raise OSError(failure.errno, failure.strerror) from failure

    def _wait(self, fd: int, needed: int) -> None:
        """Under the condition: wait until fsync ``needed`` finished, running one when none runs."""
        while self._done < needed:
            if self._running:
                self._cond.wait()
            else:
                self._run(fd)

    def _run(self, fd: int) -> None:
        """Under the condition: run the next fsync, with the condition released meanwhile."""
        self._running = True
        self._started += 1
        mine = self._started
        self._cond.release()
        try:
            os.fsync(fd)
        except OSError as exc:
            self._cond.acquire()
            self._failures += 1
            self._failure = exc
            # every name renamed and not yet covered: renamed before this fsync, or while it ran
            self._suspect.update(self._renaming)
            self._done = mine
        except BaseException:
            self._cond.acquire()  # not run (interrupted): the next caller runs another, numbered after it
            raise
        else:
            self._cond.acquire()
            self._done = mine
        finally:
            self._running = False
            self._cond.notify_all()


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
