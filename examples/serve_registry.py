"""Serve OCI image layouts as a pull-only registry: an ASGI app (Starlette) on anyio, run by hypercorn.

    python examples/serve_registry.py LAYOUT [--host 127.0.0.1] [--port 5000] [--trio]

Then ``skopeo copy --src-tls-verify=false docker://127.0.0.1:5000/any/name:TAG oci:out:TAG``
(or ``docker pull``, ``crane``, ``oras``…). ``--port 0`` picks a free port; the first
line printed says which. Runs on asyncio, or on trio with ``--trio``.

Repository names: if ``LAYOUT`` is an image layout (it holds ``oci-layout``), it is
served under every repository name. Otherwise it is a directory of layouts and
``/v2/team/app/…`` serves the layout ``LAYOUT/team/app``; a name without one is
``NAME_UNKNOWN``. References are the layout's reference names that are valid tags.

Endpoints (distribution-spec "pull"): ``GET/HEAD /v2/``, ``/v2/<name>/manifests/<tag
or digest>``, ``/v2/<name>/blobs/<digest>`` (with ``Range: bytes=…``),
``/v2/<name>/tags/list``, and the referrers API ``/v2/<name>/referrers/<digest>``
(``?artifactType=`` filters). Anything else is ``UNSUPPORTED`` (405 for writes).

Verification: a whole blob is streamed from ``engine.get_blob``, which hashes it as
it goes and withholds the last chunk until the digest checks out; a blob that
fails is cut short, so the client sees a truncated body, never a complete-looking
corrupt one. A *range* cannot be checked against the digest by itself, so before
the first range of a blob file is served the whole file is hashed once, and the
verdict is cached by the file's identity (device, inode, size, mtime, ctime: any
write or replacement changes it). Ranges are then read straight from the file
descriptor that was checked, and the identity is checked again before the last
chunk of each range goes out (if it changed, say because ``gc`` unlinked the file
meanwhile, the file is hashed again). The cost: the first range request of a blob
reads it whole; the rest read only what they send.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final, Protocol, TypeAlias, cast

import anyio
import anyio.to_thread
import hypercorn.asyncio
import hypercorn.trio
from hypercorn.config import Config
from hypercorn.typing import ASGIFramework
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

import ocicas

#: Bytes read per worker-thread hop when serving ranges.
CHUNK: Final = 1 << 20
#: Manifests at least this big are parsed on a worker thread.
PARSE_IN_THREAD: Final = 1 << 20
#: Blob files whose hash verdict is remembered.
VERDICTS: Final = 4096
API_VERSION: Final = {"Docker-Distribution-API-Version": "registry/2.0"}
_REPOSITORY: Final = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_TAG: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_RANGE: Final = re.compile(r"bytes=(\d*)-(\d*)")
_METHODS: Final = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
_SERVED_TYPES: Final = ocicas.MANIFEST_MEDIA_TYPES | ocicas.INDEX_MEDIA_TYPES

#: A blob file's identity: what it was verified as.
FileKey: TypeAlias = tuple[str, int, int, int, int, int]


class RegistryError(Exception):
    """An error answered in the distribution spec's format: ``{"errors": [{"code", "message"}]}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def response(self, request: Request) -> Response:
        if request.method == "HEAD":
            return Response(status_code=self.status, headers=API_VERSION)
        body = json.dumps({"errors": [{"code": self.code, "message": str(self), "detail": {}}]})
        return Response(body, self.status, headers=API_VERSION, media_type="application/json")


class Unsatisfiable(Exception):
    """A ``Range`` that selects no byte of the blob (answered 416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The first and last byte a ``Range`` header asks for; ``None`` to send the whole blob.

    One range only: a malformed header or several ranges are ignored, as RFC 9110
    allows. Raises :class:`Unsatisfiable` if it selects no byte.
    """
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or match[1] == match[2] == "":
        return None
    if match[1] == "":  # bytes=-N: the last N bytes
        if int(match[2]) == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - int(match[2])), size - 1
    first = int(match[1])
    last = max(first, size - 1) if match[2] == "" else int(match[2])
    if last < first:
        return None  # malformed
    if first >= size:
        raise Unsatisfiable
    return first, min(last, size - 1)


def _open_blob_file(root: Path, digest: ocicas.Digest) -> tuple[int, FileKey]:
    """Open a blob file of a layout for ranged reads (worker thread); its descriptor and identity."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # no symlink, and a FIFO cannot hang us
    try:
        fd = os.open(root / "blobs" / digest.algorithm / digest.encoded, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise ocicas.BlobNotFoundError(f"blob {digest} not found") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ocicas.InvalidError(f"blob {digest} is a symlink") from None
        raise
    try:
        return fd, _identity(fd, digest)
    except BaseException:
        os.close(fd)
        raise


def _identity(fd: int, digest: str) -> FileKey:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ocicas.InvalidError(f"blob {digest} is not a regular file")
    return (digest, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _hashes_to(fd: int, key: FileKey) -> bool:
    """Whether the whole file behind ``fd`` hashes to its digest (worker thread)."""
    digest = ocicas.Digest(key[0])
    hasher = hashlib.new(digest.algorithm)
    offset = 0
    while chunk := os.pread(fd, 4 * CHUNK, offset):
        hasher.update(chunk)
        offset += len(chunk)
    return offset == key[3] and hasher.hexdigest() == digest.encoded


class Verdicts:
    """Which blob files were hashed whole and matched their digest, by file identity (LRU)."""

    def __init__(self, capacity: int = VERDICTS) -> None:
        self._capacity = capacity
        self._known: collections.OrderedDict[FileKey, bool] = collections.OrderedDict()
        self._running: dict[FileKey, anyio.Event] = {}

    async def verified(self, fd: int, key: FileKey) -> bool:
        """Whether the file is intact, hashing it only if no verdict on this identity is known."""
        while key not in self._known:
            running = self._running.get(key)
            if running is None:
                self._running[key] = done = anyio.Event()
                try:
                    self._known[key] = await anyio.to_thread.run_sync(_hashes_to, fd, key)
                finally:
                    del self._running[key]
                    done.set()
                if len(self._known) > self._capacity:
                    self._known.popitem(last=False)
            else:
                await running.wait()  # another request is hashing this very file
        self._known.move_to_end(key)
        return self._known[key]


class _Body(Protocol):
    def __aiter__(self) -> AsyncIterator[bytes]: ...
    async def aclose(self) -> None: ...


class RangeReader:
    """Bytes ``first..last`` of a verified blob file, read from its descriptor; closes it."""

    def __init__(self, fd: int, key: FileKey, first: int, last: int, verdicts: Verdicts) -> None:
        self._fd, self._key, self._offset, self._last, self._verdicts = fd, key, first, last, verdicts

    def __aiter__(self) -> RangeReader:
        return self

    async def __anext__(self) -> bytes:
        if self._offset > self._last:
            raise StopAsyncIteration
        wanted = min(CHUNK, self._last + 1 - self._offset)
        chunk = await anyio.to_thread.run_sync(os.pread, self._fd, wanted, self._offset)
        self._offset += len(chunk)
        if len(chunk) < wanted:
            raise ocicas.SizeMismatchError(f"blob {self._key[0]} shrank while it was being served")
        if self._offset > self._last:  # the last chunk goes out only if the file is (still) intact
            key = await anyio.to_thread.run_sync(_identity, self._fd, self._key[0])
            # an unlink (gc) changes the identity too: hash again rather than cut a good blob short
            if key != self._key and not await self._verdicts.verified(self._fd, key):
                raise ocicas.DigestMismatchError(f"blob {self._key[0]} changed while it was being served")
        return chunk

    async def aclose(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)  # never blocks on a regular file


class BlobResponse(StreamingResponse):
    """A streamed response that always closes its body, even when the client goes away."""

    def __init__(self, body: _Body, status: int, headers: Mapping[str, str]) -> None:
        super().__init__(body, status, headers, media_type="application/octet-stream")
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._body.aclose()


class Layouts:
    """Repository names to open layouts: one layout under every name, or a directory of layouts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.single: bool | None = None  # decided when opened
        self._engines: dict[str, ocicas.DirEngine] = {}
        self._lock = anyio.Lock()

    async def __aenter__(self) -> Layouts:
        if not await anyio.Path(self.root).is_dir():
            raise ocicas.LayoutNotFoundError(f"{str(self.root)!r} is not a directory")
        self.single = await anyio.Path(self.root, "oci-layout").exists()
        if self.single:
            self._engines[""] = await ocicas.open_layout(self.root)
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            for engine in self._engines.values():
                await engine.close()

    async def engine(self, name: str) -> ocicas.DirEngine:
        """The layout served as repository ``name``."""
        if len(name) > 255 or not _REPOSITORY.fullmatch(name):
            raise RegistryError(400, "NAME_INVALID", f"invalid repository name {name!r:.300}")
        key = "" if self.single else name
        async with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                path = self.root / name
                if not await anyio.Path(path, "oci-layout").is_file():
                    raise RegistryError(404, "NAME_UNKNOWN", f"repository {name!r} is not known")
                engine = self._engines[key] = await ocicas.open_layout(path)
        return engine


def _digest(text: str) -> ocicas.Digest:
    try:
        return ocicas.Digest(text)
    except ocicas.InvalidError:
        raise RegistryError(400, "DIGEST_INVALID", f"invalid digest {text!r:.300}") from None


def _media_type_of(data: bytes) -> str | None:
    """The media type of a stored manifest or index, or ``None`` if it is neither."""
    for model in (ocicas.Manifest, ocicas.Index):
        try:
            document = model.from_json(data)
        except ocicas.InvalidError:
            continue
        media_type = document.media_type or (
            ocicas.MEDIA_TYPE_IMAGE_MANIFEST if model is ocicas.Manifest else ocicas.MEDIA_TYPE_IMAGE_INDEX
        )
        return media_type if media_type in _SERVED_TYPES else None
    return None


async def _served_type(data: bytes) -> str | None:
    """:func:`_media_type_of`, big documents parsed off the event loop."""
    if len(data) < PARSE_IN_THREAD:
        return _media_type_of(data)
    return await anyio.to_thread.run_sync(_media_type_of, data)


class Registry:
    """The endpoints, over :class:`Layouts`."""

    def __init__(self, root: Path) -> None:
        self.layouts = Layouts(root)
        self.verdicts = Verdicts()

    async def base(self, request: Request) -> Response:
        return Response(b"{}" if request.method == "GET" else b"", headers=API_VERSION, media_type="application/json")

    async def manifest(self, request: Request) -> Response:
        engine = await self.layouts.engine(request.path_params["name"])
        reference: str = request.path_params["reference"]
        unknown = RegistryError(404, "MANIFEST_UNKNOWN", f"manifest {reference!r:.300} is not known")
        try:
            if ":" in reference:
                digest = _digest(reference)
                data = await engine.read_blob(digest, max_size=ocicas.DEFAULT_JSON_LIMIT)
            else:
                if not _TAG.fullmatch(reference):
                    raise unknown
                try:
                    ocicas.validate_reference_name(reference)
                except ocicas.InvalidError:
                    raise unknown from None  # a tag no layout can hold
                descriptor = await engine.get_reference(reference)
                if descriptor.media_type not in _SERVED_TYPES:
                    raise unknown
                data = await ocicas.read_described(engine, descriptor)
                digest = descriptor.digest
            # the document's own mediaType, by tag as by digest: one digest, one type
            media_type = await _served_type(data)
            if media_type is None:
                raise unknown
        except (ocicas.NotFoundError, ocicas.BlobTooLargeError, ocicas.UnsupportedAlgorithmError):
            raise unknown from None
        headers = {
            **API_VERSION,
            "Docker-Content-Digest": digest,
            "Content-Length": str(len(data)),
            "ETag": f'"{digest}"',
        }
        return Response(data if request.method == "GET" else b"", headers=headers, media_type=media_type)

    async def blob(self, request: Request) -> Response:
        engine = await self.layouts.engine(request.path_params["name"])
        digest = _digest(request.path_params["digest"])
        headers = {**API_VERSION, "Docker-Content-Digest": digest, "Accept-Ranges": "bytes", "ETag": f'"{digest}"'}
        try:
            if request.method == "HEAD":
                size = await engine.stat_blob(digest)
                return Response(headers={**headers, "Content-Length": str(size)}, media_type="application/octet-stream")
            if_range = request.headers.get("if-range")
            if "range" in request.headers and if_range in (None, headers["ETag"]):
                return await self._range(engine, digest, request.headers["range"], headers)
            reader = await engine.get_blob(digest)  # verified as it streams
        except (ocicas.NotFoundError, ocicas.UnsupportedAlgorithmError):
            raise RegistryError(404, "BLOB_UNKNOWN", f"blob {digest} is not known") from None
        return BlobResponse(reader, 200, {**headers, "Content-Length": str(reader.size)})

    async def _range(
        self, engine: ocicas.DirEngine, digest: ocicas.Digest, header: str, headers: dict[str, str]
    ) -> Response:
        if not digest.supported:
            raise ocicas.UnsupportedAlgorithmError(f"cannot verify {digest}")
        fd, key = await anyio.to_thread.run_sync(_open_blob_file, engine.path, digest)
        try:
            size = key[3]
            try:
                selected = parse_range(header, size)
            except Unsatisfiable:
                os.close(fd)
                return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
            if not await self.verdicts.verified(fd, key):
                raise ocicas.DigestMismatchError(f"blob {digest} does not hash to its digest")
        except BaseException:
            os.close(fd)
            raise
        if selected is None:
            return BlobResponse(
                RangeReader(fd, key, 0, size - 1, self.verdicts), 200, {**headers, "Content-Length": str(size)}
            )
        first, last = selected
        headers = {**headers, "Content-Length": str(last + 1 - first), "Content-Range": f"bytes {first}-{last}/{size}"}
        return BlobResponse(RangeReader(fd, key, first, last, self.verdicts), 206, headers)

    async def tags(self, request: Request) -> Response:
        name = request.path_params["name"]
        engine = await self.layouts.engine(name)
        tags = [t for t in await engine.list_references() if _TAG.fullmatch(t)]
        last, count = request.query_params.get("last"), request.query_params.get("n")
        if last is not None:
            tags = [t for t in tags if t > last]
        headers = dict(API_VERSION)
        if count is not None and count.isdigit() and 0 < int(count) < len(tags):
            tags = tags[: int(count)]
            headers["Link"] = f'</v2/{name}/tags/list?n={count}&last={tags[-1]}>; rel="next"'
        return Response(json.dumps({"name": name, "tags": tags}), headers=headers, media_type="application/json")

    async def referrers(self, request: Request) -> Response:
        """The referrers API (distribution-spec 1.1): an image index of the subject's referrers."""
        engine = await self.layouts.engine(request.path_params["name"])
        digest = _digest(request.path_params["digest"])
        artifact_type = request.query_params.get("artifactType")
        try:
            found = await engine.referrers(digest, artifact_type=artifact_type)
        except ocicas.InvalidError as exc:
            if artifact_type is None:
                raise
            raise RegistryError(400, "UNSUPPORTED", f"cannot filter on {exc}") from None  # not a media type
        headers = dict(API_VERSION)
        if artifact_type is not None:
            headers["OCI-Filters-Applied"] = "artifactType"
        manifests = [d.to_dict() for d in found]
        index = {"schemaVersion": 2, "mediaType": ocicas.MEDIA_TYPE_IMAGE_INDEX, "manifests": manifests}
        body = json.dumps(index).encode() if request.method == "GET" else b""
        return Response(body, headers=headers, media_type=ocicas.MEDIA_TYPE_IMAGE_INDEX)

    async def unsupported(self, request: Request) -> Response:
        raise RegistryError(404, "UNSUPPORTED", f"{request.method} {request.url.path} is not served here")


def _pull_only(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Answer every error of ``endpoint`` in the spec's format, and writes with 405 ``UNSUPPORTED``."""

    async def handle(request: Request) -> Response:
        try:
            if request.method not in ("GET", "HEAD"):
                raise RegistryError(405, "UNSUPPORTED", "this registry is pull-only")
            return await endpoint(request)
        except RegistryError as error:
            return error.response(request)
        except ocicas.InvalidError as exc:  # stored content failed verification, or is not what it claims
            return RegistryError(500, "UNKNOWN", f"stored content is damaged: {exc}").response(request)

    return handle


def create_app(root: str | os.PathLike[str]) -> Starlette:
    """The ASGI app serving the layout (or directory of layouts) at ``root``."""
    registry = Registry(Path(root))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with registry.layouts:
            yield

    routes = [
        Route("/v2/", _pull_only(registry.base), methods=_METHODS),
        Route("/v2/{name:path}/manifests/{reference}", _pull_only(registry.manifest), methods=_METHODS),
        Route("/v2/{name:path}/blobs/{digest}", _pull_only(registry.blob), methods=_METHODS),
        Route("/v2/{name:path}/tags/list", _pull_only(registry.tags), methods=_METHODS),
        Route("/v2/{name:path}/referrers/{digest}", _pull_only(registry.referrers), methods=_METHODS),
        Route("/{path:path}", _pull_only(registry.unsupported), methods=_METHODS),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``0``: any free port) and listening."""
    return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)


async def _until_signalled() -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


async def serve(
    root: str | os.PathLike[str], sock: socket.socket, *, shutdown: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Serve ``root`` on the listening ``sock`` (taken over) until ``shutdown()`` returns (default: SIGINT/SIGTERM).

    Runs on whichever event loop runs it: asyncio or trio.
    """
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.graceful_timeout = 2.0
    # Starlette types scopes as plain mappings, hypercorn as TypedDicts: the same ASGI app
    app = cast(ASGIFramework, create_app(root))
    trigger = shutdown or _until_signalled
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no asyncio loop here: trio
        await hypercorn.trio.serve(app, config, shutdown_trigger=trigger)
    else:
        await hypercorn.asyncio.serve(app, config, shutdown_trigger=trigger)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve OCI image layouts as a pull-only registry.")
    parser.add_argument("layout", type=Path, help="an image layout, or a directory of layouts")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000, help="0 picks a free port")
    parser.add_argument("--trio", action="store_true", help="run on trio instead of asyncio")
    args = parser.parse_args(argv)
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    print(f"serving {args.layout} on http://{host}:{port}", flush=True)
    anyio.run(serve, args.layout, sock, backend="trio" if args.trio else "asyncio")


if __name__ == "__main__":
    main()
