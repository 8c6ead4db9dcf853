"""Read what a descriptor points at, typed by its media type (umoci's ``casext.FromDescriptor``).

:func:`from_descriptor` reads JSON documents whole (capped, verified) and parses
them with the parser registered for the descriptor's media type; anything else
(layers, unknown media types) comes back as a verified, streaming
:class:`~ocicas.BlobReader`. :func:`register_media_type` teaches it new types.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Final, TypeAlias

import anyio
import anyio.lowlevel

from ._checks import check_ctx, check_descriptor, check_engine, check_int
from ._context import Context
from ._descriptor import Descriptor, validate_media_type
from ._digest import Digest, addressable
from ._engine import BlobReader, Engine
from ._errors import BlobTooLargeError, ClobberError, DigestMismatchError, InvalidError, SizeMismatchError
from ._json import DEFAULT_JSON_LIMIT, load_json
from ._media_types import (
    CONFIG_MEDIA_TYPES,
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    MEDIA_TYPE_DESCRIPTOR,
    MEDIA_TYPE_EMPTY_JSON,
)
from ._models import ImageConfig, Index, Manifest
from ._threads import run_sync

__all__ = ["Blob", "BlobParser", "from_descriptor", "register_media_type", "unregister_media_type"]

#: Turns a whole, verified blob into a typed value; raises :class:`~ocicas.InvalidError` if malformed.
BlobParser: TypeAlias = Callable[[bytes], object]

_PARSERS: dict[str, BlobParser] = {}
#: Documents at least this big are parsed in a worker thread, off the event loop.
_THREAD_PARSE_SIZE: Final = 1 << 20  # JSON parses at ≈100 MB/s: bigger documents leave the event loop


def register_media_type(media_type: str, parser: BlobParser, *, replace: bool = False) -> None:
    """Make :func:`from_descriptor` read blobs of ``media_type`` whole and return ``parser(data)``.

    ``parser`` gets the verified bytes (at most the ``max_size`` of the call) and
    should raise :class:`~ocicas.InvalidError` for malformed content; it may run in a
    worker thread. Registering a media type that already has a parser (built-ins
    included) raises :class:`~ocicas.ClobberError` unless ``replace=True``.
    """
    validate_media_type(media_type)
    if not callable(parser):
        raise TypeError(f"parser must be callable, not {type(parser).__name__}")
    if not replace and media_type in _PARSERS:
        raise ClobberError(f"media type {media_type!r} already has a parser (pass replace=True to replace it)")
    _PARSERS[media_type] = parser


def unregister_media_type(media_type: str) -> BlobParser | None:
    """Forget the parser of ``media_type`` (its blobs are then streamed); return it, or ``None``."""
    return _PARSERS.pop(media_type, None)


def _parse_descriptor(data: bytes) -> Descriptor:
    return Descriptor.from_dict(load_json(data, "descriptor"))


def _parse_empty(data: bytes) -> object:
    value = load_json(data, "empty JSON blob")
    if value != {}:
        raise InvalidError(f"{MEDIA_TYPE_EMPTY_JSON} blob must be {{}}, not {data[:100]!r}")
    return value


register_media_type(MEDIA_TYPE_DESCRIPTOR, _parse_descriptor)
register_media_type(MEDIA_TYPE_EMPTY_JSON, _parse_empty)
for _type in sorted(MANIFEST_MEDIA_TYPES):
    register_media_type(_type, functools.partial(Manifest.from_json, media_type=_type))
for _type in sorted(INDEX_MEDIA_TYPES):
    register_media_type(_type, functools.partial(Index.from_json, media_type=_type))
for _type in sorted(CONFIG_MEDIA_TYPES):
    register_media_type(_type, functools.partial(ImageConfig.from_json, media_type=_type))
del _type


@dataclasses.dataclass(frozen=True, kw_only=True)
class Blob:
    """A blob read through its descriptor, its :attr:`data` typed by media type.

    ============================================  =============================
    media type                                    :attr:`data`
    ============================================  =============================
    descriptor                                    :class:`~ocicas.Descriptor`
    image manifest (OCI, Docker schema 2)         :class:`~ocicas.Manifest`
    image index, Docker manifest list             :class:`~ocicas.Index`
    image config (OCI, Docker)                    :class:`~ocicas.ImageConfig`
    empty JSON                                    ``{}``
    registered with :func:`register_media_type`   what its parser returns
    layers, anything else                         a verified :class:`~ocicas.BlobReader`
    ============================================  =============================

    A reader must be closed: use ``async with blob:`` or :meth:`aclose` (a no-op
    for parsed data).
    """

    descriptor: Descriptor
    data: object

    @property
    def media_type(self) -> str:
        """The descriptor's media type, which decided the type of :attr:`data`."""
        return self.descriptor.media_type

    @property
    def digest(self) -> Digest:
        """The digest the blob was read (and verified) by."""
        return self.descriptor.digest

    async def aclose(self) -> None:
        """Close :attr:`data` if it is a reader. Idempotent."""
        if isinstance(self.data, BlobReader):
            await self.data.aclose()

    async def __aenter__(self) -> Blob:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()


async def read_described(
    engine: Engine, descriptor: Descriptor, *, max_size: int | None = DEFAULT_JSON_LIMIT, ctx: Context | None = None
) -> bytes:
    """The whole blob ``descriptor`` points at, verified against its digest *and* size.

    Embedded ``data`` is used without touching the engine. A descriptor whose size
    is over ``max_size`` is refused with :class:`~ocicas.BlobTooLargeError` before
    anything is read, and no more than ``descriptor.size`` bytes are ever read.
    """
    check_engine(engine)
    check_descriptor(descriptor)
    check_int(max_size, "max_size", optional=True)
    check_ctx(ctx)
    digest = addressable(descriptor.digest)
    if max_size is not None and descriptor.size > max_size:
        raise BlobTooLargeError(
            f"{descriptor.media_type} blob {digest} has {descriptor.size} bytes, over the cap of {max_size}"
        )
    if descriptor.data is not None:
        return descriptor.data
    try:  # never read more than the descriptor promises
        data = await engine.read_blob(digest, max_size=descriptor.size, ctx=ctx)
    except BlobTooLargeError:
        raise SizeMismatchError(f"blob {digest} is larger than its descriptor's size {descriptor.size}") from None
    except DigestMismatchError:  # a file shorter than described fails its hash first: name the size
        stored = await engine.stat_blob(digest, ctx=ctx)
        if stored != descriptor.size:
            raise SizeMismatchError(
                f"blob {digest} has {stored} bytes, but its descriptor says {descriptor.size}"
            ) from None
        raise
    if len(data) != descriptor.size:
        raise SizeMismatchError(f"blob {digest} has {len(data)} bytes, but its descriptor says {descriptor.size}")
    return data


async def from_descriptor(
    engine: Engine,
    descriptor: Descriptor,
    *,
    ctx: Context | None = None,
    max_size: int | None = DEFAULT_JSON_LIMIT,
) -> Blob:
    """Read the blob ``descriptor`` points at and return it typed by its media type.

    Documents with a parser (see :class:`Blob`) are read whole and verified, after
    refusing with :class:`~ocicas.BlobTooLargeError` a descriptor whose size is over
    ``max_size`` (``None``: no cap), so a forged size cannot make us allocate. A
    document whose own ``mediaType`` disagrees with the descriptor's raises
    :class:`~ocicas.InvalidError`. Anything else is returned as an open, verified
    :class:`~ocicas.BlobReader` that the caller closes (``async with blob:``).

    A descriptor with embedded ``data`` (already checked against its digest) is
    served from it without touching the engine. A stored blob whose size differs
    from the descriptor's raises :class:`~ocicas.SizeMismatchError`; one whose bytes
    do not match the digest, :class:`~ocicas.DigestMismatchError`.
    """
    check_engine(engine)
    check_descriptor(descriptor)
    check_ctx(ctx)
    check_int(max_size, "max_size", optional=True)
    digest = addressable(descriptor.digest)  # UnsupportedAlgorithmError: we could not verify it
    parser = _PARSERS.get(descriptor.media_type)
    if parser is None:
        if descriptor.data is not None:
            return Blob(descriptor=descriptor, data=BlobReader.from_bytes(digest, descriptor.data))
        reader = await engine.get_blob(digest, ctx=ctx)
        if reader.size != descriptor.size:
            with anyio.CancelScope(shield=True):
                await reader.aclose()
            raise SizeMismatchError(f"blob {digest} has {reader.size} bytes, but its descriptor says {descriptor.size}")
        return Blob(descriptor=descriptor, data=reader)

    data = await read_described(engine, descriptor, max_size=max_size, ctx=ctx)
    try:
        if len(data) >= _THREAD_PARSE_SIZE:
            value = await run_sync(parser, data)
        else:
            value = parser(data)
    except InvalidError as exc:
        if type(exc).__module__ != InvalidError.__module__:
            raise  # a parser's own subclass: its constructor may differ, leave it be
        raise type(exc)(f"{descriptor.media_type} blob {digest}: {exc}") from None
    return Blob(descriptor=descriptor, data=value)
