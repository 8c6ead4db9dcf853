"""The descriptor graph: edges, the bounded concurrent walk, and reference resolution."""

from __future__ import annotations

from collections import Counter

import anyio
import pytest

import ocicas
from ocicas import Descriptor, Digest, Platform
from tests.images import INDEX, put, put_artifact, put_image, put_index, put_json

pytestmark = pytest.mark.anyio


class TracingEngine(ocicas.MemoryEngine):
    """Counts reads and the most reads in flight at once."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[Digest] = Counter()
        self.in_flight = 0
        self.most_in_flight = 0

    async def _open_blob(self, digest: Digest) -> ocicas.RawBlob:
        self.reads[digest] += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await anyio.sleep(0.001)
            return await super()._open_blob(digest)
        finally:
            self.in_flight -= 1


async def test_children_follow_manifests_indexes_and_subjects() -> None:
    engine = ocicas.MemoryEngine()
    image, blobs = await put_image(engine, [b"a", b"b"])
    signature, _ = await put_artifact(engine, image, b"sig")
    index = await put_index(engine, [image, signature], subject=image)
    manifest_children = ocicas.children(image, await engine.read_blob(image.digest))
    assert [c.digest for c in manifest_children] == blobs[1:]
    signature_children = ocicas.children(signature, await engine.read_blob(signature.digest))
    assert signature_children[-1] == image
    assert ocicas.children(index, await engine.read_blob(index.digest)) == [image, signature, image]
    layer = Descriptor(media_type="application/vnd.oci.image.layer.v1.tar", digest=blobs[2], size=1)
    assert ocicas.children(layer, b"not even looked at") == []
    assert (ocicas.is_node(image), ocicas.is_node(index), ocicas.is_node(layer)) == (True, True, False)


async def test_children_refuse_media_type_confusion() -> None:
    engine = ocicas.MemoryEngine()
    image, _ = await put_image(engine, [b"a"])
    confused = await put_json(
        engine, {"schemaVersion": 2, "mediaType": INDEX, "manifests": [image.to_dict()], "layers": []}, INDEX
    )
    with pytest.raises(ocicas.InvalidError, match="CVE-2021-41190"):
        ocicas.children(confused, await engine.read_blob(confused.digest))


async def test_walk_fetches_each_node_once_within_the_concurrency_bound() -> None:
    engine = TracingEngine()
    images = [(await put_image(engine, [b"shared", f"own {n}".encode()])) for n in range(40)]
    indexes = [await put_index(engine, [image for image, _ in images]) for _ in range(3)]
    top = await put_index(engine, indexes)
    graph = await ocicas.walk(engine, [top, *indexes, images[0][0]], concurrency=4)
    expected = {top.digest, *(i.digest for i in indexes)} | {d for _, blobs in images for d in blobs}
    assert graph.digests() == expected
    assert set(engine.reads) == {top.digest, *(i.digest for i in indexes), *(image.digest for image, _ in images)}
    assert max(engine.reads.values()) == 1
    assert engine.most_in_flight == 4
    assert len(graph) == len(expected)


async def test_walk_orders_children_before_parents() -> None:
    engine = ocicas.MemoryEngine()
    image, blobs = await put_image(engine, [b"x"])
    index = await put_index(engine, [image])
    order = [d.digest for d in (await ocicas.walk(engine, [index])).bottom_up()]
    assert sorted(order) == sorted([index.digest, *blobs])
    assert order.index(image.digest) > max(order.index(d) for d in blobs[1:])
    assert order[-1] == index.digest


async def test_walk_refuses_a_forged_size_before_reading() -> None:
    engine = TracingEngine()
    image, _ = await put_image(engine, [b"x"])
    forged = image.replace(size=1 << 40)
    with pytest.raises(ocicas.BlobTooLargeError, match="over the cap"):
        await ocicas.walk(engine, [forged])
    assert engine.reads == Counter()


async def test_walk_refuses_a_descriptor_whose_size_disagrees() -> None:
    engine = ocicas.MemoryEngine()
    image, _ = await put_image(engine, [b"x"])
    with pytest.raises(ocicas.SizeMismatchError, match="larger than its descriptor"):
        await ocicas.walk(engine, [image.replace(size=image.size - 1)])
    with pytest.raises(ocicas.SizeMismatchError, match="descriptor says"):
        await ocicas.walk(engine, [image.replace(size=image.size + 1)])


async def test_walk_uses_embedded_data_without_reading() -> None:
    engine = TracingEngine()
    image, blobs = await put_image(engine, [b"x"])
    data = await engine.read_blob(image.digest)
    engine.reads.clear()
    graph = await ocicas.walk(engine, [image.replace(data=data)])
    assert graph.digests() == set(blobs)
    assert engine.reads == Counter()


async def test_walk_with_broken_ok_records_missing_nodes() -> None:
    engine = ocicas.MemoryEngine()
    image, _ = await put_image(engine, [b"x"])
    await engine.delete_blob(image.digest)
    index = await put_index(engine, [image])
    graph = await ocicas.walk(engine, [index], broken_ok=True)
    assert set(graph.broken) == {image.digest}
    assert isinstance(graph.broken[image.digest], ocicas.BlobNotFoundError)
    with pytest.raises(ocicas.BlobNotFoundError, match=f"referenced by {index.digest}") as raised:
        await ocicas.walk(engine, [index])
    # the engine's own error, as the cause: not lost where the walk's task group unwraps its one failure
    assert isinstance(raised.value.__cause__, ocicas.BlobNotFoundError)
    assert str(raised.value.__cause__) != str(raised.value)


async def test_walk_cancelled_by_context() -> None:
    engine = TracingEngine()
    images = [(await put_image(engine, [f"{n}".encode()]))[0] for n in range(50)]
    ctx = ocicas.Context.background().with_timeout(0.005)
    with pytest.raises(ocicas.DeadlineExceededError):
        await ocicas.walk(engine, images, concurrency=1, ctx=ctx)


async def test_resolve_reference_through_nested_indexes_with_platforms() -> None:
    engine = ocicas.MemoryEngine()
    amd64, _ = await put_image(engine, [b"amd64"], platform=Platform(os="linux", architecture="amd64"))
    arm64, _ = await put_image(engine, [b"arm64"], platform=Platform(os="linux", architecture="arm64", variant="v8"))
    inner = await put_index(engine, [amd64, arm64])
    outer = await put_index(engine, [inner])
    await engine.put_reference("multi", outer)
    await engine.put_reference("single", amd64)
    paths = await ocicas.resolve_reference(engine, "multi")
    assert [p.walk for p in paths] == [(outer, inner, amd64), (outer, inner, arm64)]
    assert [p.descriptor for p in await ocicas.resolve_reference(engine, "multi", platform="linux/arm64")] == [arm64]
    assert await ocicas.resolve_reference(engine, "multi", platform="linux/arm64/v7") == []
    assert [p.descriptor for p in await ocicas.resolve_reference(engine, "multi", platform=amd64.platform)] == [amd64]
    single = await ocicas.resolve_reference(engine, "single")
    assert [(p.root, p.descriptor) for p in single] == [(amd64, amd64)]
    with pytest.raises(ocicas.ReferenceNotFoundError):
        await ocicas.resolve_reference(engine, "absent")
    with pytest.raises(ocicas.InvalidError, match="platform"):
        await ocicas.resolve_reference(engine, "multi", platform="linux")


async def test_unknown_leaf_blobs_are_reached_but_not_read() -> None:
    engine = TracingEngine()
    blob = await put(engine, b"opaque", "application/x-opaque")
    graph = await ocicas.walk(engine, [blob])
    assert graph.digests() == {blob.digest}
    assert engine.reads == Counter()
