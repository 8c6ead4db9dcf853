r"""Request and response bodies without half-run async generators.

httpx streams bodies through nested async generators that it does not close when
a read stops early (a cancelled upload, a reader closed mid-blob), and trio warns
about each one collected half-run (encode/httpx#3686). So request bodies go out
through a plain iterator (:class:`Body`), and a response read only in part is
:func:`release`\ d: closed, then its iteration driven to the end, which comes at
once because the connection is closed.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Final

import anyio
import httpx

__all__ = ["BODIES", "Body", "body_of", "read_body", "release"]

#: The bodies ``RegistryClient.request`` read (whole, or capped for streamed errors); see :func:`body_of`.
BODIES: Final[weakref.WeakKeyDictionary[httpx.Response, bytes]] = weakref.WeakKeyDictionary()
#: Seconds a released response's iteration may take to end (it ends at once: the connection is closed).
_RELEASE_TIMEOUT: Final = 1.0


class _Pieces:
    """An async iterator over bytes objects: a request body without an async generator."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self._pieces = iter(pieces)

    def __aiter__(self) -> _Pieces:
        return self

    async def __anext__(self) -> bytes:
        for piece in self._pieces:
            if piece:
                return piece
        raise StopAsyncIteration


class Body(httpx.AsyncByteStream):
    """A request body of known bytes, in one piece or several (sent as they are, never joined).

    Iterated without an async generator (see the module doc).
    """

    def __init__(self, data: bytes | Sequence[bytes]) -> None:
        self._pieces: Sequence[bytes] = (data,) if isinstance(data, bytes) else data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _Pieces(self._pieces)

    def drop(self) -> None:
        """Let go of the bytes once sent: httpx's responses are reference cycles that keep their request,
        so a body would otherwise stay in memory until the cyclic collector runs."""
        self._pieces = ()


async def release(response: httpx.Response, iterator: AsyncIterator[bytes] | None = None) -> None:
    """Close a streamed answer; if ``iterator`` (of its body) was started, end it too. Shielded."""
    with anyio.CancelScope(shield=True):
        await response.aclose()
        if iterator is not None:
            with anyio.move_on_after(_RELEASE_TIMEOUT):
                try:
                    async for _ in iterator:
                        pass
                except Exception:  # ReadError from the closed connection: the end we want
                    pass


async def read_body(response: httpx.Response, limit: int | None = None) -> bytes:
    """Read a streamed answer's body through and close it; stop after ``limit + 1`` bytes (over the limit)."""
    iterator = aiter(response.aiter_bytes())
    body = bytearray()
    try:
        async for piece in iterator:
            body += piece
            if limit is not None and len(body) > limit:
                break
    finally:
        await release(response, iterator)
    return bytes(body if limit is None else body[: limit + 1])


def body_of(response: httpx.Response) -> bytes:
    """The body ``RegistryClient.request`` read for ``response`` (``b""`` if none was read)."""
    return BODIES.get(response, b"")
