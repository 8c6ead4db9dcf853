"""An engine that hands every call to another one: the base of the tests' spying engines."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager

from ocicas import BlobInfo, BlobReader, BlobSource, Descriptor, Digest, Engine, RawBlob
from ocicas._digest import Verifier


class ReaderRaw(RawBlob):
    """Another engine's verified reader, as raw bytes for this engine's reader."""

    def __init__(self, reader: BlobReader) -> None:
        super().__init__(reader.size)
        self._reader = reader

    async def read(self, n: int) -> bytes:
        return await self._reader.read(n)

    async def aclose(self) -> None:
        await self._reader.aclose()

    def close_now(self) -> None:
        del self._reader  # the inner reader frees itself when collected


class Delegating(Engine):
    """Delegates every hook to ``inner``'s public methods; subclasses spy on some of them."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner

    async def _put_blob(self, source: BlobSource, verifier: Verifier) -> tuple[Digest, int]:
        return await self.inner.put_blob(source, expected_digest=verifier.digest, expected_size=verifier.size)

    async def _open_blob(self, digest: Digest) -> RawBlob:
        return ReaderRaw(await self.inner.get_blob(digest))

    async def _stat_blob(self, digest: Digest) -> int:
        return await self.inner.stat_blob(digest)

    async def _stat_blobs(self, digests: list[Digest], head: int) -> dict[Digest, BlobInfo]:
        return await self.inner.stat_blobs(digests, head=head)

    async def _touch_blobs(self, digests: list[Digest]) -> dict[Digest, BlobInfo]:
        return await self.inner.touch_blobs(digests)

    async def _delete_blobs(self, digests: list[Digest], unmodified_since: float | None) -> dict[Digest, int]:
        return await self.inner.delete_blobs(digests, unmodified_since=unmodified_since)

    async def _delete_blob(self, digest: Digest) -> None:
        await self.inner.delete_blob(digest)

    async def _list_blobs(self) -> list[Digest]:
        return await self.inner.list_blobs()

    def _gc_lock(self) -> AbstractAsyncContextManager[None]:
        return self.inner.gc_lock()

    async def _update_references(self, changes: Mapping[str, Descriptor | None], replace: bool) -> None:
        await self.inner.update_references(changes, replace=replace)

    async def _get_reference(self, name: str) -> Descriptor:
        return await self.inner.get_reference(name)

    async def _list_references(self) -> list[str]:
        return await self.inner.list_references()

    async def _list_roots(self) -> list[Descriptor]:
        return await self.inner.list_roots()

    async def _gc(self) -> None:
        await self.inner.gc()

    async def _release(self) -> None:
        await self.inner.close()
