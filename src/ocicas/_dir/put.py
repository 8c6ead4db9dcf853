"""The directory engine's put: a pipeline from the source into a temporary file, then a rename.

Large blobs flow through three stages at once, each on its own worker thread
when it runs (hashlib and write release the GIL): the source is read while the
previous batch is hashed and the one before it is written. The writer also
syncs as it goes, so the disk flushes while hashing continues and the final
fsync has little left to do. A blob smaller than one batch takes a single
thread hop from open to rename.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Final

import anyio

from .._budget import PUT_BUDGET
from .._digest import Digest, Verifier
from .._source import BlobSource, iterate_source
from .._tasks import task_group
from .._threads import CHUNK_SIZE, checkpoint, run_sync
from .fs import blobs_held, open_blob, write_all

if TYPE_CHECKING:
    from .engine import DirEngine

__all__ = ["PendingBlob"]

#: put_blob hands the worker threads this much at a time.
_PIPELINE_BATCH: Final = CHUNK_SIZE
#: Batches waiting between the stages of put_blob's pipeline (with those in work: ≈ 7 batches in memory).
_PIPELINE_DEPTH: Final = 2
# issue 16 (memory): a vouched put (the source is a verifying BlobReader, as in copy) only counts, so its
# pipeline is shallow and its batches small, and it reads its source a batch at a time: with copy's 4 transfers at
# once, a few MiB in all (a whole 1 GiB pull from a registry stays under 64 MiB of RSS) instead of 4 x 28 MiB.
#: A vouched put hands the worker threads this much at a time.
_VOUCHED_BATCH: Final = 256 << 10
#: Batches waiting between the stages of a vouched put.
_VOUCHED_DEPTH: Final = 1
#: put_blob syncs each time this much more is written, so the disk works while hashing goes on.
_SYNC_EVERY: Final = 64 << 20

_Chunk = bytes | bytearray | memoryview
_Batch = list[_Chunk]


def _frozen(chunk: _Chunk) -> bytes | memoryview:
    """``chunk``, copied if its bytes could change while it waits in the pipeline (a reused buffer)."""
    if isinstance(chunk, bytes) or (isinstance(chunk, memoryview) and chunk.readonly):
        return chunk
    return bytes(chunk)


class PendingBlob:
    """A blob on its way in: a temporary file, fed by a pipeline of reading, hashing and writing."""

    def __init__(self, engine: DirEngine, verifier: Verifier, *, vouched: bool = False) -> None:
        self._engine = engine
        self._verifier = verifier
        # the source is a BlobReader of this very digest: it verifies, so the bytes are only counted here
        self._vouched = vouched
        self._batch = _VOUCHED_BATCH if vouched else _PIPELINE_BATCH
        self._depth = _VOUCHED_DEPTH if vouched else _PIPELINE_DEPTH
        self._name = f"blob-{secrets.token_hex(8)}"
        self._fd = -1
        self._unsynced = 0
        self._budgeted = False  # whether chunks count against PUT_BUDGET (streams do; bytes are already held)
        self._held = 0  # bytes of PUT_BUDGET this put holds
        self._guess = 1 << 20  # bytes reserved before reading a chunk: the size of the last one

    async def put(self, source: BlobSource) -> tuple[Digest, int]:
        """Consume ``source`` and commit it; on any failure, leave nothing behind."""
        self._budgeted = not isinstance(source, bytes | bytearray | memoryview)
        self._guess = min(self._guess, PUT_BUDGET.limit)
        try:
            tail = await self._take(source)
            return await run_sync(self._commit, tail)  # small blobs: open, write and commit in one hop
        except BaseException:
            with anyio.CancelScope(shield=True):
                await run_sync(self._abandon)
            raise
        finally:
            if self._held:
                PUT_BUDGET.release(self._held)
                self._held = 0

    def _try_reserve(self, n: int) -> bool:
        """Count ``n`` bytes against the process-wide budget if they fit now; whether they did."""
        if not self._budgeted:
            return True
        if PUT_BUDGET.try_acquire(n):
            self._held += n
            return True
        return False

    async def _reserve(self, n: int) -> None:
        """Count ``n`` bytes just taken from the source against the process-wide budget, waiting for room."""
        if self._budgeted:
            await PUT_BUDGET.acquire(n)
            self._held += n

    def _unreserve(self, n: int) -> None:
        """Give back ``n`` reserved bytes (a negative ``n`` takes more, without waiting)."""
        if self._budgeted and n:
            self._held -= n
            PUT_BUDGET.release(n)

    def _written(self, batch: _Batch) -> None:
        """Give back the budget of a batch now on disk."""
        if self._budgeted:
            n = sum(map(len, batch))
            self._held -= n
            PUT_BUDGET.release(n)

    def _open(self) -> None:
        if self._fd < 0:
            temp = self._engine._temp_dir()
            self._fd = os.open(self._name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=temp)

    def _hash(self, batch: _Batch) -> None:
        account = self._verifier.count if self._vouched else self._verifier.update
        for chunk in batch:
            checkpoint()
            account(chunk)

    def _write(self, batch: _Batch) -> None:
        self._open()
        for chunk in batch:
            checkpoint()
            write_all(self._fd, chunk)
            self._unsynced += len(chunk)
        if self._unsynced >= _SYNC_EVERY:
            os.fdatasync(self._fd)
            self._unsynced = 0

    async def _read(self, chunks: AsyncIterator[bytes | bytearray | memoryview]) -> _Chunk | None:
        """The next chunk of the source (``None`` at its end), read with ``self._guess`` bytes reserved for it."""
        guess = self._guess
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            self._unreserve(guess)
            return None
        n = len(chunk)
        # the surplus goes back; a chunk bigger than reserved is counted at once (at most one chunk over)
        self._unreserve(guess - n)
        if n:
            self._guess = n
        return chunk

    async def _take(self, source: BlobSource) -> _Batch:
        """Consume ``source``: hash and write all of it but a tail smaller than a batch, which is returned."""
        batch: _Batch = []
        pending = total = 0
        # a vouched source is read a batch at a time: its chunks are what a copy holds in flight
        async with aclosing(iterate_source(source, _VOUCHED_BATCH if self._vouched else CHUNK_SIZE)) as chunks:
            while True:
                if not self._try_reserve(self._guess):  # no room: what we hold goes down the pipeline meanwhile
                    return await self._pipeline(batch, total, chunks)
                chunk = await self._read(chunks)
                if chunk is None:
                    return batch
                total += len(chunk)
                self._verifier.check_total(total)  # an oversized stream stops now, not a batch later
                batch.append(_frozen(chunk))
                pending += len(chunk)
                if pending >= self._batch:
                    return await self._pipeline(batch, total, chunks)

    async def _pipeline(
        self, first: _Batch, total: int, chunks: AsyncIterator[bytes | bytearray | memoryview]
    ) -> _Batch:
        to_hash, hashing = anyio.create_memory_object_stream[_Batch](self._depth)
        to_write, writing = anyio.create_memory_object_stream[_Batch](self._depth)

        async def hasher() -> None:
            async with hashing, to_write:
                async for batch in hashing:
                    await run_sync(self._hash, batch)
                    await to_write.send(batch)
                    del batch  # not held (outside the budget) while waiting for the next one

        async def writer() -> None:
            async with writing:
                async for batch in writing:
                    await run_sync(self._write, batch)
                    self._written(batch)
                    del batch  # given back to the budget: not held while waiting for the next one

        batch: _Batch = []
        pending = 0
        async with task_group() as tg:
            tg.start_soon(hasher)
            tg.start_soon(writer)
            async with to_hash:
                if first:
                    await to_hash.send(first)
                while True:
                    if not self._try_reserve(self._guess):
                        if batch:  # never wait for room holding a partial batch: all could wait so
                            await to_hash.send(batch)
                            batch, pending = [], 0
                        await self._reserve(self._guess)
                    chunk = await self._read(chunks)
                    if chunk is None:
                        break
                    total += len(chunk)
                    self._verifier.check_total(total)
                    batch.append(_frozen(chunk))
                    pending += len(chunk)
                    if pending >= self._batch:
                        await to_hash.send(batch)
                        batch, pending = [], 0
        return batch

    def _commit(self, batch: _Batch) -> tuple[Digest, int]:
        """Take the last batch, verify, fsync and move the file into ``blobs/`` (or freshen a present copy)."""
        self._hash(batch)
        self._write(batch)
        verifier = self._verifier
        if self._vouched:  # the reader raised before its end had the content been wrong
            if verifier.size is not None and verifier.received != verifier.size:
                verifier.verify()  # raises SizeMismatchError
            assert verifier.digest is not None
            digest = verifier.digest
        else:
            digest = verifier.verify()
        size = verifier.received
        os.fsync(self._fd)
        checkpoint()
        engine = self._engine
        alg = engine._alg_dir(digest.algorithm, create=True)
        try:
            with blobs_held(alg):  # no collector unlinks the blob meanwhile
                held = open_blob(alg, digest.encoded, f"blob path of {digest}")
                try:
                    if held is not None and os.fstat(held).st_size == size:
                        os.utime(held)  # freshen, as git does
                        renamed = False
                    else:  # absent, or a damaged copy of the wrong size
                        os.rename(self._name, digest.encoded, src_dir_fd=engine._temp_dir(), dst_dir_fd=alg)
                        renamed = True
                finally:
                    if held is not None:
                        os.close(held)
            if renamed:
                engine._dir_syncs[digest.algorithm].sync(alg)
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
