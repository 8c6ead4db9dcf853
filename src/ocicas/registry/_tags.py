"""Tags: the manifest store of one repository, read by tag, written in checked batches, deleted safely.

Writing tags (:meth:`TagStore.update`) first checks everything that can fail
without changing a tag: clobbers, the content of every manifest (its bytes from
this engine's recent ``put_blob``, the blob store or the manifest store, parsed
strictly), the push of each index's child manifests and of every manifest by
digest, and whether deletes are safe. Only then are tags deleted and written.

Deleting a tag: ``DELETE /manifests/<tag>`` where the registry allows it
(distribution spec 1.1). distribution 2.8 answers it ``400 DIGEST_INVALID`` and
deletes only by digest, which removes the manifest *and every tag on it*; there
the manifest is deleted only when no other tag, and no index another tag names,
still needs it. Otherwise :class:`~ocicas.UnsupportedError` says which does.
"""

from __future__ import annotations

import collections
import json
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping

import anyio
import httpx

from .._descriptor import Descriptor
from .._digest import Digest
from .._errors import (
    BlobNotFoundError,
    BlobTooLargeError,
    ClobberError,
    InvalidError,
    SizeMismatchError,
    UnsupportedError,
)
from .._json import DEFAULT_JSON_LIMIT
from .._media_types import INDEX_MEDIA_TYPES
from .._tasks import task_group
from ._manifests import ACCEPT, DocumentCache, check_document, child_manifests, describe, is_manifest_type
from ._referrers import Referrers
from ._streams import body_of, read_body, release
from ._transport import RegistryClient, error_codes, error_list

__all__ = ["TagStore"]

#: ``read(digest, max_size)``: a whole blob, verified, from the engine (blob store, then manifest store).
ReadBlob = Callable[[Digest, int], Awaitable[bytes]]


class TagStore:
    """The tags and manifests of one repository. See the module documentation."""

    def __init__(
        self, client: RegistryClient, documents: DocumentCache, manifests: set[Digest], read: ReadBlob
    ) -> None:
        self._client = client
        self._documents = documents
        #: Digests known to be in the manifest store (shared with the engine).
        self._manifests = manifests
        self._read = read
        self._tag_deletes: bool | None = None  # whether DELETE /manifests/<tag> works here
        #: Referrers found through the API or the referrers tag, which every manifest PUT keeps up.
        self.referrers = Referrers(client, self)

    async def state(self, name: str) -> Descriptor | None:
        """What tag ``name`` holds (media type, digest, size) from a ``HEAD``, or ``None``."""
        response = await self._client.head(f"manifests/{name}", accept=ACCEPT)
        if response is None:
            return None
        digest = response.headers.get("docker-content-digest")
        media_type = response.headers.get("content-type", "").partition(";")[0].strip()
        size = response.headers.get("content-length", "")
        if digest and is_manifest_type(media_type) and size.isdigit():
            return Descriptor(media_type=media_type, digest=digest, size=int(size))
        found = await self.fetch(name)  # a registry that does not say: read it
        return None if found is None else found[0]

    async def fetch(self, reference: str) -> tuple[Descriptor, bytes] | None:
        """``GET /manifests/<reference>`` (capped, verified): its descriptor and bytes, or ``None`` if absent."""
        url = self._client.url(f"manifests/{reference}")
        response = await self._client.request("GET", url, headers={"Accept": ACCEPT}, stream=True)
        if response.status_code != 200:
            await release(response)
            if response.status_code == 404:
                return None
            raise self._client.error(response, f"GET manifest {reference}")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > DEFAULT_JSON_LIMIT:
            await release(response)
            raise BlobTooLargeError(
                f"manifest {reference!r} in {self._client.where} has {declared} bytes, over the cap of "
                f"{DEFAULT_JSON_LIMIT}"
            )
        try:
            data = await read_body(response, DEFAULT_JSON_LIMIT)
        except httpx.TransportError as exc:
            raise self._client.dropped(f"reading manifest {reference!r}", exc) from exc
        if len(data) > DEFAULT_JSON_LIMIT:
            raise BlobTooLargeError(
                f"manifest {reference!r} in {self._client.where} is over the cap of {DEFAULT_JSON_LIMIT}"
            )
        descriptor = describe(response, data, reference, self._client.where)
        self._documents.offer(descriptor.digest, data)
        self._manifests.add(descriptor.digest)
        return descriptor, data

    async def _put_tags(self, puts: Mapping[str, Descriptor], bodies: Mapping[Digest, bytes]) -> None:
        """``PUT`` the tags concurrently, but an index's only after those of its children in the batch.

        Re-putting a manifest rewrites its link in distribution's storage, and an
        index put meanwhile can find its child missing (``MANIFEST_BLOB_UNKNOWN``).
        """
        pending = collections.Counter(d.digest for d in puts.values())
        landed = {digest: anyio.Event() for digest in pending}

        async def tag(name: str, descriptor: Descriptor) -> None:
            for child in child_manifests(descriptor.media_type, bodies[descriptor.digest]):
                if child.digest in landed and child.digest != descriptor.digest:
                    await landed[child.digest].wait()
            await self._put_manifest(name, descriptor, bodies[descriptor.digest])
            pending[descriptor.digest] -= 1
            if not pending[descriptor.digest]:
                landed[descriptor.digest].set()

        async with task_group() as tg:
            for name, descriptor in puts.items():
                tg.start_soon(tag, name, descriptor)

    async def _push_manifests(self, roots: Iterable[Descriptor]) -> dict[Digest, bytes]:
        """Make sure every root (and each index's children) is in the manifest store; return the roots' bytes."""
        bodies: dict[Digest, bytes] = {}
        started: dict[Digest, anyio.Event] = {}

        async def push(descriptor: Descriptor, root: bool) -> None:
            digest = descriptor.digest
            if digest in started:
                await started[digest].wait()
                return
            started[digest] = done = anyio.Event()
            try:
                if not root and (
                    digest in self._manifests or await self._client.head(f"manifests/{digest}", accept=ACCEPT)
                ):
                    self._manifests.add(digest)
                    return
                data = await self._manifest_bytes(descriptor)
                check_document(descriptor.media_type, data)
                async with task_group() as tg:
                    for child in child_manifests(descriptor.media_type, data):
                        tg.start_soon(push, child, False)
                await self._put_manifest(str(digest), descriptor, data)
                if root:
                    bodies[digest] = data
            finally:
                done.set()

        unique = {d.digest: d for d in roots}
        async with task_group() as tg:
            for descriptor in unique.values():
                tg.start_soon(push, descriptor, True)
        for digest, descriptor in unique.items():  # a root that was also another root's child
            if digest not in bodies:
                bodies[digest] = await self._manifest_bytes(descriptor)
        return bodies

    async def _manifest_bytes(self, descriptor: Descriptor) -> bytes:
        """The verified bytes of the manifest ``descriptor`` names, from wherever this engine can find them."""
        digest = descriptor.digest
        if descriptor.size > DEFAULT_JSON_LIMIT:
            raise BlobTooLargeError(
                f"{descriptor.media_type} {digest} has {descriptor.size} bytes, over the cap of {DEFAULT_JSON_LIMIT}"
            )
        data = self._documents.get(digest)
        if data is None:
            data = descriptor.data
        if data is None:
            try:
                data = await self._read(digest, DEFAULT_JSON_LIMIT)
            except BlobNotFoundError:
                raise BlobNotFoundError(
                    f"{descriptor.media_type} {digest} is not stored in {self._client.where}: put_blob it first"
                ) from None
        if len(data) != descriptor.size:
            raise SizeMismatchError(
                f"{descriptor.media_type} {digest} has {len(data)} bytes, descriptor says {descriptor.size}"
            )
        return data

    async def _put_manifest(self, reference: str, descriptor: Descriptor, data: bytes) -> None:
        url = self._client.url(f"manifests/{reference}")
        response = await self._client.request("PUT", url, headers={"Content-Type": descriptor.media_type}, content=data)
        if response.status_code in (200, 201, 202, 204):
            self._manifests.add(descriptor.digest)
            await self.referrers.pushed(descriptor, data, response)
            return
        codes = error_codes(response)
        what = f"{descriptor.media_type} {descriptor.digest}"
        if "MANIFEST_BLOB_UNKNOWN" in codes or "BLOB_UNKNOWN" in codes:
            missing = [
                str(e["detail"])
                for e in error_list(response)
                if e.get("code") in ("MANIFEST_BLOB_UNKNOWN", "BLOB_UNKNOWN") and isinstance(e.get("detail"), str)
            ]
            content = f"blob {missing[0]}" if missing else "content"
            raise BlobNotFoundError(f"{what} refers to {content}, which is not in {self._client.where}")
        if response.status_code == 400 or "MANIFEST_INVALID" in codes or "TAG_INVALID" in codes:
            raise InvalidError(f"{what} refused as {reference!r}: {self._client.error(response, 'PUT')}")
        raise self._client.error(response, f"PUT manifest {reference}")

    async def _delete_tags(
        self, deletes: Mapping[str, Digest], puts: Mapping[str, Descriptor], bodies: Mapping[Digest, bytes]
    ) -> None:
        """Delete tags: one by one where the registry can; else their manifests, if nothing else needs them."""
        if self._tag_deletes is None:  # probe once with a tag that does not exist
            probe = f"ocicas-probe-{secrets.token_hex(8)}"
            response = await self._client.request("DELETE", self._client.url(f"manifests/{probe}"))
            self._tag_deletes = response.status_code in (200, 202, 204, 404)
        if self._tag_deletes:
            async with task_group() as tg:
                for name in deletes:
                    tg.start_soon(self._delete_manifest, name)
            return
        needed = await self._holders(set(deletes.values()), set(deletes) | set(puts), puts, bodies)
        for name, digest in deletes.items():
            if digest in needed:
                raise UnsupportedError(
                    f"cannot delete reference {name!r} alone in {self._client.where}: this registry deletes a tag "
                    f"only by deleting its manifest {digest}, which {needed[digest]} still needs"
                )
        for digest in sorted(set(deletes.values())):
            await self._delete_manifest(str(digest))
            self._manifests.discard(digest)

    async def _delete_manifest(self, reference: str) -> None:
        response = await self._client.request("DELETE", self._client.url(f"manifests/{reference}"))
        if response.status_code not in (200, 202, 204, 404):
            raise self._client.delete_refused(response, f"manifests/{reference}")

    async def _holders(
        self,
        digests: set[Digest],
        changing: set[str],
        puts: Mapping[str, Descriptor],
        bodies: Mapping[Digest, bytes],
    ) -> dict[Digest, str]:
        """Which of ``digests`` another tag (or an index it names) still needs after the change: digest → who."""
        needed: dict[Digest, set[str]] = {}
        opened: set[Digest] = set()

        async def reach(descriptor: Descriptor, who: str) -> None:
            if descriptor.digest in digests:
                needed.setdefault(descriptor.digest, set()).add(who)
            if descriptor.media_type not in INDEX_MEDIA_TYPES or descriptor.digest in opened:
                return
            opened.add(descriptor.digest)
            data = bodies.get(descriptor.digest) or await self._manifest_bytes(descriptor)
            for child in child_manifests(descriptor.media_type, data):
                await reach(child, f"the index {descriptor.digest} named by {who}")

        others = [t for t in await self.names() if t not in changing]
        held: dict[str, Descriptor | None] = {}

        async def look(name: str) -> None:
            held[name] = await self.state(name)

        async with task_group() as tg:
            for name in others:
                tg.start_soon(look, name)
        roots = [(d, f"tag {n!r}") for n, d in held.items() if d is not None]
        roots += [(d, f"tag {n!r}") for n, d in puts.items()]
        async with task_group() as tg:
            for descriptor, who in roots:
                tg.start_soon(reach, descriptor, who)
        return {digest: sorted(whos)[0] for digest, whos in needed.items()}

    async def names(self) -> list[str]:
        """Every tag, sorted, across ``Link`` pages (``[]`` if the repository does not exist yet)."""
        tags: set[str] = set()
        url: str | None = self._client.url("tags/list")
        seen: set[str] = set()
        while url is not None and url not in seen:
            seen.add(url)
            response = await self._client.request("GET", url)
            if response.status_code == 404:
                break  # NAME_UNKNOWN: nothing pushed yet
            if response.status_code != 200:
                raise self._client.error(response, "GET tags/list")
            try:
                body = json.loads(body_of(response))
            except ValueError:
                raise InvalidError(f"{self._client.where} answered tags/list with invalid JSON") from None
            listed = body.get("tags") if isinstance(body, dict) else None
            if listed is not None and (not isinstance(listed, list) or not all(isinstance(t, str) for t in listed)):
                raise InvalidError(f"{self._client.where} answered tags/list with a malformed tag list")
            tags.update(listed or ())
            following = response.links.get("next", {}).get("url")
            url = str(response.request.url.join(following)) if following else None
        return sorted(tags)

    async def update(self, changes: Mapping[str, Descriptor | None], *, replace: bool) -> None:
        """Apply validated tag changes: every check first (clobbers, content, safe deletes), then the changes."""
        current: dict[str, Descriptor | None] = {}

        async def look(name: str) -> None:
            current[name] = await self.state(name)

        async with task_group() as tg:
            for name in changes:
                tg.start_soon(look, name)
        puts: dict[str, Descriptor] = {}
        deletes: dict[str, Digest] = {}
        for name, descriptor in changes.items():
            held = current[name]
            if descriptor is None:
                if held is not None:
                    deletes[name] = held.digest
            elif held is None or (held.digest, held.media_type) != (descriptor.digest, descriptor.media_type):
                if held is not None and not replace:
                    raise ClobberError(f"reference {name!r} already holds {held.digest}, not {descriptor.digest}")
                puts[name] = descriptor
        bodies = await self._push_manifests(puts.values())
        if deletes:
            await self._delete_tags(deletes, puts, bodies)
        await self._put_tags(puts, bodies)
