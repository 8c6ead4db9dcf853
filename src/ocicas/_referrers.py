"""Finding referrers: stored manifests and indexes whose ``subject`` is in a graph.

A referrer (a signature, an SBOM) points at its subject, not the other way
round, so nothing in the graph leads to it: it has to be found among the other
blobs of the store. Only a subject that is present counts: an absent one (in
:attr:`Graph.absent_subjects`, reached through another referrer) keeps nothing.
GC keeps referrers of live content, and copy can bring them
along; both search the same way, reading only blobs that can be JSON documents.
:func:`scan_referrers` is the same search for one subject: the default of
:meth:`Engine.referrers` for engines that can list their blobs (a registry asks
its referrers API instead).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Final

import anyio

from ._context import Context
from ._descriptor import Descriptor
from ._digest import Digest
from ._engine import BlobInfo, Engine
from ._errors import BlobNotFoundError, InvalidError, OCICASError
from ._graph import DEFAULT_CONCURRENCY, Graph
from ._json import DEFAULT_JSON_LIMIT, load_json
from ._media_types import INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES, MEDIA_TYPE_IMAGE_INDEX, MEDIA_TYPE_IMAGE_MANIFEST
from ._tasks import task_group
from ._threads import run_sync

__all__ = ["SNIFF_SIZE", "find_referrers", "referrer_descriptor", "scan_referrers"]

#: Bytes to ask :meth:`Engine.stat_blobs` for (``head=``) to tell JSON from anything else.
SNIFF_SIZE: Final = 64


def referrer_descriptor(digest: Digest, data: bytes, media_type: str | None = None) -> tuple[Digest, Descriptor] | None:
    """If ``data`` is a manifest or index with a ``subject``: that subject's digest, and a descriptor of it.

    The descriptor is the one the distribution-spec's referrers list holds: media
    type, digest, size, ``artifactType`` (the document's own, else a manifest's
    config media type) and the document's annotations. ``media_type`` is the
    document's if known (a registry's ``Content-Type``), else read from it.
    """
    try:
        document = load_json(data, "blob")
        if not isinstance(document, dict) or not isinstance(document.get("subject"), dict):
            return None
        subject = Descriptor.from_dict(document["subject"]).digest
        if media_type is None:
            media_type = document.get("mediaType")
        if not isinstance(media_type, str):
            media_type = MEDIA_TYPE_IMAGE_INDEX if "manifests" in document else MEDIA_TYPE_IMAGE_MANIFEST
        if media_type not in MANIFEST_MEDIA_TYPES and media_type not in INDEX_MEDIA_TYPES:
            return None
        artifact_type = document.get("artifactType")
        config = document.get("config")
        if not artifact_type and media_type in MANIFEST_MEDIA_TYPES and isinstance(config, dict):
            artifact_type = config.get("mediaType")
        annotations = document.get("annotations")
        descriptor = Descriptor(media_type=media_type, digest=digest, size=len(data))
    except OCICASError:
        return None
    if isinstance(artifact_type, str) and artifact_type:
        try:
            descriptor = descriptor.replace(artifact_type=artifact_type)
        except InvalidError:
            pass  # not a media type: listed without one, as a registry would not filter on it
    if isinstance(annotations, dict) and annotations and all(isinstance(v, str) for v in annotations.values()):
        descriptor = descriptor.replace(annotations=annotations)
    return subject, descriptor


def _as_referrer(digest: Digest, data: bytes) -> tuple[Digest, Descriptor] | None:
    found = referrer_descriptor(digest, data)
    if found is None:
        return None
    subject, descriptor = found
    return subject, Descriptor(media_type=descriptor.media_type, digest=digest, size=descriptor.size)


async def find_referrers(
    engine: Engine,
    graph: Graph,
    candidates: Iterable[Digest],
    infos: Mapping[Digest, BlobInfo] | None,
    grow: Callable[[list[Descriptor]], Awaitable[object]],
    *,
    concurrency: int,
    max_size: int,
    ctx: Context | None,
) -> set[Digest]:
    """Add to ``graph`` every candidate whose ``subject`` is in it, to a fixed point; return them.

    ``infos`` must hold each candidate's :class:`BlobInfo` with at least
    :data:`SNIFF_SIZE` bytes of ``head``: only candidates no larger than
    ``max_size`` that start like JSON are read (tarballs and compressed layers
    never are; ``None``: they were sniffed so already, by ``Engine._gc_triage``).
    ``grow(descriptors)`` walks new roots into ``graph``; the bytes read here are
    left in :attr:`Graph.data`, so the walk does not read them again.
    """
    found: dict[Digest, tuple[Digest, Descriptor, bytes]] = {}
    limiter = anyio.CapacityLimiter(concurrency)

    async def inspect(digest: Digest) -> None:
        async with limiter:
            try:
                data = await engine.read_blob(digest, max_size=max_size, ctx=ctx)
            except (InvalidError, BlobNotFoundError):
                return  # corrupt, or deleted meanwhile: nothing that can point anywhere
        referrer = _as_referrer(digest, data)
        if referrer is not None:
            found[digest] = (*referrer, data)

    def json_like() -> list[Digest]:
        if infos is None:
            return list(candidates)
        return [d for d in candidates if infos[d].size <= max_size and infos[d].head.lstrip()[:1] in (b"{", b"")]

    async with task_group() as tg:
        for digest in await run_sync(json_like):  # O(blobs): off the event loop
            tg.start_soon(inspect, digest)

    kept: set[Digest] = set()
    while True:  # a referrer's graph may hold the subject of another
        new = sorted(
            d
            for d, (subject, _, _) in found.items()
            if d not in graph.descriptors and subject in graph.descriptors and subject not in graph.absent_subjects
        )
        if not new:
            return kept
        kept.update(new)
        for digest in new:
            graph.data[digest] = found[digest][2]
        await grow([found[digest][1] for digest in new])


async def scan_referrers(engine: Engine, subject: Digest, artifact_type: str | None) -> list[Descriptor]:
    """The referrers of ``subject`` among every blob of ``engine`` (its hooks: call it inside an operation).

    Only blobs that start like JSON and are at most :data:`~ocicas._json.DEFAULT_JSON_LIMIT`
    bytes are read, each verified; with ``artifact_type``, only referrers of that type.
    """
    # the collector's hooks: per-blob text and ints, no Digest or BlobInfo for each of the store's blobs
    _, _, _, json_like = await engine._gc_triage(await engine._gc_list(), None, SNIFF_SIZE, DEFAULT_JSON_LIMIT)
    found: dict[Digest, Descriptor] = {}
    limiter = anyio.CapacityLimiter(DEFAULT_CONCURRENCY)

    async def inspect(text: str) -> None:
        digest = Digest._trusted(text)
        async with limiter:
            try:
                async with await engine._reader(digest, None) as reader:
                    data = await reader.read()
            except (InvalidError, BlobNotFoundError):
                return  # corrupt, or deleted meanwhile
        referrer = referrer_descriptor(digest, data)
        if referrer is not None and referrer[0] == subject and artifact_type in (None, referrer[1].artifact_type):
            found[digest] = referrer[1]

    async with task_group() as tg:
        for digest in json_like:
            tg.start_soon(inspect, digest)
    return [found[d] for d in sorted(found)]
