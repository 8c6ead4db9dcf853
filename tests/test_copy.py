"""ocicas.copy: exact sets, skipping without reading, children first, interruption and rerun."""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import ocicas
from ocicas import (
    BlobInfo,
    Context,
    CopyEvent,
    CopyResult,
    Descriptor,
    Digest,
    Engine,
    Platform,
    RawBlob,
    copy,
)
from ocicas._digest import Verifier
from ocicas._dir.clone import METHODS, CopyMethod, KernelCopy, clone_blob
from ocicas._media_types import EMPTY_DESCRIPTOR
from tests.blobfiles import payload, temp_files
from tests.delegating import Delegating
from tests.images import CONFIG, LAYER, MANIFEST, put, put_artifact, put_image, put_index, put_json
from tests.leaks import fd_targets

pytestmark = pytest.mark.anyio

AMD64 = Platform(os="linux", architecture="amd64")
ARM64 = Platform(os="linux", architecture="arm64")
ARMV7 = Platform(os="linux", architecture="arm", variant="v7")


class Recording(Delegating):
    """Delegates to another engine, counting the blobs opened and read."""

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner)
        self.reads: Counter[Digest] = Counter()

    async def _open_blob(self, digest: Digest) -> RawBlob:
        self.reads[digest] += 1
        return await super()._open_blob(digest)


async def _engine(kind: str, path: Path) -> Engine:
    if kind == "memory":
        return ocicas.MemoryEngine()
    await ocicas.create_layout(path)
    return await ocicas.open_layout(path)


@pytest.fixture(params=["memory-memory", "dir-dir", "memory-dir"])
async def engines(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Engine, Engine]]:
    src_kind, dst_kind = str(request.param).split("-")
    async with await _engine(src_kind, tmp_path / "src") as src, await _engine(dst_kind, tmp_path / "dst") as dst:
        yield src, dst


class Image:
    """A two-platform index (sharing a layer), a third platform, a referrer, and unrelated content."""

    index: Descriptor
    amd64: Descriptor
    arm64: Descriptor
    armv7: Descriptor
    blobs: dict[Descriptor, set[Digest]]  # per manifest: its manifest, config and layers
    other: set[Digest]

    @classmethod
    async def put(cls, engine: Engine, *, big: int = 0) -> Image:
        image = cls()
        shared = b"shared base layer"
        image.amd64, amd64 = await put_image(engine, [shared, b"amd64 app" + bytes(big)], platform=AMD64)
        image.arm64, arm64 = await put_image(engine, [shared, b"arm64 app"], platform=ARM64)
        image.armv7, armv7 = await put_image(engine, [shared, b"armv7 app"], platform=ARMV7)
        image.blobs = {image.amd64: set(amd64), image.arm64: set(arm64), image.armv7: set(armv7)}
        image.index = await put_index(engine, [image.amd64, image.arm64, image.armv7])
        await engine.put_reference("v1", image.index)
        other, other_blobs = await put_image(engine, [b"another image"])
        await engine.put_reference("other", other)
        garbage = await put(engine, b"garbage", "application/octet-stream")
        image.other = {*other_blobs, garbage.digest} - set().union(*image.blobs.values())
        return image

    def reachable(self, *manifests: Descriptor) -> set[Digest]:
        chosen = manifests or tuple(self.blobs)
        return {self.index.digest}.union(*(self.blobs[m] for m in chosen))


async def _sizes(engine: Engine, digests: Iterable[Digest]) -> int:
    return sum(info.size for info in (await engine.stat_blobs(list(digests))).values())


async def _intact(engine: Engine) -> set[Digest]:
    """Every blob of ``engine``, each read back verified."""
    digests = set(await engine.list_blobs())
    for digest in digests:
        await engine.read_blob(digest, max_size=None)
    return digests


async def test_copies_exactly_what_the_reference_reaches(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    image = await Image.put(src)
    result = await copy(src, "v1", dst)
    assert set(await dst.list_blobs()) == image.reachable()
    assert await dst.list_references() == ["v1"]
    assert await dst.get_reference("v1") == image.index
    assert result == CopyResult(
        root=image.index,
        reference="v1",
        copied=tuple(sorted(image.reachable())),
        skipped=(),
        bytes_copied=await _sizes(src, image.reachable()),
        bytes_skipped=0,
        referrers=(),
        excluded=(),
    )
    assert await _intact(dst) == image.reachable()


async def test_a_second_copy_moves_nothing_and_names_it_again(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    image = await Image.put(src)
    await copy(src, "v1", dst)
    again = await copy(src, "v1", dst, "v1-again")
    assert (again.copied, set(again.skipped), again.bytes_copied) == ((), image.reachable(), 0)
    assert await dst.get_reference("v1-again") == image.index


async def test_a_descriptor_is_copied_without_naming_it(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    image = await Image.put(src)
    result = await copy(src, image.arm64, dst)
    assert result.reference is None
    assert await dst.list_references() == []
    assert set(await dst.list_blobs()) == image.blobs[image.arm64]


async def test_present_blobs_are_skipped_without_being_read(engines: tuple[Engine, Engine]) -> None:
    inner, dst = engines
    image = await Image.put(inner)
    await copy(inner, image.amd64, dst)  # the destination has one platform's image already
    src = Recording(inner)
    result = await copy(src, "v1", dst)
    present = image.blobs[image.amd64]
    assert set(result.skipped) == present
    assert set(result.copied) == image.reachable() - present
    leaves = image.reachable() - {image.index.digest, *(m.digest for m in image.blobs)}
    assert not set(src.reads) & (present & leaves)  # layers and configs present: never opened
    assert max(src.reads.values()) == 1  # everything else read once: manifests are not read twice
    assert set(await dst.list_blobs()) == image.reachable()


async def test_children_land_before_parents_and_the_reference_last(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    image = await Image.put(src)
    inner = await put_index(src, [image.index, image.amd64])  # nested, and a manifest reached twice
    await src.put_reference("nested", inner)
    events: list[tuple[str, Digest]] = []
    tagged: list[int] = []

    def progress(event: CopyEvent) -> None:
        if event.descriptor is not None:
            events.append((event.kind, event.descriptor.digest))

    class Watching(Recording):
        async def update_references(self, changes: Mapping[str, Descriptor | None], **kwargs: Any) -> None:
            tagged.append(len(events))
            await super().update_references(changes, **kwargs)

    await copy(src, "nested", Watching(dst), concurrency=8, progress=progress)
    finished = {digest: n for n, (kind, digest) in enumerate(events) if kind == "finished"}
    started = {digest: n for n, (kind, digest) in enumerate(events) if kind == "started"}
    assert set(finished) == image.reachable() | {inner.digest}
    for parent in [inner, image.index, *image.blobs]:
        data = await src.read_blob(parent.digest)
        for child in ocicas.children(parent, data):
            assert finished[child.digest] < started[parent.digest], (child.digest, parent.digest)
    assert tagged == [len(events)]


@pytest.mark.parametrize("stop_after", [0, 1, 3, 6, 9])
async def test_an_interrupted_copy_leaves_no_reference_and_a_rerun_moves_only_what_is_missing(
    engines: tuple[Engine, Engine], stop_after: int
) -> None:
    src, dst = engines
    image = await Image.put(src)
    ctx = Context.background().with_cancel()
    finished = 0

    def cancel_later(event: CopyEvent) -> None:
        nonlocal finished
        if event.kind == "finished":
            finished += 1
        if finished >= stop_after:
            ctx.cancel()

    with pytest.raises(ocicas.ContextCancelledError):
        await copy(src, "v1", dst, concurrency=1, progress=cancel_later, ctx=ctx)
    assert await dst.list_references() == []
    landed = await _intact(dst)  # only whole, verified blobs
    assert len(landed) == stop_after
    assert image.index.digest not in landed  # the root lands last
    rerun = await copy(src, "v1", dst)
    assert set(rerun.skipped) == landed
    assert set(rerun.copied) == image.reachable() - landed
    assert await _intact(dst) == image.reachable()


async def test_a_copy_cancelled_within_a_blob_leaves_no_part_of_it(
    engines: tuple[Engine, Engine], tmp_path: Path
) -> None:
    src, dst = engines
    image = await Image.put(src, big=9 << 20)  # the amd64 layer moves in several chunks
    ctx = Context.background().with_cancel()
    chunks: list[int] = []

    def cancel_midway(event: CopyEvent) -> None:
        # the first chunk of the big layer, whatever size the destination reads it in
        if event.kind == "progress" and event.descriptor is not None and event.descriptor.size > 9 << 20:
            chunks.append(event.nbytes)
            ctx.cancel()

    with pytest.raises(ocicas.ContextCancelledError):
        await copy(src, "v1", dst, concurrency=1, progress=cancel_midway, ctx=ctx)
    assert len(chunks) == 1
    assert 0 < chunks[0] < 9 << 20  # cancelled within the blob
    landed = await _intact(dst)
    assert all(info.size < 1 << 20 for info in (await dst.stat_blobs(landed)).values())  # no part of the big one
    if isinstance(dst, ocicas.DirEngine):
        assert not [p for p in (tmp_path / "dst").iterdir() if p.name.startswith(".ocicas-") and any(p.iterdir())]
    await copy(src, "v1", dst)
    assert await _intact(dst) == image.reachable()


@pytest.mark.parametrize("delay", [0, 0.001, 0.003, 0.01])
async def test_ambient_cancellation_leaves_no_reference(engines: tuple[Engine, Engine], delay: float) -> None:
    src, dst = engines
    image = await Image.put(src)
    with anyio.move_on_after(delay):
        await copy(src, "v1", dst, concurrency=2)
    references = await dst.list_references()
    landed = await _intact(dst)
    assert references == [] or landed == image.reachable()
    await copy(src, "v1", dst)
    assert await _intact(dst) == image.reachable()


async def test_progress_totals_are_exact(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    image = await Image.put(src, big=5 << 20)
    await copy(src, image.arm64, dst)
    events: list[CopyEvent] = []
    result = await copy(src, "v1", dst, progress=events.append)
    planned = events[0]
    assert planned.kind == "planned"
    assert planned.blobs_total == len(image.reachable())
    assert planned.bytes_total == await _sizes(src, image.reachable())
    assert (planned.blobs_done, planned.bytes_done) == (0, 0)
    last = events[-1]
    assert (last.blobs_done, last.bytes_done) == (last.blobs_total, last.bytes_total)
    assert all(e.blobs_total == planned.blobs_total and e.bytes_total == planned.bytes_total for e in events)
    kinds = Counter(e.kind for e in events)
    assert kinds["skipped"] == len(result.skipped) == len(image.blobs[image.arm64])
    assert kinds["started"] == kinds["finished"] == len(result.copied)
    assert sum(e.nbytes for e in events if e.kind == "progress") == result.bytes_copied
    assert sum(e.nbytes for e in events if e.kind == "skipped") == result.bytes_skipped
    done = [e.bytes_done for e in events]
    assert done == sorted(done)


async def test_referrers_are_copied_when_asked(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    image = await Image.put(src)
    signature, signature_blobs = await put_artifact(src, image.amd64, b"signature of amd64")
    countersign, countersign_blobs = await put_artifact(src, signature, b"signature of the signature")
    index_referrer = await put_index(src, [], subject=image.index, annotations={"kind": "attestations"})
    other = await src.get_reference("other")
    await put_artifact(src, other, b"signature of another image")

    plain = await copy(src, "v1", dst)
    assert plain.referrers == ()
    assert set(await dst.list_blobs()) == image.reachable()

    result = await copy(src, "v1", dst, referrers=True)
    expected = {signature.digest, countersign.digest, index_referrer.digest}
    assert set(result.referrers) == expected
    assert set(result.copied) == set(signature_blobs) | set(countersign_blobs) | {index_referrer.digest}
    assert set(await dst.list_blobs()) == image.reachable() | set(result.copied)
    assert await dst.list_references() == ["v1"]
    # the destination's collector keeps them: their subjects are live
    assert (await ocicas.gc(dst, grace_period=0)).removed == ()


async def test_referrers_follow_the_platform_filter(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    image = await Image.put(src)
    arm_signature, _ = await put_artifact(src, image.arm64, b"arm64 signature")
    await put_artifact(src, image.amd64, b"amd64 signature")
    result = await copy(src, "v1", dst, referrers=True, platforms=["linux/arm64"])
    assert result.referrers == (arm_signature.digest,)


async def test_a_platform_filter_copies_a_partial_index(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    image = await Image.put(src)
    result = await copy(src, "v1", dst, platforms=["linux/arm64", ARMV7])
    assert set(await dst.list_blobs()) == image.reachable(image.arm64, image.armv7)
    assert result.excluded == (image.amd64.digest,)
    assert await dst.get_reference("v1") == image.index  # the index itself, digest unchanged
    with pytest.raises(ocicas.BlobNotFoundError, match=image.amd64.digest):
        await ocicas.gc(dst, grace_period=0)  # a partial index is a broken graph to the collector
    assert (await ocicas.gc(dst, grace_period=0, broken_ok=True)).removed == ()

    await copy(src, "v1", dst)  # completing it later moves only the missing platform
    assert set(await dst.list_blobs()) == image.reachable()


async def test_a_variant_less_platform_matches_every_variant(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    image = await Image.put(src)
    result = await copy(src, "v1", dst, platforms=["linux/arm"])
    assert set(await dst.list_blobs()) == image.reachable(image.armv7)
    assert set(result.excluded) == {image.amd64.digest, image.arm64.digest}


async def test_a_platform_nothing_matches_is_not_found_and_writes_nothing(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    await Image.put(src)
    with pytest.raises(ocicas.NotFoundError, match="s390x"):
        await copy(src, "v1", dst, platforms=["linux/s390x"])
    assert await dst.list_blobs() == []
    with pytest.raises(ocicas.InvalidError, match="platform"):
        await copy(src, "v1", dst, platforms=["linux"])


async def test_one_platform_manifest_alone_as_skopeo_does(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    image = await Image.put(src)
    [path] = await ocicas.resolve_reference(src, "v1", platform="linux/arm64")
    await copy(src, path.descriptor, dst, "v1")
    assert set(await dst.list_blobs()) == image.blobs[image.arm64]
    assert (await dst.get_reference("v1")).digest == image.arm64.digest


async def test_content_missing_from_both_fails_before_anything_lands(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    image = await Image.put(src)
    layer = Digest.from_bytes(b"arm64 app")
    await src.delete_blob(layer)
    with pytest.raises(ocicas.BlobNotFoundError, match=f"{layer}.*{image.arm64.digest}"):
        await copy(src, "v1", dst)
    assert await dst.list_blobs() == []

    await dst.put_blob(b"arm64 app")  # a partial source is fine when the destination has the rest
    await copy(src, "v1", dst)
    assert set(await dst.list_blobs()) == image.reachable()


async def test_a_missing_manifest_names_what_points_at_it(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    image = await Image.put(src)
    await src.delete_blob(image.armv7.digest)
    with pytest.raises(ocicas.BlobNotFoundError, match=f"{image.armv7.digest}.*{image.index.digest}"):
        await copy(src, "v1", dst)
    assert await dst.list_blobs() == []


async def test_corrupt_source_content_never_lands(tmp_path: Path) -> None:
    async with await _engine("dir", tmp_path / "src") as src, await _engine("dir", tmp_path / "dst") as dst:
        image = await Image.put(src, big=5 << 20)
        big = max(image.blobs[image.amd64], key=lambda d: (tmp_path / "src/blobs/sha256" / d.encoded).stat().st_size)
        path = tmp_path / "src/blobs/sha256" / big.encoded
        data = bytearray(path.read_bytes())
        data[-1] ^= 1  # the last chunk: everything before it was streamed already
        path.write_bytes(bytes(data))
        with pytest.raises(ocicas.DigestMismatchError, match=big):
            await copy(src, "v1", dst)
        assert big not in await _intact(dst)
        assert await dst.list_references() == []
        assert not [p for p in (tmp_path / "dst").iterdir() if p.name.startswith(".ocicas-") and any(p.iterdir())]


async def test_an_existing_destination_reference_is_moved_unless_told_not_to(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    image = await Image.put(src)
    await copy(src, "other", dst, "v1")
    with pytest.raises(ocicas.ClobberError):
        await copy(src, "v1", dst, replace=False)
    assert (await dst.get_reference("v1")).digest != image.index.digest
    await copy(src, "v1", dst)
    assert await dst.get_reference("v1") == image.index


async def test_copying_within_one_engine_only_names(engines: tuple[Engine, Engine]) -> None:
    src, _ = engines
    image = await Image.put(src)
    before = await src.list_blobs()
    result = await copy(src, "v1", src, "v1-copy")
    assert result.copied == ()
    assert await src.list_blobs() == before
    assert await src.get_reference("v1-copy") == image.index


async def test_embedded_data_is_copied_from_the_descriptor(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    layer = await put(src, b"layer", LAYER)
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST, "config": EMPTY_DESCRIPTOR.to_dict(), "layers": [layer]}
    descriptor = await put_json(src, manifest, MANIFEST)
    await src.put_reference("empty-config", descriptor)
    assert EMPTY_DESCRIPTOR.digest not in await src.list_blobs()
    await copy(src, "empty-config", dst)
    assert set(await dst.list_blobs()) == {layer.digest, descriptor.digest, EMPTY_DESCRIPTOR.digest}


async def test_garbage_a_collector_removes_during_the_copy_is_copied_again(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    image = await Image.put(src)
    config = next(d for d in image.blobs[image.arm64] if d not in image.blobs[image.amd64] and d != image.arm64.digest)
    await dst.put_blob(await src.read_blob(config))  # old garbage at the destination, about to be reused

    class Collected(Recording):
        """A collector deletes the blob right after the copy saw it present."""

        deleted = False

        async def _stat_blobs(self, digests: list[Digest], head: int) -> dict[Digest, BlobInfo]:
            found = await super()._stat_blobs(digests, head)
            if config in found and not self.deleted:
                self.deleted = True
                await self.inner.delete_blob(config)  # right after the copy saw it: behind the lease's back
            return found

    result = await copy(src, "v1", Collected(dst))
    assert config in result.copied
    assert config not in result.skipped
    assert await _intact(dst) == image.reachable()


async def test_a_copy_racing_aggressive_collections_ends_complete(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    image = await Image.put(src)
    for n in range(20):
        await dst.put_blob(f"old garbage {n}".encode())
    await dst.put_blob(b"shared base layer")  # reused by the copy, and unreferenced until it tags
    when = time.time() - 7200
    for digest in await dst.list_blobs():
        if isinstance(dst, ocicas.MemoryEngine):
            dst._modified[digest] = when
        else:
            assert isinstance(dst, ocicas.DirEngine)
            os.utime(dst.path / "blobs" / "sha256" / digest.encoded, (when, when))
    done = anyio.Event()

    async def collector() -> None:
        while not done.is_set():
            await ocicas.gc(dst, grace_period=0)  # no grace at all: every untagged blob goes
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(collector)
        await copy(src, "v1", dst, concurrency=2)
        done.set()
    await ocicas.gc(dst, grace_period=0)
    assert await _intact(dst) == image.reachable()


async def test_arguments_are_checked_before_anything_is_read(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    await Image.put(src)
    with pytest.raises(ocicas.InvalidError, match="reference name"):
        await copy(src, "v1", dst, "not a name")
    with pytest.raises(ValueError, match="concurrency"):
        await copy(src, "v1", dst, concurrency=0)
    with pytest.raises(ocicas.ReferenceNotFoundError):
        await copy(src, "nope", dst)
    with pytest.raises(TypeError):
        await copy(src, 42, dst)  # type: ignore[arg-type]
    assert await dst.list_blobs() == []


async def test_docker_manifest_lists_are_copied(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    image, blobs = await put_image(src, [b"docker layer"], docker=True, platform=AMD64)
    listing = await put_index(src, [image], docker=True)
    await src.put_reference("docker", listing)
    await copy(src, "docker", dst, platforms=["linux/amd64"])
    assert set(await dst.list_blobs()) == {*blobs, listing.digest}


async def test_config_reference_is_a_leaf(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    config = await put_json(src, {"architecture": "amd64", "os": "linux"}, CONFIG)
    await src.put_reference("config", config)
    result = await copy(src, "config", dst)
    assert result.copied == (config.digest,)


async def test_a_large_index_is_filtered_and_copied(engines: tuple[Engine, Engine]) -> None:
    src, dst = engines
    image = await Image.put(src)
    entries = [
        m.replace(annotations={"entry": f"{n:06d}" * 20})
        for n in range(3000)
        for m in (image.amd64, image.arm64, image.armv7)
    ]
    large = await put_index(src, entries)
    assert large.size > 1 << 20  # parsed in a worker thread
    await src.put_reference("large", large)
    result = await copy(src, "large", dst, platforms=["linux/amd64"])
    assert set(await dst.list_blobs()) == {large.digest, *image.blobs[image.amd64]}
    assert set(result.excluded) == {image.arm64.digest, image.armv7.digest}


# -- layout to layout: the kernel copies the file, the destination hashes what landed ------------------------------


async def _layouts(src_path: Path, dst_path: Path) -> tuple[Engine, Engine]:
    await ocicas.create_layout(src_path)
    await ocicas.create_layout(dst_path)
    return await ocicas.open_layout(src_path), await ocicas.open_layout(dst_path)


async def test_a_layout_reader_put_into_a_layout_is_copied_by_the_kernel(tmp_path: Path) -> None:
    data = payload(21 << 20)  # past one copy step (16 MiB), not a multiple of any chunk
    src, dst = await _layouts(tmp_path / "src", tmp_path / "dst")
    async with src, dst:
        digest, size = await src.put_blob(data)
        progress: list[int] = []
        async with await src.get_blob(digest) as reader:
            reader.on_read = progress.append
            assert await dst.put_blob(reader, expected_digest=digest, expected_size=size) == (digest, size)
            # the reader lent its file and read nothing itself: the fast path moved the bytes
            assert (reader.bytes_read, reader.closed) == (0, True)
        assert progress == [4 << 20] * 5 + [1 << 20]
        assert (tmp_path / "dst/blobs/sha256" / digest.encoded).read_bytes() == data
        assert await dst.read_blob(digest, max_size=None) == data
        assert temp_files(tmp_path / "dst") == []
        # present already: freshened, not written again
        async with await src.get_blob(digest) as reader:
            assert await dst.put_blob(reader) == (digest, size)
        assert temp_files(tmp_path / "dst") == []


@pytest.mark.parametrize("where", ["start", "middle", "end"])
async def test_a_source_file_corrupt_on_disk_is_refused_by_the_kernel_copy(tmp_path: Path, where: str) -> None:
    data = payload(20 << 20)
    src, dst = await _layouts(tmp_path / "src", tmp_path / "dst")
    async with src, dst:
        digest, size = await src.put_blob(data)
        path = tmp_path / "src/blobs/sha256" / digest.encoded
        offset = {"start": 0, "middle": size // 2, "end": size - 1}[where]
        with open(path, "r+b") as f:  # same size, one bit flipped
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ 1]))
        async with await src.get_blob(digest) as reader:
            with pytest.raises(ocicas.DigestMismatchError, match=digest):
                await dst.put_blob(reader, expected_digest=digest, expected_size=size)
            assert (reader.bytes_read, reader.closed) == (0, True)
        assert await dst.list_blobs() == []
        assert temp_files(tmp_path / "dst") == []
        layer = Descriptor(media_type=LAYER, digest=digest, size=size)
        manifest = await put_json(
            src,
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": EMPTY_DESCRIPTOR.to_dict(),
                "layers": [layer.to_dict()],
            },
            MANIFEST,
        )
        with pytest.raises(ocicas.DigestMismatchError, match=digest):
            await copy(src, manifest, dst, "bad")
        assert digest not in await dst.list_blobs()
        assert await dst.list_references() == []
        assert temp_files(tmp_path / "dst") == []


async def test_a_source_truncated_or_grown_while_copied_never_lands_wrong(tmp_path: Path) -> None:
    data = payload(20 << 20)
    src, dst = await _layouts(tmp_path / "src", tmp_path / "dst")
    async with src, dst:
        digest, size = await src.put_blob(data)
        path = tmp_path / "src/blobs/sha256" / digest.encoded
        async with await src.get_blob(digest) as reader:  # opened at its full size, then cut short
            os.truncate(path, size - 3)
            with pytest.raises(ocicas.SizeMismatchError):
                await dst.put_blob(reader, expected_digest=digest, expected_size=size)
        assert await dst.list_blobs() == []
        assert temp_files(tmp_path / "dst") == []
        path.write_bytes(data)
        async with await src.get_blob(digest) as reader:  # grown after it was opened: its first `size` bytes are right
            with open(path, "ab") as f:
                f.write(b"appended")
            assert await dst.put_blob(reader, expected_digest=digest, expected_size=size) == (digest, size)
        assert (tmp_path / "dst/blobs/sha256" / digest.encoded).read_bytes() == data


@pytest.mark.parametrize("stop", [4 << 20, 68 << 20])  # in the first stretch; with a sync of the first 64 MiB running
async def test_a_cancel_scope_around_a_kernel_copy_leaves_no_temporary_file_and_no_descriptor(
    tmp_path: Path, stop: int
) -> None:
    data = payload(stop + (12 << 20))
    src, dst = await _layouts(tmp_path / "src", tmp_path / "dst")
    async with src, dst:
        digest, size = await src.put_blob(data)
        manifest = await put_json(
            src,
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": EMPTY_DESCRIPTOR.to_dict(),
                "layers": [{"mediaType": LAYER, "digest": digest, "size": size}],
            },
            MANIFEST,
        )
        await dst.put_blob(b"make the temporary directory")
        before = fd_targets()
        moved: list[int] = []
        with anyio.CancelScope() as scope:

            def cancel_midway(event: CopyEvent) -> None:
                if event.kind == "progress" and event.descriptor is not None and event.descriptor.digest == digest:
                    moved.append(event.nbytes)
                    if sum(moved) >= stop:
                        scope.cancel()

            await copy(src, manifest, dst, "v1", concurrency=1, progress=cancel_midway)
        assert scope.cancelled_caught
        assert moved == [4 << 20] * (stop // (4 << 20))
        assert temp_files(tmp_path / "dst") == []
        assert fd_targets() == before
        assert digest not in await dst.list_blobs()
        await copy(src, manifest, dst, "v1")
        assert (tmp_path / "dst/blobs/sha256" / digest.encoded).read_bytes() == data


def _other_filesystem(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no writable /dev/shm on another file system than the test's directory")
    return shm


async def test_a_copy_across_file_systems_falls_back_and_is_exact(tmp_path: Path) -> None:
    import tempfile

    data = payload(19 << 20)
    with tempfile.TemporaryDirectory(dir=_other_filesystem(tmp_path), prefix="ocicas-test-") as other:
        src, dst = await _layouts(Path(other) / "src", tmp_path / "dst")
        async with src, dst:
            digest, size = await src.put_blob(data)
            image, digests = await put_image(src, [data, b"small layer"])
            await src.put_reference("v1", image)
            async with await src.get_blob(digest) as reader:
                assert await dst.put_blob(reader, expected_digest=digest, expected_size=size) == (digest, size)
                assert (reader.bytes_read, reader.closed) == (0, True)
            result = await copy(src, "v1", dst)
            assert set(result.copied) == set(digests) - {digest}
            assert set(result.skipped) == {digest}
            assert (tmp_path / "dst/blobs/sha256" / digest.encoded).read_bytes() == data
            assert await _intact(dst) == set(digests)
            assert temp_files(tmp_path / "dst") == []


# copy_file_range alone across file systems is left out: whether the kernel takes it depends on its version
@pytest.mark.parametrize(
    ("methods", "across"),
    [
        (("copy_file_range",), False),
        (("sendfile",), False),
        (("sendfile",), True),
        (("pread",), False),
        (("pread",), True),
        (METHODS, False),
        (METHODS, True),
    ],
)
async def test_every_kernel_copy_method_lands_the_exact_bytes(
    tmp_path: Path, methods: tuple[CopyMethod, ...], across: bool
) -> None:
    data = payload(18 << 20)
    source = (_other_filesystem(tmp_path) if across else tmp_path) / f"ocicas-test-{os.getpid()}-{id(data)}"
    expected = Digest("sha256:" + hashlib.sha256(data).hexdigest())
    try:
        source.write_bytes(data)
        await ocicas.create_layout(tmp_path / "dst")
        async with await ocicas.open_layout(tmp_path / "dst") as dst:
            assert isinstance(dst, ocicas.DirEngine)
            fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
            try:
                async with dst._operation(None):
                    stored = await clone_blob(dst, fd, len(data), Verifier(expected, len(data)), methods=methods)
            finally:
                os.close(fd)
            assert stored == (expected, len(data))
            assert (tmp_path / "dst/blobs/sha256" / expected.encoded).read_bytes() == data
            assert temp_files(tmp_path / "dst") == []
    finally:
        source.unlink(missing_ok=True)


def test_kernel_copy_copies_ranges_in_place_by_the_method_asked(tmp_path: Path) -> None:
    data = payload(3 << 20)
    (tmp_path / "a").write_bytes(data)
    source = os.open(tmp_path / "a", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(tmp_path / "b", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    ranges: dict[CopyMethod, tuple[int, int]] = {
        "pread": (2 << 20, 3 << 20),
        "sendfile": (1 << 20, 2 << 20),
        "copy_file_range": (0, 1 << 20),
    }
    try:
        for method, (start, end) in ranges.items():  # back to front: each must write at its offset
            copier = KernelCopy(source, target, (method,))
            position = start
            while position < end:
                position += copier.copy(position, end - position)
            assert copier.method == method
        assert KernelCopy(source, target).copy(len(data), 1 << 20) == 0  # the source's end
    finally:
        os.close(source)
        os.close(target)
    assert (tmp_path / "b").read_bytes() == data
