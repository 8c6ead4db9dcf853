"""An in-memory engine with the same semantics as the directory engine."""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import aclosing

import anyio.lowlevel

from ._descriptor import Descriptor
from ._digest import Digest, Verifier
from ._engine import BlobInfo, Engine
from ._errors import BlobNotFoundError, ReferenceNotFoundError
from ._layout_format import BrokenRoot, IndexDocument
from ._reader import BytesRaw, RawBlob
from ._source import BlobSource, iterate_source
from ._threads import hash_into

__all__ = ["MemoryEngine"]


class MemoryEngine(Engine):
    """An :class:`Engine` that keeps blobs and references in memory.

    It follows the protocol exactly as the directory engine does (references are
    even kept as an ``index.json`` document), which makes it the reference
    implementation for tests and a fast scratch store. Not shared between processes.
    """

    def __init__(self) -> None:
        self._blobs: dict[Digest, bytes] = {}
        self._modified: dict[Digest, float] = {}
        self._document = IndexDocument.empty()

    def __repr__(self) -> str:
        return f"<MemoryEngine {len(self._blobs)} blobs{' closed' if self.closed else ''}>"

    async def _put_blob(self, source: BlobSource, verifier: Verifier) -> tuple[Digest, int]:
        parts = []
        async with aclosing(iterate_source(source)) as chunks:
            async for chunk in chunks:
                await hash_into(verifier, chunk)
                parts.append(bytes(chunk))
        digest = verifier.verify()
        await anyio.lowlevel.checkpoint()  # the last chance to cancel before it is stored
        self._blobs.setdefault(digest, b"".join(parts))
        self._modified[digest] = time.time()
        return digest, verifier.received

    def _get(self, digest: Digest) -> bytes:
        try:
            return self._blobs[digest]
        except KeyError:
            raise BlobNotFoundError(f"blob {digest} not found") from None

    async def _open_blob(self, digest: Digest) -> RawBlob:
        await anyio.lowlevel.checkpoint()
        return BytesRaw(self._get(digest))

    async def _stat_blob(self, digest: Digest) -> int:
        await anyio.lowlevel.checkpoint()
        return len(self._get(digest))

    async def _delete_blob(self, digest: Digest) -> None:
        await anyio.lowlevel.checkpoint()
        self._blobs.pop(digest, None)
        self._modified.pop(digest, None)

    async def _stat_blobs(self, digests: list[Digest], head: int) -> dict[Digest, BlobInfo]:
        await anyio.lowlevel.checkpoint()
        return {
            d: BlobInfo(len(self._blobs[d]), self._modified[d], self._blobs[d][:head])
            for d in digests
            if d in self._blobs
        }

    async def _touch_blobs(self, digests: list[Digest]) -> dict[Digest, BlobInfo]:
        await anyio.lowlevel.checkpoint()
        now = time.time()
        out = {}
        for digest in digests:
            if digest in self._blobs:
                self._modified[digest] = now
                out[digest] = BlobInfo(len(self._blobs[digest]), now)
        return out

    async def _delete_blobs(self, digests: list[Digest], unmodified_since: float | None) -> dict[Digest, int]:
        await anyio.lowlevel.checkpoint()
        removed = {}
        for digest in digests:
            if digest in self._blobs and (unmodified_since is None or self._modified[digest] < unmodified_since):
                removed[digest] = len(self._blobs.pop(digest))
                del self._modified[digest]
        return removed

    async def _list_blobs(self) -> list[Digest]:
        await anyio.lowlevel.checkpoint()
        return sorted(self._blobs)

    async def _update_references(self, changes: Mapping[str, Descriptor | None], replace: bool) -> None:
        await anyio.lowlevel.checkpoint()
        updated = self._document.apply(changes, replace=replace)
        if updated is not None:
            self._document = updated

    async def _get_reference(self, name: str) -> Descriptor:
        await anyio.lowlevel.checkpoint()
        descriptor = self._document.get(name)
        if descriptor is None:
            raise ReferenceNotFoundError(f"reference {name!r} not found")
        return descriptor

    async def _list_references(self) -> list[str]:
        await anyio.lowlevel.checkpoint()
        return self._document.names()

    async def _list_roots(self) -> list[Descriptor]:
        await anyio.lowlevel.checkpoint()
        return self._document.roots()

    async def _list_broken_roots(self) -> list[BrokenRoot]:
        await anyio.lowlevel.checkpoint()
        return self._document.broken()

    async def _gc(self) -> None:
        """Nothing to collect: a memory engine leaves no temporary files."""
        await anyio.lowlevel.checkpoint()

    async def _release(self) -> None:
        """Nothing to release but memory, which stays readable by nobody."""
