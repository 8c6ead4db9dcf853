"""The Engine protocol every backend implements, and the verified blob reader."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any, Final, Protocol, TypeAlias, runtime_checkable

import anyio
import anyio.lowlevel

if sys.version_info >= (3, 11):
    from typing import Self
else:
    from typing_extensions import Self

from ._context import Context, bound
from ._descriptor import Descriptor
from ._digest import Digest, Verifier
from ._errors import BlobNotFoundError, BlobTooLargeError, EngineClosedError
from ._json import dump_json

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_READ_LIMIT",
    "AsyncReadable",
    "BlobInfo",
    "BlobReader",
    "BlobSource",
    "Engine",
]

#: Bytes moved per worker-thread hop, and the largest chunk a reader yields: large
#: enough that the ≈100 µs hop is noise next to hashing it (≈2.5 ms).
CHUNK_SIZE: Final = 4 << 20
#: Default cap of :meth:`Engine.read_blob`.
DEFAULT_READ_LIMIT: Final = 64 << 20


@runtime_checkable
class AsyncReadable(Protocol):
    """Anything with ``async read(n) -> bytes`` (anyio streams' wrappers, aiofiles files, …)."""

    def read(self, size: int = ..., /) -> Awaitable[bytes]: ...


#: What :meth:`Engine.put_blob` accepts.
BlobSource: TypeAlias = "bytes | bytearray | memoryview | AsyncIterable[bytes] | AsyncReadable"


async def iterate_source(
    source: BlobSource, chunk_size: int = CHUNK_SIZE
) -> AsyncGenerator[bytes | bytearray | memoryview, None]:
    """Yield a :data:`BlobSource` as bytes-like chunks; use it under ``contextlib.aclosing``."""
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source).cast("B")
        for start in range(0, len(view), chunk_size):
            await anyio.lowlevel.checkpoint()
            yield view[start : start + chunk_size]
        return
    if isinstance(source, str):
        raise TypeError("put_blob takes bytes, not str: encode the text first")
    read = getattr(source, "read", None)
    # read(n) wins over iteration: files (anyio's AsyncFile, aiofiles) iterate by *lines*
    if read is not None and inspect.iscoroutinefunction(read):
        while True:
            chunk = await read(chunk_size)
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise TypeError(f"blob source read() returned {type(chunk).__name__}, expected bytes")
            if not chunk:
                return
            yield chunk
    if isinstance(source, AsyncIterable):
        iterator = aiter(source)
        try:
            async for chunk in iterator:
                if not isinstance(chunk, bytes | bytearray | memoryview):
                    raise TypeError(f"blob source yielded {type(chunk).__name__}, expected bytes")
                yield chunk
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:  # an abandoned async generator must be finalised here, not by the GC
                with anyio.CancelScope(shield=True):
                    await aclose()
        return
    raise TypeError(
        f"cannot read a blob from {type(source).__name__}: pass bytes, an async iterable of bytes, "
        "or an object with `async read(n)`"
    )


class BlobReader:
    """An async reader of one blob that verifies its digest and size as it goes.

    Iterate it (``async for chunk in reader``) or call :meth:`read`. Reads are
    clamped to the expected size; the chunk that completes the blob is returned
    only after the digest checked out, and a blob that is too short, too long or
    different raises :class:`SizeMismatchError` or :class:`DigestMismatchError`
    instead of signalling the end. Close it with ``async with`` or :meth:`aclose`.
    """

    def __init__(
        self,
        digest: Digest,
        size: int,
        pull: Callable[[int, Verifier], Awaitable[bytes]],
        *,
        close: Callable[[], Awaitable[None]] | None = None,
        ctx: Context | None = None,
    ) -> None:
        self.digest = digest
        self.size = size
        self._pull = pull
        self._close = close
        self._ctx = ctx
        self._verifier = Verifier(digest, size)
        #: Called with the size of each chunk as it is handed out (progress displays).
        self.on_read: Callable[[int], None] | None = None
        self._eof = False
        self._closed = False

    @classmethod
    def from_bytes(cls, digest: Digest, data: bytes, *, ctx: Context | None = None) -> BlobReader:
        """A reader over content already in memory, verified like any other (checkpointing per chunk)."""
        position = 0

        async def pull(n: int, verifier: Verifier) -> bytes:
            nonlocal position
            await anyio.lowlevel.checkpoint()
            chunk = data[position : position + n]
            position += len(chunk)
            verifier.update(chunk)
            return chunk

        return cls(digest, len(data), pull, ctx=ctx)

    @property
    def bytes_read(self) -> int:
        """How many bytes have passed through so far."""
        return self._verifier.received

    async def read(self, n: int = -1) -> bytes:
        """Return up to ``n`` bytes (all that remain if ``n < 0``); ``b""`` at the verified end."""
        if n < 0:
            parts = []
            while chunk := await self.read(CHUNK_SIZE):
                parts.append(chunk)
            return b"".join(parts)
        if self._closed:
            raise EngineClosedError(f"reader of {self.digest} is closed")
        if self._eof or n == 0:
            return b""
        if self._ctx is not None:
            self._ctx.check()
        verifier = self._verifier
        remaining = self.size - verifier.received
        # one byte past the end is asked for too, so a longer file is caught
        chunk = await self._pull(min(n, remaining) if remaining > 0 else 1, verifier)
        if verifier.received == self.size and chunk:
            verifier.verify()  # before handing out the chunk that completes the blob
        elif not chunk:
            verifier.verify()
            self._eof = True
        if chunk and self.on_read is not None:
            self.on_read(len(chunk))
        return chunk

    def vouches_for(self, digest: Digest | None, size: int | None) -> bool:
        """Whether reading this reader to its end proves content of ``digest`` (and ``size``).

        True for a reader that has handed out nothing yet: it raises before
        signalling the end of content that does not match, so a consumer that
        commits only at the end need not hash again.
        """
        return self.bytes_read == 0 and digest == self.digest and size in (None, self.size)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read(CHUNK_SIZE)
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        """Release the underlying file or connection. Idempotent."""
        if not self._closed:
            self._closed = True
            if self._close is not None:
                await self._close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()

    def __repr__(self) -> str:
        return f"<BlobReader {self.digest} {self.bytes_read}/{self.size}>"


@dataclasses.dataclass(frozen=True)
class BlobInfo:
    """What :meth:`Engine.stat_blobs` knows of a blob without reading it."""

    size: int
    #: POSIX time of the last write or freshening, or ``None`` if the engine cannot tell.
    modified: float | None
    #: The first bytes, when asked for with ``head=``: unverified, for sniffing only.
    head: bytes = b""


@asynccontextmanager
async def _locked(lock: anyio.Lock, ctx: Context | None) -> AsyncIterator[None]:
    async with bound(ctx):
        await lock.acquire()
    try:
        yield
    finally:
        lock.release()


class Engine(ABC):
    """An OCI content-addressable store: blobs by digest, references by name.

    The Python form of umoci's ``cas.Engine``. Every method takes an optional
    keyword-only ``ctx`` (:class:`~ocicas.Context`). Engines are async context
    managers; after :meth:`close`, methods raise :class:`~ocicas.EngineClosedError`.

    Backends implement the abstract methods; :meth:`put_blob_json` and
    :meth:`read_blob` have shared implementations on top of them.
    """

    _closed: bool = False

    # -- blobs ---------------------------------------------------------------------

    @abstractmethod
    async def put_blob(
        self,
        source: BlobSource,
        *,
        expected_digest: Digest | str | None = None,
        expected_size: int | None = None,
        ctx: Context | None = None,
    ) -> tuple[Digest, int]:
        """Store a blob streamed from ``source``; return its digest and size.

        ``source`` is bytes-like, an async iterable of bytes, or an object with
        ``async read(n)``. Idempotent: storing content that is already present
        succeeds and refreshes its age. With ``expected_digest``/``expected_size``
        the content is checked as it streams (the digest's algorithm is used), and
        a mismatch raises before anything is stored.
        """

    async def put_blob_json(self, obj: Any, *, ctx: Context | None = None) -> tuple[Digest, int]:
        """Store ``obj`` serialised as compact JSON (objects with ``to_dict()`` allowed)."""
        return await self.put_blob(dump_json(obj), ctx=ctx)

    @abstractmethod
    async def get_blob(self, digest: Digest | str, *, ctx: Context | None = None) -> BlobReader:
        """Open a verified reader of a blob; :class:`~ocicas.BlobNotFoundError` if absent."""

    async def read_blob(
        self, digest: Digest | str, *, max_size: int | None = DEFAULT_READ_LIMIT, ctx: Context | None = None
    ) -> bytes:
        """Return a whole blob, verified before it is returned.

        Blobs larger than ``max_size`` bytes (``None``: no cap) are refused with
        :class:`~ocicas.BlobTooLargeError` before any byte is read.
        """
        reader = await self.get_blob(digest, ctx=ctx)
        async with reader:
            if max_size is not None and reader.size > max_size:
                raise BlobTooLargeError(f"blob {reader.digest} has {reader.size} bytes, over the cap of {max_size}")
            return await reader.read()

    @abstractmethod
    async def stat_blob(self, digest: Digest | str, *, ctx: Context | None = None) -> int:
        """Return a blob's size without reading it; :class:`~ocicas.BlobNotFoundError` if absent."""

    @abstractmethod
    async def delete_blob(self, digest: Digest | str, *, ctx: Context | None = None) -> None:
        """Remove a blob. Idempotent: an absent blob is not an error."""

    @abstractmethod
    async def list_blobs(self, *, ctx: Context | None = None) -> list[Digest]:
        """Every blob digest in the store, sorted."""

    # -- optional capabilities, with generic defaults --------------------------------

    async def stat_blobs(
        self, digests: Iterable[Digest], *, head: int = 0, ctx: Context | None = None
    ) -> dict[Digest, BlobInfo]:
        """Size and modification time of many blobs at once; absent blobs are left out.

        Engines that know when a blob was last written or freshened report it as
        :attr:`BlobInfo.modified` (GC's grace period relies on it). With ``head``,
        the first ``head`` bytes of each blob come along, unverified: enough to tell
        a JSON document from a tarball without reading either. The default asks
        :meth:`stat_blob` (and :meth:`get_blob`) one by one and reports no time.
        """
        out: dict[Digest, BlobInfo] = {}
        for digest in digests:
            try:
                size = await self.stat_blob(digest, ctx=ctx)
                prefix = b""
                if head:
                    async with await self.get_blob(digest, ctx=ctx) as reader:
                        prefix = await reader.read(head)
            except BlobNotFoundError:
                continue
            out[digest] = BlobInfo(size, None, prefix)
        return out

    async def touch_blobs(self, digests: Iterable[Digest], *, ctx: Context | None = None) -> dict[Digest, BlobInfo]:
        """Freshen the present blobs among ``digests``, as ``put_blob`` of present content does; return them.

        A writer that reuses blobs it finds present (as :func:`ocicas.copy` does)
        touches them so a concurrent GC's grace period protects them until it has
        referenced them. Atomic with respect to :meth:`delete_blobs`. The default,
        for engines without blob times, only reports them.
        """
        return await self.stat_blobs(digests, ctx=ctx)

    async def delete_blobs(
        self, digests: Iterable[Digest], *, unmodified_since: float | None = None, ctx: Context | None = None
    ) -> dict[Digest, int]:
        """Delete many blobs; return the ones removed with their sizes.

        With ``unmodified_since`` (a POSIX time), a blob written or freshened at or
        after it is kept: the check and the removal are atomic with respect to this
        engine's own :meth:`put_blob`. Engines without blob times keep every blob
        when it is given. The default deletes one by one.
        """
        if unmodified_since is not None:
            return {}
        removed: dict[Digest, int] = {}
        for digest in digests:
            try:
                size = await self.stat_blob(digest, ctx=ctx)
            except BlobNotFoundError:
                continue
            await self.delete_blob(digest, ctx=ctx)
            removed[digest] = size
        return removed

    def gc_lock(self, *, ctx: Context | None = None) -> AbstractAsyncContextManager[None]:
        """Held by :func:`ocicas.gc` while it runs, so two collections never overlap.

        The default is a lock of this engine object; the directory engine also
        excludes collections in other processes.
        """
        lock = self.__dict__.setdefault("_gc_mutex", anyio.Lock())
        return _locked(lock, ctx)

    # -- references ----------------------------------------------------------------

    async def put_reference(self, name: str, descriptor: Descriptor, *, ctx: Context | None = None) -> None:
        """Store ``descriptor`` under ``name``.

        Idempotent; raises :class:`~ocicas.ClobberError` if ``name`` already holds a
        different descriptor (delete it first to move a name).
        """
        await self.update_references({name: descriptor}, ctx=ctx)

    async def delete_reference(self, name: str, *, ctx: Context | None = None) -> None:
        """Remove a reference. Idempotent: an absent name is not an error."""
        await self.update_references({name: None}, ctx=ctx)

    @abstractmethod
    async def update_references(
        self, changes: Mapping[str, Descriptor | None], *, replace: bool = False, ctx: Context | None = None
    ) -> None:
        """Apply many reference changes at once: ``name: descriptor`` puts, ``name: None`` deletes.

        All or nothing. Without ``replace``, a put that would change what a name
        already holds raises :class:`~ocicas.ClobberError` and nothing is applied;
        with ``replace=True`` names are moved. The directory engine writes
        ``index.json`` once for the whole batch.
        """

    @abstractmethod
    async def get_reference(self, name: str, *, ctx: Context | None = None) -> Descriptor:
        """The descriptor stored under ``name``; :class:`~ocicas.ReferenceNotFoundError` if absent."""

    @abstractmethod
    async def list_references(self, *, ctx: Context | None = None) -> list[str]:
        """Every reference name, sorted."""

    @abstractmethod
    async def list_roots(self, *, ctx: Context | None = None) -> list[Descriptor]:
        """Every descriptor the store keeps as a root, named or not (GC's root set).

        Named ones carry their ``org.opencontainers.image.ref.name`` annotation.
        """

    # -- lifecycle -----------------------------------------------------------------

    @abstractmethod
    async def gc(self, *, ctx: Context | None = None) -> None:
        """Remove engine-level garbage (stale temporary files); never a blob or reference."""

    @abstractmethod
    async def close(self) -> None:
        """Release the engine's resources. Idempotent."""

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError(f"{self!r} is closed")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.close()
