"""The Engine conformance suite: the protocol's behaviour, written once.

Third-party engines run it by subclassing :class:`EngineConformance` in a test
module and providing an ``engine`` fixture (async, yielding a fresh, empty engine)::

    from ocicas.testing import EngineConformance

    class TestMyEngine(EngineConformance):
        @pytest.fixture
        async def engine(self):
            async with MyEngine(...) as engine:
                yield engine

Every test runs on asyncio and on trio (override the ``anyio_backend`` fixture to
change that). Operations an engine cannot perform are listed in
:attr:`EngineConformance.unsupported`: the suite then checks that they raise
:class:`~ocicas.UnsupportedError` and skips the tests that need them. Engines
whose references are registry tags set :attr:`EngineConformance.references_are_tags`.
Requires pytest and anyio's pytest plugin (``-p anyio``).
"""

from __future__ import annotations

import gc
import hashlib
import random
import re
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

import anyio
import pytest

from ._context import Context
from ._descriptor import Descriptor, Platform
from ._digest import Digest
from ._engine import CHUNK_SIZE, Engine
from ._errors import (
    BlobNotFoundError,
    BlobTooLargeError,
    ClobberError,
    ContextCancelledError,
    DeadlineExceededError,
    DigestMismatchError,
    EngineClosedError,
    InvalidError,
    ReferenceNotFoundError,
    SizeMismatchError,
    UnsupportedAlgorithmError,
    UnsupportedError,
)

__all__ = ["EngineConformance", "blob_bytes", "sha256"]

_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_INDEX = "application/vnd.oci.image.index.v1+json"

#: Digests that must be refused before any I/O: traversal, case, length, shape.
BAD_DIGESTS: tuple[str, ...] = (
    "",
    "sha256",
    ":abc",
    "sha256:",
    "sha256:../../../etc/passwd",
    "sha256:" + "A" * 64,
    "sha256:" + "a" * 63,
    "sha256:" + "a" * 65,
    "sha256:" + "g" * 64,
    "SHA256:" + "a" * 64,
    "sha256:" + "a" * 63 + "\n",
    "sha256:" + "a" * 63 + "\x00",
    "sha256:" + "a" * 32 + "/" + "a" * 31,
    "sha512:" + "a" * 64,
    "sha256+:" + "a" * 64,
    "sha256:" + "\u0661" * 64,  # Arabic-Indic digit one is not hex
)

#: Names the image-spec reference grammar refuses.
BAD_NAMES: tuple[str, ...] = (
    "",
    "..",
    "/abs",
    "a//b",
    "a/",
    "-a",
    "a b",
    "a\x00b",
    "a\nb",
    "é",
    "a" * 1025,
    "a:",
    "a---b",
)


#: The distribution-spec tag grammar.
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def sha256(data: bytes) -> Digest:
    """The sha256 digest of ``data``."""
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def blob_bytes(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random content."""
    return random.Random(seed).randbytes(size)


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        await anyio.lowlevel.checkpoint()
        yield data[start : start + size]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    async def read(self, n: int = -1) -> bytes:
        await anyio.lowlevel.checkpoint()
        n = len(self._data) if n < 0 else n
        chunk, self._data = self._data[:n], self._data[n:]
        return bytes(chunk)


def _descriptor(data: bytes, media_type: str = _MANIFEST, **fields: Any) -> Descriptor:
    return Descriptor(media_type=media_type, digest=sha256(data), size=len(data), **fields)


class EngineConformance:
    """The behaviour every :class:`~ocicas.Engine` must have. Subclass it; see the module doc."""

    #: Operation names (``"list_blobs"``, ``"delete_blob"``, ``"gc"``, …) the engine cannot do.
    unsupported: ClassVar[frozenset[str]] = frozenset()

    #: References are registry tags: a tag must name a manifest or index that is stored
    #: (with what it needs), keeps only its media type, digest and size, and its name must
    #: also be a tag (``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``). The reference tests then tag
    #: real manifests (:meth:`target`), compare bare descriptors and use tag names.
    references_are_tags: ClassVar[bool] = False

    pytestmark = pytest.mark.anyio

    @pytest.fixture(params=["asyncio", "trio"])
    def anyio_backend(self, request: pytest.FixtureRequest) -> str:
        """Run every test on asyncio and on trio."""
        return str(request.param)

    @pytest.fixture
    async def engine(self) -> Engine:
        """A fresh, empty engine; subclasses must override this (usually as an async generator)."""
        raise NotImplementedError("subclass EngineConformance and define an `engine` fixture")

    def need(self, *operations: str) -> None:
        """Skip the calling test if the engine cannot do one of ``operations``."""
        missing = sorted(set(operations) & self.unsupported)
        if missing:
            pytest.skip(f"engine does not support {', '.join(missing)}")

    async def target(self, engine: Engine, seed: bytes, media_type: str = _MANIFEST) -> Descriptor:
        """A descriptor to put under a reference, the same for the same ``seed``, distinct for others.

        A real manifest (empty config, no layers) or index (no entries) stored
        first, told apart by a ``seed`` annotation: references name only content
        that is present.
        """
        annotations = {"org.example.seed": seed.hex()}
        document: dict[str, Any]
        if media_type == _INDEX:
            document = {"schemaVersion": 2, "mediaType": _INDEX, "manifests": [], "annotations": annotations}
        else:
            empty, _ = await engine.put_blob(b"{}")
            config = {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2}
            document = {"schemaVersion": 2, "mediaType": _MANIFEST, "config": config, "layers": []}
            document["annotations"] = annotations
        digest, size = await engine.put_blob_json(document)
        return Descriptor(media_type=media_type, digest=digest, size=size)

    # -- unsupported operations ---------------------------------------------------------

    async def test_unsupported_operations_raise_unsupported_error(self, engine: Engine) -> None:
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "list_blobs": lambda: engine.list_blobs(),
            "delete_blob": lambda: engine.delete_blob(sha256(b"x")),
            "gc": lambda: engine.gc(),
            "list_references": lambda: engine.list_references(),
            "list_roots": lambda: engine.list_roots(),
            "delete_reference": lambda: engine.delete_reference("x"),
        }
        for operation in sorted(self.unsupported):
            with pytest.raises(UnsupportedError):
                await calls[operation]()

    # -- blobs --------------------------------------------------------------------------

    async def test_put_blob_returns_sha256_digest_and_size(self, engine: Engine) -> None:
        assert await engine.put_blob(b"hello") == (
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            5,
        )

    async def test_put_blob_returns_a_digest_instance(self, engine: Engine) -> None:
        digest, _ = await engine.put_blob(b"hello")
        assert type(digest) is Digest
        assert (digest.algorithm, digest.encoded) == ("sha256", sha256(b"hello").encoded)

    async def test_put_blob_of_empty_content(self, engine: Engine) -> None:
        digest, size = await engine.put_blob(b"")
        assert (digest, size) == ("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", 0)
        assert await engine.read_blob(digest) == b""

    @pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "async-iterable", "async-read"])
    async def test_put_blob_accepts_every_source_kind(self, engine: Engine, kind: str) -> None:
        data = blob_bytes(3 * CHUNK_SIZE + 17, seed=1)
        sources: dict[str, Callable[[], Any]] = {
            "bytes": lambda: data,
            "bytearray": lambda: bytearray(data),
            "memoryview": lambda: memoryview(data),
            "async-iterable": lambda: _chunks(data, 300_001),
            "async-read": lambda: _Reader(data),
        }
        assert await engine.put_blob(sources[kind]()) == (sha256(data), len(data))
        assert await engine.read_blob(sha256(data)) == data

    async def test_put_blob_accepts_small_uneven_chunks(self, engine: Engine) -> None:
        data = blob_bytes(100_003, seed=2)
        assert await engine.put_blob(_chunks(data, 7)) == (sha256(data), len(data))
        assert await engine.read_blob(sha256(data)) == data

    async def test_put_blob_refuses_str_and_non_bytes_chunks(self, engine: Engine) -> None:
        async def texts() -> AsyncIterator[str]:
            yield "text"

        with pytest.raises(TypeError):
            await engine.put_blob("text")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await engine.put_blob(texts())  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await engine.put_blob(42)  # type: ignore[arg-type]
        if "list_blobs" not in self.unsupported:
            assert await engine.list_blobs() == []

    async def test_put_blob_is_idempotent(self, engine: Engine) -> None:
        first = await engine.put_blob(b"same")
        second = await engine.put_blob(_chunks(b"same", 1))
        assert first == second == (sha256(b"same"), 4)
        if "list_blobs" not in self.unsupported:
            assert await engine.list_blobs() == [sha256(b"same")]

    async def test_concurrent_puts_of_one_blob_store_it_once(self, engine: Engine) -> None:
        data = blob_bytes(CHUNK_SIZE + 5, seed=3)
        results = []

        async def put() -> None:
            results.append(await engine.put_blob(_chunks(data, 65536)))

        async with anyio.create_task_group() as tg:
            for _ in range(16):
                tg.start_soon(put)
        assert results == [(sha256(data), len(data))] * 16
        assert await engine.read_blob(sha256(data)) == data
        if "list_blobs" not in self.unsupported:
            assert await engine.list_blobs() == [sha256(data)]

    async def test_put_blob_with_expected_digest_and_size(self, engine: Engine) -> None:
        assert await engine.put_blob(b"abc", expected_digest=sha256(b"abc"), expected_size=3) == (sha256(b"abc"), 3)

    async def test_put_blob_with_wrong_expected_digest_stores_nothing(self, engine: Engine) -> None:
        with pytest.raises(DigestMismatchError):
            await engine.put_blob(b"abc", expected_digest=sha256(b"abd"))
        with pytest.raises(BlobNotFoundError):
            await engine.stat_blob(sha256(b"abc"))
        with pytest.raises(BlobNotFoundError):
            await engine.stat_blob(sha256(b"abd"))

    @pytest.mark.parametrize("expected", [2, 4])
    async def test_put_blob_with_wrong_expected_size_stores_nothing(self, engine: Engine, expected: int) -> None:
        with pytest.raises(SizeMismatchError):
            await engine.put_blob(_chunks(b"abc", 1), expected_size=expected)
        with pytest.raises(BlobNotFoundError):
            await engine.stat_blob(sha256(b"abc"))

    async def test_put_blob_stops_reading_once_over_expected_size(self, engine: Engine) -> None:
        pulled = 0

        async def endless() -> AsyncIterator[bytes]:
            nonlocal pulled
            while True:
                pulled += 1
                yield b"x" * 65536

        with pytest.raises(SizeMismatchError):
            await engine.put_blob(endless(), expected_size=CHUNK_SIZE)
        assert pulled <= 2 * CHUNK_SIZE // 65536 + 1

    async def test_put_blob_under_sha512(self, engine: Engine) -> None:
        expected = Digest("sha512:" + hashlib.sha512(b"abc").hexdigest())
        assert await engine.put_blob(b"abc", expected_digest=expected) == (expected, 3)
        assert await engine.read_blob(expected) == b"abc"
        assert await engine.stat_blob(expected) == 3

    async def test_put_blob_json(self, engine: Engine) -> None:
        descriptor = _descriptor(b"{}")
        digest, size = await engine.put_blob_json({"b": [1, 2], "a": descriptor, "é": None})
        expected = (
            '{"b":[1,2],"a":{"mediaType":"' + _MANIFEST + '","digest":"' + sha256(b"{}") + '","size":2},"é":null}'
        ).encode()
        assert (digest, size) == (sha256(expected), len(expected))
        assert await engine.read_blob(digest) == expected

    async def test_get_blob_streams_verified_chunks(self, engine: Engine) -> None:
        data = blob_bytes(2 * CHUNK_SIZE + 1, seed=4)
        digest, _ = await engine.put_blob(data)
        reader = await engine.get_blob(digest)
        async with reader:
            assert (reader.digest, reader.size) == (digest, len(data))
            chunks = [chunk async for chunk in reader]
            assert reader.bytes_read == len(data)
        assert b"".join(chunks) == data
        assert all(len(c) <= CHUNK_SIZE for c in chunks)

    async def test_put_blob_from_a_reader(self, engine: Engine) -> None:
        """A reader put in whole lands as it is; one read from already gives only what is left."""
        data = blob_bytes(2 * CHUNK_SIZE + 5, seed=7)
        digest, size = await engine.put_blob(data)
        async with await engine.get_blob(digest) as reader:  # an engine may copy an unread reader its own way
            assert await engine.put_blob(reader, expected_digest=digest, expected_size=size) == (digest, size)
        assert await engine.read_blob(digest, max_size=None) == data
        rest = data[10:]
        async with await engine.get_blob(digest) as reader:
            assert await reader.read(10) == data[:10]
            assert await engine.put_blob(reader) == (sha256(rest), len(rest))
        assert await engine.read_blob(sha256(rest), max_size=None) == rest
        async with await engine.get_blob(digest) as reader:
            with pytest.raises(DigestMismatchError):  # a reader of other content is not taken at its word
                await engine.put_blob(reader, expected_digest=sha256(b"other content"))

    async def test_get_blob_read_with_sizes(self, engine: Engine) -> None:
        digest, _ = await engine.put_blob(b"0123456789")
        async with await engine.get_blob(digest) as reader:
            assert await reader.read(3) == b"012"
            assert await reader.read(0) == b""
            assert await reader.read() == b"3456789"
            assert await reader.read(5) == b""

    async def test_closed_reader_refuses_reads(self, engine: Engine) -> None:
        digest, _ = await engine.put_blob(b"data")
        reader = await engine.get_blob(digest)
        await reader.aclose()
        await reader.aclose()
        with pytest.raises(EngineClosedError):
            await reader.read()

    async def test_missing_blob_is_not_found(self, engine: Engine) -> None:
        missing = sha256(b"missing")
        for call in (engine.get_blob, engine.read_blob, engine.stat_blob):
            with pytest.raises(BlobNotFoundError) as info:
                await call(missing)
            assert isinstance(info.value, FileNotFoundError)
            assert missing in str(info.value)

    async def test_read_blob_refuses_blobs_over_the_cap(self, engine: Engine) -> None:
        digest, _ = await engine.put_blob(b"0123456789")
        with pytest.raises(BlobTooLargeError, match="10 bytes"):
            await engine.read_blob(digest, max_size=9)
        assert await engine.read_blob(digest, max_size=10) == b"0123456789"
        assert await engine.read_blob(digest, max_size=None) == b"0123456789"

    async def test_stat_blob_returns_the_size(self, engine: Engine) -> None:
        digest, _ = await engine.put_blob(blob_bytes(12345))
        assert await engine.stat_blob(digest) == 12345

    async def test_delete_blob_is_idempotent(self, engine: Engine) -> None:
        self.need("delete_blob")
        keep, _ = await engine.put_blob(b"keep")
        gone, _ = await engine.put_blob(b"gone")
        await engine.delete_blob(gone)
        await engine.delete_blob(gone)
        with pytest.raises(BlobNotFoundError):
            await engine.stat_blob(gone)
        assert await engine.read_blob(keep) == b"keep"

    async def test_list_blobs_is_exact_and_sorted(self, engine: Engine) -> None:
        self.need("list_blobs")
        assert await engine.list_blobs() == []
        digests = [(await engine.put_blob(bytes([i])))[0] for i in range(20)]
        listed = await engine.list_blobs()
        assert listed == sorted(digests)
        assert all(type(d) is Digest for d in listed)

    @pytest.mark.parametrize("bad", BAD_DIGESTS)
    async def test_invalid_digests_are_refused(self, engine: Engine, bad: str) -> None:
        for call in (engine.get_blob, engine.read_blob, engine.stat_blob, engine.delete_blob):
            with pytest.raises(InvalidError) as info:
                await call(bad)
            assert isinstance(info.value, ValueError)
        with pytest.raises(InvalidError):
            await engine.put_blob(b"x", expected_digest=bad)

    async def test_unregistered_algorithms_are_unsupported(self, engine: Engine) -> None:
        digest = "sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564"
        for call in (engine.get_blob, engine.read_blob, engine.stat_blob):
            with pytest.raises(UnsupportedAlgorithmError) as info:
                await call(digest)
            assert isinstance(info.value, NotImplementedError)

    # -- references ---------------------------------------------------------------------

    async def test_put_and_get_reference(self, engine: Engine) -> None:
        target = await self.target(engine, b"{}")
        descriptor = target.replace(
            annotations={"org.example": "x"},
            platform=Platform(architecture="arm64", os="linux", variant="v8"),
            extra={"com.example.unknown": [1]},
        )
        await engine.put_reference("v1.0", descriptor)
        # a registry tag holds the manifest itself: no descriptor fields beyond type, digest and size
        assert await engine.get_reference("v1.0") == (target if self.references_are_tags else descriptor)

    async def test_put_reference_is_idempotent(self, engine: Engine) -> None:
        descriptor = await self.target(engine, b"{}")
        await engine.put_reference("latest", descriptor)
        await engine.put_reference("latest", descriptor)
        await engine.put_reference("latest", descriptor.replace(annotations={}))
        assert await engine.list_references() == ["latest"]

    async def test_put_reference_refuses_to_clobber(self, engine: Engine) -> None:
        first = await self.target(engine, b"one")
        await engine.put_reference("tag", first)
        others = [await self.target(engine, b"two"), first.replace(media_type=_INDEX)]
        if not self.references_are_tags:  # a tag keeps no annotations, so these cannot differ there
            others.append(first.replace(annotations={"a": "b"}))
        for other in others:
            with pytest.raises(ClobberError) as info:  # (a manifest posing as an index: partial skips its parse)
                await engine.put_reference("tag", other, partial=other.media_type == _INDEX)
            assert isinstance(info.value, FileExistsError)
            assert "'tag'" in str(info.value)
        assert await engine.get_reference("tag") == first

    async def test_missing_reference_is_not_found(self, engine: Engine) -> None:
        with pytest.raises(ReferenceNotFoundError) as info:
            await engine.get_reference("nope")
        assert isinstance(info.value, FileNotFoundError)
        assert "'nope'" in str(info.value)

    async def test_delete_reference_is_idempotent(self, engine: Engine) -> None:
        self.need("delete_reference")
        await engine.put_reference("a", await self.target(engine, b"a"))
        await engine.put_reference("b", await self.target(engine, b"b"))
        await engine.delete_reference("a")
        await engine.delete_reference("a")
        await engine.delete_reference("never")
        assert await engine.list_references() == ["b"]
        with pytest.raises(ReferenceNotFoundError):
            await engine.get_reference("a")

    async def test_list_references_is_exact_and_sorted(self, engine: Engine) -> None:
        names = ["v1", "a/b:c", "A.b-c_d", "x@y+z", "a--b", "registry.example.com/ns/app:1.0", "1.0.0-rc.1"]
        if self.references_are_tags:
            for name in [n for n in names if not _TAG.fullmatch(n)]:
                with pytest.raises(InvalidError):
                    await engine.put_reference(name, await self.target(engine, name.encode()))
            names = [n for n in names if _TAG.fullmatch(n)]
        for name in names:
            await engine.put_reference(name, await self.target(engine, name.encode()))
        assert await engine.list_references() == sorted(names)
        for name in names:
            assert (await engine.get_reference(name)).digest == (await self.target(engine, name.encode())).digest

    @pytest.mark.parametrize("bad", BAD_NAMES)
    async def test_invalid_reference_names_are_refused(self, engine: Engine, bad: str) -> None:
        await engine.put_reference("good", await self.target(engine, b"good"))
        with pytest.raises(InvalidError):
            await engine.put_reference(bad, _descriptor(b"x"))
        with pytest.raises(InvalidError):
            await engine.get_reference(bad)
        with pytest.raises(InvalidError):
            await engine.delete_reference(bad)
        with pytest.raises(InvalidError):
            await engine.update_references({"ok": _descriptor(b"ok"), bad: None})
        assert await engine.list_references() == ["good"]

    async def test_a_reference_to_absent_content_is_refused(self, engine: Engine) -> None:
        absent = _descriptor(b'{"never":"stored"}')
        with pytest.raises(BlobNotFoundError) as info:
            await engine.put_reference("absent", absent)
        assert absent.digest in str(info.value)
        if not self.references_are_tags:  # a registry names the repository instead
            assert "'absent'" in str(info.value)
        with pytest.raises(BlobNotFoundError):
            await engine.update_references({"ok": await self.target(engine, b"ok"), "absent": absent})
        assert await engine.list_references() == []

    async def test_a_reference_to_a_manifest_missing_a_layer_is_refused(self, engine: Engine) -> None:
        empty, _ = await engine.put_blob(b"{}")
        layer = Descriptor(media_type="application/vnd.oci.image.layer.v1.tar", digest=sha256(b"gone"), size=4)
        document = {
            "schemaVersion": 2,
            "mediaType": _MANIFEST,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [layer.to_dict()],
        }
        digest, size = await engine.put_blob_json(document)
        manifest = Descriptor(media_type=_MANIFEST, digest=digest, size=size)
        with pytest.raises(BlobNotFoundError, match=layer.digest):
            await engine.put_reference("v1", manifest)
        assert await engine.list_references() == []
        if not self.references_are_tags:  # a registry checks a manifest's blobs itself
            await engine.put_reference("v1", manifest, partial=True)
            assert await engine.get_reference("v1") == manifest
        await engine.put_blob(b"gone")
        await engine.put_reference("v1", manifest, partial=False)
        assert (await engine.get_reference("v1")).digest == digest

    async def test_a_reference_does_not_need_its_subject(self, engine: Engine) -> None:
        subject = _descriptor(b'{"subject":"elsewhere"}')
        empty, _ = await engine.put_blob(b"{}")
        document = {
            "schemaVersion": 2,
            "mediaType": _MANIFEST,
            "artifactType": "application/vnd.example.signature",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [],
            "subject": subject.to_dict(),
        }
        digest, size = await engine.put_blob_json(document)
        await engine.put_reference("sig", Descriptor(media_type=_MANIFEST, digest=digest, size=size))
        assert (await engine.get_reference("sig")).digest == digest

    async def test_referrers_lists_what_names_a_subject(self, engine: Engine) -> None:
        subject = await self.target(engine, b"subject")
        empty, _ = await engine.put_blob(b"{}")
        found = []
        for kind in ("application/vnd.example.sbom", "application/vnd.example.signature"):
            document = {
                "schemaVersion": 2,
                "mediaType": _MANIFEST,
                "artifactType": kind,
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
                "layers": [],
                "subject": subject.to_dict(),
            }
            digest, size = await engine.put_blob_json(document)
            found.append(Descriptor(media_type=_MANIFEST, digest=digest, size=size, artifact_type=kind))
        listed = await engine.referrers(subject)
        assert [(d.digest, d.artifact_type) for d in listed] == sorted((d.digest, d.artifact_type) for d in found)
        signatures = await engine.referrers(subject.digest, artifact_type="application/vnd.example.signature")
        assert [d.digest for d in signatures] == [found[1].digest]
        assert await engine.referrers(sha256(b"nothing refers to this")) == []

    async def test_a_lease_records_what_is_put_inside_it(self, engine: Engine) -> None:
        before, _ = await engine.put_blob(b"before")
        async with engine.lease() as lease:
            inside, _ = await engine.put_blob(b"inside")
            assert lease.digests == {inside}
            assert inside in await engine.leased_blobs()
            assert set(await lease.add([before])) == {before}
            assert lease.digests == {inside, before}
        assert await engine.leased_blobs() == frozenset()

    async def test_put_reference_takes_only_descriptors(self, engine: Engine) -> None:
        with pytest.raises(TypeError):
            await engine.put_reference("x", {"digest": sha256(b"x")})  # type: ignore[arg-type]
        assert await engine.list_references() == []

    async def test_update_references_applies_a_batch(self, engine: Engine) -> None:
        targets = [await self.target(engine, str(i).encode()) for i in range(100)]
        await engine.update_references({f"t{i}": target for i, target in enumerate(targets)})
        await engine.update_references({"t0": None, "t1": None, "new": await self.target(engine, b"new")})
        assert await engine.list_references() == sorted([f"t{i}" for i in range(2, 100)] + ["new"])
        assert (await engine.get_reference("t42")).digest == targets[42].digest

    async def test_update_references_is_all_or_nothing(self, engine: Engine) -> None:
        one, two, fresh = [await self.target(engine, seed) for seed in (b"one", b"two", b"f")]
        await engine.put_reference("held", one)
        with pytest.raises(ClobberError):
            await engine.update_references({"fresh": fresh, "held": two, "gone": None})
        assert await engine.list_references() == ["held"]
        assert (await engine.get_reference("held")).digest == one.digest

    async def test_update_references_with_replace_moves_names(self, engine: Engine) -> None:
        await engine.put_reference("tag", await self.target(engine, b"one"))
        two = await self.target(engine, b"two")
        await engine.update_references({"tag": two}, replace=True)
        assert await engine.get_reference("tag") == two
        assert await engine.list_references() == ["tag"]

    async def test_list_roots_names_every_root(self, engine: Engine) -> None:
        self.need("list_roots")
        a, b = await self.target(engine, b"a"), await self.target(engine, b"b", media_type=_INDEX)
        await engine.put_reference("a", a)
        await engine.put_reference("b", b)
        roots = await engine.list_roots()
        assert sorted(
            (r.digest, (r.annotations or {}).get("org.opencontainers.image.ref.name")) for r in roots
        ) == sorted([(a.digest, "a"), (b.digest, "b")])

    # -- contexts and cancellation --------------------------------------------------------

    async def test_cancelled_context_refuses_every_operation(self, engine: Engine) -> None:
        digest, _ = await engine.put_blob(b"x")
        await engine.put_reference("x", await self.target(engine, b"x"))
        ctx = Context.background().with_cancel()
        ctx.cancel()
        calls = [
            engine.put_blob(b"y", ctx=ctx),
            engine.put_blob_json({}, ctx=ctx),
            engine.get_blob(digest, ctx=ctx),
            engine.read_blob(digest, ctx=ctx),
            engine.stat_blob(digest, ctx=ctx),
            engine.put_reference("y", _descriptor(b"y"), ctx=ctx),
            engine.update_references({"y": None}, ctx=ctx),
            engine.get_reference("x", ctx=ctx),
        ]
        optional = {
            "delete_blob": engine.delete_blob(digest, ctx=ctx),
            "list_blobs": engine.list_blobs(ctx=ctx),
            "delete_reference": engine.delete_reference("x", ctx=ctx),
            "list_references": engine.list_references(ctx=ctx),
            "list_roots": engine.list_roots(ctx=ctx),
            "gc": engine.gc(ctx=ctx),
        }
        for name, coro in optional.items():
            if name in self.unsupported:
                coro.close()
            else:
                calls.append(coro)
        for call in calls:
            with pytest.raises(ContextCancelledError):
                await call
        assert await engine.read_blob(digest) == b"x"
        assert await engine.list_references() == ["x"]

    async def test_expired_deadline_raises_deadline_exceeded(self, engine: Engine) -> None:
        ctx = Context.background().with_timeout(-1)
        with pytest.raises(DeadlineExceededError) as info:
            await engine.put_blob(b"x", ctx=ctx)
        assert isinstance(info.value, TimeoutError)
        with pytest.raises(BlobNotFoundError):
            await engine.stat_blob(sha256(b"x"))

    async def test_cancel_during_put_blob_stores_nothing(self, engine: Engine) -> None:
        ctx = Context.background().with_cancel()

        async def source() -> AsyncIterator[bytes]:
            yield b"a" * CHUNK_SIZE
            yield b"b" * CHUNK_SIZE
            ctx.cancel()
            yield b"c"
            await anyio.sleep_forever()

        with pytest.raises(ContextCancelledError):
            await engine.put_blob(source(), ctx=ctx)
        if "list_blobs" not in self.unsupported:
            assert await engine.list_blobs() == []

    async def test_cancel_from_another_thread_interrupts_a_wait(self, engine: Engine) -> None:
        ctx = Context.background()

        async def source() -> AsyncIterator[bytes]:
            yield b"start"
            await anyio.to_thread.run_sync(ctx.cancel)  # as if another thread cancelled it
            await anyio.sleep_forever()

        with anyio.fail_after(10), pytest.raises(ContextCancelledError):
            await engine.put_blob(source(), ctx=ctx)

    async def test_deadline_interrupts_a_stalled_source(self, engine: Engine) -> None:
        async def stalled() -> AsyncIterator[bytes]:
            yield b"start"
            await anyio.sleep_forever()

        with anyio.fail_after(10), pytest.raises(DeadlineExceededError):
            await engine.put_blob(stalled(), ctx=Context.background().with_timeout(0.05))
        if "list_blobs" not in self.unsupported:
            assert await engine.list_blobs() == []

    async def test_ambient_cancellation_propagates_and_stores_nothing(self, engine: Engine) -> None:
        async def stalled() -> AsyncIterator[bytes]:
            yield b"x" * (2 * CHUNK_SIZE)
            await anyio.sleep_forever()

        with anyio.move_on_after(0.05) as scope:
            await engine.put_blob(stalled(), ctx=Context.background())
        assert scope.cancelled_caught
        with pytest.raises(BlobNotFoundError):
            await engine.stat_blob(sha256(b"x" * (2 * CHUNK_SIZE)))

    async def test_reader_checks_its_context_per_chunk(self, engine: Engine) -> None:
        digest, _ = await engine.put_blob(blob_bytes(3 * CHUNK_SIZE))
        ctx = Context.background().with_cancel()
        async with await engine.get_blob(digest, ctx=ctx) as reader:
            assert len(await reader.read(CHUNK_SIZE)) == CHUNK_SIZE
            ctx.cancel()
            with pytest.raises(ContextCancelledError):
                await reader.read(CHUNK_SIZE)

    # -- lifecycle ----------------------------------------------------------------------

    async def test_gc_never_removes_blobs_or_references(self, engine: Engine) -> None:
        self.need("gc")
        digest, _ = await engine.put_blob(b"unreferenced")
        await engine.put_reference("r", await self.target(engine, b"r"))
        await engine.gc()
        assert await engine.read_blob(digest) == b"unreferenced"
        assert await engine.list_references() == ["r"]

    async def test_closed_engine_refuses_operations(self, engine: Engine) -> None:
        digest, _ = await engine.put_blob(b"x")
        reader = await engine.get_blob(digest)
        await engine.close()
        await engine.close()
        assert engine.closed
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: engine.put_blob(b"y"),
            lambda: engine.put_blob_json({}),
            lambda: engine.get_blob(digest),
            lambda: engine.read_blob(digest),
            lambda: engine.stat_blob(digest),
            lambda: engine.stat_blobs([digest]),
            lambda: engine.touch_blobs([digest]),
            lambda: engine.delete_blobs([digest]),
            lambda: engine.delete_blob(digest),
            lambda: engine.list_blobs(),
            lambda: engine.put_reference("y", _descriptor(b"y")),
            lambda: engine.update_references({"y": None}),
            lambda: engine.delete_reference("y"),
            lambda: engine.get_reference("y"),
            lambda: engine.list_references(),
            lambda: engine.list_roots(),
            lambda: engine.gc(),
            lambda: reader.read(),
        ]
        for call in calls:
            with pytest.raises(EngineClosedError):
                await call()
        with pytest.raises(EngineClosedError):
            async with engine.gc_lock():
                pass  # pragma: no cover
        await reader.aclose()

    async def test_close_cancels_a_running_put_and_stores_nothing(self, engine: Engine) -> None:
        started = anyio.Event()

        async def stalled() -> AsyncIterator[bytes]:
            yield b"x" * CHUNK_SIZE
            started.set()
            await anyio.sleep_forever()

        outcome: list[BaseException] = []

        async def put() -> None:
            try:
                await engine.put_blob(stalled())
            except BaseException as exc:
                outcome.append(exc)
                raise

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._swallow_closed, put)
                await started.wait()
                await engine.close()
        assert [type(e) for e in outcome] == [EngineClosedError]
        assert engine.closed

    @staticmethod
    async def _swallow_closed(call: Callable[[], Awaitable[object]]) -> None:
        try:
            await call()
        except EngineClosedError:
            pass

    async def test_close_waits_for_readers_and_ends_their_reads(self, engine: Engine) -> None:
        data = blob_bytes(3 * CHUNK_SIZE, seed=9)
        digest, _ = await engine.put_blob(data)
        reader = await engine.get_blob(digest)
        assert await reader.read(CHUNK_SIZE) == data[:CHUNK_SIZE]
        await engine.close()
        with pytest.raises(EngineClosedError):
            await reader.read(CHUNK_SIZE)
        await reader.aclose()

    async def test_close_from_inside_an_operation_does_not_wait_for_itself(self, engine: Engine) -> None:
        async def source() -> AsyncIterator[bytes]:
            yield b"first"
            await engine.close()
            yield b"second"

        with anyio.fail_after(30), pytest.raises(EngineClosedError):
            await engine.put_blob(source())
        assert engine.closed

    async def test_ambient_cancellation_during_close_still_releases(self, engine: Engine) -> None:
        started = anyio.Event()

        async def stalled() -> AsyncIterator[bytes]:
            yield b"x"
            started.set()
            await anyio.sleep_forever()

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._swallow_closed, lambda: engine.put_blob(stalled()))
                await started.wait()
                with anyio.CancelScope() as scope:
                    scope.cancel()
                    await engine.close()  # the closer is cancelled: the put, leaving last, releases
        assert engine.closed
        with pytest.raises(EngineClosedError):
            await engine.stat_blob(sha256(b"x"))

    # -- readers ------------------------------------------------------------------------

    async def test_reader_read_to_the_end_needs_no_close(self, engine: Engine) -> None:
        data = blob_bytes(2 * CHUNK_SIZE + 3, seed=10)
        digest, _ = await engine.put_blob(data)
        reader = await engine.get_blob(digest)
        assert b"".join([chunk async for chunk in reader]) == data
        assert await reader.read() == b""
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            del reader
            gc.collect()  # released at the end of data: no ResourceWarning

    async def test_reader_dropped_unclosed_is_released_with_a_warning(self, engine: Engine) -> None:
        digest, _ = await engine.put_blob(blob_bytes(2 * CHUNK_SIZE, seed=11))
        reader = await engine.get_blob(digest)
        await reader.read(10)
        with pytest.warns(ResourceWarning, match="unclosed <BlobReader"):  # noqa: PT031 - del runs the finaliser
            del reader
            gc.collect()

    async def test_reader_refuses_two_readers_at_once(self, engine: Engine) -> None:
        digest, _ = await engine.put_blob(blob_bytes(8 * CHUNK_SIZE, seed=12))
        async with await engine.get_blob(digest) as reader:
            errors: list[BaseException] = []

            async def read() -> None:
                try:
                    while await reader.read(CHUNK_SIZE):
                        pass
                except anyio.BusyResourceError as exc:
                    errors.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                tg.start_soon(read)
            assert len(errors) == 1
            assert reader.bytes_read == 8 * CHUNK_SIZE

    async def test_descriptor_addresses_a_blob_with_its_size(self, engine: Engine) -> None:
        data = b"described"
        digest, size = await engine.put_blob(data)
        descriptor = Descriptor(media_type="application/octet-stream", digest=digest, size=size)
        assert await engine.read_blob(descriptor) == data
        assert await engine.stat_blob(descriptor) == size
        async with await engine.get_blob(descriptor) as reader:
            assert await reader.read() == data
        wrong = descriptor.replace(size=size + 1)
        for call in (engine.read_blob, engine.stat_blob, engine.get_blob):
            with pytest.raises(SizeMismatchError):
                await call(wrong)
