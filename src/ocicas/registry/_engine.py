"""The registry engine: the Engine protocol over one repository of an OCI distribution registry.

How the protocol maps onto the distribution API (``/v2/<name>/…``):

=========================  ==================================================================
``put_blob``               blob store. Content in hand (and streams that end within ``chunk_size``)
                           is hashed first, then ``HEAD`` (present content is never sent again),
                           ``POST`` and one ``PUT ?digest=``; an unread reader of a local file
                           (a push from a layout) goes up as ``POST``, one streamed ``PATCH``
                           (resumed, or made again, when cut) and ``PUT``; other longer streams
                           as ``POST``, chunked ``PATCH``es and ``PUT``. With ``expected_digest``, a ``HEAD``
                           comes first. Verified locally before the ``PUT``: on a mismatch the
                           upload is cancelled (``DELETE``) and nothing is stored
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
``referrers``              ``GET /referrers/<digest>``, following ``Link`` pages; where the registry
                           answers 404, the image index tagged ``sha256-<hex>`` (``_referrers``).
                           ``put_blob`` of content in hand that is a manifest or index with a
                           ``subject`` also pushes it by digest to the manifest store (its blobs
                           first), and any manifest pushed with a ``subject`` to a registry without
                           the referrers API is added to that tag, as oras and regclient do
                           (``delete_blob`` of one takes it out)
``list_blobs``             :class:`~ocicas.UnsupportedError`: the API cannot list blobs
``list_roots``             :class:`~ocicas.UnsupportedError`: nor untagged manifests, so
                           :func:`ocicas.gc` cannot run on a registry (use the registry's own GC)
``gc``                     nothing to do: abandoned uploads are purged by the registry
=========================  ==================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import aclosing
from typing import ClassVar, Final, TypeGuard

import anyio
import anyio.lowlevel
import httpx

from .._checks import check_ctx, check_digest, check_int
from .._context import Context
from .._descriptor import Descriptor
from .._digest import Digest, Verifier
from .._engine import BlobInfo, Engine
from .._errors import (
    BlobNotFoundError,
    InvalidError,
    ReferenceNotFoundError,
    SizeMismatchError,
    UnsupportedError,
)
from .._reader import BlobReader, RawBlob
from .._source import BlobSource, iterate_source
from .._tasks import bounded_shield, task_group
from .._threads import CHUNK_SIZE, hash_into
from ._download import ResumingRaw
from ._location import RegistryLocation, validate_repository, validate_tag
from ._manifests import ACCEPT, DocumentCache, is_manifest_type
from ._streams import read_body, release
from ._tags import TagStore
from ._transport import RegistryClient
from ._upload import UPLOAD_BUDGET, UploadSession, _Attempts, _landed, mount_blob, named, transient, upload_file

__all__ = ["RegistryEngine"]

#: A push reads its source this much at a time: a chunk goes up as these pieces, never joined.
_PIECE_SIZE: Final = 256 << 10

#: Why :func:`ocicas.gc` cannot run on a registry (raised by ``list_roots``).
_NO_GC: Final = (
    "garbage collection is not possible on a registry: the distribution API lists neither a repository's "
    "blobs nor its untagged manifests (index children, referrers, digests pushed by other clients), so "
    "neither the live set nor the garbage can be known from outside; run the registry's own collector "
    "(distribution: `registry garbage-collect`)"
)


class RegistryEngine(Engine):
    """An :class:`~ocicas.Engine` over one repository of an OCI distribution registry.

    Open one with :func:`open_registry`. See the module documentation for how each
    method maps onto the distribution API; references are registry tags. Requests
    are authenticated (basic or bearer tokens), retried when idempotent, and at
    most ``concurrency`` are in flight at once.
    """

    # tagging pushes a manifest's children first and checks every blob it names is stored
    _checks_own_references: ClassVar[bool] = True

    def __init__(self, client: RegistryClient, *, chunk_size: int = CHUNK_SIZE) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        self._client = client
        self._chunk_size = chunk_size
        self._documents = DocumentCache()
        self._manifests: set[Digest] = set()  # digests known to be in the manifest store
        self._tags = TagStore(client, self._documents, self._manifests, self._read_whole)

    async def _read_whole(self, digest: Digest, max_size: int) -> bytes:
        return await self.read_blob(digest, max_size=max_size)

    @property
    def location(self) -> RegistryLocation:
        """The registry and repository this engine works on."""
        return self._client.location

    def __repr__(self) -> str:
        return f"<RegistryEngine {self.location}{' closed' if self.closed else ''}>"

    # -- blobs ----------------------------------------------------------------------------

    async def _put_blob(self, source: BlobSource, verifier: Verifier) -> tuple[Digest, int]:
        if isinstance(source, bytes | bytearray | memoryview):
            return await self._put_whole(bytes(source), verifier)
        expected = verifier.digest
        if expected is not None:  # known in advance: present content is not sent again
            size = await self._blob_size(expected)
            if size is not None:
                if verifier.size is not None and size != verifier.size:
                    raise SizeMismatchError(f"blob {expected} has {size} bytes here, expected {verifier.size}")
                return expected, size
        return await self._put_stream(source, verifier, absent=expected is not None)

    async def _put_whole(self, data: bytes, verifier: Verifier, *, absent: bool = False) -> tuple[Digest, int]:
        """Store content in hand: hashed first, then skipped if present, else one ``POST`` + ``PUT``."""
        verifier.check_total(len(data))
        await hash_into(verifier, data)
        digest = verifier.verify()
        if absent or await self._blob_size(digest) != len(data):
            await self._upload_whole(digest, data)
        self._documents.offer(digest, data)
        await self._tags.referrers.stored(digest, data)  # a referrer is one only in the manifest store
        return digest, len(data)

    async def _upload_whole(self, digest: Digest, data: bytes) -> None:
        """``POST`` + ``PUT``; an upload the registry lost on the way is made again (the content is in hand).

        One retry count for the whole blob, whichever request failed (each failure counted once).
        """
        client = self._client
        attempts = _Attempts(client)
        while True:
            session = UploadSession(client, attempts)
            try:
                await session.start()
                await session.commit(digest, data)
                return
            except BaseException as exc:
                await session.cancel()
                if not (isinstance(exc, Exception) and transient(exc)):
                    raise
                await attempts.pause(exc)  # at once if already counted (a lost session); raises when none is left
                if await _landed(client, digest, len(data), attempts):  # only the answer was lost
                    return

    async def _put_stream(self, source: BlobSource, verifier: Verifier, *, absent: bool) -> tuple[Digest, int]:
        """Store a stream: a local file as one streamed ``PATCH``, a short one as a whole, a long one as chunked
        ``PATCH``es.

        Every byte read and not yet acknowledged by the registry counts against
        :data:`UPLOAD_BUDGET`, reserved a chunk at a time before it is read: the
        pushes of a process hold that much at most, however many run at once. A
        source that verifies itself (a :class:`BlobReader` of this digest, as in
        :func:`ocicas.copy`) is not hashed a second time.
        """
        vouched = isinstance(source, BlobReader) and source.vouches_for(verifier.digest, verifier.size)
        chunk_size = self._chunk_size
        if vouched and isinstance(source, BlobReader) and source.size > chunk_size:
            async with source._borrow_file() as fd:
                if fd is not None:  # an unread reader of a local file (a push from a layout): streamed, resumable
                    assert verifier.digest is not None
                    await upload_file(self._client, fd, source.size, verifier.digest, source.on_read)
                    return verifier.digest, source.size
        session: UploadSession | None = None
        held = total = 0  # bytes of UPLOAD_BUDGET this upload holds; bytes read from the source
        try:
            pending: list[bytes] = []
            size = 0
            async with aclosing(iterate_source(source, min(chunk_size, _PIECE_SIZE))) as chunks:
                while True:
                    if not held:  # a new chunk: room for all of it first, so none waits holding part of one
                        want = chunk_size if verifier.size is None else min(chunk_size, verifier.size - total)
                        if want > 0:
                            await UPLOAD_BUDGET.acquire(want)
                            held = want
                    chunk = await anext(chunks, None)
                    if chunk is None:
                        break
                    total += len(chunk)
                    verifier.check_total(total)  # an oversized stream stops here, before it is sent
                    pending.append(bytes(chunk))
                    size += len(chunk)
                    if size > held:  # more than reserved (a source of bigger pieces): counted, not waited for
                        UPLOAD_BUDGET.release(held - size)
                        held = size
                    if size >= chunk_size:
                        if session is None:  # set once open: a failed opening sent none of the source
                            opening = UploadSession(self._client)
                            await opening.start()
                            session = opening
                        if size >= max(chunk_size, session.min_chunk):
                            await session.append(pending, verifier, vouched=vouched)
                            pending, size = [], 0
                            UPLOAD_BUDGET.release(held)
                            held = 0
            if session is None:
                return await self._put_whole(b"".join(pending), verifier, absent=absent)
            if pending and size >= session.min_chunk:
                # the tail goes as a PATCH too: a cut one resumes, while a closing PUT cut with bytes on board
                # loses the session (distribution drops it) and, the source being read, the upload
                await session.append(pending, verifier, vouched=vouched)
                pending = []
            if vouched:
                for piece in pending:
                    verifier.count(piece)
                if verifier.size is not None and verifier.received != verifier.size:
                    verifier.verify()  # raises SizeMismatchError
                assert verifier.digest is not None  # the reader raised before its end had the content been wrong
                digest = verifier.digest
            else:
                for piece in pending:
                    await hash_into(verifier, piece)
                digest = verifier.verify()
            await anyio.lowlevel.checkpoint()  # the last chance to cancel before it is committed
            await session.commit(digest, pending)
            return digest, verifier.received
        except BaseException as exc:
            if session is not None:
                await session.cancel()
            if isinstance(exc, Exception) and transient(exc):
                why = ", and its source cannot be read again" if session is not None else ""  # bytes were sent
                raise named(exc, verifier.digest, total, verifier.size, why) from exc
            raise
        finally:
            if held:
                UPLOAD_BUDGET.release(held)

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
        ctx = check_ctx(ctx)
        digest = check_digest(digest)
        expected_size = check_int(expected_size, "expected_size", optional=True)
        if isinstance(source, RegistryEngine):
            if source.location.base_url != self.location.base_url:
                raise InvalidError(f"cannot mount from {source.location}: it is on another registry than {self}")
            repository = source.location.repository
        elif isinstance(source, str):
            repository = validate_repository(source)
        else:
            raise TypeError(f"source must be a RegistryEngine or a repository name, not {type(source).__name__}")
        async with self._operation(ctx):
            return await self._mount(digest, repository, expected_size)

    async def _mount_blob(self, source: Engine, digest: Digest, size: int) -> bool:
        if not self.can_mount_from(source):
            return False
        return await self._mount(digest, source.location.repository, size)

    async def _mount(self, digest: Digest, repository: str, expected_size: int | None) -> bool:
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

    async def _blob_size(self, digest: Digest) -> int | None:
        """The size of ``digest`` in the blob store, or ``None``."""
        response = await self._client.head(f"blobs/{digest}")
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
            response = await self._client.head(path, accept=accept)
            if response is not None:
                return self._length(response, digest)
        self._manifests.discard(digest)
        raise BlobNotFoundError(f"blob {digest} not found in {self._client.where}")

    @staticmethod
    def _content_paths(digest: Digest, manifest_first: bool) -> list[tuple[str, str | None]]:
        paths: list[tuple[str, str | None]] = [(f"blobs/{digest}", None), (f"manifests/{digest}", ACCEPT)]
        return paths[::-1] if manifest_first else paths

    async def _stat_blob(self, digest: Digest) -> int:
        return await self._stat(digest)

    async def _stat_blobs(self, digests: list[Digest], head: int) -> dict[Digest, BlobInfo]:
        """Sizes of many blobs, looked up concurrently; registries do not tell blob ages (``modified=None``)."""
        wanted = sorted(set(digests))
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
                    raise self._client.dropped(f"reading the head of blob {digest}", exc) from exc
            found[digest] = BlobInfo(size, None, prefix)

        async with task_group() as tg:
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
                "GET",
                client.url(path),
                headers={**headers, "Accept": accept} if accept else headers,
                stream=True,
                follow_redirects=True,  # blob stores may send the content from elsewhere (S3, a CDN)
            )
            if response.status_code in (200, 206):
                if path.startswith("manifests/"):
                    self._manifests.add(digest)
                try:
                    size = self._length(response, digest) if response.status_code == 200 else self._total(response)
                    if size is None:
                        size = await self._stat(digest)
                except BaseException:
                    await release(response)
                    raise
                return response, size
            await release(response)
            if response.status_code != 404:
                raise client.error(response, f"GET {path}")
        self._manifests.discard(digest)
        raise BlobNotFoundError(f"blob {digest} not found in {client.where}")

    @staticmethod
    def _total(response: httpx.Response) -> int | None:
        """The whole size a ``206`` answer's ``Content-Range: bytes a-b/total`` gives, or ``None``."""
        total = response.headers.get("content-range", "").rpartition("/")[2].strip()
        return int(total) if total.isdigit() else None

    async def _open_blob(self, digest: Digest) -> RawBlob:
        response, size = await self._open(digest)
        first = response.history[0] if response.history else response  # before any redirect
        manifest = first.request.url.path.endswith(f"/manifests/{digest}")

        async def reopen(start: int) -> httpx.Response:  # resumes on the same path (a redirect is followed again)
            return await self._client.request(
                "GET",
                self._client.url(f"manifests/{digest}" if manifest else f"blobs/{digest}"),
                headers={
                    "Accept-Encoding": "identity",
                    "Range": f"bytes={start}-",
                    **({"Accept": ACCEPT} if manifest else {}),
                },
                stream=True,
                follow_redirects=True,
            )

        return ResumingRaw(response, size, client=self._client, what=f"blob {digest}", reopen=reopen)

    async def _delete_blob(self, digest: Digest) -> None:
        """Delete ``digest`` from the blob store and, if it is a manifest, from the manifest store.

        A registry drops every tag on a manifest it deletes. Raises
        :class:`~ocicas.UnsupportedError` if the registry does not allow deletes.
        """
        subject = await self._tags.referrers.subject_of(digest)  # read while it is there
        for path in (f"blobs/{digest}", f"manifests/{digest}"):
            response = await self._client.request("DELETE", self._client.url(path))
            if response.status_code not in (200, 202, 204, 404):
                raise self._client.delete_refused(response, path)
        self._documents.discard(digest)
        self._manifests.discard(digest)
        if subject is not None:
            await self._tags.referrers.deleted(digest, subject)

    async def _list_blobs(self) -> list[Digest]:
        """Unsupported: the distribution API has no way to list a repository's blobs."""
        raise UnsupportedError(
            f"cannot list the blobs of {self._client.where}: the distribution API has no blob listing"
        )

    # -- references -------------------------------------------------------------------------

    async def _get_reference(self, name: str) -> Descriptor:
        validate_tag(name)
        found = await self._tags.fetch(name)
        if found is None:
            raise ReferenceNotFoundError(f"reference {name!r} not found in {self._client.where}")
        return found[0]

    async def _list_references(self) -> list[str]:
        """Every tag of the repository, sorted (``[]`` if the repository does not exist yet)."""
        return await self._tags.names()

    async def _list_roots(self) -> list[Descriptor]:
        """Unsupported: a registry cannot list its untagged manifests, so it has no knowable root set."""
        raise UnsupportedError(f"cannot list the roots of {self._client.where}: {_NO_GC}")

    async def _update_references(self, changes: Mapping[str, Descriptor | None], replace: bool) -> None:
        """Apply tag changes: every check first (names, clobbers, content, safe deletes), then the changes.

        Registries have no transactions: a failure while the tags are being written
        (a dropped connection) can leave some written. Tags keep only the media
        type, digest and size of a descriptor.
        """
        for name, descriptor in changes.items():
            validate_tag(name)
            if descriptor is not None and not is_manifest_type(descriptor.media_type):
                raise InvalidError(
                    f"reference {name!r}: a registry tag names a manifest or an index, not {descriptor.media_type}"
                )
        await self._tags.update(changes, replace=replace)

    async def _referrers(self, subject: Digest, artifact_type: str | None) -> list[Descriptor]:
        """The referrers API, or the referrers tag where the registry answers the API 404."""
        return await self._tags.referrers.find(subject, artifact_type)

    # -- lifecycle --------------------------------------------------------------------------

    async def _gc(self) -> None:
        """Nothing to collect: this engine leaves nothing behind, and registries purge abandoned uploads."""
        await anyio.lowlevel.checkpoint()

    async def ping(self, *, ctx: Context | None = None) -> None:
        """Check that the registry answers the distribution API (``GET /v2/``) and lets us in."""
        async with self._operation(check_ctx(ctx)):
            base = self.location.base_url
            response = await self._client.request("GET", f"{base}/v2/", scope=self._client.scope("GET"))
        if response.status_code != 200:
            raise InvalidError(
                f"{base} is not an OCI distribution registry: GET /v2/ answered HTTP {response.status_code}"
            )

    async def _release(self) -> None:
        with bounded_shield():
            await self._client.http.aclose()
