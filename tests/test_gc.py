"""ocicas.gc: exact survivors on real graphs, and the safety rules that go beyond the anchors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

import ocicas
import ocicas.testing
from ocicas import Descriptor, Digest, Engine
from tests.images import MANIFEST, age, put, put_artifact, put_image, put_index, put_json

pytestmark = pytest.mark.anyio


async def age_all(engine: Engine) -> None:
    age(engine, await engine.list_blobs())


async def test_shared_layers_survive_and_unreachable_blobs_go(engine: Engine) -> None:
    shared = b"shared layer"
    a, a_blobs = await put_image(engine, [shared, b"only a"], name="a")
    b, b_blobs = await put_image(engine, [shared, b"only b"], name="b")
    await engine.put_reference("a", a)
    await engine.put_reference("b", b)
    await engine.delete_reference("b")
    await age_all(engine)
    gone = set(b_blobs) - set(a_blobs)
    sizes = {d: await engine.stat_blob(d) for d in gone}
    result = await ocicas.gc(engine)
    assert set(result.removed) == gone
    assert len(gone) == 3  # b's manifest, config and its own layer
    assert set(await engine.list_blobs()) == set(a_blobs)
    assert result.live == set(a_blobs)
    assert result.bytes_freed == sum(sizes.values())
    assert not result.dry_run


async def test_bytes_freed_is_the_exact_sum(engine: Engine) -> None:
    blobs = [await put(engine, bytes(n), "application/octet-stream") for n in (10, 200, 3000)]
    await age_all(engine)
    result = await ocicas.gc(engine)
    assert (set(result.removed), result.bytes_freed) == ({b.digest for b in blobs}, 3210)


async def test_nested_indexes_keep_everything_below_them(engine: Engine) -> None:
    image, image_blobs = await put_image(engine, [b"l1"])
    inner = await put_index(engine, [image])
    outer = await put_index(engine, [inner])
    await engine.put_reference("nested", outer)
    garbage = await put(engine, b"garbage", "application/octet-stream")
    await age_all(engine)
    result = await ocicas.gc(engine)
    assert result.removed == (garbage.digest,)
    assert set(await engine.list_blobs()) == {*image_blobs, inner.digest, outer.digest}


async def test_docker_schema2_images_and_lists_are_walked(engine: Engine) -> None:
    image, image_blobs = await put_image(engine, [b"docker layer"], docker=True)
    listing = await put_index(engine, [image], docker=True)
    await engine.put_reference("docker", listing)
    await put(engine, b"garbage", "application/octet-stream")
    await age_all(engine)
    await ocicas.gc(engine)
    assert set(await engine.list_blobs()) == {*image_blobs, listing.digest}


async def test_unknown_media_types_are_leaves_and_never_opened(engine: Engine) -> None:
    # JSON that *looks* like a manifest, under a media type nobody registered
    looks_like, _ = await put_image(engine, [b"hidden layer"])
    fake = await put_json(
        engine, {"layers": [looks_like.to_dict()], "manifests": [looks_like.to_dict()]}, "application/x-unknown"
    )
    await engine.put_reference("unknown", fake)
    await age_all(engine)
    result = await ocicas.gc(engine)
    assert set(await engine.list_blobs()) == {fake.digest}
    assert looks_like.digest in result.removed


async def test_referrers_of_live_content_are_kept(engine: Engine) -> None:
    image, image_blobs = await put_image(engine, [b"app"])
    await engine.put_reference("app", image)
    signature, signature_blobs = await put_artifact(engine, image, b"signature")
    sbom_signature, sbom_signature_blobs = await put_artifact(engine, signature, b"signature of the signature")
    dead, dead_blobs = await put_image(engine, [b"dead"])
    _, orphan_blobs = await put_artifact(engine, dead, b"signature of dead")
    index_referrer = await put_index(engine, [], subject=image, annotations={"kind": "index referrer"})
    await age_all(engine)
    result = await ocicas.gc(engine)
    kept = {*image_blobs, *signature_blobs, *sbom_signature_blobs, index_referrer.digest}
    assert set(await engine.list_blobs()) == kept
    assert result.referrers == {signature.digest, sbom_signature.digest, index_referrer.digest}
    assert set(result.removed) == set(dead_blobs) | set(orphan_blobs) - set(signature_blobs)  # shares the empty config


async def test_referrers_can_be_dropped(engine: Engine) -> None:
    image, image_blobs = await put_image(engine, [b"app"])
    await engine.put_reference("app", image)
    _, signature_blobs = await put_artifact(engine, image, b"signature")
    await age_all(engine)
    result = await ocicas.gc(engine, referrers=False)
    assert set(await engine.list_blobs()) == set(image_blobs)
    assert set(result.removed) == set(signature_blobs)
    assert result.referrers == frozenset()


async def test_a_named_referrer_keeps_its_subject(engine: Engine) -> None:
    image, image_blobs = await put_image(engine, [b"app"])
    signature, signature_blobs = await put_artifact(engine, image, b"signature")
    await engine.put_reference("sig", signature)
    await age_all(engine)
    await ocicas.gc(engine, referrers=False)
    assert set(await engine.list_blobs()) == {*image_blobs, *signature_blobs}


async def test_a_missing_manifest_aborts_before_deleting_anything(engine: Engine) -> None:
    image, image_blobs = await put_image(engine, [b"layer"])
    index = await put_index(engine, [image])
    await engine.put_reference("broken", index)
    await engine.delete_blob(image.digest)
    garbage = await put(engine, b"garbage", "application/octet-stream")
    await age_all(engine)
    before = await engine.list_blobs()
    with pytest.raises(ocicas.BlobNotFoundError) as info:
        await ocicas.gc(engine)
    assert image.digest in str(info.value)
    assert index.digest in str(info.value)  # names what points at it
    assert await engine.list_blobs() == before

    result = await ocicas.gc(engine, broken_ok=True)
    assert result.broken == {image.digest}
    # the manifest is gone, so what it held is unreachable: only the index survives
    assert set(await engine.list_blobs()) == {index.digest}
    assert garbage.digest in result.removed
    assert set(image_blobs[1:]) <= set(result.removed)


async def test_a_dangling_reference_aborts(engine: Engine) -> None:
    missing = Descriptor(media_type=MANIFEST, digest=ocicas.testing.sha256(b"never stored"), size=12)
    await engine.put_reference("dangling", missing, partial=True)  # written as another tool might
    garbage = await put(engine, b"garbage", "application/octet-stream")
    await age_all(engine)
    with pytest.raises(ocicas.BlobNotFoundError, match="missing"):
        await ocicas.gc(engine)
    assert await engine.list_blobs() == [garbage.digest]


async def test_an_unparseable_manifest_aborts(engine: Engine) -> None:
    bogus = await put(engine, b'{"schemaVersion": 2, "manifests": []}', MANIFEST)
    await engine.put_reference("bogus", bogus, partial=True)
    await put(engine, b"garbage", "application/octet-stream")
    await age_all(engine)
    with pytest.raises(ocicas.InvalidError, match=bogus.digest):
        await ocicas.gc(engine)
    assert len(await engine.list_blobs()) == 2


async def test_missing_leaves_are_fine(engine: Engine) -> None:
    image, image_blobs = await put_image(engine, [b"layer one", b"layer two"])
    await engine.put_reference("partial", image)
    await engine.delete_blob(image_blobs[2])
    await age_all(engine)
    result = await ocicas.gc(engine)
    assert result.removed == ()
    assert set(await engine.list_blobs()) == set(image_blobs) - {image_blobs[2]}


async def test_grace_period_keeps_young_blobs(engine: Engine) -> None:
    young = await put(engine, b"young", "application/octet-stream")
    old = await put(engine, b"old", "application/octet-stream")
    age(engine, [old.digest])
    result = await ocicas.gc(engine)  # the default grace period is an hour
    assert result.removed == (old.digest,)
    assert result.fresh == {young.digest}
    assert await engine.list_blobs() == [young.digest]
    assert (await ocicas.gc(engine, grace_period=0)).removed == (young.digest,)


async def test_put_of_present_garbage_freshens_it(engine: Engine) -> None:
    reused = await put(engine, b"reused", "application/octet-stream")
    age(engine, [reused.digest])
    await engine.put_blob(b"reused")  # a writer deduplicating against old garbage
    result = await ocicas.gc(engine)
    assert result.removed == ()
    assert await engine.read_blob(reused.digest) == b"reused"


async def test_dry_run_reports_and_deletes_nothing(engine: Engine) -> None:
    image, _ = await put_image(engine, [b"kept"])
    await engine.put_reference("kept", image)
    garbage = [await put(engine, bytes([n]) * 100, "application/octet-stream") for n in range(3)]
    await age_all(engine)
    before = await engine.list_blobs()
    result = await ocicas.gc(engine, dry_run=True)
    assert result.dry_run
    assert set(result.removed) == {g.digest for g in garbage}
    assert result.bytes_freed == 300
    assert await engine.list_blobs() == before


async def test_a_policy_can_veto_deletions(engine: Engine) -> None:
    keep = await put(engine, b"keep me", "application/octet-stream")
    drop = await put(engine, b"drop me", "application/octet-stream")
    await age_all(engine)
    asked: list[Digest] = []

    async def policy(digest: Digest) -> bool:
        asked.append(digest)
        await anyio.lowlevel.checkpoint()
        return digest != keep.digest

    result = await ocicas.gc(engine, policy=policy)
    assert sorted(asked) == sorted([keep.digest, drop.digest])
    assert result.removed == (drop.digest,)
    assert result.vetoed == {keep.digest}
    assert await engine.list_blobs() == [keep.digest]


async def test_cancelling_gc_keeps_every_live_blob(engine: Engine) -> None:
    live: set[Digest] = set()
    for n in range(20):
        image, blobs = await put_image(engine, [f"layer {n}".encode()])
        await engine.put_reference(f"i{n}", image)
        live.update(blobs)
    for n in range(50):
        await put(engine, f"garbage {n}".encode(), "application/octet-stream")
    await age_all(engine)
    for delay in (0, 0.0005, 0.001, 0.002, 0.005):
        with anyio.move_on_after(delay):
            await ocicas.gc(engine, concurrency=2)
        ctx = ocicas.Context.background()
        with anyio.move_on_after(1):  # cancel by context part-way too
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_later, ctx, delay)
                try:
                    await ocicas.gc(engine, concurrency=2, ctx=ctx)
                except ocicas.ContextCancelledError:
                    pass
        assert live <= set(await engine.list_blobs())
    await ocicas.gc(engine)
    assert set(await engine.list_blobs()) == live


async def _cancel_later(ctx: ocicas.Context, delay: float) -> None:
    await anyio.sleep(delay)
    ctx.cancel()


async def test_writers_during_gc_lose_nothing(engine: Engine) -> None:
    for n in range(30):
        await put(engine, f"old garbage {n}".encode(), "application/octet-stream")
    reused = await put(engine, b"old but about to be reused", LAYER_TYPE)
    await age_all(engine)
    tagged: dict[str, set[Digest]] = {}

    async def writer(w: int) -> None:
        for n in range(10):
            image, blobs = await put_image(engine, [b"old but about to be reused", f"w{w} n{n}".encode()])
            await anyio.lowlevel.checkpoint()
            await engine.put_reference(f"w{w}-{n}", image)
            tagged[f"w{w}-{n}"] = set(blobs)

    async def collector() -> None:
        for _ in range(10):
            await ocicas.gc(engine, grace_period=60)
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        for w in range(4):
            tg.start_soon(writer, w)
        tg.start_soon(collector)
    await ocicas.gc(engine, grace_period=60)
    present = set(await engine.list_blobs())
    for name, blobs in tagged.items():
        assert blobs <= present, name
    assert reused.digest in present
    assert len(tagged) == 40


LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"


async def test_unnamed_index_entries_are_roots(tmp_path: Path) -> None:
    await ocicas.create_layout(tmp_path / "l")
    async with await ocicas.open_layout(tmp_path / "l") as engine:
        image, blobs = await put_image(engine, [b"unnamed"])
        await put(engine, b"garbage", "application/octet-stream")
        index = json.loads((tmp_path / "l" / "index.json").read_bytes())
        index["manifests"].append(image.to_dict())
        (tmp_path / "l" / "index.json").write_text(json.dumps(index))
        await age_all(engine)
        await ocicas.gc(engine)
        assert set(await engine.list_blobs()) == set(blobs)


async def test_gc_removes_dead_engine_temp_files(tmp_path: Path) -> None:
    await ocicas.create_layout(tmp_path / "l")
    dead = tmp_path / "l" / ".ocicas-0000000000000000"
    dead.mkdir()
    (dead / "blob-x").write_bytes(b"partial")
    async with await ocicas.open_layout(tmp_path / "l") as engine:
        await ocicas.gc(engine)
    assert not dead.exists()


class CountingEngine(ocicas.MemoryEngine):
    """Counts every blob opened."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: Counter[Digest] = Counter()

    async def _open_blob(self, digest: Digest) -> ocicas.RawBlob:
        self.opened[digest] += 1
        return await super()._open_blob(digest)


@pytest.mark.parametrize("referrers", [True, False])
async def test_a_large_gc_fetches_each_manifest_once_and_no_layer(referrers: bool) -> None:
    engine = CountingEngine()
    shared_base = [f"base layer {n}".encode() for n in range(3)]
    layers: set[Digest] = set()
    manifests: set[Digest] = set()
    images: list[Descriptor] = []
    for n in range(200):
        image, blobs = await put_image(engine, [*shared_base, f"app {n}".encode()])
        images.append(image)
        manifests.add(image.digest)
        layers.update(blobs[2:])
    await engine.update_references({f"img{n}": image for n, image in enumerate(images)})
    # the same images again under an index per 10, so manifests are reached many times
    indexes = [await put_index(engine, images[i : i + 10]) for i in range(0, 200, 10)]
    await engine.update_references({f"set{i}": index for i, index in enumerate(indexes)})
    garbage_count = 20_000 - len(await engine.list_blobs())
    for n in range(garbage_count):
        await engine.put_blob(n.to_bytes(4, "big") * 8)
    await age_all(engine)
    engine.opened.clear()
    result = await ocicas.gc(engine, referrers=referrers)  # the garbage is not JSON: sniffed, never read
    assert len(result.removed) == garbage_count
    assert max(engine.opened.values()) == 1
    assert set(engine.opened) == manifests | {i.digest for i in indexes}
    assert not layers & set(engine.opened)


async def test_touched_blobs_are_fresh_again(engine: Engine) -> None:
    reused = await put(engine, b"reused by a copy", "application/octet-stream")
    other = await put(engine, b"left alone", "application/octet-stream")
    await age_all(engine)
    touched = await engine.touch_blobs([reused.digest, ocicas.testing.sha256(b"absent")])
    assert set(touched) == {reused.digest}
    assert touched[reused.digest].size == reused.size
    result = await ocicas.gc(engine)
    assert result.removed == (other.digest,)
    assert result.fresh == {reused.digest}
