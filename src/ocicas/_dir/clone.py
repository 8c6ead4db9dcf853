"""The directory engine's put from a local file: the kernel copies the bytes, the put hashes what landed.

When a put's source is an unread :class:`~ocicas.BlobReader` over a file (another
layout's blob, as :func:`ocicas.copy` moves them), or an :class:`anyio.AsyncFile`
of a plain binary file (``anyio.open_file(path, "rb")``, see :func:`put_local_file`)
with at least :data:`LOCAL_MIN` bytes left, the bytes need not pass through
Python: ``os.copy_file_range`` copies them inside the kernel (sharing extents where
the file system can, as btrfs and XFS do), falling back to ``sendfile`` and then to
``pread``/``pwrite`` where it cannot (another file system: ``EXDEV``; an old kernel or
a sandbox: ``ENOSYS``, ``EINVAL``, ``EOPNOTSUPP``). Meanwhile a second worker thread
reads back what landed in the temporary file and hashes it, a step behind the copy.

What this guarantees: the digest is computed over the destination's own bytes, read
back from its temporary file after the kernel wrote them, and that file becomes the
blob only if they hash to the expected digest and size. Whatever happens to the
source meanwhile (corrupt on disk, rewritten, truncated or grown by another process),
nothing unverified becomes a blob: changed bytes fail the check, and a source whose
first ``size`` bytes are still right gives the right blob. The temporary file lives
in the engine's private, flock-held directory, as for every put, and is committed
the same way (:meth:`PendingBlob._commit`: fsync, rename into ``blobs/``, directory
fsync; a present copy is freshened instead, unless a failed directory fsync made it
suspect). On any failure or cancellation the
temporary file and both descriptors are gone before the error leaves.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, Literal

import anyio

from .._budget import PUT_BUDGET
from .._digest import Digest, Verifier
from .._tasks import task_group
from .._threads import CHUNK_SIZE, checkpoint, run_sync
from .fs import READ_FLAGS, write_all
from .put import PendingBlob

if TYPE_CHECKING:
    from .engine import DirEngine

__all__ = ["LOCAL_MIN", "METHODS", "CopyMethod", "KernelCopy", "clone_blob", "put_local_file"]

CopyMethod = Literal["copy_file_range", "sendfile", "pread"]
#: The ways to copy a range of one file into another, in the order they are tried.
METHODS: Final[tuple[CopyMethod, ...]] = ("copy_file_range", "sendfile", "pread")
#: Errors after which the next method is tried: the method cannot copy between these two files.
_UNSUPPORTED: Final = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})
#: Bytes the kernel copies per worker-thread hop (the hash reads back CHUNK_SIZE per hop, as a reader does).
_STEP: Final = 16 << 20
#: Steps the copy may run ahead of the hash.
_AHEAD: Final = 2
#: The buffer the hash reads the temporary file into (and pread/pwrite copies through), counted against PUT_BUDGET.
_BUFFER: Final = 1 << 20
#: The least an async file must hold to be copied by the kernel: a smaller one takes the pipeline's single hop.
#: Measured on ext4 (a VM, 2 cores), 1 GiB from ``anyio.open_file``: read, hash and write in the pipeline 1.4-2.3 s
#: (CPU 1.8-2.5 s), the kernel copy with the hash reading back 0.8-1.7 s (CPU 1.2-1.8 s): no user-space copy
#: of the source, and a hop per 16 MiB copied instead of three per 4 MiB.
LOCAL_MIN: Final = CHUNK_SIZE


class KernelCopy:
    """Copies a range of one file into the same range of another (the source's shifted by ``base``), by the first
    of ``methods`` that works."""

    def __init__(self, source: int, target: int, methods: Iterable[CopyMethod] = METHODS, *, base: int = 0) -> None:
        self._source = source
        self._target = target
        self._base = base
        self._methods = list(methods)
        self._buffer: bytearray | None = None
        #: The method in use (the first that has not failed as unsupported).
        self.method: CopyMethod = self._methods[0]

    def copy(self, offset: int, count: int) -> int:
        """Copy up to ``count`` bytes to ``offset`` from ``base + offset``; return how many (0: the source ends
        there). Blocking."""
        while True:
            try:
                return self._copy(self.method, offset, count)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED or len(self._methods) == 1:
                    raise
                self._methods.pop(0)
                self.method = self._methods[0]

    def _copy(self, method: CopyMethod, offset: int, count: int) -> int:
        at = self._base + offset
        if method == "copy_file_range":
            return os.copy_file_range(self._source, self._target, count, at, offset)
        if method == "sendfile":
            os.lseek(self._target, offset, os.SEEK_SET)  # sendfile writes at the target's position
            return os.sendfile(self._target, self._source, at, count)
        if self._buffer is None:
            self._buffer = bytearray(_BUFFER)
        view = memoryview(self._buffer)[: min(count, _BUFFER)]
        n = os.preadv(self._source, [view], at)
        os.lseek(self._target, offset, os.SEEK_SET)
        write_all(self._target, view[:n])
        return n


class _Clone:
    """One put from a file: the temporary file (a :class:`PendingBlob`'s), a read-back descriptor, the copier."""

    def __init__(
        self, pending: PendingBlob, source: int, offset: int, verifier: Verifier, methods: Iterable[CopyMethod]
    ) -> None:
        self.pending = pending
        self.source = source
        self.offset = offset
        self.verifier = verifier
        self.methods = tuple(methods)
        self.kernel: KernelCopy | None = None
        self.readback = -1
        self.buffer = bytearray(_BUFFER)

    def open(self) -> None:
        """Create the temporary file, and open it a second time to read back what lands in it."""
        pending = self.pending
        pending._open()
        fd = os.open(pending._name, READ_FLAGS, dir_fd=pending._engine._temp_dir())
        if os.fstat(fd).st_ino != os.fstat(pending._fd).st_ino:  # our private directory: cannot happen
            os.close(fd)
            raise OSError(errno.ESTALE, f"temporary file {pending._name} was replaced")
        self.readback = fd
        self.kernel = KernelCopy(self.source, pending._fd, self.methods, base=self.offset)

    def copy(self, start: int, end: int) -> int:
        """Copy ``[start, end)`` of the source into the temporary file; return where the copy stopped."""
        assert self.kernel is not None
        position = start
        while position < end:
            checkpoint()
            n = self.kernel.copy(position, end - position)
            if n == 0:
                break  # the source is shorter than it was: the hash will not match
            position += n
        return position

    def hash(self, start: int, end: int) -> None:
        """Read ``[start, end)`` back from the temporary file and hash it."""
        view = memoryview(self.buffer)
        while start < end:
            checkpoint()
            n = os.preadv(self.readback, [view[: min(_BUFFER, end - start)]], start)
            if n == 0:
                break  # shorter than copied: only if someone truncated our file; the check fails
            self.verifier.update(view[:n])
            start += n

    def commit(self) -> tuple[Digest, int]:
        self.close_readback()
        return self.pending._commit([])

    def close_readback(self) -> None:
        fd, self.readback = self.readback, -1
        if fd >= 0:
            os.close(fd)

    def abandon(self) -> None:
        self.close_readback()
        self.pending._abandon()


async def clone_blob(
    engine: DirEngine,
    source: int,
    size: int,
    verifier: Verifier,
    progress: Callable[[int], None] | None = None,
    *,
    offset: int = 0,
    methods: Iterable[CopyMethod] = METHODS,
) -> tuple[Digest, int]:
    """Store ``size`` bytes of the open file ``source``, from ``offset``, as a blob, if they pass ``verifier``.

    The kernel copies them into a temporary file while the bytes that landed there
    are read back and hashed (see the module doc for the guarantee); ``progress(n)``
    is called on the event loop thread as each stretch is verified. Cancellable
    between stretches; leaves nothing behind on failure.
    """
    clone = _Clone(PendingBlob(engine, verifier), source, offset, verifier, methods)
    budget = 2 * _BUFFER  # the read-back buffer, and pread/pwrite's if it comes to that
    await PUT_BUDGET.acquire(budget)
    try:
        await run_sync(clone.open)
        copied, arrivals = anyio.create_memory_object_stream[int](_AHEAD)

        async def copier() -> None:
            async with copied:
                position = 0
                while position < size:
                    end = min(position + _STEP, size)
                    reached = await run_sync(clone.copy, position, end)
                    clone.pending._unsynced += reached - position
                    position = reached
                    clone.pending._sync_soon(tg)  # the disk flushes while copy and hash go on
                    await copied.send(position)
                    if position < end:
                        return

        hashed = 0
        async with task_group() as tg:
            tg.start_soon(copier)
            async with arrivals:
                async for position in arrivals:
                    while hashed < position:  # in a reader's chunks: progress (and cancellation) at its pace
                        end = min(hashed + CHUNK_SIZE, position)
                        await run_sync(clone.hash, hashed, end)
                        if progress is not None:
                            progress(end - hashed)
                        hashed = end
        return await run_sync(clone.commit)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await run_sync(clone.abandon)
        raise
    finally:
        PUT_BUDGET.release(budget)


#: The file objects whose positions are their descriptor's: exactly these types (a subclass may show a window
#: of its file, as tarfile's members do, or read from something else).
_PLAIN_FILES: Final = (io.BufferedReader, io.BufferedRandom, io.FileIO)


def _plain_file(source: object) -> io.BufferedReader | io.BufferedRandom | io.FileIO | None:
    """The file object an :class:`anyio.AsyncFile` wraps, if it reads a descriptor's bytes as they are."""
    file = source.wrapped if isinstance(source, anyio.AsyncFile) else None
    if type(file) not in _PLAIN_FILES:
        return None  # text, a BytesIO, a subclass
    assert isinstance(file, _PLAIN_FILES)
    if not isinstance(file, io.FileIO) and type(file.raw) is not io.FileIO:
        return None
    return file


def _local_file(file: io.BufferedReader | io.BufferedRandom | io.FileIO) -> tuple[int, int, int] | None:
    """``(descriptor, position, bytes left)`` of ``file``, the descriptor a duplicate (ours to close), if it is a
    readable regular file with at least :data:`LOCAL_MIN` bytes left; ``None`` otherwise. Blocking."""
    if file.closed or not file.readable():
        return None
    fd = file.fileno()
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return None  # a pipe, a socket, a device: read as a stream (tell() would fail on some)
    if file.writable():
        file.flush()  # bytes written to its buffer would be read back through it: the kernel copies the file's
        st = os.fstat(fd)
    position = file.tell()  # a buffered file's own: what it has read ahead is not consumed
    if st.st_size - position < LOCAL_MIN:
        return None
    return os.dup(fd), position, st.st_size - position


def _stored(fd: int, file: io.BufferedReader | io.BufferedRandom | io.FileIO, end: int) -> None:
    """After a put from ``file``: close our duplicate ``fd``, and move ``file`` to ``end`` unless its owner
    closed it meanwhile (the blob is stored: nothing may make the put fail now)."""
    os.close(fd)
    with contextlib.suppress(ValueError):  # closed meanwhile
        file.seek(end)


async def put_local_file(engine: DirEngine, source: object, verifier: Verifier) -> tuple[Digest, int] | None:
    """Put ``source`` with :func:`clone_blob` if it is an :class:`anyio.AsyncFile` over a local regular file of
    at least :data:`LOCAL_MIN` bytes left, then position the file after what was stored; ``None``, having read
    nothing, if it is not.

    The file is stored from its position to the end it had when the put began (it is measured then: bytes
    appended meanwhile are not stored). With an expected size, one byte more than that is copied at most:
    enough for a longer file to fail the check. If the put fails, the file stays where it was.
    """
    file = _plain_file(source)
    if file is None:
        return None
    local = await run_sync(_local_file, file)
    if local is None:
        return None
    fd, position, size = local
    if verifier.size is not None:
        size = min(size, verifier.size + 1)
    try:
        digest, stored = await clone_blob(engine, fd, size, verifier, offset=position)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await run_sync(os.close, fd)  # in a thread: if the owner closed the file meanwhile, this is its last close
        raise
    with anyio.CancelScope(shield=True):
        await run_sync(_stored, fd, file, position + stored)
    return digest, stored
