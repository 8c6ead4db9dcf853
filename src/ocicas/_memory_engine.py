"""An in-memory engine with the same semantics as the directory engine."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from contextlib import aclosing

import anyio.lowlevel

from ._context import Context, bound
from ._descriptor import Descriptor
from ._digest import Digest, Verifier, addressable
from ._engine import BlobInfo, BlobReader, BlobSource, Engine, iterate_source
from ._errors import BlobNotFoundError, ReferenceNotFoundError
from ._layout_format import IndexDocument, validate_reference_name

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
        self._index = IndexDocument.empty()

    def __repr__(self) -> str:
        return f"<MemoryEngine {len(self._blobs)} blobs{' closed' if self._closed else ''}>"

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
        parts = []
        async with bound(ctx):
            async with aclosing(iterate_source(source)) as chunks:
                async for chunk in chunks:
                    if ctx is not None:
                        ctx.check()
                    verifier.update(chunk)
                    parts.append(bytes(chunk))
            digest = verifier.verify()
            if ctx is not None:
                ctx.check()
        self._blobs.setdefault(digest, b"".join(parts))
        self._modified[digest] = time.time()
        return digest, verifier.received

    def _get(self, digest: Digest | str) -> tuple[Digest, bytes]:
        self._check_open()
        digest = addressable(digest)
        try:
            return digest, self._blobs[digest]
        except KeyError:
            raise BlobNotFoundError(f"blob {digest} not found") from None

    async def get_blob(self, digest: Digest | str, *, ctx: Context | None = None) -> BlobReader:
        async with bound(ctx):
            await anyio.lowlevel.checkpoint()
            digest, data = self._get(digest)
        return BlobReader.from_bytes(digest, data, ctx=ctx)

    async def stat_blob(self, digest: Digest | str, *, ctx: Context | None = None) -> int:
        async with bound(ctx):
            await anyio.lowlevel.checkpoint()
            return len(self._get(digest)[1])

    async def delete_blob(self, digest: Digest | str, *, ctx: Context | None = None) -> None:
        self._check_open()
        digest = addressable(digest)
        async with bound(ctx):
            await anyio.lowlevel.checkpoint()
            self._blobs.pop(digest, None)
            self._modified.pop(digest, None)

    async def stat_blobs(
        self, digests: Iterable[Digest], *, head: int = 0, ctx: Context | None = None
    ) -> dict[Digest, BlobInfo]:
        self._check_open()
        async with bound(ctx):
            await anyio.lowlevel.checkpoint()
            return {
                d: BlobInfo(len(self._blobs[d]), self._modified[d], self._blobs[d][:head])
                for d in map(addressable, digests)
                if d in self._blobs
            }

    async def touch_blobs(self, digests: Iterable[Digest], *, ctx: Context | None = None) -> dict[Digest, BlobInfo]:
        self._check_open()
        async with bound(ctx):
            await anyio.lowlevel.checkpoint()
            now = time.time()
            out = {}
            for digest in map(addressable, digests):
                if digest in self._blobs:
                    self._modified[digest] = now
                    out[digest] = BlobInfo(len(self._blobs[digest]), now)
            return out

    async def delete_blobs(
        self, digests: Iterable[Digest], *, unmodified_since: float | None = None, ctx: Context | None = None
    ) -> dict[Digest, int]:
        self._check_open()
        removed = {}
        async with bound(ctx):
            await anyio.lowlevel.checkpoint()
            for digest in map(addressable, digests):
                if digest in self._blobs and (unmodified_since is None or self._modified[digest] < unmodified_since):
                    removed[digest] = len(self._blobs.pop(digest))
                    del self._modified[digest]
        return removed

    async def list_blobs(self, *, ctx: Context | None = None) -> list[Digest]:
        self._check_open()
        async with bound(ctx):
            await anyio.lowlevel.checkpoint()
            return sorted(self._blobs)

    async def update_references(
        self, changes: Mapping[str, Descriptor | None], *, replace: bool = False, ctx: Context | None = None
    ) -> None:
        self._check_open()
        for name, descriptor in changes.items():
            validate_reference_name(name)
            if descriptor is not None and not isinstance(descriptor, Descriptor):
                raise TypeError(f"reference {name!r}: expected a Descriptor, not {type(descriptor).__name__}")
        async with bound(ctx):
            await anyio.lowlevel.checkpoint()
            updated = self._index.apply(changes, replace=replace)
            if updated is not None:
                self._index = updated

    async def get_reference(self, name: str, *, ctx: Context | None = None) -> Descriptor:
        self._check_open()
        validate_reference_name(name)
        async with bound(ctx):
            await anyio.lowlevel.checkpoint()
            descriptor = self._index.get(name)
        if descriptor is None:
            raise ReferenceNotFoundError(f"reference {name!r} not found")
        return descriptor

    async def list_references(self, *, ctx: Context | None = None) -> list[str]:
        self._check_open()
        async with bound(ctx):
            await anyio.lowlevel.checkpoint()
            return self._index.names()

    async def list_roots(self, *, ctx: Context | None = None) -> list[Descriptor]:
        self._check_open()
        async with bound(ctx):
            await anyio.lowlevel.checkpoint()
            return self._index.roots()

    async def gc(self, *, ctx: Context | None = None) -> None:
        """Nothing to collect: a memory engine leaves no temporary files."""
        self._check_open()
        async with bound(ctx):
            await anyio.lowlevel.checkpoint()

    async def close(self) -> None:
        self._closed = True
