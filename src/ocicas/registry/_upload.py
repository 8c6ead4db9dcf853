"""Blob upload sessions (distribution spec "pushing blobs"): monolithic, chunked, cancelled, mounted.

A session is opened with ``POST /v2/<name>/blobs/uploads/``; every answer names
the URL of the next step in its ``Location`` (distribution signs the upload state
into it), so that header is followed rather than built. Content is verified
locally before the closing ``PUT …?digest=`` commits it: on any failure, the
session is cancelled with ``DELETE`` and nothing is committed.

A ``PATCH`` or the closing ``PUT`` that fails (a dropped connection, a ``5xx``)
is resumed: ``GET`` on the upload URL answers how far the registry got
(``Range: 0-N``), and the rest of the chunk, still in memory, goes again from
byte ``N + 1``. Retries are bounded by the client's :class:`RetryPolicy`, one
count for each step (opening the session, a chunk, the commit, a streamed file):
every transient failure of any request the step makes (the ``GET`` asking how far
the registry got and the ``HEAD`` asking whether a lost commit landed included,
which are sent once per attempt, not retried by the client on their own) takes
one retry, and when none is left the error names the step. A
registry that lost the session (distribution 2.8 drops a session whose last
request was cut midway) ends the upload with the original error; content in
hand is then sent again as a new upload by the engine.

A blob read from a local file (:func:`upload_file`, a push from a layout) goes
up as one streamed ``PATCH`` instead, read and hashed a piece at a time in a
worker thread. When that ``PATCH`` is cut, the registry is asked how far it got
and a new ``PATCH`` continues from there, the file read again from that byte;
where the registry lost the session (distribution 2.8 does, for any request cut
once part of its body was stored), a new upload starts from byte 0.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final

import anyio
import anyio.lowlevel
import httpx

from .._budget import ByteBudget
from .._digest import Digest, Verifier, _new_hash
from .._errors import (
    BlobNotFoundError,
    DigestMismatchError,
    InvalidError,
    RegistryError,
    RegistryUnreachableError,
    SizeMismatchError,
    UnsupportedAlgorithmError,
)
from .._tasks import task_group
from .._threads import hash_into, run_sync
from ._transport import RETRY_STATUSES, RegistryClient, error_codes, note_retry

__all__ = [
    "UPLOAD_BUDGET",
    "FileBody",
    "FileSource",
    "UploadSession",
    "mount_blob",
    "named",
    "transient",
    "upload_file",
]

#: Bytes all blob pushes of the process may hold at once (read, and not yet acknowledged by a registry, or
#: for a streamed upload not yet written to its connection): a chunk is reserved before it is read and given
#: back once its ``PATCH`` was answered (a streamed piece once the next one is asked for). Two 4 MiB
#: chunks in flight keep a 2-core machine busy; ``UPLOAD_BUDGET.limit`` may be changed at any time.
UPLOAD_BUDGET: Final = ByteBudget(8 << 20)
#: Seconds a cancelled upload's ``DELETE`` may take before it is abandoned (the registry purges it later).
_CANCEL_TIMEOUT: Final = 5.0
#: Hash states a streamed upload keeps to resume from (their spacing doubles as the blob grows past them).
MAX_STATES: Final = 64
#: A streamed upload reads its file this much per worker-thread hop (and hashes it in the same hop).
FILE_PIECE: Final = 512 << 10


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth a new attempt: a dropped connection or a ``5xx``/``429``."""
    return isinstance(exc, RegistryUnreachableError) or (
        isinstance(exc, RegistryError) and exc.status in RETRY_STATUSES
    )


def _restated(exc: Exception, message: str) -> Exception:
    """``exc`` again (same type, status and codes), saying ``message``; caused by ``exc``."""
    if isinstance(exc, RegistryError):
        restated: Exception = type(exc)(message, status=exc.status, codes=exc.codes, retry_after=exc.retry_after)
    else:
        restated = type(exc)(message)
    restated.__cause__ = exc
    return restated


class _Attempts:
    """The retries one upload step may make (the client's :class:`RetryPolicy`), whatever request failed.

    Each transient failure is counted once (a failure handed on to an outer loop
    sharing this count is not counted again, and one this count refused is raised
    again unchanged), with the policy's backoff, or the wait a ``Retry-After`` asked
    for (up to ``max_delay``), as the client's own retries.
    """

    def __init__(self, client: RegistryClient) -> None:
        self._client = client
        self._counted: list[Exception] = []
        self._refused: list[Exception] = []  # what pause raised: the final word, whoever hands it on

    async def pause(self, failure: Exception) -> None:
        """Wait before the next attempt after ``failure``, counting it; raise it if no retry is left."""
        if any(failure is refused for refused in self._refused):
            raise failure
        if any(failure is counted for counted in self._counted):
            return
        policy = self._client.retry
        if len(self._counted) >= policy.retries:
            self._refused.append(failure)
            raise failure
        delay = failure.retry_after if isinstance(failure, RegistryError) else None
        if delay is None:
            delay = policy.delay(len(self._counted))
        elif delay > policy.max_delay:
            refusal = _restated(
                failure,
                f"{failure}; the registry asked to retry after {delay:.0f} s, over the limit of "
                f"{policy.max_delay:.0f} s",
            )
            self._refused.append(refusal)
            raise refusal
        await anyio.sleep(delay)
        self._counted.append(failure)
        note_retry(self._client)


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

    def __init__(self, client: RegistryClient, attempts: _Attempts | None = None) -> None:
        self._client = client
        # shared by every step of this session when given (a streamed file's one count); else one per step
        self._attempts = attempts
        self._location: str | None = None
        #: The registry said it no longer knows this session (or answered nonsense about it).
        self.lost = False
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
        attempts = self._attempts or _Attempts(client)
        while True:
            try:
                response = await client.request("POST", client.url("blobs/uploads/"), idempotent=False)
                break
            except RegistryError as exc:
                if not transient(exc):
                    raise
                await attempts.pause(exc)
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
        start, sent = self.offset, 0
        attempts = self._attempts or _Attempts(self._client)
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
            assert failure is not None
            await attempts.pause(failure)
            reached = await self.reached(attempts)
            if reached is None or not start <= reached <= start + length:
                self.lost = True
                raise failure
            sent = reached - start

    async def stream(self, body: FileBody) -> None:
        """``PATCH`` the file ``body`` streams, from its start to the end of its source, in one request."""
        assert self._location is not None
        start, size = body.start, body.source.size
        headers = _octets(size - start)
        headers["Content-Range"] = f"{start}-{size - 1}"
        try:
            response = await self._client.request(
                "PATCH", self._location, headers=headers, content=body, idempotent=False
            )
        finally:
            body.release()
        if response.status_code != 202:
            raise self._failed(response, f"upload blob {body.source.digest}")
        self._follow(response)
        self.offset = size

    async def reached(self, attempts: _Attempts) -> int | None:
        """How many bytes the registry holds for this upload (``GET``: ``Range: 0-N``), or ``None`` if it lost it.

        A transient failure of the question is one of ``attempts`` and the question goes again; when
        none is left, the error says it came from asking.
        """
        while True:
            try:
                return await self._status()
            except RegistryError as exc:
                if not transient(exc):
                    return None
                await attempts.pause(_restated(exc, f"asking the registry how far the upload got: {exc}"))

    async def _status(self) -> int | None:
        """:meth:`reached`, asked once: a transient failure is raised."""
        assert self._location is not None
        response = await self._client.request("GET", self._location, idempotent=False)
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


class FileSource:
    """The bytes of a blob in a local file, read a piece at a time and hashed as read, from any byte again.

    Hash states are kept at evenly spaced piece boundaries (at most :data:`MAX_STATES`,
    however large the blob), so reading again from byte ``n`` (an upload resumed
    there) rehashes the bytes since the last one before ``n``: the digest is always
    that of one pass over the whole file.
    """

    def __init__(self, fd: int, size: int, digest: Digest) -> None:
        self.fd = fd
        self.size = size
        self.digest = digest
        self._states: dict[int, Any] = {0: _new_hash(digest.algorithm)}
        self._every = FILE_PIECE  # the spacing of the kept hash states
        self._hash: Any = None
        self._position = 0
        #: Bytes handed out at least once (progress counts each byte once).
        self.reached = 0

    @property
    def position(self) -> int:
        """Where the next read starts: the end of what the current pass read."""
        return self._position

    def rewind(self, start: int) -> int:
        """Read again from the last kept hash state at or before byte ``start``; returns where that is."""
        position = max(p for p in self._states if p <= start)
        self._hash = self._states[position].copy()
        self._position = position
        return position

    def read(self) -> bytes:
        """The next piece, hashed (in a worker thread); ``b""`` at the end."""
        position = self._position
        n = min(FILE_PIECE, self.size - position)
        if n <= 0:
            return b""
        data = os.pread(self.fd, n, position)
        if len(data) != n:
            raise SizeMismatchError(f"blob {self.digest} ended at byte {position + len(data)}, expected {self.size}")
        self._hash.update(data)
        self._position = position = position + n
        if position % self._every == 0 and position not in self._states:
            self._states[position] = self._hash.copy()
            if len(self._states) > MAX_STATES:
                self._every *= 2
                self._states = {p: state for p, state in self._states.items() if p % self._every == 0}
        return data

    def verify(self) -> None:
        """Check that what was read last, end to end, hashes to :attr:`digest`."""
        actual = f"{self.digest.algorithm}:{self._hash.hexdigest()}"
        if self._position != self.size or actual != self.digest:
            raise DigestMismatchError(f"blob {self.digest} hashes to {actual}: the source file changed")


class FileBody(httpx.AsyncByteStream):
    """A request body of a :class:`FileSource` from byte ``start`` to its end.

    Each piece is reserved in :data:`UPLOAD_BUDGET` before it is read and given
    back once the next one is asked for (it was written to the connection), or
    by :meth:`release`. Iterated again (a request sent again), it reads again.
    """

    def __init__(self, source: FileSource, start: int, progress: Callable[[int], None] | None = None) -> None:
        self.source = source
        self.start = start
        self._progress = progress
        self._held = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _FileIterator(self)

    def release(self) -> None:
        """Give back the budget of the piece in flight, if any."""
        held, self._held = self._held, 0
        if held:
            UPLOAD_BUDGET.release(held)

    async def _next(self) -> bytes:
        self.release()  # the last piece was sent
        source = self.source
        want = min(FILE_PIECE, source.size - source.position)
        if want <= 0:
            return b""
        await UPLOAD_BUDGET.acquire(want)
        self._held = want
        data = await run_sync(source.read)
        end = source.position
        if end > source.reached:
            if self._progress is not None:
                self._progress(end - source.reached)
            source.reached = end
        return data


class _FileIterator:
    """One pass of a :class:`FileBody` (a plain async iterator, no async generator: see ``_streams``)."""

    def __init__(self, body: FileBody) -> None:
        self._body = body
        self._start = body.start
        body.source.rewind(body.start)

    def __aiter__(self) -> _FileIterator:
        return self

    async def __anext__(self) -> bytes:
        source = self._body.source
        while True:
            before = source.position
            data = await self._body._next()
            if not data:
                raise StopAsyncIteration
            if source.position <= self._start:  # before ``start``: read to be hashed, not sent
                continue
            return data[self._start - before :] if before < self._start else data


def named(exc: Exception, digest: Digest | None, reached: int, size: int | None, why: str = "") -> Exception:
    """``exc`` again, its message naming the blob and the byte its push reached (and ``why`` it ended there)."""
    of = "" if size is None else f" of {size}"
    return _restated(
        exc, f"pushing {f'blob {digest}' if digest else 'a blob'} stopped at byte {reached}{of}{why}: {exc}"
    )


async def _landed(client: RegistryClient, digest: Digest, size: int, attempts: _Attempts) -> bool:
    """Whether the registry holds blob ``digest`` of ``size`` bytes (``HEAD``, its failures one of ``attempts``)."""
    while True:
        try:
            response = await client.request(
                "HEAD", client.url(f"blobs/{digest}"), follow_redirects=True, idempotent=False
            )
        except RegistryError as exc:
            if not transient(exc):
                raise
            await attempts.pause(_restated(exc, f"asking the registry whether blob {digest} landed: {exc}"))
            continue
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise client.error(response, f"HEAD blobs/{digest}")
        length: str | None = response.headers.get("content-length")
        return length == str(size)


async def upload_file(
    client: RegistryClient, fd: int, size: int, digest: Digest, progress: Callable[[int], None] | None = None
) -> None:
    """Push the blob ``digest`` of ``size`` bytes from the local file ``fd``: one streamed ``PATCH``, then ``PUT``.

    A failed ``PATCH`` resumes where the registry says it got (``GET`` on the
    session), re-reading the file from there; a lost session starts a new upload
    from byte 0. Every retry is counted (:func:`note_retry`), at most
    ``client.retry.retries`` of them for the whole file, whichever request
    failed (the ``PATCH``, the ``GET`` asking how far it got, the commit), with
    backoff. The content is hashed as read:
    nothing is committed unless it hashes to ``digest``. On failure the session is
    cancelled and the error names the blob and the byte reached.
    """
    source = FileSource(fd, size, digest)
    attempts = _Attempts(client)  # one count for the whole file, whichever request fails
    session: UploadSession | None = None
    held = 0  # bytes the open session holds
    try:
        while True:
            try:
                if session is None:
                    session = UploadSession(client, attempts)
                    await session.start()
                    held = 0
                if held < size:
                    await session.stream(FileBody(source, held, progress))
                    held = size
                source.verify()
                await anyio.lowlevel.checkpoint()  # the last chance to cancel before it is committed
                await session.commit(digest)
                return
            except Exception as exc:
                if not transient(exc):
                    raise
                failure = exc
            try:
                await attempts.pause(failure)
                assert session is not None
                reached = None if session.lost or session._location is None else await session.reached(attempts)
                if reached is not None and held <= reached <= source.position:  # never more than was sent
                    held = reached
                    continue
                await session.cancel()  # lost (or answered nonsense): a new upload from byte 0
                session = None
                if await _landed(client, digest, size, attempts):  # a lost commit answer: it may have landed
                    return
            except Exception as exc:
                if not transient(exc):
                    raise
                raise named(exc, digest, source.reached, size) from exc
    except BaseException:
        if session is not None:
            await session.cancel()
        raise
