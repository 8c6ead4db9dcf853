"""The directory engine's put: a pipeline from the source into a temporary file, then a rename.

Large blobs flow through three stages at once (hashlib and write release the
GIL): the source is read on the event loop while the previous batch is hashed
and the one before it is written, each stage a :class:`~ocicas._threads.ThreadStage`.
The hashing thread takes batch after batch with no turn of the loop; the writing
thread tells the loop of each batch written (the budget, the buffers, the
``fdatasync``), waiting for it, off the hash's path. A source lent by a
verifying reader (a pull) has two: the writer hashes what it writes; or one, when
the source can pour (a registry body on a plain socket): worker threads receive,
hash and write it, a few MiB a hop, with no event loop in between. Every 64 MiB
written, an ``fdatasync`` starts beside the writer, not in its way (the kernel
copy of ``clone.py`` does the same), so the disk flushes while writing and
hashing go on and the final fsync has little left to do. A blob smaller than
one batch takes a single thread hop from open to rename. On a layout opened with
``direct_writes``, a put known to hold :data:`~.direct.DIRECT_MIN` or more writes
through a :class:`~.direct.DirectWriter` (``O_DIRECT``), the one switch in ``_write``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Final

import anyio
import anyio.from_thread
import anyio.lowlevel

from .._budget import PUT_BUDGET
from .._digest import Digest, Verifier
from .._errors import NotDurableError
from .._source import BlobSource, iterate_source, reads_async
from .._syncs import BLOB_SYNCS
from .._tasks import task_group
from .._threads import CHUNK_SIZE, ThreadStage, checkpoint, run_sync
from .direct import DIRECT_MIN, DirectWriter
from .fs import blobs_held, group_sync, open_blob, write_pieces

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from .._reader import RawBlob
    from .engine import DirEngine

__all__ = ["LentRaw", "PendingBlob"]

#: put_blob hands the worker threads this much at a time.
_PIPELINE_BATCH: Final = CHUNK_SIZE
#: Batches waiting between the stages of put_blob's pipeline (a streamed put's memory is bounded by the budget).
_PIPELINE_DEPTH: Final = 2
# A vouched put (the source is a verifying BlobReader that could not lend its source, see below) only counts what
# it writes, on the event loop, and hands each batch straight to the writer (no queue): one thread hop per batch.
#: A vouched put reads and writes this much at a time.
_VOUCHED_BATCH: Final = 512 << 10
#: Batches waiting between the stages of a vouched put: none, the writer takes each as it comes.
_VOUCHED_DEPTH: Final = 0
# A lent put (an unread verifying reader lent its async source, as in a pull from a registry) is hashed by the
# thread that writes it, one hop per batch, while the event loop receives the next batch: the loop hashes nothing.
# Batch size is memory against hops: a 1 GiB pull (4 layers at once) holds about two batches per layer. Measured
# with 512 KiB socket reads: 1 MiB batches took 3.6-3.9 s of CPU at 52-54 MiB peak RSS (the reader hashing 512 KiB
# batches on the loop before: 5.3-5.6 s, 55-57 MiB). Now the socket is received into this put's reused buffers
# (LentRaw.readinto): 2.8-3.3 s at 48-52 MiB; 2 MiB batches took 55-57 MiB for no clear gain.
#: A lent put hands the writer this much at a time.
_LENT_BATCH: Final = 1 << 20
#: A poured put (``_pour``) comes back to the event loop after this many bytes: its progress is told, an
#: ``fdatasync`` started, every so often.
_POUR_HOP: Final = 4 << 20
#: Room a streamed put is admitted with, before it knows the size of its source's chunks.
_FIRST_SLOT: Final = 1 << 20
#: The least a streamed put reads from a file at once, however small its bound.
_MIN_READ: Final = 64 << 10
#: put_blob syncs each time this much more is written, so the disk works while hashing goes on.
_SYNC_EVERY: Final = 64 << 20

_Chunk = bytes | bytearray | memoryview
_Batch = list[_Chunk]


class LentRaw:
    """A reader's raw source lent to a put (``BlobReader._borrow_raw``): read like a file, within its size."""

    def __init__(self, raw: RawBlob, on_read: Callable[[int], None] | None) -> None:
        self._raw = raw
        self._on_read = on_read
        self._left = raw.size

    async def read(self, n: int = -1, /) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        if n <= 0:
            return b""
        chunk = await self._raw.read_some(n)
        if len(chunk) > n:
            raise RuntimeError(f"{type(self._raw).__name__}.read_some({n}) returned {len(chunk)} bytes")
        self._left -= len(chunk)
        if chunk and self._on_read is not None:
            self._on_read(len(chunk))
        return chunk

    async def readinto(self, buffer: memoryview, /) -> int:
        """Fill ``buffer`` (fewer bytes only at the end): the put's own buffers, reused, which a network
        source receives into."""
        n = min(len(buffer), self._left)
        if n <= 0:
            return 0
        got = await self._raw.readinto(buffer[:n] if n < len(buffer) else buffer)
        if not 0 <= got <= n:
            raise RuntimeError(f"{type(self._raw).__name__}.readinto() of {n} bytes returned {got}")
        self._left -= got
        if got and self._on_read is not None:
            self._on_read(got)
        return got

    async def pour(self, buffer: memoryview, sink: Callable[[memoryview], None], limit: int) -> int | None:
        """Move up to ``limit`` next bytes into ``sink`` in a worker thread (``RawBlob.pour``); ``None`` if the
        source cannot (read it with :meth:`readinto`)."""
        n = min(limit, self._left)
        if n <= 0:
            return 0
        got = await self._raw.pour(buffer, sink, n)
        if got is None:
            return None
        if not 0 <= got <= n:
            raise RuntimeError(f"{type(self._raw).__name__}.pour() of {n} bytes returned {got}")
        self._left -= got
        if got and self._on_read is not None:
            self._on_read(got)
        return got


def _frozen(chunk: _Chunk) -> bytes | memoryview:
    """``chunk``, copied if its bytes could change while it waits in the pipeline (a reused buffer)."""
    if isinstance(chunk, bytes) or (isinstance(chunk, memoryview) and chunk.readonly):
        return chunk
    return bytes(chunk)


def _not_durable(digest: Digest, exc: OSError) -> NotDurableError:
    """The error of a put whose blob was renamed into place (visible) but whose directory fsync failed."""
    error = NotDurableError(
        f"blob {digest} is stored and visible, but syncing its directory failed ({exc.strerror or exc}): "
        "it may not survive a crash; putting it again (put_blob, in this process) makes it durable"
    )
    error.errno, error.strerror = exc.errno, exc.strerror
    return error


class PendingBlob:
    """A blob on its way in: a temporary file, fed by a pipeline of reading, hashing and writing.

    A streamed put counts its memory against :data:`PUT_BUDGET` (see :mod:`ocicas._budget`):
    ``_slot`` covers the newest chunk taken from the source (which the source may
    still hold), ``_extra`` the older chunks not yet written. Before each read every
    unwritten byte must be covered by ``_extra``, taken without waiting; when it does
    not fit, the put hands what it has to the pipeline and waits for its own writes.
    Only admission (the first ``_slot``) waits for other puts, holding nothing.
    """

    def __init__(
        self,
        engine: DirEngine,
        verifier: Verifier,
        *,
        vouched: bool = False,
        lent: bool = False,
        size: int | None = None,
    ) -> None:
        self._engine = engine
        self._verifier = verifier
        self._size = size  # the source's own size, if it knows it (a BlobReader's)
        # the source is a BlobReader of this very digest: it verifies, so the bytes are only counted here
        self._vouched = vouched
        # the source is a LentRaw: the writer hashes each batch in the hop that writes it
        self._lent = lent
        self._batch = _LENT_BATCH if lent else _VOUCHED_BATCH if vouched else _PIPELINE_BATCH
        self._depth = _VOUCHED_DEPTH if vouched or lent else _PIPELINE_DEPTH
        self._name = ""  # named in _open, in a worker thread: os.urandom lets go of the GIL, costly on the loop
        self._fd = -1
        # a put known to be large by its first write (its size, or what it has read), of a layout opened with
        # direct_writes, writes through this
        self._large = False
        self._direct: DirectWriter | None = None
        self._unsynced = 0  # bytes written since the last fdatasync began
        self._syncing = False
        self._budgeted = False  # whether chunks count against PUT_BUDGET (streams do; bytes are already held)
        self._slot = 0  # budget held for the newest chunk
        self._extra = 0  # budget held for older chunks not yet written
        self._unwritten = 0  # bytes taken from the source and not yet written
        self._in_flight = 0  # batches sent down the pipeline and not yet written
        self._per_put = 0  # the most this put may hold (PUT_BUDGET.holder_limit when it started)
        self._progress: anyio.Event | None = None  # set when the writer has written a batch
        # a file with readinto is read into buffers of this put, reused once written: no allocation (and no
        # page faults) per chunk; the budget then counts every buffer made, until the put ends
        self._free: list[bytearray] | None = None
        self._buffers = 0  # buffers made
        self._buffer_size = 0

    async def put(self, source: BlobSource) -> tuple[Digest, int]:
        """Consume ``source`` and commit it; on any failure, leave nothing behind."""
        self._budgeted = not isinstance(source, bytes | bytearray | memoryview)
        read_size = CHUNK_SIZE
        if self._budgeted:
            self._per_put = PUT_BUDGET.holder_limit
            # a file is read in pieces that leave room for the pipeline; an iterator's chunks are its own
            # (a vouched source, copy's reader, a batch at a time: its chunks are what a copy holds in flight)
            batch = self._batch if self._vouched or self._lent else CHUNK_SIZE
            read_size = max(_MIN_READ, min(batch, self._per_put // 4))
            # a file yields what it is asked for; an iterator's chunks are guessed, then counted as they come
            slot = read_size if reads_async(source) else min(_FIRST_SLOT, read_size)
            if reads_async(source) and inspect.iscoroutinefunction(getattr(source, "readinto", None)):
                self._free, self._buffer_size = [], read_size
        try:
            if self._budgeted:
                await PUT_BUDGET.acquire(slot)  # cancelled while it waits, it holds nothing: nor may we give back
                self._slot = slot
            poured = await self._pour(source, read_size) if self._lent and isinstance(source, LentRaw) else None
            tail = [] if poured else await self._take(source, read_size)
            return await run_sync(self._commit, tail)  # small blobs: open, write and commit in one hop
        except BaseException:
            with anyio.CancelScope(shield=True):
                await run_sync(self._abandon)
            raise
        finally:
            # the budget is given back after the source is closed (by _take): nothing of it is held any more
            if self._budgeted and (self._slot or self._extra):
                PUT_BUDGET.release(self._slot + self._extra)
                self._slot = self._extra = 0

    def _known_large(self, taken: int) -> bool:
        """Whether this put is large enough to write past the page cache (if asked), known from a size or from
        the ``taken`` bytes read before its first write."""
        return max(taken, self._verifier.size or 0, self._size or 0) >= DIRECT_MIN

    def _room(self) -> bool:
        """Whether the next chunk may be read now: every unwritten byte covered by ``_extra``, within the per-put bound.

        The next chunk becomes the newest (covered by ``_slot``); all unwritten ones are then older.
        """
        if not self._budgeted:
            return True
        if self._free is not None:
            if self._free:
                return True
            if self._buffers:  # the first buffer is the slot
                if (self._buffers + 1) * self._buffer_size > self._per_put:
                    return False
                if not PUT_BUDGET.try_acquire(self._buffer_size):
                    return False
                self._extra += self._buffer_size
            self._free.append(bytearray(self._buffer_size))
            self._buffers += 1
            return True
        need = self._unwritten - self._extra
        if need <= 0:
            return True
        if self._unwritten + self._slot > self._per_put or not PUT_BUDGET.try_acquire(need):
            return False
        self._extra += need
        return True

    def _taken(self, n: int) -> None:
        """Count a chunk of ``n`` bytes just read: it is the newest now, so ``_slot`` takes its size."""
        self._unwritten += n
        if self._budgeted and self._free is None and n and n != self._slot:  # an empty chunk changes nothing
            if n > self._slot:
                PUT_BUDGET.take(n - self._slot)  # already in memory: counted at once
            else:
                PUT_BUDGET.release(self._slot - n)
            self._slot = n

    def _written(self, batch: _Batch) -> None:
        """A batch is on disk: drop it, and give back the budget of the older chunks it held."""
        self._unwritten -= sum(map(len, batch))
        if self._free is not None:
            for chunk in batch:
                assert isinstance(chunk, memoryview)
                buffer = chunk.obj
                assert isinstance(buffer, bytearray)
                try:
                    chunk.release()  # any later use raises, rather than see the buffer refilled
                except BufferError:  # still viewed somewhere: not reused
                    buffer = bytearray(self._buffer_size)
                self._free.append(buffer)
        batch.clear()  # the hasher's reference is this same list: nothing keeps the chunks now
        if self._budgeted and self._free is None:
            older = max(0, self._unwritten - self._slot)  # still unwritten, but for the newest chunk
            if self._extra > older:
                PUT_BUDGET.release(self._extra - older)
                self._extra = older
        if self._progress is not None:
            self._progress.set()

    async def _wait_until(self, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()`` (checked again each time a batch is written): before reading, for room (the caller
        has handed every unwritten batch to the pipeline); before sending, for a place in the pipeline."""
        while True:
            self._progress = progress = anyio.Event()
            if ready():
                return
            await progress.wait()

    async def _read_into(self, source: BlobSource) -> AsyncGenerator[memoryview, None]:
        """Read a file with ``readinto`` into this put's buffers; :meth:`_room` has made one free before each read."""
        readinto = source.readinto  # type: ignore[union-attr]
        assert self._free is not None
        while True:
            buffer = self._free.pop()
            n = await readinto(memoryview(buffer))
            if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(buffer):
                raise TypeError(f"blob source readinto() returned {n!r}, expected a count of bytes")
            if not n:
                self._free.append(buffer)
                return
            chunk = memoryview(buffer).toreadonly()[:n]
            del buffer  # the chunk is all that refers to it: when written, the buffer is free again
            yield chunk
            del chunk

    async def _pour(self, source: LentRaw, size: int) -> bool:
        """Have worker threads receive ``source`` and hash and write it, a buffer at a time, with no event loop
        turn in between (``LentRaw.pour``); ``False``, having read nothing, if it cannot (read it with _take).

        One buffer of ``size`` (the slot the budget holds), reused; a hop every :data:`_POUR_HOP` bytes (the
        ``fdatasync`` every :data:`_SYNC_EVERY` is started between hops).
        """
        view = memoryview(bytearray(size))
        self._large = self._known_large(0)
        async with task_group() as tg:
            while True:
                moved = await source.pour(view, self._sink, _POUR_HOP)
                if moved is None:
                    return False
                if not moved:
                    return True
                self._sync_soon(tg)

    def _sink(self, chunk: memoryview) -> None:
        """In a worker thread (``_pour``): hash and write ``chunk``."""
        self._write([chunk])

    def _open(self) -> None:
        if self._fd < 0:
            temp = self._engine._temp_dir()
            self._name = f"blob-{secrets.token_hex(8)}"
            self._fd = os.open(self._name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=temp)

    def _hash(self, batch: _Batch) -> None:
        for chunk in batch:
            checkpoint()
            self._verifier.update(chunk)

    def _count(self, batch: _Batch) -> None:
        for chunk in batch:
            self._verifier.count(chunk)

    def _sync_soon(self, tg: TaskGroup) -> None:
        """Every :data:`_SYNC_EVERY` bytes written, start an ``fdatasync`` in ``tg``: beside the writer, not in its
        way, so the disk flushes while writing and hashing go on; one at a time (a running one covers the rest)."""
        if self._unsynced >= _SYNC_EVERY and not self._syncing:
            self._syncing, self._unsynced = True, 0
            tg.start_soon(self._sync)

    async def _sync(self) -> None:
        try:
            await run_sync(os.fdatasync, self._fd)
        finally:
            self._syncing = False

    def _write(self, batch: _Batch) -> None:
        self._open()
        if self._large and self._direct is None and self._engine._direct_writes:
            self._direct = DirectWriter(self._fd)
        direct = self._direct
        hashing = self._lent
        for chunk in batch:
            checkpoint()
            if hashing:
                self._verifier.update(chunk)
            if direct is not None:
                direct.write(chunk)
            else:
                write_pieces(self._fd, chunk)
            self._unsynced += len(chunk)

    async def _take(self, source: BlobSource, read_size: int) -> _Batch:
        """Consume ``source``: hash and write all of it but a tail smaller than a batch, which is returned."""
        batch: _Batch = []
        pending = total = 0
        reader = iterate_source(source, read_size) if self._free is None else self._read_into(source)
        async with aclosing(reader) as chunks:
            while True:
                if not self._room():  # no room: what we hold goes down the pipeline meanwhile
                    return await self._pipeline(batch, total, chunks)
                try:
                    chunk = _frozen(await chunks.__anext__())
                except StopAsyncIteration:
                    return batch
                self._taken(len(chunk))
                total += len(chunk)
                self._verifier.check_total(total)  # an oversized stream stops now, not a batch later
                batch.append(chunk)
                pending += len(chunk)
                del chunk  # once written, nothing may keep it: this frame waits on the pipeline below
                if pending >= self._batch:
                    return await self._pipeline(batch, total, chunks)

    async def _pipeline(
        self, first: _Batch, total: int, chunks: AsyncIterator[bytes | bytearray | memoryview]
    ) -> _Batch:
        """Hash and write ``first`` and the rest of ``chunks`` in stages of their own (:class:`ThreadStage`), all
        but a tail smaller than a batch, which is returned once everything before it is written."""
        self._large = self._known_large(total)
        # a hashing stage of its own only when the source neither verifies (vouched) nor is hashed by the writer (lent)
        staged = not (self._vouched or self._lent)
        # batches sent and not yet written: a queue of _depth before each stage, one in each, and one more, so
        # that a stage done with one finds the next queued (else it stops, and the next costs a hop to start);
        # what a stream holds is bounded by the budget first (_room), and bytes are in memory already
        most = (self._depth + 1) * (2 if staged else 1) + 1

        def hash_batch(batch: _Batch) -> None:
            self._hash(batch)
            to_write.put(batch)

        def write_batch(batch: _Batch) -> None:
            self._write(batch)
            # waits for the loop: an error there reaches this stage's task, and the put never ends before it
            anyio.from_thread.run_sync(wrote, batch)

        def wrote(batch: _Batch) -> None:
            self._in_flight -= 1
            self._written(batch)  # empties the list the hasher had too: no chunk is held after
            self._sync_soon(tg)

        async def send(batch: _Batch) -> None:
            if self._vouched:  # only counted, here: no hop for that
                self._count(batch)
            await self._wait_until(lambda: self._in_flight < most)
            self._in_flight += 1
            to_hash.put(batch)
            await anyio.lowlevel.checkpoint()

        batch: _Batch = []
        pending = 0
        to_write = ThreadStage[_Batch](write_batch)
        to_hash = ThreadStage[_Batch](hash_batch) if staged else to_write
        async with task_group() as tg:
            tg.start_soon(to_write.serve)
            if staged:
                tg.start_soon(to_hash.serve)
            if first:
                await send(first)
            while True:
                if not self._room():
                    if batch:  # never wait for room holding a partial batch: our own writes free the room
                        await send(batch)
                        batch, pending = [], 0
                    await self._wait_until(self._room)
                try:
                    chunk = _frozen(await chunks.__anext__())
                except StopAsyncIteration:
                    break
                self._taken(len(chunk))
                total += len(chunk)
                self._verifier.check_total(total)
                batch.append(chunk)
                pending += len(chunk)
                del chunk
                if pending >= self._batch:
                    await send(batch)
                    batch, pending = [], 0
            await self._wait_until(lambda: not self._in_flight)
            to_hash.close()
            to_write.close()
        return batch

    def _commit(self, batch: _Batch) -> tuple[Digest, int]:
        """Take the last batch, verify, fsync and move the file into ``blobs/`` (or freshen a present copy)."""
        if self._vouched:
            self._count(batch)
        elif not self._lent:  # a lent put's writer hashes
            self._hash(batch)
        self._write(batch)
        if self._direct is not None:
            self._direct.finish()
        verifier = self._verifier
        if self._vouched:  # the reader raised before its end had the content been wrong
            if verifier.size is not None and verifier.received != verifier.size:
                verifier.verify()  # raises SizeMismatchError
            assert verifier.digest is not None
            digest = verifier.digest
        else:
            digest = verifier.verify()
        size = verifier.received
        with BLOB_SYNCS.admitted():  # a short queue before the disk, for the index commits tags wait on
            os.fsync(self._fd)
        checkpoint()
        engine = self._engine
        alg = engine._alg_dir(digest.algorithm, create=True)
        name = digest.encoded
        try:
            with group_sync(alg).change(name) as change:
                with blobs_held(alg):  # no collector unlinks the blob meanwhile
                    held = open_blob(alg, name, f"blob path of {digest}")
                    try:
                        if held is not None and os.fstat(held).st_size == size and not change.suspect:
                            os.utime(held)  # freshen, as git does
                        else:  # absent, a damaged copy of the wrong size, or one whose rename may be lost
                            change.renaming = True
                            os.rename(self._name, name, src_dir_fd=engine._temp_dir(), dst_dir_fd=alg)
                    finally:
                        if held is not None:
                            os.close(held)
                try:
                    # a copy found present may rest on a rename not yet synced (another put's, another process's)
                    change.sync(alg)
                except OSError as exc:
                    raise _not_durable(digest, exc) from exc.__cause__
        finally:
            os.close(alg)
        self._abandon()  # the temporary file is only still there when the blob was already present
        return digest, size

    def _abandon(self) -> None:
        """Close and remove the temporary file, if any. Idempotent."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._name, dir_fd=self._engine._temp_dir())
