"""Referrers on a registry: the distribution-spec 1.1 referrers API, and its tag-schema fallback.

**Finding** the referrers of a subject: ``GET /v2/<name>/referrers/<digest>``
(``?artifactType=`` when filtered), an image index of descriptors, following
``Link: <…>; rel="next"`` pages. A registry without the API answers 404; then
the referrers are those listed by the image index tagged ``<alg>-<encoded>``
(the *referrers tag*), and none if that tag is absent or holds no valid image
index. A filter the registry did not apply (no ``OCI-Filters-Applied:
artifactType``) is applied here.

**Pushing** a manifest or index that has a ``subject`` (every manifest ``PUT``
of :class:`~ocicas.registry._tags.TagStore` comes through :meth:`Referrers.pushed`):
a registry with the API says so with an ``OCI-Subject`` header. Without it, the
API is probed once (``GET …/referrers/<subject>``); a registry that answers it
404 gets its referrers tag updated as oras and regclient do: read the index (an
empty one if the tag is absent; anything but an image index is refused), append
the descriptor (media type, digest, size, ``artifactType``, annotations) unless
one with its digest is there, and ``PUT`` it back. Updates of one subject's tag
are serialised within an engine; two clients updating the same tag at once can
lose one update (distribution 2.8 has no conditional ``PUT``), as with oras. The
superseded index stays in the repository untagged, for the registry's own
collector (``garbage-collect --delete-untagged``). ``delete_blob`` of a referrer
takes it out of the tag (the spec's "Deleting Manifests"); a tag left with no
referrers holds an empty index.

``put_blob`` of such a document (content in hand) also pushes it by digest to
the manifest store (:meth:`Referrers.stored`): a referrer is usually untagged,
and only the manifest store makes it one.
"""

from __future__ import annotations

import re
import weakref
from typing import TYPE_CHECKING, Final

import anyio
import httpx

from .._descriptor import Descriptor
from .._digest import Digest
from .._errors import BlobTooLargeError, InvalidError, OCICASError, RegistryError
from .._json import DEFAULT_JSON_LIMIT, dump_json, load_json
from .._media_types import MEDIA_TYPE_IMAGE_INDEX
from .._models import Index
from .._referrers import referrer_descriptor
from ._manifests import is_manifest_type
from ._streams import read_body, release
from ._transport import RegistryClient, error_codes

if TYPE_CHECKING:
    from ._tags import TagStore

__all__ = ["Referrers", "referrers_tag"]

#: Characters a tag cannot hold, replaced by ``-`` in a referrers tag.
_NOT_IN_TAG: Final = re.compile(r"[^A-Za-z0-9_.-]")


def referrers_tag(digest: Digest) -> str:
    """The referrers tag of ``digest`` (distribution-spec "Referrers Tag Schema"): ``sha256-<hex>``."""
    algorithm = _NOT_IN_TAG.sub("-", digest.algorithm[:32])
    encoded = _NOT_IN_TAG.sub("-", digest.encoded[:64])
    return f"{algorithm}-{encoded}"


def _filtered(response: httpx.Response) -> bool:
    applied = response.headers.get("oci-filters-applied", "")
    return "artifacttype" in (f.strip().lower() for f in applied.split(","))


class Referrers:
    """The referrers of one repository: found through the API or the referrers tag, which pushes keep up."""

    def __init__(self, client: RegistryClient, tags: TagStore) -> None:
        self._client = client
        self._tags = tags
        #: Whether the registry has the referrers API (``None``: not known yet).
        self.api: bool | None = None
        self._locks: weakref.WeakValueDictionary[Digest, anyio.Lock] = weakref.WeakValueDictionary()
        #: ``(subject, referrer)`` pairs known to be in the subject's referrers tag.
        self._listed: set[tuple[Digest, Digest]] = set()

    async def find(self, subject: Digest, artifact_type: str | None) -> list[Descriptor]:
        """The referrers of ``subject``: from the API, or from the referrers tag where the API answers 404."""
        if self.api is not False:
            found = await self._from_api(subject, artifact_type)
            if found is not None:
                return found
        return await self._from_tag(subject, artifact_type)

    async def _from_api(self, subject: Digest, artifact_type: str | None) -> list[Descriptor] | None:
        """Every page of ``GET …/referrers/<subject>``, or ``None`` if the registry answers 404."""
        params = {"artifactType": artifact_type} if artifact_type is not None else None
        url: str | None = self._client.url(f"referrers/{subject}")
        seen: set[str] = set()
        found: list[Descriptor] = []
        while url is not None and url not in seen:
            seen.add(url)
            response = await self._client.request(
                "GET", url, headers={"Accept": MEDIA_TYPE_IMAGE_INDEX}, params=params, stream=True
            )
            if response.status_code == 404 and not found:
                await release(response)
                # NAME_UNKNOWN: a repository not pushed yet, which says nothing of the API
                if "NAME_UNKNOWN" not in error_codes(response):
                    self.api = False
                return None
            if response.status_code != 200:
                await release(response)
                raise self._client.error(response, f"GET referrers/{subject}")
            self.api = True
            data = await self._read(response, f"the referrers of {subject}")
            try:
                manifests = list(Index.from_json(data).manifests)
            except InvalidError as exc:
                raise InvalidError(f"{self._client.where} answered the referrers of {subject} with {exc}") from None
            if artifact_type is not None and not _filtered(response):
                manifests = [m for m in manifests if m.artifact_type == artifact_type]
            found += [m for m in manifests if is_manifest_type(m.media_type)]
            following = response.links.get("next", {}).get("url")
            url, params = (str(response.request.url.join(following)), None) if following else (None, params)
        return found

    async def _read(self, response: httpx.Response, what: str) -> bytes:
        try:
            data = await read_body(response, DEFAULT_JSON_LIMIT)
        except httpx.TransportError as exc:
            raise self._client.dropped(f"reading {what}", exc) from exc
        if len(data) > DEFAULT_JSON_LIMIT:
            raise BlobTooLargeError(f"{self._client.where}: {what} is over the cap of {DEFAULT_JSON_LIMIT} bytes")
        return data

    async def _from_tag(self, subject: Digest, artifact_type: str | None) -> list[Descriptor]:
        """The referrers the referrers tag lists; none if it is absent or not a valid image index (as the spec says)."""
        found = await self._tags.fetch(referrers_tag(subject))
        if found is None or found[0].media_type != MEDIA_TYPE_IMAGE_INDEX:
            return []
        try:
            manifests = Index.from_json(found[1]).manifests
        except InvalidError:
            return []
        return [
            m
            for m in manifests
            if is_manifest_type(m.media_type) and (artifact_type is None or m.artifact_type == artifact_type)
        ]

    # -- pushing ----------------------------------------------------------------------------

    async def stored(self, digest: Digest, data: bytes) -> None:
        """After ``put_blob`` of ``data``: a manifest or index with a ``subject`` is pushed by digest too."""
        if len(data) > DEFAULT_JSON_LIMIT or data[:64].lstrip()[:1] != b"{":
            return
        found = referrer_descriptor(digest, data)
        if found is None:
            return
        media_type = found[1].media_type
        await self._tags._push_manifests([Descriptor(media_type=media_type, digest=digest, size=len(data))])

    async def pushed(self, descriptor: Descriptor, data: bytes, response: httpx.Response) -> None:
        """After a manifest ``PUT`` answered ``response``: keep the referrers tag up if it has a ``subject``."""
        found = referrer_descriptor(descriptor.digest, data, descriptor.media_type)
        if found is None:
            return
        subject, listed = found
        if response.headers.get("oci-subject"):
            self.api = True
        if self.api is None:
            await self._from_api(subject, None)  # sets self.api, unless the repository is unknown
        if self.api or (subject, listed.digest) in self._listed:
            return
        lock = self._locks.get(subject)
        if lock is None:
            lock = self._locks[subject] = anyio.Lock()
        async with lock:
            await self._list(subject, listed)

    async def subject_of(self, digest: Digest) -> Digest | None:
        """Before ``delete_blob`` of ``digest``: its subject if it is a referrer whose removal must be listed."""
        if self.api:
            return None
        data = self._tags._documents.get(digest)
        if data is None:
            try:
                data = await self._document(digest)
            except RegistryError:
                return None  # the registry will not say: the delete itself reports what it answers
        referrer = None if data is None else referrer_descriptor(digest, data)
        return None if referrer is None else referrer[0]

    async def _document(self, digest: Digest) -> bytes | None:
        """The bytes of ``digest`` if it can be a JSON document: a layer is sniffed, never read whole.

        distribution answers ``GET /manifests/<digest>`` of a layer with a 500, so the
        manifest store is asked only for what the blob store does not hold.
        """
        response = await self._client.head(f"blobs/{digest}")
        if response is None:
            found = await self._tags.fetch(str(digest))
            return None if found is None else found[1]
        if int(response.headers.get("content-length", "0") or 0) > DEFAULT_JSON_LIMIT:
            return None
        url = self._client.url(f"blobs/{digest}")
        head = await self._client.request(
            "GET",
            url,
            headers={"Range": "bytes=0-63", "Accept-Encoding": "identity"},
            stream=True,
            follow_redirects=True,
        )
        if head.status_code not in (200, 206):
            await release(head)
            return None
        try:
            start = (await read_body(head, 64))[:64]
        except httpx.TransportError as exc:
            raise self._client.dropped(f"reading the head of blob {digest}", exc) from exc
        if start.lstrip()[:1] != b"{":
            return None
        return await self._tags._read(digest, DEFAULT_JSON_LIMIT)

    async def deleted(self, digest: Digest, subject: Digest) -> None:
        """After ``delete_blob`` of the referrer ``digest``: take it out of its subject's referrers tag (no API).

        Left listed, it would make every later update of the tag fail on registries
        that check an index's manifests (distribution: ``MANIFEST_BLOB_UNKNOWN``).
        """
        if self.api is None:
            await self._from_api(subject, None)
        if self.api:
            return
        lock = self._locks.get(subject)
        if lock is None:
            lock = self._locks[subject] = anyio.Lock()
        async with lock:
            self._listed.discard((subject, digest))
            await self._change(subject, removed=digest)

    async def _list(self, subject: Digest, listed: Descriptor) -> None:
        await self._change(subject, added=listed)
        self._listed.add((subject, listed.digest))

    async def _change(self, subject: Digest, *, added: Descriptor | None = None, removed: Digest | None = None) -> None:
        """Read the referrers tag of ``subject``, add or remove one entry (by digest), and write it back if changed."""
        tag = referrers_tag(subject)
        found = await self._tags.fetch(tag)
        document: dict[str, object] = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_IMAGE_INDEX, "manifests": []}
        if found is not None:
            held, body = found
            what = f"the referrers tag {tag!r} of {subject} in {self._client.where}"
            if held.media_type != MEDIA_TYPE_IMAGE_INDEX:
                raise InvalidError(f"{what} holds a {held.media_type}, not an image index: it was not updated")
            try:
                Index.from_json(body)
                document = load_json(body, what)
            except OCICASError as exc:
                raise InvalidError(f"{what} is not a valid image index ({exc}): it was not updated") from None
        elif added is None:
            return
        manifests = document["manifests"]
        assert isinstance(manifests, list)
        digests = [entry.get("digest") for entry in manifests]
        if added is not None:
            if added.digest in digests:
                return
            manifests.append(added.to_dict())
        if removed is not None:
            if removed not in digests:
                return
            document["manifests"] = [entry for entry in manifests if entry.get("digest") != removed]
        data = dump_json(document)
        index = Descriptor(media_type=MEDIA_TYPE_IMAGE_INDEX, digest=Digest.from_bytes(data), size=len(data))
        await self._tags._put_manifest(tag, index, data)
