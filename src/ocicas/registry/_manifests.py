"""Manifests on a registry: what we accept, how a response becomes a descriptor, and a small document cache."""

from __future__ import annotations

import collections
from typing import Final

import httpx

from .._descriptor import Descriptor
from .._digest import Digest, Verifier
from .._errors import DigestMismatchError, InvalidError, OCICASError
from .._json import DEFAULT_JSON_LIMIT, load_json
from .._media_types import INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES
from .._models import Index, Manifest

__all__ = ["ACCEPT", "DocumentCache", "check_document", "child_manifests", "describe", "is_manifest_type"]

#: Every manifest and index type we read. distribution 2.8 answers 404 to a request
#: for an OCI manifest that does not accept OCI types, so all four are always sent.
ACCEPT: Final = ", ".join(sorted(MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES))
#: Content types that say nothing about which manifest a body is.
_GENERIC: Final = frozenset({"", "application/json", "application/octet-stream", "text/plain"})


def is_manifest_type(media_type: str) -> bool:
    """Whether a registry keeps documents of ``media_type`` in its manifest store."""
    return media_type in MANIFEST_MEDIA_TYPES or media_type in INDEX_MEDIA_TYPES


def check_document(media_type: str, data: bytes) -> Manifest | Index:
    """Parse a manifest or index strictly (it is refused before a registry sees it); :class:`InvalidError` if bad."""
    if media_type in INDEX_MEDIA_TYPES:
        return Index.from_json(data, media_type=media_type)
    return Manifest.from_json(data, media_type=media_type)


def child_manifests(media_type: str, data: bytes) -> list[Descriptor]:
    """The manifests and indexes an index lists (``[]`` for a manifest): what must be pushed before it."""
    if media_type not in INDEX_MEDIA_TYPES:
        return []
    return [d for d in Index.from_json(data, media_type=media_type).manifests if is_manifest_type(d.media_type)]


def describe(response: httpx.Response, data: bytes, reference: str, where: str) -> Descriptor:
    """The descriptor of a manifest answer: its media type, digest (verified against ``data``) and size.

    The digest is the ``Docker-Content-Digest`` header, checked against the body, or
    the body's sha256 when the header is absent; a ``reference`` that is a digest
    must match too. The media type is the ``Content-Type``, or the body's own
    ``mediaType`` when the header is generic.
    """
    claimed: Digest | None = None
    header = response.headers.get("docker-content-digest")
    if header:
        try:
            claimed = Digest(header.strip())
        except InvalidError:
            raise InvalidError(
                f"manifest {reference!r} in {where}: invalid Docker-Content-Digest {header!r:.100}"
            ) from None
    if ":" in reference:
        requested = Digest(reference)
        if claimed is not None and claimed != requested:
            raise DigestMismatchError(f"manifest {reference} in {where}: the registry answered with {claimed}")
        claimed = requested
    digest: Digest
    if claimed is not None and claimed.supported:
        verifier = Verifier(claimed)
        verifier.update(data)
        actual = verifier.result()
        if actual != claimed:
            raise DigestMismatchError(
                f"manifest {reference!r} in {where}: the registry says {claimed}, the content hashes to {actual}"
            )
        digest = claimed
    else:
        digest = Digest.from_bytes(data)
    content_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
    media_type = content_type
    if content_type in _GENERIC:
        try:
            document = load_json(data, f"manifest {reference!r}")
        except OCICASError:
            document = None
        media_type = document.get("mediaType", "") if isinstance(document, dict) else ""
        if not isinstance(media_type, str) or not media_type:
            raise InvalidError(f"manifest {reference!r} in {where} has no media type (Content-Type {content_type!r})")
    try:
        return Descriptor(media_type=media_type, digest=digest, size=len(data))
    except InvalidError as exc:
        raise InvalidError(f"manifest {reference!r} in {where}: {exc}") from None


class DocumentCache:
    """Small JSON documents recently stored or fetched, by digest: verified content, bounded in bytes.

    ``put_reference`` needs the bytes of the manifest it tags; when ``put_blob``
    stored them a moment earlier they are taken from here instead of downloaded.
    """

    def __init__(self, limit: int = 16 << 20, item_limit: int = DEFAULT_JSON_LIMIT) -> None:
        self._items: collections.OrderedDict[Digest, bytes] = collections.OrderedDict()
        self._size = 0
        self._limit = limit
        self._item_limit = item_limit

    def offer(self, digest: Digest, data: bytes | bytearray | memoryview) -> None:
        """Keep ``data`` (whose digest was verified) if it looks like a JSON document and fits."""
        if len(data) > self._item_limit or digest in self._items:
            return
        view = memoryview(data)[:64]
        if bytes(view).lstrip()[:1] != b"{":
            return
        self._items[digest] = bytes(data)
        self._size += len(data)
        while self._size > self._limit:
            _, dropped = self._items.popitem(last=False)
            self._size -= len(dropped)

    def get(self, digest: Digest) -> bytes | None:
        """The document stored under ``digest``, or ``None``."""
        data = self._items.get(digest)
        if data is not None:
            self._items.move_to_end(digest)
        return data

    def discard(self, digest: Digest) -> None:
        """Forget ``digest`` (its blob was deleted)."""
        data = self._items.pop(digest, None)
        if data is not None:
            self._size -= len(data)
