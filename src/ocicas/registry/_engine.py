"""The registry engine: the Engine protocol over one repository of an OCI distribution registry.

How the protocol maps onto the distribution API (``/v2/<name>/…``):

=========================  ==================================================================
``put_blob``               blob store: ``HEAD`` (present content is never sent again), then one
                           ``POST`` + ``PUT ?digest=`` (content up to 4 MiB), or ``POST``, chunked
                           ``PATCH``es and ``PUT`` (larger streams). Verified locally first: on a
                           mismatch the session is cancelled (``DELETE``) and nothing is stored
``get_blob``/``stat_blob`` blob store, falling back to the manifest store (``/manifests/<digest>``),
                           so manifests pushed by other tools read like any blob
``delete_blob``            ``DELETE`` in the blob store and, for a manifest, in the manifest store
                           (the registry then drops every tag on that manifest)
``put_reference``          the manifest's bytes (from this engine's recent ``put_blob``, the blob
                           store or the manifest store) are checked, an index's child manifests
                           are pushed by digest first, the manifest itself by digest, and then
                           ``PUT /manifests/<tag>``. A tag keeps only media type, digest, size
``get_reference``          ``GET /manifests/<tag>``: digest verified against the body
``list_references``        ``GET /tags/list``, following ``Link`` pages
``delete_reference``       ``DELETE /manifests/<tag>`` (distribution spec 1.1); on registries that
                           delete only by digest (distribution 2.8), the manifest is deleted by
                           digest, but only when no other tag and no tagged index still needs it
``list_blobs``             :class:`~ocicas.UnsupportedError`: the API cannot list blobs
``list_roots``             :class:`~ocicas.UnsupportedError`: nor untagged manifests, so
                           :func:`ocicas.gc` cannot run on a registry (use the registry's own GC)
``gc``                     nothing to do: abandoned uploads are purged by the registry
=========================  ==================================================================
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
from collections.abc import Iterable, Mapping
from contextlib import aclosing
from typing import Final, TypeGuard

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx

from .._context import Context, bound
from .._descriptor import Descriptor
from .._digest import Digest, Verifier, addressable
from .._engine import CHUNK_SIZE, BlobInfo, BlobReader, BlobSource, Engine, iterate_source
from .._errors import (
    BlobNotFoundError,
    BlobTooLargeError,
    ClobberError,
    InvalidError,
    ReferenceNotFoundError,
    RegistryUnreachableError,
    SizeMismatchError,
    UnsupportedError,
)
from .._json import DEFAULT_JSON_LIMIT
from .._media_types import INDEX_MEDIA_TYPES
from .._tasks import task_group
from ._auth import Authenticator, Credentials, load_docker_credentials
from ._location import RegistryLocation, parse_registry_location, validate_repository, validate_tag
from ._manifests import ACCEPT, DocumentCache, check_document, child_manifests, describe, is_manifest_type
from ._streams import body_of, read_body, release
from ._transport import RegistryClient, RetryPolicy, error_codes
from ._upload import UploadSession, mount_blob

__all__ = ["RegistryEngine", "open_registry"]

#: Why :func:`ocicas.gc` cannot run on a registry (raised by ``list_roots``).
_NO_GC: Final = (
    "garbage collection is not possible on a registry: the distribution API lists neither a repository's "
    "blobs nor its untagged manifests (index children, referrers, digests pushed by other clients), so "
    "neither the live set nor the garbage can be known from outside; run the registry's own collector "
    "(distribution: `registry garbage-collect`)"
)
#: Blob content is read from the network in pieces of about this size before it is hashed.
_THREAD_HASH: Final = 1 << 20
_USER_AGENT: Final = "ocicas (python-httpx)"


class RegistryEngine(Engine):
    """An :class:`~ocicas.Engine` over one repository of an OCI distribution registry.

    Open one with :func:`open_registry`. See the module documentation for how each
    method maps onto the distribution API; references are registry tags. Requests
    are authenticated (basic or bearer tokens), retried when idempotent, and at
    most ``concurrency`` are in flight at once.
    """

    def __init__(self, client: RegistryClient, *, chunk_size: int = CHUNK_SIZE) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        self._client = client
        self._chunk_size = chunk_size
        self._documents = DocumentCache()
        self._manifests: set[Digest] = set()  # digests known to be in the manifest store
        self._tag_deletes: bool | None = None  # whether DELETE /manifests/<tag> works here

    @property
    def location(self) -> RegistryLocation:
        """The registry and repository this engine works on."""
        return self._client.location

    def __repr__(self) -> str:
        return f"<RegistryEngine {self.location}{' closed' if self._closed else ''}>"

    # -- blobs ----------------------------------------------------------------------------

    async def put_blob(
        self,
        source: BlobSource,
        *,
        expected_digest: Digest | str | None = None,
        expected_size: int | None = None,
        ctx: Context | None = None,
    ) -> tuple[Digest, int]:
        self._check_open()
        expected = None if expected_digest is None else addressable(expected_digest)
        verifier = Verifier(expected, expected_size)
        async with bound(ctx):
            if isinstance(source, bytes | bytearray | memoryview):
                return await self._put_whole(bytes(source), verifier)
            if expected is not None:  # known in advance: present content is not sent again
                size = await self._blob_size(expected)
                if size is not None:
                    if expected_size is not None and size != expected_size:
                        raise SizeMismatchError(f"blob {expected} has {size} bytes here, expected {expected_size}")
                    return expected, size
            return await self._put_stream(source, verifier, ctx, absent=expected is not None)

    async def _put_whole(self, data: bytes, verifier: Verifier, *, absent: bool = False) -> tuple[Digest, int]:
        """Store content in hand: hashed first, then skipped if present, else one ``POST`` + ``PUT``."""
        verifier.check_total(len(data))
        if len(data) >= _THREAD_HASH:
            await anyio.to_thread.run_sync(verifier.update, data)
        else:
            verifier.update(data)
        digest = verifier.verify()
        if absent or await self._blob_size(digest) != len(data):
            session = UploadSession(self._client)
            await session.start()
            try:
                await session.commit(digest, data)
            except BaseException:
                await session.cancel()
                raise
        self._documents.offer(digest, data)
        return digest, len(data)

    async def _put_stream(
        self, source: BlobSource, verifier: Verifier, ctx: Context | None, *, absent: bool
    ) -> tuple[Digest, int]:
        """Store a stream: a short one as a whole, a long one as chunked ``PATCH``es."""
        session: UploadSession | None = None
        try:
            pending: list[bytes] = []
            size = total = 0
            async with aclosing(iterate_source(source)) as chunks:
                async for chunk in chunks:
                    if ctx is not None:
                        ctx.check()
                    total += len(chunk)
                    verifier.check_total(total)  # an oversized stream stops here, before it is sent
                    pending.append(bytes(chunk))
                    size += len(chunk)
                    if size >= self._chunk_size:
                        if session is None:
                            session = UploadSession(self._client)
                            await session.start()
                        if size >= max(self._chunk_size, session.min_chunk):
                            await session.append(b"".join(pending), verifier)
                            pending, size = [], 0
            last = b"".join(pending)
            if session is None:
                return await self._put_whole(last, verifier, absent=absent)
            if len(last) >= _THREAD_HASH:
                await anyio.to_thread.run_sync(verifier.update, last)
            else:
                verifier.update(last)
            digest = verifier.verify()
            if ctx is not None:
                ctx.check()
            await session.commit(digest, last)
            return digest, verifier.received
        except BaseException:
            if session is not None:
                await session.cancel()
            raise

    async def mount_blob(
        self,
        digest: Digest | str,
        source: RegistryEngine | str,
        *,
        expected_size: int | None = None,
        ctx: Context | None = None,
    ) -> bool:
        """Link a blob of another repository on the same registry into this one, without moving its bytes.

        ``source`` is a :class:`RegistryEngine` on the same registry or a repository
        name. Returns ``False`` if the registry would not mount it (it is absent
        there, or the credentials cannot read it); the caller then copies it.
        """
        self._check_open()
        digest = addressable(digest)
        if isinstance(source, RegistryEngine):
            if source.location.base_url != self.location.base_url:
                raise InvalidError(f"cannot mount from {source.location}: it is on another registry than {self}")
            repository = source.location.repository
        else:
            repository = validate_repository(source)
        async with bound(ctx):
            if not await mount_blob(self._client, digest, repository):
                return False
            size = await self._blob_size(digest)
        if size is None:
            return False
        if expected_size is not None and size != expected_size:
            raise SizeMismatchError(f"mounted blob {digest} has {size} bytes, expected {expected_size}")
        return True

    def can_mount_from(self, other: Engine) -> TypeGuard[RegistryEngine]:
        """Whether blobs of ``other`` can be mounted here: another repository of the same registry."""
        return (
            isinstance(other, RegistryEngine)
            and other.location.base_url == self.location.base_url
            and other.location.repository != self.location.repository
        )

    async def _head(self, path: str, *, accept: str | None = None) -> httpx.Response | None:
        """``HEAD`` under this repository: the answer if 200, ``None`` if 404."""
        headers = {"Accept": accept} if accept else None
        response = await self._client.request("HEAD", self._client.url(path), headers=headers, follow_redirects=True)
        if response.status_code == 200:
            return response
        if response.status_code == 404:
            return None
        raise self._client.error(response, f"HEAD {path}")

    async def _blob_size(self, digest: Digest) -> int | None:
        """The size of ``digest`` in the blob store, or ``None``."""
        response = await self._head(f"blobs/{digest}")
        return None if response is None else self._length(response, digest)

    def _length(self, response: httpx.Response, digest: Digest) -> int:
        try:
            size = int(response.headers["content-length"])
        except (KeyError, ValueError):
            raise InvalidError(f"{self._client.where} did not give the size of {digest}") from None
        if size < 0:
            raise InvalidError(f"{self._client.where} gave a negative size for {digest}")
        return size

    async def _stat(self, digest: Digest) -> int:
        """Size of ``digest`` as a blob or, failing that, as a manifest; :class:`BlobNotFoundError` if neither."""
        first_manifest = digest in self._manifests
        for path, accept in self._content_paths(digest, first_manifest):
            response = await self._head(path, accept=accept)
            if response is not None:
                return self._length(response, digest)
        self._manifests.discard(digest)
        raise BlobNotFoundError(f"blob {digest} not found in {self._client.where}")

    @staticmethod
    def _content_paths(digest: Digest, manifest_first: bool) -> list[tuple[str, str | None]]:
        paths: list[tuple[str, str | None]] = [(f"blobs/{digest}", None), (f"manifests/{digest}", ACCEPT)]
        return paths[::-1] if manifest_first else paths

    async def stat_blob(self, digest: Digest | str, *, ctx: Context | None = None) -> int:
        self._check_open()
        digest = addressable(digest)
        async with bound(ctx):
            return await self._stat(digest)

    async def stat_blobs(
        self, digests: Iterable[Digest], *, head: int = 0, ctx: Context | None = None
    ) -> dict[Digest, BlobInfo]:
        """Sizes of many blobs, looked up concurrently; registries do not tell blob ages (``modified=None``)."""
        self._check_open()
        wanted = sorted(set(map(addressable, digests)))
        found: dict[Digest, BlobInfo] = {}

        async def one(digest: Digest) -> None:
            try:
                size = await self._stat(digest)
            except BlobNotFoundError:
                return
            prefix = b""
            if head and size:
                response, _ = await self._open(digest, head=head)
                try:
                    prefix = (await read_body(response, head))[:head]
                except httpx.TransportError as exc:
                    raise self._dropped(f"reading the head of blob {digest}", exc) from exc
            found[digest] = BlobInfo(size, None, prefix)

        async with bound(ctx), task_group() as tg:
            for digest in wanted:
                tg.start_soon(one, digest)
        return found

    async def _open(self, digest: Digest, *, head: int = 0) -> tuple[httpx.Response, int]:
        """``GET`` a blob's content (or a manifest's, by digest), streamed: the open answer and the size."""
        client = self._client
        headers = {"Accept-Encoding": "identity"}
        if head:
            headers["Range"] = f"bytes=0-{head - 1}"
        for path, accept in self._content_paths(digest, digest in self._manifests):
            response = await client.request(
                "GET", client.url(path), headers={**headers, "Accept": accept} if accept else headers, stream=True
            )
            if response.status_code in (200, 206):
                if path.startswith("manifests/"):
                    self._manifests.add(digest)
                try:
                    size = self._length(response, digest) if response.status_code == 200 else await self._stat(digest)
                except BaseException:
                    await release(response)
                    raise
                return response, size
            await release(response)
            if response.status_code != 404:
                raise client.error(response, f"GET {path}")
        self._manifests.discard(digest)
        raise BlobNotFoundError(f"blob {digest} not found in {client.where}")

    def _dropped(self, what: str, exc: httpx.TransportError) -> RegistryUnreachableError:
        return RegistryUnreachableError(
            f"connection to {self._client.where} dropped while {what}: {exc or type(exc).__name__}"
        )

    async def get_blob(self, digest: Digest | str, *, ctx: Context | None = None) -> BlobReader:
        self._check_open()
        digest = addressable(digest)
        async with bound(ctx):
            response, size = await self._open(digest)
        iterator = aiter(response.aiter_bytes())
        leftover = b""

        async def pull(n: int, verifier: Verifier) -> bytes:
            nonlocal leftover
            parts, have = [leftover] if leftover else [], len(leftover)
            async with bound(ctx):
                try:
                    while have < n:
                        piece = await anext(iterator, b"")
                        if not piece:
                            break
                        parts.append(piece)
                        have += len(piece)
                except httpx.TransportError as exc:
                    raise self._dropped(f"reading blob {digest} at byte {verifier.received + have}", exc) from exc
            data = b"".join(parts)
            chunk, leftover = data[:n], data[n:]
            if len(chunk) >= _THREAD_HASH:
                await anyio.to_thread.run_sync(verifier.update, chunk)
            else:
                verifier.update(chunk)
            return chunk

        async def close() -> None:
            await release(response, iterator)

        return BlobReader(digest, size, pull, close=close, ctx=ctx)

    async def delete_blob(self, digest: Digest | str, *, ctx: Context | None = None) -> None:
        """Delete ``digest`` from the blob store and, if it is a manifest, from the manifest store.

        A registry drops every tag on a manifest it deletes. Raises
        :class:`~ocicas.UnsupportedError` if the registry does not allow deletes.
        """
        self._check_open()
        digest = addressable(digest)
        async with bound(ctx):
            for path in (f"blobs/{digest}", f"manifests/{digest}"):
                response = await self._client.request("DELETE", self._client.url(path))
                if response.status_code not in (200, 202, 204, 404):
                    raise self._delete_error(response, path)
        self._documents.discard(digest)
        self._manifests.discard(digest)

    def _delete_error(self, response: httpx.Response, path: str) -> Exception:
        if response.status_code == 405 or "UNSUPPORTED" in error_codes(response):
            return UnsupportedError(
                f"{self._client.where} does not allow deletes (distribution: storage.delete.enabled is off)"
            )
        return self._client.error(response, f"DELETE {path}")

    async def list_blobs(self, *, ctx: Context | None = None) -> list[Digest]:
        """Unsupported: the distribution API has no way to list a repository's blobs."""
        self._check_open()
        raise UnsupportedError(
            f"cannot list the blobs of {self._client.where}: the distribution API has no blob listing"
        )

    # -- references -------------------------------------------------------------------------

    async def get_reference(self, name: str, *, ctx: Context | None = None) -> Descriptor:
        self._check_open()
        validate_tag(name)
        async with bound(ctx):
            found = await self._fetch_manifest(name)
        if found is None:
            raise ReferenceNotFoundError(f"reference {name!r} not found in {self._client.where}")
        return found[0]

    async def _fetch_manifest(self, reference: str) -> tuple[Descriptor, bytes] | None:
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
            raise self._dropped(f"reading manifest {reference!r}", exc) from exc
        if len(data) > DEFAULT_JSON_LIMIT:
            raise BlobTooLargeError(
                f"manifest {reference!r} in {self._client.where} is over the cap of {DEFAULT_JSON_LIMIT}"
            )
        descriptor = describe(response, data, reference, self._client.where)
        self._documents.offer(descriptor.digest, data)
        self._manifests.add(descriptor.digest)
        return descriptor, data

    async def _tag_state(self, name: str) -> Descriptor | None:
        """What tag ``name`` holds (media type, digest, size) from a ``HEAD``, or ``None``."""
        response = await self._head(f"manifests/{name}", accept=ACCEPT)
        if response is None:
            return None
        digest = response.headers.get("docker-content-digest")
        media_type = response.headers.get("content-type", "").partition(";")[0].strip()
        size = response.headers.get("content-length", "")
        if digest and is_manifest_type(media_type) and size.isdigit():
            return Descriptor(media_type=media_type, digest=digest, size=int(size))
        found = await self._fetch_manifest(name)  # a registry that does not say: read it
        return None if found is None else found[0]

    async def list_references(self, *, ctx: Context | None = None) -> list[str]:
        """Every tag of the repository, sorted (``[]`` if the repository does not exist yet)."""
        self._check_open()
        tags: set[str] = set()
        url: str | None = self._client.url("tags/list")
        seen: set[str] = set()
        async with bound(ctx):
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

    async def list_roots(self, *, ctx: Context | None = None) -> list[Descriptor]:
        """Unsupported: a registry cannot list its untagged manifests, so it has no knowable root set."""
        self._check_open()
        raise UnsupportedError(f"cannot list the roots of {self._client.where}: {_NO_GC}")

    async def update_references(
        self, changes: Mapping[str, Descriptor | None], *, replace: bool = False, ctx: Context | None = None
    ) -> None:
        """Apply tag changes: every check first (names, clobbers, content, safe deletes), then the changes.

        Registries have no transactions: a failure while the tags are being written
        (a dropped connection) can leave some written. Tags keep only the media
        type, digest and size of a descriptor.
        """
        self._check_open()
        for name, descriptor in changes.items():
            validate_tag(name)
            if descriptor is not None and not isinstance(descriptor, Descriptor):
                raise TypeError(f"reference {name!r}: expected a Descriptor, not {type(descriptor).__name__}")
            if descriptor is not None and not is_manifest_type(descriptor.media_type):
                raise InvalidError(
                    f"reference {name!r}: a registry tag names a manifest or an index, not {descriptor.media_type}"
                )
        async with bound(ctx):
            current: dict[str, Descriptor | None] = {}

            async def look(name: str) -> None:
                current[name] = await self._tag_state(name)

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

            async def tag(name: str, descriptor: Descriptor) -> None:
                await self._put_manifest(name, descriptor, bodies[descriptor.digest])

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
                if not root and (digest in self._manifests or await self._head(f"manifests/{digest}", accept=ACCEPT)):
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
                data = await self.read_blob(digest, max_size=DEFAULT_JSON_LIMIT)
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
            return
        codes = error_codes(response)
        what = f"{descriptor.media_type} {descriptor.digest}"
        if "MANIFEST_BLOB_UNKNOWN" in codes or "BLOB_UNKNOWN" in codes:
            raise BlobNotFoundError(
                f"{what} refers to content that is not in {self._client.where}: {self._client.error(response, 'PUT')}"
            )
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
            raise self._delete_error(response, f"manifests/{reference}")

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

        others = [t for t in await self.list_references() if t not in changing]
        held: dict[str, Descriptor | None] = {}

        async def look(name: str) -> None:
            held[name] = await self._tag_state(name)

        async with task_group() as tg:
            for name in others:
                tg.start_soon(look, name)
        roots = [(d, f"tag {n!r}") for n, d in held.items() if d is not None]
        roots += [(d, f"tag {n!r}") for n, d in puts.items()]
        async with task_group() as tg:
            for descriptor, who in roots:
                tg.start_soon(reach, descriptor, who)
        return {digest: sorted(whos)[0] for digest, whos in needed.items()}

    # -- lifecycle --------------------------------------------------------------------------

    async def gc(self, *, ctx: Context | None = None) -> None:
        """Nothing to collect: this engine leaves nothing behind, and registries purge abandoned uploads."""
        self._check_open()
        async with bound(ctx):
            await anyio.lowlevel.checkpoint()

    async def ping(self, *, ctx: Context | None = None) -> None:
        """Check that the registry answers the distribution API (``GET /v2/``) and lets us in."""
        self._check_open()
        async with bound(ctx):
            base = self.location.base_url
            response = await self._client.request("GET", f"{base}/v2/", scope=self._client.scope("GET"))
        if response.status_code != 200:
            raise InvalidError(
                f"{base} is not an OCI distribution registry: GET /v2/ answered HTTP {response.status_code}"
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._client.http.aclose()


def _ssl_context(verify: bool | str | os.PathLike[str] | ssl.SSLContext) -> ssl.SSLContext:
    """Build the TLS context (reads CA files: run it in a worker thread)."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is True:
        return httpx.create_ssl_context()
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    path = os.fspath(verify)
    if os.path.isdir(path):
        return ssl.create_default_context(capath=path)
    return ssl.create_default_context(cafile=path)


async def open_registry(
    location: str | RegistryLocation,
    *,
    username: str | None = None,
    password: str | None = None,
    docker_config: bool | str | os.PathLike[str] = True,
    verify: bool | str | os.PathLike[str] | ssl.SSLContext = True,
    request_timeout: float | httpx.Timeout = 60.0,
    concurrency: int = 8,
    retry: RetryPolicy | None = None,
    chunk_size: int = CHUNK_SIZE,
    transport: httpx.AsyncBaseTransport | None = None,
    check: bool = True,
) -> RegistryEngine:
    """Open repository ``location`` (``http://127.0.0.1:5000/team/app``; ``https`` by default) as an engine.

    Credentials are ``username``/``password``, or else those a Docker ``config.json``
    holds for the registry (``docker_config``: ``True`` for ``$DOCKER_CONFIG`` or
    ``~/.docker/config.json``, a path, or ``False``); anonymous otherwise. ``verify``
    is ``True`` (system CAs), ``False``, a CA bundle path or an ``ssl.SSLContext``.
    ``request_timeout`` bounds each network wait (seconds, or an ``httpx.Timeout``),
    ``concurrency`` bounds the requests in flight, ``retry`` sets the retries of
    idempotent requests, ``chunk_size`` the size of chunked uploads, and
    ``transport`` replaces httpx's network transport (tests). With ``check``, the
    registry is asked ``GET /v2/`` first: :class:`~ocicas.RegistryUnreachableError`,
    :class:`~ocicas.AccessDeniedError` or :class:`~ocicas.InvalidError` say why it
    cannot be used.
    """
    if isinstance(location, str):
        location = parse_registry_location(location)
    if location.reference is not None:
        raise InvalidError(f"open_registry takes a repository, not a tag or digest: {location}")
    if (username is None) != (password is None):
        raise ValueError("pass both username and password, or neither")
    credentials: Credentials | None = None
    if username is not None and password is not None:
        credentials = Credentials(username, password)
    elif docker_config is not False:
        path = None if docker_config is True else docker_config
        credentials = await load_docker_credentials(location.host, path)

    timeouts = (
        request_timeout
        if isinstance(request_timeout, httpx.Timeout)
        else httpx.Timeout(request_timeout, connect=min(request_timeout, 15.0))
    )

    def client() -> httpx.AsyncClient:  # reads CA files and the environment: off the event loop
        return httpx.AsyncClient(
            verify=_ssl_context(verify),
            timeout=timeouts,
            transport=transport,
            headers={"User-Agent": _USER_AGENT},
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=concurrency),
        )

    http = await anyio.to_thread.run_sync(client)
    authenticator = Authenticator(credentials, f"repository {location.repository!r} on registry {location.base_url}")
    engine = RegistryEngine(
        RegistryClient(http, location, authenticator, concurrency=concurrency, retry=retry or RetryPolicy()),
        chunk_size=chunk_size,
    )
    if check:
        try:
            await engine.ping()
        except BaseException:
            await engine.close()
            raise
    return engine
