"""Assemble images and indexes from parts: layers in, a tagged manifest out.

:func:`build_image` stores layers, an image configuration whose
``rootfs.diff_ids`` it computes (the digests of the *uncompressed* layers;
gzip layers are inflated and hashed as they stream, never held whole, on
worker threads) and a manifest. :func:`build_index` stores an index over
manifests already in the store, for multi-platform images.
"""

from __future__ import annotations

import hashlib
import platform as _host
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from contextlib import aclosing
from typing import Any, Final, TypeAlias, cast

from ._checks import (
    check_blob_source,
    check_ctx,
    check_descriptor,
    check_engine,
    check_instance,
    check_reference_name,
    type_name,
)
from ._context import Context, bound
from ._descriptor import Descriptor, Platform, _string_map, validate_media_type
from ._digest import Digest
from ._engine import CHUNK_SIZE, Engine
from ._errors import BlobNotFoundError, InvalidError, SizeMismatchError, UnsupportedError
from ._graph import _to_platform
from ._media_types import (
    MEDIA_TYPE_DOCKER_FOREIGN_LAYER,
    MEDIA_TYPE_DOCKER_LAYER,
    MEDIA_TYPE_IMAGE_CONFIG,
    MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_LAYER,
    MEDIA_TYPE_IMAGE_LAYER_GZIP,
    MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE,
    MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_GZIP,
    MEDIA_TYPE_IMAGE_MANIFEST,
)
from ._models import ImageConfig, Index, Manifest, RootFS
from ._source import BlobSource, iterate_source
from ._threads import checkpoint, run_sync

__all__ = ["build_image", "build_index"]

_Chunk: TypeAlias = "bytes | bytearray | memoryview"

#: Layer media types whose blob is the tar itself: the diff ID is the blob's digest.
_PLAIN_TAR: Final = frozenset({MEDIA_TYPE_IMAGE_LAYER, MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE})
#: Layer media types whose blob is a gzip stream: the diff ID is the digest of what it inflates to.
_GZIP_TAR: Final = frozenset(
    {
        MEDIA_TYPE_IMAGE_LAYER_GZIP,
        MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_GZIP,
        MEDIA_TYPE_DOCKER_LAYER,
        MEDIA_TYPE_DOCKER_FOREIGN_LAYER,
    }
)
#: Python's ``platform.machine()`` names, as Go's ``GOARCH`` (and so the image-spec) spells them.
_GOARCH: Final = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "i386": "386",
    "i686": "386",
    "armv7l": "arm",
    "armv6l": "arm",
}


def _host_architecture() -> str:
    machine = _host.machine().lower()
    return _GOARCH.get(machine, machine or "amd64")


class _GzipDiffHasher:
    """SHA-256 of what a gzip stream inflates to, fed chunk by chunk.

    Concatenated gzip members are one stream (as Go's ``gzip.Reader`` reads them);
    anything else after a member, a truncated stream or a corrupt one is refused.
    Inflated output is hashed in pieces of at most :data:`CHUNK_SIZE`, so a small
    chunk that inflates hugely never sits in memory whole.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._inflater = zlib.decompressobj(31)

    def feed(self, chunks: Sequence[_Chunk]) -> None:
        try:
            for chunk in chunks:
                data: _Chunk = chunk
                while data:
                    if self._inflater.eof:  # the previous member ended: another one follows
                        self._inflater = zlib.decompressobj(31)
                    data = self._inflate(data)
        except zlib.error as exc:
            raise InvalidError(f"gzip layer is corrupt: {exc}") from None

    def _inflate(self, data: _Chunk) -> bytes:
        """Inflate ``data`` up to the end of the current member; return what follows it."""
        inflater = self._inflater
        while True:
            checkpoint()
            out = inflater.decompress(data, CHUNK_SIZE)
            self._hash.update(out)
            if inflater.eof:
                return inflater.unused_data
            data = inflater.unconsumed_tail
            if not data and len(out) < CHUNK_SIZE:
                return b""

    def result(self) -> Digest:
        if not self._inflater.eof:
            raise InvalidError("gzip layer is truncated or empty: the stream does not end")
        return Digest(f"sha256:{self._hash.hexdigest()}")


async def _teed(source: BlobSource, hasher: _GzipDiffHasher) -> AsyncIterator[_Chunk]:
    """Yield ``source``'s chunks unchanged, feeding them to ``hasher`` about 1 MiB at a time on a worker thread."""
    batch: list[_Chunk] = []
    pending = 0
    async with aclosing(iterate_source(source)) as chunks:
        async for chunk in chunks:
            batch.append(chunk)
            pending += len(chunk)
            if pending >= CHUNK_SIZE:
                await run_sync(hasher.feed, batch)
                batch, pending = [], 0
            yield chunk
    await run_sync(hasher.feed, batch)
    hasher.result()  # a truncated stream fails here, inside put_blob, so nothing is stored


async def _put_layer(
    engine: Engine, source: BlobSource, media_type: str, ctx: Context | None
) -> tuple[Descriptor, Digest | None]:
    """Store one layer; return its descriptor and its diff ID (``None``: cannot tell)."""
    if media_type in _GZIP_TAR:
        hasher = _GzipDiffHasher()
        stream = cast("AsyncIterable[bytes]", _teed(source, hasher))  # any bytes-like chunk is accepted
        digest, size = await engine.put_blob(stream, ctx=ctx)
        diff_id: Digest | None = hasher.result()
    else:
        digest, size = await engine.put_blob(source, ctx=ctx)
        diff_id = digest if media_type in _PLAIN_TAR else None
    return Descriptor(media_type=media_type, digest=digest, size=size), diff_id


def _image_config(config: ImageConfig | Mapping[str, Any] | None, wanted: Platform | None) -> ImageConfig:
    """``config`` as a model, its architecture and os filled from ``wanted`` (or the host) and checked against it."""
    if config is None or isinstance(config, Mapping):
        obj = dict(config or {})
        if obj.get("architecture") is None:
            obj["architecture"] = wanted.architecture if wanted is not None else _host_architecture()
        if obj.get("os") is None:
            obj["os"] = wanted.os if wanted is not None else "linux"
        if obj.get("rootfs") is None:
            obj["rootfs"] = RootFS().to_dict()
        parsed = ImageConfig.from_dict(obj)
    elif isinstance(config, ImageConfig):
        parsed = config
    else:
        raise TypeError(f"config must be an ocicas.ImageConfig, a mapping or None, not {type_name(config)}")
    if wanted is not None:
        if (parsed.os, parsed.architecture) != (wanted.os, wanted.architecture) or (
            wanted.variant is not None and parsed.variant not in (None, wanted.variant)
        ):
            raise InvalidError(f"image config is for {parsed.platform}, but the platform given is {wanted}")
        if wanted.variant is not None and parsed.variant is None:
            parsed = parsed.replace(variant=wanted.variant)
    return parsed


def _annotations(annotations: object) -> dict[str, str] | None:
    if annotations is None:
        return None
    check_instance(annotations, Mapping, "annotations", "a mapping of str to str or None")
    return _string_map(annotations, "annotations")


def _diff_ids(given: tuple[Digest, ...], computed: list[Digest | None], layers: list[Descriptor]) -> tuple[Digest, ...]:
    """The diff IDs to record: those computed, checked against those given; given ones where we cannot compute."""
    if not given:
        missing = [layer.media_type for layer, diff_id in zip(layers, computed, strict=True) if diff_id is None]
        if missing:
            raise UnsupportedError(
                f"cannot compute the diff ID of a {missing[0]} layer: give the uncompressed layers' "
                "digests in the config's rootfs.diff_ids"
            )
        return tuple(d for d in computed if d is not None)
    for position, (expected, actual) in enumerate(zip(given, computed, strict=True)):
        if actual is not None and actual != expected:
            raise InvalidError(f"config rootfs.diff_ids[{position}] is {expected}, but layer {position} is {actual}")
    return given


async def build_image(
    engine: Engine,
    layers: Iterable[BlobSource],
    *,
    config: ImageConfig | Mapping[str, Any] | None = None,
    annotations: Mapping[str, str] | None = None,
    reference: str | None = None,
    platform: Platform | str | None = None,
    layer_media_type: str = MEDIA_TYPE_IMAGE_LAYER,
    ctx: Context | None = None,
) -> Descriptor:
    """Store an image made of ``layers`` (bottom first); return its manifest's descriptor.

    Each layer is a :data:`~ocicas.BlobSource` stored as ``layer_media_type``
    (default: uncompressed tar). ``config`` (an :class:`~ocicas.ImageConfig` or a
    JSON mapping; default empty) gets ``architecture`` and ``os`` from
    ``platform`` when it lacks them (without one: the host's architecture and
    ``linux``, as ``umoci new`` does), and ``rootfs.diff_ids`` computed from the
    layers when it has none: the blob digest for a tar, the digest of the
    inflated stream for gzip. Given diff IDs are checked where they can be
    computed, and must be given for other media types (zstd):
    :class:`~ocicas.UnsupportedError` otherwise. ``annotations`` go on the
    manifest. With ``reference`` the manifest is tagged
    (:class:`~ocicas.ClobberError` if the name holds another); with ``platform``
    (``"linux/arm64"`` or a :class:`~ocicas.Platform`, which must agree with the
    config) the descriptor carries it, ready for :func:`build_index`.
    """
    check_engine(engine)
    if isinstance(layers, str | bytes | bytearray | memoryview) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be an iterable of blob sources, not {type_name(layers)}")
    sources = list(layers)
    for source in sources:
        check_blob_source(source, "each of layers")
    annotations = _annotations(annotations)  # refused before anything is stored
    if reference is not None:
        check_reference_name(reference, "reference")
    wanted = None if platform is None else _to_platform(platform, "platform")
    check_instance(layer_media_type, str, "layer_media_type", "a media type (str)")
    validate_media_type(layer_media_type, "layer_media_type")
    check_ctx(ctx)
    image_config = _image_config(config, wanted)
    given = image_config.rootfs.diff_ids
    if given and len(given) != len(sources):
        raise InvalidError(f"config rootfs.diff_ids has {len(given)} entries for {len(sources)} layers")
    async with bound(ctx), engine.lease(ctx=ctx):  # nothing put here is collected before the tag
        stored: list[Descriptor] = []
        computed: list[Digest | None] = []
        for source in sources:
            descriptor, diff_id = await _put_layer(engine, source, layer_media_type, ctx)
            stored.append(descriptor)
            computed.append(diff_id)
        rootfs = image_config.rootfs.replace(diff_ids=_diff_ids(given, computed, stored))
        config_digest, config_size = await engine.put_blob(image_config.replace(rootfs=rootfs).to_json(), ctx=ctx)
        manifest = Manifest(
            config=Descriptor(media_type=MEDIA_TYPE_IMAGE_CONFIG, digest=config_digest, size=config_size),
            layers=tuple(stored),
            annotations=annotations,
        )
        digest, size = await engine.put_blob(manifest.to_json(), ctx=ctx)
        result = Descriptor(media_type=MEDIA_TYPE_IMAGE_MANIFEST, digest=digest, size=size, platform=wanted)
        if reference is not None:
            await engine.put_reference(reference, result, ctx=ctx)
    return result


async def build_index(
    engine: Engine,
    manifests: Iterable[Descriptor],
    *,
    reference: str | None = None,
    annotations: Mapping[str, str] | None = None,
    ctx: Context | None = None,
) -> Descriptor:
    """Store an image index over ``manifests`` (say, :func:`build_image` results with platforms).

    Every entry must already be in the store at its size (or embed its
    ``data``): :class:`~ocicas.BlobNotFoundError` or
    :class:`~ocicas.SizeMismatchError` otherwise, since an index pointing at
    nothing would make every garbage collection refuse to run. ``annotations``
    go on the index; with ``reference`` it is tagged. Returns the index's
    descriptor.
    """
    check_engine(engine)
    if isinstance(manifests, Descriptor) or not isinstance(manifests, Iterable):
        raise TypeError(f"manifests must be an iterable of ocicas.Descriptor, not {type_name(manifests)}")
    entries = tuple(manifests)
    for entry in entries:
        check_descriptor(entry, "each of manifests")
    if reference is not None:
        check_reference_name(reference, "reference")
    annotations = _annotations(annotations)
    check_ctx(ctx)
    index = Index(manifests=entries, annotations=annotations)
    async with bound(ctx), engine.lease(ctx=ctx):
        stored = [entry for entry in entries if entry.data is None]
        found = await engine.stat_blobs([entry.digest for entry in stored], ctx=ctx)
        for entry in stored:
            info = found.get(entry.digest)
            if info is None:
                raise BlobNotFoundError(f"index entry {entry.digest} is not in the store")
            if info.size != entry.size:
                raise SizeMismatchError(f"index entry {entry.digest} has {info.size} bytes, but says {entry.size}")
        digest, size = await engine.put_blob(index.to_json(), ctx=ctx)
        result = Descriptor(media_type=MEDIA_TYPE_IMAGE_INDEX, digest=digest, size=size)
        if reference is not None:
            await engine.put_reference(reference, result, ctx=ctx)
    return result
