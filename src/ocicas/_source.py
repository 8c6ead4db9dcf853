"""What ``put_blob`` accepts, and the one loop that reads it as chunks."""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable
from typing import Protocol, TypeAlias, runtime_checkable

import anyio.lowlevel

from ._checks import check_blob_source, type_name
from ._tasks import bounded_shield
from ._threads import CHUNK_SIZE

__all__ = ["AsyncReadable", "BlobSource", "iterate_source", "reads_async"]


@runtime_checkable
class AsyncReadable(Protocol):
    """Anything with ``async read(n) -> bytes`` (anyio streams' wrappers, aiofiles files, …)."""

    def read(self, size: int = ..., /) -> Awaitable[bytes]: ...


#: What :meth:`Engine.put_blob` accepts.
BlobSource: TypeAlias = "bytes | bytearray | memoryview | AsyncIterable[bytes] | AsyncReadable"


def reads_async(source: object) -> bool:
    return inspect.iscoroutinefunction(getattr(source, "read", None))


async def iterate_source(
    source: BlobSource, chunk_size: int = CHUNK_SIZE
) -> AsyncGenerator[bytes | bytearray | memoryview, None]:
    """Yield a :data:`BlobSource` as bytes-like chunks; use it under ``contextlib.aclosing``.

    It keeps no reference to a chunk once yielded: a put's memory budget counts
    what it holds, and a chunk pinned here while the put waits would be off the books.
    """
    check_blob_source(source, "source")
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source).cast("B")
        for start in range(0, len(view), chunk_size):
            await anyio.lowlevel.checkpoint()
            yield view[start : start + chunk_size]
        return
    # read(n) wins over iteration: files (anyio's AsyncFile, aiofiles) iterate by *lines*
    box: list[bytes | bytearray | memoryview] = []
    if reads_async(source):
        read = source.read  # type: ignore[union-attr]
        while True:
            chunk = await read(chunk_size)
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise TypeError(f"blob source read() returned {type_name(chunk)}, expected bytes")
            if not chunk:
                return
            box.append(chunk)
            del chunk  # the frame holds nothing while suspended: the chunk goes out through the box
            yield box.pop()
    iterator = aiter(source)  # type: ignore[arg-type]
    try:
        async for chunk in iterator:
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise TypeError(f"blob source yielded {type_name(chunk)}, expected bytes")
            box.append(chunk)
            del chunk
            yield box.pop()
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:  # an abandoned async generator must be finalised here, not by the GC
            with bounded_shield():  # foreign code: it may not hold us forever
                await aclose()
