"""The directory engine: an OCI image layout on a local filesystem.

On disk (image-spec image-layout 1.0/1.1)::

    oci-layout            {"imageLayoutVersion":"1.0.0"}
    index.json            image index; references are entries annotated
                          org.opencontainers.image.ref.name
    blobs/<alg>/<hex>     content, named by its digest
    .ocicas-<random>/     this engine's temporary files, flock-held while it lives

Every write goes to a temporary file inside the layout (same filesystem), is
fsynced, renamed into place and its directory fsynced. ``index.json`` changes are
a read-modify-write under an exclusive ``flock`` on the layout directory, so
processes tagging at once lose nothing and readers never see a torn file.
Blob paths are only ever built from validated digests and opened relative to
directory descriptors with ``O_NOFOLLOW``, so a symlink cannot lead outside.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from pathlib import Path
from typing import Final

import anyio
import anyio.to_thread

from .._context import Context, bound
from .._descriptor import Descriptor
from .._digest import _ENCODED, SUPPORTED_ALGORITHMS, Digest, Verifier, addressable
from .._engine import CHUNK_SIZE, DEFAULT_READ_LIMIT, BlobInfo, BlobReader, BlobSource, Engine, iterate_source
from .._errors import (
    BlobNotFoundError,
    BlobTooLargeError,
    InvalidError,
    LayoutExistsError,
    LayoutNotFoundError,
    ReferenceNotFoundError,
)
from .._layout_format import IndexDocument, layout_file, parse_layout_file, validate_reference_name
from .._tasks import task_group
from .fs import (
    DIR_FLAGS,
    GroupSync,
    hold_blob,
    open_dir,
    open_regular,
    read_open,
    read_small,
    remove_temp_dir,
    run_split,
    run_sync,
    unlink_unused,
    write_all,
    write_file,
)

__all__ = ["DirEngine", "create_layout", "open_layout"]

#: Prefix of this library's temporary directories inside a layout.
TEMP_PREFIX: Final = ".ocicas-"
_INDEX_LIMIT: Final = 256 << 20
_LAYOUT_FILE_LIMIT: Final = 64 << 10
#: put_blob hands the worker threads this much at a time.
_PIPELINE_BATCH: Final = CHUNK_SIZE
#: Batches waiting between the stages of put_blob's pipeline (with those in work: ≈ 7 batches in memory).
_PIPELINE_DEPTH: Final = 2
#: put_blob syncs each time this much more is written, so the disk works while hashing goes on.
_SYNC_EVERY: Final = 64 << 20


async def create_layout(path: str | os.PathLike[str]) -> None:
    """Create a new, empty OCI image layout at ``path``.

    Parent directories are created as needed; :class:`~ocicas.LayoutExistsError`
    (a ``FileExistsError``) if ``path`` already exists.
    """
    await run_sync(_create_layout, Path(path))


def _create_layout(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        raise LayoutExistsError(f"cannot create layout: {str(path)!r} already exists") from None
    fd = os.open(path, DIR_FLAGS)
    try:
        os.mkdir("blobs", dir_fd=fd)
        blobs = os.open("blobs", DIR_FLAGS, dir_fd=fd)
        try:
            os.mkdir("sha256", dir_fd=blobs)
            os.fsync(blobs)
        finally:
            os.close(blobs)
        write_file(fd, "index.json", IndexDocument.empty().serialize())
        write_file(fd, "oci-layout", layout_file())  # last: its presence marks a complete layout
        os.fsync(fd)
    finally:
        os.close(fd)


async def open_layout(path: str | os.PathLike[str]) -> DirEngine:
    """Open the OCI image layout at ``path`` as an :class:`Engine`.

    Raises :class:`~ocicas.LayoutNotFoundError` if ``path`` does not exist and
    :class:`~ocicas.InvalidError` if it is not a valid layout (no or a wrong
    ``oci-layout``, an unreadable ``index.json``, no ``blobs`` directory).
    """
    return await run_sync(DirEngine._open, Path(path))


_Chunk = bytes | bytearray | memoryview
_Batch = list[_Chunk]


def _frozen(chunk: _Chunk) -> bytes | memoryview:
    """``chunk``, copied if its bytes could change while it waits in the pipeline (a reused buffer)."""
    if isinstance(chunk, bytes) or (isinstance(chunk, memoryview) and chunk.readonly):
        return chunk
    return bytes(chunk)


class _PendingBlob:
    """A blob on its way in: a temporary file, fed by a pipeline of reading, hashing and writing.

    Large blobs flow through three stages at once, each on its own worker thread
    when it runs (hashlib and write release the GIL): the source is read while
    the previous batch is hashed and the one before it is written. The writer
    also syncs as it goes, so the disk flushes while hashing continues and the
    final fsync has little left to do. A blob smaller than one batch takes a
    single thread hop from open to rename.
    """

    def __init__(self, engine: DirEngine, verifier: Verifier, ctx: Context | None, *, vouched: bool = False) -> None:
        self._engine = engine
        self._verifier = verifier
        # the source is a BlobReader of this very digest: it verifies, so the bytes are only counted here
        self._vouched = vouched
        self._ctx = ctx
        self._name = f"blob-{secrets.token_hex(8)}"
        self._fd = -1
        self._unsynced = 0

    def _open(self) -> None:
        if self._fd < 0:
            temp = self._engine._temp_dir()
            self._fd = os.open(self._name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=temp)

    def _hash(self, batch: _Batch) -> None:
        account = self._verifier.count if self._vouched else self._verifier.update
        for chunk in batch:
            if self._ctx is not None:
                self._ctx.check()
            account(chunk)

    def _write(self, batch: _Batch) -> None:
        self._open()
        for chunk in batch:
            if self._ctx is not None:
                self._ctx.check()
            write_all(self._fd, chunk)
            self._unsynced += len(chunk)
        if self._unsynced >= _SYNC_EVERY:
            os.fdatasync(self._fd)
            self._unsynced = 0

    async def take(self, source: BlobSource) -> _Batch:
        """Consume ``source``: hash and write all of it but a tail smaller than a batch, which is returned."""
        batch: _Batch = []
        pending = total = 0
        async with aclosing(iterate_source(source)) as chunks:
            async for chunk in chunks:
                batch.append(_frozen(chunk))
                pending += len(chunk)
                total += len(chunk)
                self._verifier.check_total(total)  # an oversized stream stops now, not a batch later
                if pending >= _PIPELINE_BATCH:
                    return await self._pipeline(batch, total, chunks)
        return batch

    async def _pipeline(
        self, first: _Batch, total: int, chunks: AsyncIterator[bytes | bytearray | memoryview]
    ) -> _Batch:
        to_hash, hashing = anyio.create_memory_object_stream[_Batch](_PIPELINE_DEPTH)
        to_write, writing = anyio.create_memory_object_stream[_Batch](_PIPELINE_DEPTH)

        async def hasher() -> None:
            async with hashing, to_write:
                async for batch in hashing:
                    await run_sync(self._hash, batch)
                    await to_write.send(batch)

        async def writer() -> None:
            async with writing:
                async for batch in writing:
                    await run_sync(self._write, batch)

        batch: _Batch = []
        pending = 0
        async with task_group() as tg:
            tg.start_soon(hasher)
            tg.start_soon(writer)
            async with to_hash:
                await to_hash.send(first)
                async for chunk in chunks:
                    batch.append(_frozen(chunk))
                    pending += len(chunk)
                    total += len(chunk)
                    self._verifier.check_total(total)
                    if pending >= _PIPELINE_BATCH:
                        await to_hash.send(batch)
                        batch, pending = [], 0
        return batch

    def commit(self, batch: _Batch) -> tuple[Digest, int]:
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
        if self._ctx is not None:
            self._ctx.check()
        engine = self._engine
        alg = engine._alg_dir(digest.algorithm, create=True)
        try:
            held = hold_blob(alg, digest.encoded, f"blob path of {digest}", self._ctx)  # no collector unlinks it
            try:
                if held is not None and os.fstat(held).st_size == size:
                    os.utime(held)  # freshen, as git does
                    renamed = False
                else:  # absent, or a damaged copy of the wrong size
                    os.rename(self._name, digest.encoded, src_dir_fd=engine._temp_fd, dst_dir_fd=alg)
                    renamed = True
            finally:
                if held is not None:
                    os.close(held)
            if renamed:
                engine._dir_syncs[digest.algorithm].sync(alg)
        finally:
            os.close(alg)
        self.abandon()  # the temporary file is only still there when the blob was already present
        return digest, size

    def abandon(self) -> None:
        """Close and remove the temporary file, if any. Idempotent."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
            with contextlib.suppress(OSError):
                self._engine._unlink_temp(self._name)


class DirEngine(Engine):
    """An :class:`Engine` over an OCI image layout directory. Open one with :func:`open_layout`."""

    def __init__(self, path: Path, root_fd: int) -> None:
        self.path = path
        self._root = root_fd
        self._temp_fd: int | None = None
        self._temp_name: str | None = None
        self._temp_lock = threading.Lock()
        self._dir_syncs = {algorithm: GroupSync() for algorithm in SUPPORTED_ALGORITHMS}
        self._index_lock = anyio.Lock()
        self._index_cache: tuple[tuple[int, int, int, int], IndexDocument] | None = None
        # the cached file, held open: while it is, no other file can get its inode (see _load_index)
        self._index_held: int | None = None
        self._index_held_lock = threading.Lock()

    @classmethod
    def _open(cls, path: Path) -> DirEngine:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise LayoutNotFoundError(f"no layout at {str(path)!r}: path does not exist") from None
        except NotADirectoryError:
            raise InvalidError(f"not a layout: {str(path)!r} is not a directory") from None
        try:
            try:
                parse_layout_file(read_small(fd, "oci-layout", _LAYOUT_FILE_LIMIT, "oci-layout")[1])
            except FileNotFoundError:
                raise InvalidError(f"not a layout: {str(path)!r} has no oci-layout file") from None
            try:
                os.close(open_dir("blobs", fd, "blobs"))
            except FileNotFoundError:
                raise InvalidError(f"not a layout: {str(path)!r} has no blobs directory") from None
            engine = cls(path, fd)
            engine._load_index()
            return engine
        except BaseException:
            os.close(fd)
            raise

    def __repr__(self) -> str:
        return f"<DirEngine {str(self.path)!r}{' closed' if self._closed else ''}>"

    # -- helpers (worker threads) -------------------------------------------------------

    def _alg_dir(self, algorithm: str, *, create: bool = False) -> int:
        blobs = open_dir("blobs", self._root, "blobs")
        try:
            try:
                return open_dir(algorithm, blobs, f"blobs/{algorithm}")
            except FileNotFoundError:
                if not create:
                    raise
            try:
                os.mkdir(algorithm, 0o755, dir_fd=blobs)
                os.fsync(blobs)
            except FileExistsError:
                pass
            return open_dir(algorithm, blobs, f"blobs/{algorithm}")
        finally:
            os.close(blobs)

    def _temp_dir(self) -> int:
        """This engine's flock-held temporary directory, created on first use."""
        with self._temp_lock:
            if self._temp_fd is not None:
                return self._temp_fd
            while True:
                name = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
                os.mkdir(name, 0o700, dir_fd=self._root)
                fd = os.open(name, DIR_FLAGS, dir_fd=self._root)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    # another engine's gc() may have removed it between mkdir and flock
                    if (
                        os.fstat(fd).st_nlink > 0
                        and os.stat(name, dir_fd=self._root, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
                    ):
                        self._temp_fd, self._temp_name = fd, name
                        return fd
                except OSError:
                    pass
                os.close(fd)

    def _unlink_temp(self, name: str) -> None:
        if self._temp_fd is not None:
            try:
                os.unlink(name, dir_fd=self._temp_fd)
            except FileNotFoundError:
                pass

    # -- blobs --------------------------------------------------------------------------

    async def put_blob(
        self,
        source: BlobSource,
        *,
        expected_digest: Digest | str | None = None,
        expected_size: int | None = None,
        ctx: Context | None = None,
    ) -> tuple[Digest, int]:
        self._check_open()
        verifier = Verifier(None if expected_digest is None else addressable(expected_digest), expected_size)
        vouched = isinstance(source, BlobReader) and source.vouches_for(verifier.digest, expected_size)
        blob = _PendingBlob(self, verifier, ctx, vouched=vouched)
        async with bound(ctx):
            try:
                tail = await blob.take(source)
                return await run_sync(blob.commit, tail)  # small blobs: open, write and commit in one hop
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await run_sync(blob.abandon)
                raise

    def _open_blob(self, digest: Digest) -> tuple[int, int]:
        """Open a blob for reading; return (fd, size)."""
        try:
            alg = self._alg_dir(digest.algorithm)
            try:
                fd = open_regular(digest.encoded, alg, f"blob {digest}")
            finally:
                os.close(alg)
        except FileNotFoundError:
            raise BlobNotFoundError(f"blob {digest} not found") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidError(f"blob {digest} is a symlink; refusing to follow it") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise InvalidError(f"blob {digest} is not a regular file")
        return fd, st.st_size

    async def get_blob(self, digest: Digest | str, *, ctx: Context | None = None) -> BlobReader:
        self._check_open()
        digest = addressable(digest)
        async with bound(ctx):
            fd, size = await run_sync(self._open_blob, digest)

        def pull(n: int, verifier: Verifier) -> bytes:
            chunk = os.read(fd, n)
            verifier.update(chunk)
            return chunk

        async def close() -> None:
            os.close(fd)  # never blocks on a regular file opened for reading

        return BlobReader(digest, size, lambda n, v: run_sync(pull, n, v), close=close, ctx=ctx)

    async def read_blob(
        self, digest: Digest | str, *, max_size: int | None = DEFAULT_READ_LIMIT, ctx: Context | None = None
    ) -> bytes:
        self._check_open()
        digest = addressable(digest)

        def read() -> bytes:  # one thread hop for the open, the read and the hash
            fd, size = self._open_blob(digest)
            try:
                if max_size is not None and size > max_size:
                    raise BlobTooLargeError(f"blob {digest} has {size} bytes, over the cap of {max_size}")
                verifier = Verifier(digest, size)
                parts = []
                while True:
                    if ctx is not None:
                        ctx.check()
                    chunk = os.read(fd, min(max(size - verifier.received, 1), 8 * CHUNK_SIZE))
                    if not chunk:
                        break
                    verifier.update(chunk)
                    parts.append(chunk)
                verifier.verify()
                return b"".join(parts)
            finally:
                os.close(fd)

        async with bound(ctx):
            return await run_sync(read)

    async def stat_blob(self, digest: Digest | str, *, ctx: Context | None = None) -> int:
        self._check_open()
        digest = addressable(digest)

        def size() -> int:
            try:
                alg = self._alg_dir(digest.algorithm)
                try:
                    st = os.stat(digest.encoded, dir_fd=alg, follow_symlinks=False)
                finally:
                    os.close(alg)
            except FileNotFoundError:
                raise BlobNotFoundError(f"blob {digest} not found") from None
            if not stat.S_ISREG(st.st_mode):
                raise InvalidError(f"blob {digest} is not a regular file")
            return st.st_size

        async with bound(ctx):
            return await run_sync(size)

    async def delete_blob(self, digest: Digest | str, *, ctx: Context | None = None) -> None:
        self._check_open()
        digest = addressable(digest)

        def delete() -> None:
            try:
                alg = self._alg_dir(digest.algorithm)
                try:
                    os.unlink(digest.encoded, dir_fd=alg)
                finally:
                    os.close(alg)
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                raise InvalidError(f"blob path of {digest} is a directory; not removing it") from None

        async with bound(ctx):
            await run_sync(delete)

    def _by_algorithm(self, digests: Iterable[Digest]) -> Iterator[tuple[int, list[Digest]]]:
        """Group digests by algorithm, yielding each group with its open directory."""
        groups: dict[str, list[Digest]] = {}
        for digest in map(addressable, digests):  # validated, and a Digest even if given a str
            groups.setdefault(digest.algorithm, []).append(digest)
        for algorithm, group in groups.items():
            try:
                alg = self._alg_dir(algorithm)
            except FileNotFoundError:
                continue
            try:
                yield alg, group
            finally:
                os.close(alg)

    async def stat_blobs(
        self, digests: Iterable[Digest], *, head: int = 0, ctx: Context | None = None
    ) -> dict[Digest, BlobInfo]:
        self._check_open()

        def stats(digests: list[Digest]) -> dict[Digest, BlobInfo]:
            out = {}
            for alg, group in self._by_algorithm(digests):
                for digest in group:
                    try:
                        if head:
                            fd = open_regular(digest.encoded, alg, f"blob {digest}")
                            try:
                                st = os.fstat(fd)
                                prefix = os.pread(fd, head, 0) if stat.S_ISREG(st.st_mode) else b""
                            finally:
                                os.close(fd)
                        else:
                            st = os.stat(digest.encoded, dir_fd=alg, follow_symlinks=False)
                            prefix = b""
                    except (OSError, InvalidError):
                        continue  # absent, or not a regular file: not a blob
                    if stat.S_ISREG(st.st_mode):
                        out[digest] = BlobInfo(st.st_size, st.st_mtime_ns / 1e9, prefix)
            return out

        async with bound(ctx):
            return await run_split(stats, list(digests))

    async def touch_blobs(self, digests: Iterable[Digest], *, ctx: Context | None = None) -> dict[Digest, BlobInfo]:
        self._check_open()

        def touch(digests: list[Digest]) -> dict[Digest, BlobInfo]:
            out = {}
            for alg, group in self._by_algorithm(digests):
                for digest in group:
                    try:
                        held = hold_blob(alg, digest.encoded, f"blob {digest}", ctx)
                    except InvalidError:
                        continue
                    if held is None:
                        continue
                    try:
                        st = os.fstat(held)
                        os.utime(held)
                    finally:
                        os.close(held)
                    out[digest] = BlobInfo(st.st_size, time.time())
            return out

        async with bound(ctx):
            return await run_split(touch, list(digests))

    async def delete_blobs(
        self, digests: Iterable[Digest], *, unmodified_since: float | None = None, ctx: Context | None = None
    ) -> dict[Digest, int]:
        self._check_open()
        cutoff = None if unmodified_since is None else int(unmodified_since * 1e9)

        def delete() -> dict[Digest, int]:
            removed = {}
            for alg, group in self._by_algorithm(digests):
                for digest in group:
                    if ctx is not None:
                        ctx.check()
                    st = unlink_unused(
                        alg, digest.encoded, cutoff
                    )  # atomic with hold_blob, across processes and threads
                    if st is not None:
                        removed[digest] = st.st_size
            return removed

        async with bound(ctx):
            return await run_sync(delete)

    def gc_lock(self, *, ctx: Context | None = None) -> AbstractAsyncContextManager[None]:
        """Excludes other collections of this layout, in this process and in others (flock on ``blobs/``)."""
        return self._exclusive_gc(ctx)

    @asynccontextmanager
    async def _exclusive_gc(self, ctx: Context | None) -> AsyncIterator[None]:
        async with super().gc_lock(ctx=ctx):
            blobs = await run_sync(open_dir, "blobs", self._root, "blobs")
            try:
                async with bound(ctx):
                    delay = 0.001
                    while not await run_sync(self._try_lock, blobs):
                        await anyio.sleep(delay)
                        delay = min(delay * 2, 0.1)
                yield
            finally:
                os.close(blobs)

    async def list_blobs(self, *, ctx: Context | None = None) -> list[Digest]:
        self._check_open()

        def listing() -> list[Digest]:
            out = []
            for algorithm in sorted(SUPPORTED_ALGORITHMS):
                try:
                    alg = self._alg_dir(algorithm)
                except FileNotFoundError:
                    continue
                try:
                    shape = _ENCODED[algorithm]
                    with os.scandir(alg) as entries:
                        for entry in entries:
                            if shape.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                                out.append(Digest._trusted(f"{algorithm}:{entry.name}"))  # the name matched the grammar
                finally:
                    os.close(alg)
            out.sort()
            return out

        async with bound(ctx):
            return await run_sync(listing)

    # -- references ---------------------------------------------------------------------

    def _hold_index(self, fd: int, st: os.stat_result, document: IndexDocument) -> None:
        """Cache ``document`` as the content of the file open as ``fd``, and keep that file open."""
        with self._index_held_lock:
            released, self._index_held = self._index_held, fd
            self._index_cache = ((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), document)
        if released is not None:
            os.close(released)

    def _load_index(self) -> IndexDocument:
        """The parsed ``index.json``, re-read only when the file's identity changed.

        The identity is (device, inode, size, mtime), and the cached file is kept
        open: a file that was replaced and freed could otherwise hand its inode to a
        new ``index.json`` of the same size written within the same tick of a coarse
        file clock, which would read as unchanged (a stale read, and a lost update
        when the stale index is rewritten).
        """
        try:
            fd = open_regular("index.json", self._root, "index.json")
        except FileNotFoundError:
            raise InvalidError(f"not a layout: {str(self.path)!r} has no index.json") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidError("index.json is a symlink") from None
            raise
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._index_cache
            if cached is not None and cached[0] == key:
                return cached[1]
            st, data = read_open(fd, _INDEX_LIMIT, "index.json")
            document = IndexDocument.parse(data)
            self._hold_index(fd, st, document)
            fd = -1  # held by the cache now
            return document
        finally:
            if fd >= 0:
                os.close(fd)

    async def _index(self, ctx: Context | None) -> IndexDocument:
        self._check_open()
        async with bound(ctx):
            return await run_sync(self._load_index)

    async def get_reference(self, name: str, *, ctx: Context | None = None) -> Descriptor:
        validate_reference_name(name)
        descriptor = (await self._index(ctx)).get(name)
        if descriptor is None:
            raise ReferenceNotFoundError(f"reference {name!r} not found")
        return descriptor

    async def list_references(self, *, ctx: Context | None = None) -> list[str]:
        return (await self._index(ctx)).names()

    async def list_roots(self, *, ctx: Context | None = None) -> list[Descriptor]:
        return (await self._index(ctx)).roots()

    async def update_references(
        self, changes: Mapping[str, Descriptor | None], *, replace: bool = False, ctx: Context | None = None
    ) -> None:
        self._check_open()
        for name, descriptor in changes.items():
            validate_reference_name(name)
            if descriptor is not None and not isinstance(descriptor, Descriptor):
                raise TypeError(f"reference {name!r}: expected a Descriptor, not {type(descriptor).__name__}")
        async with bound(ctx), self._index_lock:
            lock_fd = await run_sync(open_dir, ".", self._root, "the layout")  # the layout, not the working directory
            try:
                delay = 0.001
                while not await run_sync(self._try_lock, lock_fd):
                    await anyio.sleep(delay)  # another process holds the lock: wait, cancellably
                    delay = min(delay * 2, 0.05)
                await run_sync(self._rewrite_index, changes, replace, ctx)
            finally:
                os.close(lock_fd)  # releases the flock

    @staticmethod
    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _rewrite_index(self, changes: Mapping[str, Descriptor | None], replace: bool, ctx: Context | None) -> None:
        updated = self._load_index().apply(changes, replace=replace)
        if updated is None:
            return
        if ctx is not None:
            ctx.check()
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
            self._unlink_temp(name)
            raise
        self._hold_index(held, st, updated)
        os.fsync(self._root)

    # -- lifecycle ----------------------------------------------------------------------

    async def gc(self, *, ctx: Context | None = None) -> None:
        """Remove temporary directories left by dead ocicas engines (never another tool's files)."""
        self._check_open()

        def collect() -> None:
            with os.scandir(self._root) as entries:
                names = [e.name for e in entries if e.name.startswith(TEMP_PREFIX) and e.name != self._temp_name]
            for name in names:
                if ctx is not None:
                    ctx.check()
                try:
                    fd = os.open(name, DIR_FLAGS, dir_fd=self._root)
                except OSError:
                    continue  # vanished, or not a plain directory: not ours to judge
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue  # a live engine holds it
                try:
                    remove_temp_dir(self._root, name, fd)
                except (FileNotFoundError, IsADirectoryError, OSError):
                    pass  # gone already, or holding something we did not put there: leave it
                finally:
                    os.close(fd)

        async with bound(ctx):
            await run_sync(collect)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def release() -> None:
            if self._temp_fd is not None and self._temp_name is not None:
                try:
                    remove_temp_dir(self._root, self._temp_name, self._temp_fd)
                except OSError:
                    pass  # a later gc() retries once our flock is gone
                os.close(self._temp_fd)  # drops the flock
                self._temp_fd = None
            if self._index_held is not None:
                os.close(self._index_held)
                self._index_held = None
            os.close(self._root)

        with anyio.CancelScope(shield=True):
            await run_sync(release)
