"""The directory engine's put from a local file: the kernel copies the bytes, the put hashes what landed.

When a put's source is an unread :class:`~ocicas.BlobReader` over a file (another
layout's blob, as :func:`ocicas.copy` moves them), the bytes need not pass through
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

import errno
import os
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

__all__ = ["METHODS", "CopyMethod", "KernelCopy", "clone_blob"]

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


class KernelCopy:
    """Copies a range of one file into the same range of another, by the first of ``methods`` that works."""

    def __init__(self, source: int, target: int, methods: Iterable[CopyMethod] = METHODS) -> None:
        self._source = source
        self._target = target
        self._methods = list(methods)
        self._buffer: bytearray | None = None
        #: The method in use (the first that has not failed as unsupported).
        self.method: CopyMethod = self._methods[0]

    def copy(self, offset: int, count: int) -> int:
        """Copy up to ``count`` bytes at ``offset``; return how many (0: the source ends there). Blocking."""
        while True:
            try:
                return self._copy(self.method, offset, count)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED or len(self._methods) == 1:
                    raise
                self._methods.pop(0)
                self.method = self._methods[0]

    def _copy(self, method: CopyMethod, offset: int, count: int) -> int:
        if method == "copy_file_range":
            return os.copy_file_range(self._source, self._target, count, offset, offset)
        if method == "sendfile":
            os.lseek(self._target, offset, os.SEEK_SET)  # sendfile writes at the target's position
            return os.sendfile(self._target, self._source, offset, count)
        if self._buffer is None:
            self._buffer = bytearray(_BUFFER)
        view = memoryview(self._buffer)[: min(count, _BUFFER)]
        n = os.preadv(self._source, [view], offset)
        os.lseek(self._target, offset, os.SEEK_SET)
        write_all(self._target, view[:n])
        return n


class _Clone:
    """One put from a file: the temporary file (a :class:`PendingBlob`'s), a read-back descriptor, the copier."""

    def __init__(self, pending: PendingBlob, source: int, verifier: Verifier, methods: Iterable[CopyMethod]) -> None:
        self.pending = pending
        self.source = source
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
        self.kernel = KernelCopy(self.source, pending._fd, self.methods)

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
    methods: Iterable[CopyMethod] = METHODS,
) -> tuple[Digest, int]:
    """Store the first ``size`` bytes of the open file ``source`` as a blob, if they pass ``verifier``.

    The kernel copies them into a temporary file while the bytes that landed there
    are read back and hashed (see the module doc for the guarantee); ``progress(n)``
    is called on the event loop thread as each stretch is verified. Cancellable
    between stretches; leaves nothing behind on failure.
    """
    clone = _Clone(PendingBlob(engine, verifier), source, verifier, methods)
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
