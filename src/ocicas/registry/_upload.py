"""Blob upload sessions (distribution spec "pushing blobs"): monolithic, chunked, cancelled, mounted.

A session is opened with ``POST /v2/<name>/blobs/uploads/``; every answer names
the URL of the next step in its ``Location`` (distribution signs the upload state
into it), so that header is followed rather than built. Content is verified
locally before the closing ``PUT …?digest=`` commits it: on any failure, the
session is cancelled with ``DELETE`` and nothing is committed.

A ``PATCH`` or the closing ``PUT`` that fails (a dropped connection, a ``5xx``)
is resumed: ``GET`` on the upload URL answers how far the registry got
(``Range: 0-N``), and the rest of the chunk, still in memory, goes again from
byte ``N + 1``. Retries are bounded by the client's :class:`RetryPolicy`. A
registry that lost the session (distribution 2.8 drops a session whose last
request was cut midway) ends the upload with the original error; content in
hand is then sent again as a new upload by the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import anyio
import httpx

from .._budget import ByteBudget
from .._digest import Digest, Verifier
from .._errors import (
    BlobNotFoundError,
    DigestMismatchError,
    InvalidError,
    RegistryError,
    RegistryUnreachableError,
    UnsupportedAlgorithmError,
)
from .._tasks import task_group
from .._threads import hash_into
from ._transport import RETRY_STATUSES, RegistryClient, error_codes, note_retry

__all__ = ["UPLOAD_BUDGET", "UploadSession", "mount_blob", "transient"]

#: Bytes all blob pushes of the process may hold at once (read, and not yet acknowledged by a registry):
#: a chunk is reserved before it is read and given back once its ``PATCH`` was answered. Two 4 MiB
#: chunks in flight keep a 2-core machine busy; ``UPLOAD_BUDGET.limit`` may be changed at any time.
UPLOAD_BUDGET: Final = ByteBudget(8 << 20)
#: Seconds a cancelled upload's ``DELETE`` may take before it is abandoned (the registry purges it later).
_CANCEL_TIMEOUT: Final = 5.0


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth a new attempt: a dropped connection or a ``5xx``/``429``."""
    return isinstance(exc, RegistryUnreachableError) or (
        isinstance(exc, RegistryError) and exc.status in RETRY_STATUSES
    )


def _tail(pieces: Sequence[bytes], offset: int) -> Sequence[bytes]:
    """The pieces less their first ``offset`` bytes (the first piece kept cut, if need be)."""
    if not offset:
        return pieces
    for i, piece in enumerate(pieces):
        if offset < len(piece):
            return [piece[offset:], *pieces[i + 1 :]]
        offset -= len(piece)
    return []


def _octets(size: int) -> dict[str, str]:
    return {"Content-Type": "application/octet-stream", "Content-Length": str(size)}


class UploadSession:
    """One open upload: ``await start()``, any number of :meth:`append`, then :meth:`commit` or :meth:`cancel`."""

    def __init__(self, client: RegistryClient) -> None:
        self._client = client
        self._location: str | None = None
        self.offset = 0
        #: The smallest chunk the registry accepts (``OCI-Chunk-Min-Length``), or 0.
        self.min_chunk = 0

    def _follow(self, response: httpx.Response) -> None:
        location = response.headers.get("location")
        if not location:
            raise RegistryError(
                f"{self._client.where} answered {response.request.method} of a blob upload without a Location",
                status=response.status_code,
            )
        self._location = str(response.request.url.join(location))

    async def start(self) -> None:
        """Open the session (a retry-safe ``POST``: an orphan session is purged by the registry)."""
        client = self._client
        response = await client.request("POST", client.url("blobs/uploads/"), idempotent=True)
        if response.status_code != 202:
            raise self._failed(response, "start a blob upload")
        self._follow(response)
        try:
            self.min_chunk = max(0, int(response.headers.get("oci-chunk-min-length", "0")))
        except ValueError:
            self.min_chunk = 0

    async def append(self, data: Sequence[bytes], verifier: Verifier, *, vouched: bool = False) -> None:
        """Send the pieces ``data`` as the next chunk (``PATCH``) while hashing them into ``verifier``.

        ``vouched``: the source verifies the content itself, so the bytes are only counted.
        """
        assert self._location is not None
        if vouched:
            for piece in data:
                verifier.count(piece)
            await self._send(data, None)
            return

        async def hash_all() -> None:
            for piece in data:
                await hash_into(verifier, piece)

        async with task_group() as tg:  # hashing and sending overlap
            tg.start_soon(hash_all)
            await self._send(data, None)

    async def _send(self, data: Sequence[bytes], digest: Digest | None) -> httpx.Response:
        """``PATCH`` ``data`` (or, with ``digest``, the closing ``PUT``), resuming where a failed attempt stopped."""
        start, sent, failures = self.offset, 0, 0
        length = sum(map(len, data))
        failure: Exception | None = None
        while True:
            assert self._location is not None
            piece = _tail(data, sent)
            headers = _octets(length - sent)
            if digest is None:
                headers["Content-Range"] = f"{start + sent}-{start + length - 1}"
                method, url = "PATCH", self._location
            else:
                method, url = "PUT", str(httpx.URL(self._location).copy_add_param("digest", str(digest)))
            try:
                response = await self._client.request(method, url, headers=headers, content=piece, idempotent=False)
            except RegistryError as exc:  # dropped, or a 5xx (never retried by the client for these)
                if not (isinstance(exc, RegistryUnreachableError) or exc.status in RETRY_STATUSES):
                    raise
                failure = exc
            else:
                status = response.status_code
                if digest is None and status == 202:
                    self._follow(response)
                    self.offset = start + length
                    return response
                if digest is not None and status in (200, 201, 204):
                    return response
                if status == 404 and failure is not None:
                    # the session answered the status query, then the registry dropped it for the cut request
                    # after all (distribution cleans up behind it): the first failure is what happened
                    await response.aclose()
                    raise failure
                if status not in RETRY_STATUSES:
                    return response
                failure = self._failed(response, "upload a blob chunk" if digest is None else f"commit blob {digest}")
            policy = self._client.retry
            assert failure is not None
            if failures >= policy.retries:
                raise failure
            await anyio.sleep(policy.delay(failures))
            failures += 1
            note_retry(self._client)
            reached = await self._status()
            if reached is None or not start <= reached <= start + length:
                raise failure
            sent = reached - start

    async def _status(self) -> int | None:
        """How many bytes the registry holds for this upload (``GET``: ``Range: 0-N``), or ``None`` if it lost it."""
        assert self._location is not None
        try:
            response = await self._client.request("GET", self._location)
        except RegistryError:
            return None
        last = response.headers.get("range", "").partition("-")[2].strip()
        if response.status_code != 204 or not last.isdigit():
            return None
        self._follow(response)
        end = int(last)
        # "0-0" is distribution's answer for an empty upload as well as for one byte
        return 0 if end == 0 and self.offset == 0 else end + 1

    async def commit(self, digest: Digest, last: bytes | Sequence[bytes] = b"") -> None:
        """Close the session with ``PUT ?digest=``, carrying the ``last`` bytes; the blob is then stored."""
        assert self._location is not None
        response = await self._send((last,) if isinstance(last, bytes) else last, digest)
        self._location = None  # used up, whatever the answer
        if response.status_code in (200, 201, 204):
            return
        codes = error_codes(response)
        if response.status_code == 400 and "DIGEST_INVALID" in codes:
            if digest.algorithm != "sha256":
                raise UnsupportedAlgorithmError(
                    f"{self._client.where} does not accept {digest.algorithm} digests: it answered DIGEST_INVALID "
                    f"for content that hashes to {digest}"
                )
            raise DigestMismatchError(
                f"{self._client.where} refused blob {digest}: the content it received hashes to something else"
            )
        raise self._failed(response, f"commit blob {digest}")

    async def cancel(self) -> None:
        """Abandon the session (``DELETE``), shielded and bounded in time; failures are ignored."""
        location, self._location = self._location, None
        if location is None:
            return
        with anyio.move_on_after(_CANCEL_TIMEOUT, shield=True):
            try:
                response = await self._client.request("DELETE", location)
                await response.aclose()
            except Exception:  # the registry purges abandoned uploads itself
                pass

    def _failed(self, response: httpx.Response, what: str) -> Exception:
        codes = error_codes(response)
        if response.status_code == 404 and "BLOB_UPLOAD_UNKNOWN" in codes:
            return RegistryError(
                f"{self._client.where} forgot the upload session while trying to {what} (BLOB_UPLOAD_UNKNOWN)",
                status=404,
                codes=codes,
            )
        if response.status_code in (400, 416) and codes:
            return InvalidError(str(self._client.error(response, what)))
        return self._client.error(response, what)


async def mount_blob(client: RegistryClient, digest: Digest, source: str) -> bool:
    """Mount ``digest`` from repository ``source`` of the same registry; ``False`` if the registry would not.

    A registry that cannot mount (the blob is not in ``source``, or no access to it)
    opens an ordinary upload session instead: that session is cancelled.
    """
    scope = f"{client.scope('POST')} {client.scope('GET', source)}"
    response = await client.request(
        "POST",
        client.url("blobs/uploads/"),
        params={"mount": str(digest), "from": source},
        scope=scope,
        idempotent=True,
    )
    if response.status_code == 201:
        return True
    if response.status_code == 202:
        session = UploadSession(client)
        session._follow(response)
        await session.cancel()
        return False
    if response.status_code == 404:
        raise BlobNotFoundError(f"cannot mount blob {digest} from {source!r}: {client.error(response, 'mount')}")
    raise client.error(response, f"mount blob {digest} from {source!r}")
