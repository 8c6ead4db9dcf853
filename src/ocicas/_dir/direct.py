"""Direct writes: a large put's bytes go to the disk past the page cache (``O_DIRECT``), when a layout asks.

A durable put must get every byte onto the disk before it returns; through the
page cache it also copies each into a fresh page of kernel memory first. Where
touching fresh memory is costly (a VM whose host takes back freed memory, as on
the project's CI-class machine: ``dd`` of 1 GiB with ``conv=fsync`` after a pause
3.3-4.3 s, with ``oflag=direct`` 0.65-0.72 s), or where a server should not push
its working set out of the cache with blobs it will not read soon,
``open_layout(path, direct_writes=True)`` writes puts of :data:`DIRECT_MIN` or more
with ``O_DIRECT``. The cost: the first read of such a blob comes from the disk.

``O_DIRECT`` needs aligned memory, offsets and lengths. Each write goes through one
of a few page-aligned staging buffers shared by the process (:data:`STAGE_SIZE`
each, :data:`STAGE_BUFFERS` in all, made when first needed, made anew in a forked
child): the bytes are copied in, the whole :data:`ALIGN` blocks written, the rest
carried to the next write; the last few bytes are written plainly at the end. A
file system that refuses ``O_DIRECT`` (on the ``fcntl`` or on a write: ``EINVAL``),
or a system without it (macOS), gets plain writes from there on, the same bytes.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from typing import Final

from .._threads import CHUNK_SIZE, POLL_INTERVAL, checkpoint
from .fs import write_pieces

__all__ = ["ALIGN", "DIRECT_MIN", "STAGE_BUFFERS", "STAGE_SIZE", "DirectWriter"]

#: The least a put must be known to hold (by its size, or by what it read before its first write) to be
#: written directly: a smaller one is written and read back in a moment, from the cache.
DIRECT_MIN: Final = CHUNK_SIZE

#: Offsets and lengths of direct writes are multiples of this (the largest logical block size in common use).
ALIGN: Final = 4096
#: The size of one staging buffer: the most one direct write takes. Measured (1 GiB, ext4 on a virtual disk):
#: 256 KiB writes 0.80 s, 1 MiB 0.48 s, 4 MiB 0.39 s.
STAGE_SIZE: Final = 1 << 20
#: Staging buffers in the process: as many direct writes can be under way at once.
STAGE_BUFFERS: Final = 4


class _Stages:
    """The process's staging buffers, page-aligned (``mmap``), lent to one writing thread at a time."""

    def __init__(self, count: int, size: int) -> None:
        self._count = count
        self._size = size
        self.reset()

    def reset(self) -> None:
        """Forget every buffer: in a forked child, whose copies are its parent's bytes, not its own to lend."""
        self._left = self._count  # buffers not made yet
        self._free: list[mmap.mmap] = []
        self._ready = threading.Condition()

    def take(self) -> mmap.mmap:
        """A free buffer, made if none is and fewer than ``count`` exist; blocking, cancellable in a worker thread."""
        with self._ready:
            while not self._free:
                if self._left:
                    # private: a forked child writing its copy never changes the parent's
                    buffer = mmap.mmap(-1, self._size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                    self._left -= 1
                    return buffer
                self._ready.wait(POLL_INTERVAL)
                checkpoint()
            return self._free.pop()

    def give(self, buffer: mmap.mmap) -> None:
        with self._ready:
            self._free.append(buffer)
            self._ready.notify()


_STAGES: Final = _Stages(STAGE_BUFFERS, STAGE_SIZE)
os.register_at_fork(after_in_child=_STAGES.reset)


#: The flag, where the system has it (Linux, the BSDs); elsewhere (macOS) puts write plainly.
_O_DIRECT: Final = getattr(os, "O_DIRECT", 0)


def _set_direct(fd: int, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for ``fd``; whether it is now as asked (``False``: the system refuses)."""
    if not _O_DIRECT:
        return not on
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT if on else flags & ~_O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    return True


class DirectWriter:
    """Appends to a new, empty file ``fd`` with ``O_DIRECT`` where the file system takes it. Blocking (worker threads).

    Call :meth:`finish` after the last :meth:`write`: it writes the bytes still carried.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._carry = bytearray()  # fewer than ALIGN bytes, not yet written
        #: Whether writes still go past the page cache.
        self.direct = _set_direct(fd, True)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if not self.direct:
            write_pieces(self._fd, view)
            return
        while view:
            buffer = _STAGES.take()
            try:
                carried = len(self._carry)
                buffer[:carried] = self._carry
                n = min(len(view), STAGE_SIZE - carried)
                buffer[carried : carried + n] = view[:n]
                view = view[n:]
                filled = carried + n
                whole = filled - filled % ALIGN
                if whole:
                    self._write_direct(memoryview(buffer)[:whole])
                self._carry[:] = buffer[whole:filled]
            finally:
                _STAGES.give(buffer)
            if not self.direct:  # refused meanwhile: the rest goes plainly
                write_pieces(self._fd, self._carry)
                self._carry.clear()
                write_pieces(self._fd, view)
                return

    def _write_direct(self, view: memoryview) -> None:
        while view:
            try:
                n = os.write(self._fd, view)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # refused (a file system that took the flag, not this write): the rest plainly, where it stopped
                self._refuse()
                write_pieces(self._fd, view)
                return
            view = view[n:]

    def _refuse(self) -> None:
        self.direct = False
        _set_direct(self._fd, False)

    def finish(self) -> None:
        """Write what is carried, plainly (a direct write needs a whole block)."""
        if self.direct:
            self._refuse()
        write_pieces(self._fd, self._carry)
        self._carry.clear()
