"""The verified blob reader, and the raw byte sources backends hand it.

A backend's only part in reading is a :class:`RawBlob`: unverified bytes and a
way to release them. :class:`BlobReader` does the rest, once, for every engine:
it hashes and counts every byte, withholds the chunk that completes the blob
until the digest checked out, and releases the raw source at the end of data,
on any error, on ``aclose()``, when its engine closes, and when it is collected
unclosed (with a ``ResourceWarning``, as ``io`` files do). So a web framework
that iterates a reader to its end and drops it (Starlette's ``StreamingResponse``)
leaks nothing.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, ClassVar

import anyio
import anyio.lowlevel

if sys.version_info >= (3, 11):
    from typing import Self
else:
    from typing_extensions import Self

from ._context import Context, bound
from ._digest import Digest, Verifier
from ._errors import EngineClosedError
from ._threads import CHUNK_SIZE, hash_into, run_sync

if TYPE_CHECKING:
    from ._lifecycle import Lifecycle

__all__ = ["BlobReader", "BytesRaw", "RawBlob"]


class RawBlob:
    """Raw, unverified bytes of one blob, as a backend supplies them to a :class:`BlobReader`.

    Subclasses set :attr:`size` and implement either :meth:`read` (async sources:
    a network stream, memory) or, with :attr:`blocking` true, :meth:`read_blocking`
    (called in a worker thread, where the reader also hashes the chunk in the same
    hop). :meth:`close_now` releases the resource without blocking (finalisers
    call it); :meth:`aclose` may wait, and defaults to ``close_now``.
    """

    #: Whether :meth:`read_blocking` is the way to read (in a worker thread).
    blocking: ClassVar[bool] = False

    def __init__(self, size: int) -> None:
        self.size = size

    async def read(self, n: int) -> bytes:
        """Up to ``n`` more bytes (``b""`` at the end)."""
        raise NotImplementedError

    async def read_some(self, n: int) -> bytes:
        """Up to ``n`` more bytes, perhaps fewer than :meth:`read` would wait for (``b""`` at the end).

        For a consumer that gathers pieces itself: a network source hands out what
        arrived, unjoined. Default: :meth:`read`.
        """
        return await self.read(n)

    async def readinto(self, buffer: memoryview) -> int:
        """Fill ``buffer`` with the next bytes: fewer only at the end (``0`` there).

        For a consumer with buffers of its own to fill (a directory put): a network
        source receives straight into them. Default: :meth:`read`, copied.
        """
        done = 0
        while done < len(buffer):
            chunk = await self.read(len(buffer) - done)
            if not chunk:
                break
            buffer[done : done + len(chunk)] = chunk
            done += len(chunk)
        return done

    async def pour(self, buffer: memoryview, sink: Callable[[memoryview], None], limit: int) -> int | None:
        """Move up to ``limit`` next bytes into ``sink``, called in a worker thread with parts of ``buffer``
        (fewer bytes only at the end, ``0`` there).

        For a consumer that hashes and writes in a worker thread (a directory put): a
        network source receives in that thread, with no event loop turn in between.
        ``None``, having read nothing, if the source cannot do better than
        :meth:`readinto` (the default).
        """
        return None

    def read_blocking(self, n: int) -> bytes:
        """Up to ``n`` more bytes (``b""`` at the end); runs in a worker thread."""
        raise NotImplementedError

    def fileno(self) -> int | None:
        """The open local file holding the blob's bytes from offset 0, if there is one; else ``None``.

        A consumer that copies a whole file by its own means (a directory engine's
        put: the kernel copies, the put hashes what landed) asks for it through
        the reader, never directly. Default: ``None``.
        """
        return None

    def close_now(self) -> None:
        """Release the resource now, without blocking. Idempotent."""

    async def aclose(self) -> None:
        """Release the resource. Idempotent."""
        self.close_now()


class BytesRaw(RawBlob):
    """Content already in memory."""

    def __init__(self, data: bytes) -> None:
        super().__init__(len(data))
        self._data = memoryview(data)
        self._position = 0

    async def read(self, n: int) -> bytes:
        await anyio.lowlevel.checkpoint()
        start = self._position
        self._position = min(start + n, self.size)
        return bytes(self._data[start : self._position])

    async def readinto(self, buffer: memoryview) -> int:
        await anyio.lowlevel.checkpoint()
        start = self._position
        self._position = min(start + len(buffer), len(self._data))  # closed: nothing left
        buffer[: self._position - start] = self._data[start : self._position]
        return self._position - start

    def close_now(self) -> None:
        self._data = memoryview(b"")


class BlobReader:
    """An async reader of one blob that verifies its digest and size as it goes.

    Iterate it (``async for chunk in reader``) or call :meth:`read`. Reads are
    clamped to the expected size; the chunk that completes the blob is returned
    only after the digest checked out, and a blob that is too short, too long or
    different raises :class:`~ocicas.SizeMismatchError` or
    :class:`~ocicas.DigestMismatchError` instead of signalling the end.

    The reader frees its file or connection as soon as the blob was read and
    verified, on any error, on :meth:`aclose` (or leaving ``async with``), when its
    engine closes, and, with a ``ResourceWarning``, when collected unclosed. After
    :meth:`aclose` or its engine's close, reads raise :class:`~ocicas.EngineClosedError`.
    One task at a time may read: a second concurrent read raises
    ``anyio.BusyResourceError``.
    """

    def __init__(
        self,
        digest: Digest,
        raw: RawBlob,
        *,
        ctx: Context | None = None,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        if lifecycle is not None:
            lifecycle.adopt(self)  # first: if the engine is closed, the caller still owns ``raw``
        self.digest = digest
        self.size = raw.size
        self._raw: RawBlob | None = raw
        self._ctx = ctx
        self._lifecycle = lifecycle
        self._verifier = Verifier(digest, raw.size)
        #: Called with the size of each chunk as it is handed out (progress displays).
        self.on_read: Callable[[int], None] | None = None
        self._eof = False
        self._closed = False
        self._busy = False
        self._failure: BaseException | None = None

    @classmethod
    def from_bytes(cls, digest: Digest, data: bytes, *, ctx: Context | None = None) -> BlobReader:
        """A reader over content already in memory, verified like any other (checkpointing per chunk)."""
        return cls(digest, BytesRaw(data), ctx=ctx)

    @property
    def bytes_read(self) -> int:
        """How many bytes have passed through so far."""
        return self._verifier.received

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called (or the engine closed)."""
        return self._closed

    @asynccontextmanager
    async def _operation(self) -> AsyncIterator[None]:
        if self._failure is not None:  # released at the error: say what went wrong, not "closed"
            raise self._failure
        if self._closed:
            raise EngineClosedError(f"{self!r} is closed")
        if self._busy:
            raise anyio.BusyResourceError("reading from")
        self._busy = True
        try:
            if self._lifecycle is None:
                async with bound(self._ctx):
                    yield
            else:
                async with self._lifecycle.operation(self._ctx):
                    yield
        finally:
            self._busy = False

    async def read(self, n: int = -1) -> bytes:
        """Return up to ``n`` bytes (all that remain if ``n < 0``); ``b""`` at the verified end."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        if n < 0:
            parts = []
            while chunk := await self.read(CHUNK_SIZE):
                parts.append(chunk)
            return b"".join(parts)
        async with self._operation():
            if self._eof or n == 0:
                return b""
            try:
                chunk = await self._pull(min(n, self.size - self._verifier.received))
            except BaseException as exc:
                if not isinstance(exc, anyio.get_cancelled_exc_class()):
                    self._failure = exc
                await self._release()
                raise
        if chunk and self.on_read is not None:
            self.on_read(len(chunk))
        return chunk

    async def _pull(self, n: int) -> bytes:
        """The next chunk of at most ``n`` bytes, hashed; at the end of the blob, verified and released."""
        raw, verifier = self._raw, self._verifier
        assert raw is not None
        if n == 0:  # everything was read: nothing more is asked of the source
            chunk = b""
        elif raw.blocking:
            chunk = await run_sync(self._pull_blocking, raw, n)
        else:
            chunk = await raw.read(n)
            if len(chunk) > n:
                raise RuntimeError(f"{type(raw).__name__}.read({n}) returned {len(chunk)} bytes")
            await hash_into(verifier, chunk)
        if verifier.received == self.size or not chunk:
            verifier.verify()  # raises before the last chunk is handed out, or on a short blob
            self._eof = True
            await self._release(closing=False)
        return chunk

    def _pull_blocking(self, raw: RawBlob, n: int) -> bytes:
        chunk = raw.read_blocking(n)
        if len(chunk) > n:
            raise RuntimeError(f"{type(raw).__name__}.read_blocking({n}) returned {len(chunk)} bytes")
        self._verifier.update(chunk)
        return chunk

    def vouches_for(self, digest: Digest | None, size: int | None) -> bool:
        """Whether reading this reader to its end proves content of ``digest`` (and ``size``).

        True for a reader that has handed out nothing yet: it raises before
        signalling the end of content that does not match, so a consumer that
        commits only at the end need not hash again.
        """
        return self.bytes_read == 0 and not self._closed and digest == self.digest and size in (None, self.size)

    @asynccontextmanager
    async def _borrow_file(self) -> AsyncIterator[int | None]:
        """Lend an unread reader's local file to a consumer that copies it whole and verifies what it copied.

        Yields the file descriptor, or ``None`` (the reader was read from, or its
        bytes are not a local file: read it as usual, it is left as it was). The
        reader's operation is held meanwhile, as for a read: its engine's
        ``close()`` cancels the consumer and waits for it before closing the file,
        and no other read runs. Once a descriptor was lent the reader is closed,
        whatever happened: it verified nothing itself, so it never claims an end.
        """
        async with self._operation():
            raw = self._raw
            fd = None if raw is None or self._eof or self.bytes_read else raw.fileno()
            if fd is None:
                yield None
                return
            try:
                yield fd
            finally:
                await self._release()

    @asynccontextmanager
    async def _borrow_raw(self) -> AsyncIterator[RawBlob | None]:
        """Lend an unread reader's async raw source to a consumer that hashes and verifies what it takes itself.

        As :meth:`_borrow_file`: ``None`` leaves the reader as it was (read from,
        or a blocking source); once a source was lent the reader is closed,
        whatever happened. A directory put hashes in the thread that writes, off
        the event loop, where this reader would hash on it.
        """
        async with self._operation():
            raw = self._raw
            if raw is None or raw.blocking or self._eof or self.bytes_read:
                yield None
                return
            try:
                yield raw
            finally:
                await self._release()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read(CHUNK_SIZE)
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def _release(self, *, closing: bool = True) -> None:
        """Free the raw source (and, with ``closing``, refuse further reads). Idempotent."""
        if closing:
            self._closed = True
        raw, self._raw = self._raw, None
        if raw is not None:
            with anyio.CancelScope(shield=True):
                await raw.aclose()

    async def aclose(self) -> None:
        """Release the underlying file or connection. Idempotent."""
        await self._release()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._release()

    def __del__(self) -> None:
        raw = self.__dict__.get("_raw")
        if raw is not None:
            self._raw = None
            raw.close_now()
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1, source=self)

    def __repr__(self) -> str:
        state = " closed" if self._closed else (" done" if self._eof else "")
        return f"<BlobReader {self.digest} {self.bytes_read}/{self.size}{state}>"
