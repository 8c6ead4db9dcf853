"""The reference invariant: a reference never names content that is not there.

Every tagging path (``put_reference``, ``update_references``, ``build_image``,
``build_index``, ``copy``, the CLI) checks, under the shared side of the
collector's lock, that all a tag reaches is present; writers put and tag inside a
lease, so collectors with no grace period at all, in this process and in
another, never rob them. ``OCICAS_LONG=1`` races for longer.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

import ocicas
from ocicas import Descriptor, Engine
from ocicas.testing import sha256
from tests.images import LAYER, MANIFEST, put, put_image, put_index

pytestmark = pytest.mark.anyio

LONG = os.environ.get("OCICAS_LONG") == "1"
#: Seconds builders race collectors.
RACE_SECONDS = 20.0 if LONG else 3.0
#: Tasks building and tagging images at once.
BUILDERS = 30
WORKERS = Path(__file__).parent / "workers"


@asynccontextmanager
async def worker(script: str, *args: object) -> AsyncIterator[tuple[anyio.abc.Process, list[str]]]:
    """A worker process that has printed its first line (returned, with the lines to come, as they come)."""
    process = await anyio.open_process([sys.executable, str(WORKERS / script), *map(str, args)])
    lines: list[str] = []
    first = anyio.Event()
    assert process.stdout is not None
    stdout = process.stdout
    buffer = b""

    async def read_lines() -> None:
        nonlocal buffer
        async for data in stdout:
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                lines.append(line.decode())
                first.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_lines)
            with anyio.fail_after(30):
                await first.wait()
            yield process, lines
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await process.aclose()


async def fsck(layout: Path) -> dict[str, Any]:
    result = await anyio.run_process([sys.executable, "-m", "ocicas", "fsck", str(layout), "--json"], check=False)
    report: dict[str, Any] = json.loads(result.stdout)
    assert result.returncode == 0, report
    return report


async def complete(engine: Engine, tags: dict[str, Descriptor]) -> None:
    """Every tag in ``tags`` is stored as given, and everything it reaches is present and whole."""
    assert sorted(await engine.list_references()) == sorted(tags)
    for name, descriptor in tags.items():
        assert (await engine.get_reference(name)).digest == descriptor.digest, name
    graph = await ocicas.walk(engine, list(tags.values()))  # every node read and verified
    present = await engine.stat_blobs(list(graph.descriptors))
    assert {d: present[d].size for d in present} == {d: x.size for d, x in graph.descriptors.items()}


async def test_builders_racing_collectors_here_and_in_another_process_lose_nothing(
    tmp_path: Path, anyio_backend: str
) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    acknowledged: dict[str, Descriptor] = {}
    runs = 0
    async with (
        await ocicas.open_layout(layout) as engine,
        worker("gc_loop.py", layout, RACE_SECONDS, anyio_backend) as (
            collector,
            lines,
        ),
    ):
        deadline = anyio.current_time() + RACE_SECONDS

        async def builder(n: int) -> None:
            rng = random.Random(n)
            i = 0
            while i < 2 or anyio.current_time() < deadline:  # two builds each at least, however loaded the machine
                layers = [rng.randbytes(rng.randint(1, 64 << 10)) for _ in range(rng.randint(1, 3))]
                name = f"b{n}-{i}"
                i += 1
                acknowledged[name] = await ocicas.build_image(engine, layers, reference=name)

        async def collect() -> None:
            nonlocal runs
            while anyio.current_time() < deadline:
                await ocicas.gc(engine, grace_period=0)
                runs += 1

        async with anyio.create_task_group() as tg:
            for n in range(BUILDERS):
                tg.start_soon(builder, n)
            tg.start_soon(collect)
        with anyio.fail_after(60):
            await collector.wait()
        assert collector.returncode == 0
        other_runs = sum(1 for line in lines if line.startswith("removed "))
        assert runs > 0
        assert other_runs > 0
        assert len(acknowledged) >= 2 * BUILDERS
        await complete(engine, acknowledged)
        final = await ocicas.gc(engine, grace_period=0)  # no lease left: only garbage goes
        assert final.leased == frozenset()
        await complete(engine, acknowledged)
    report = await fsck(layout)
    assert report["ok"] is True
    print(
        f"\ntagging race ({anyio_backend}): {BUILDERS} builders, {len(acknowledged)} tags in {RACE_SECONDS:.0f} s, "
        f"{runs} collections here and {other_runs} in another process, 0 dangling"
    )


async def test_a_tag_without_a_lease_is_refused_rather_than_left_dangling(engine: Engine) -> None:
    layer = await put(engine, b"soon collected", LAYER)
    config = await put(engine, b"{}", "application/vnd.oci.empty.v1+json")
    removed = (await ocicas.gc(engine, grace_period=0)).removed  # nothing named, no lease: both go
    assert set(removed) == {layer.digest, config.digest}
    document = {"schemaVersion": 2, "mediaType": MANIFEST, "config": config.to_dict(), "layers": [layer.to_dict()]}
    manifest = await put(engine, json.dumps(document).encode(), MANIFEST)
    with pytest.raises(ocicas.BlobNotFoundError) as info:
        await engine.put_reference("v1", manifest)
    assert isinstance(info.value, FileNotFoundError)
    assert "'v1'" in str(info.value)
    assert config.digest in str(info.value)
    assert await engine.list_references() == []


async def test_every_missing_kind_of_child_is_named(engine: Engine) -> None:
    image, blobs = await put_image(engine, [b"one", b"two"])
    index = await put_index(engine, [image])
    for missing in (blobs[1], blobs[2], image.digest):  # config, a layer, the manifest
        data = await engine.read_blob(missing)
        await engine.delete_blob(missing)
        with pytest.raises(ocicas.BlobNotFoundError, match=missing):
            await engine.put_reference("multi", index)
        assert await engine.list_references() == []
        await engine.put_blob(data)
    await engine.put_reference("multi", index)
    assert await engine.list_references() == ["multi"]


async def test_a_wrong_size_child_is_refused(engine: Engine) -> None:
    layer = Descriptor(media_type=LAYER, digest=sha256(b"layer"), size=99)
    await engine.put_blob(b"layer")
    config = await put(engine, b"{}", "application/vnd.oci.empty.v1+json")
    document = {"schemaVersion": 2, "mediaType": MANIFEST, "config": config.to_dict(), "layers": [layer.to_dict()]}
    manifest = await put(engine, json.dumps(document).encode(), MANIFEST)
    with pytest.raises(ocicas.SizeMismatchError, match="99"):
        await engine.put_reference("v1", manifest)
    assert await engine.list_references() == []


async def test_a_lease_keeps_its_blobs_from_a_collector_with_no_grace(engine: Engine) -> None:
    async with engine.lease() as lease:
        digest, _ = await engine.put_blob(b"leased")
        assert lease.digests == {digest}
        result = await ocicas.gc(engine, grace_period=0)
        assert digest not in result.removed
        assert result.leased == {digest}
        old = await put(engine, b"put before", LAYER)
    assert await engine.leased_blobs() == frozenset()
    await lease_free_gc(engine, {digest, old.digest})


async def lease_free_gc(engine: Engine, expected: set[ocicas.Digest]) -> None:
    result = await ocicas.gc(engine, grace_period=0)
    assert set(result.removed) == expected
    assert await engine.list_blobs() == []


async def test_lease_add_protects_present_blobs(engine: Engine) -> None:
    present = await put(engine, b"present", LAYER)
    async with engine.lease() as lease:
        found = await lease.add([present.digest, sha256(b"absent")])
        assert set(found) == {present.digest}
        assert lease.digests == {present.digest}
        assert (await ocicas.gc(engine, grace_period=0)).removed == ()
    assert (await ocicas.gc(engine, grace_period=0)).removed == (present.digest,)


async def test_a_lease_held_by_another_process_is_kept_and_expires_with_it(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with worker("leaser.py", layout) as (leaser, lines), await ocicas.open_layout(layout) as engine:
        digest = ocicas.Digest(lines[0].split()[1])
        assert await engine.leased_blobs() == {digest}
        result = await ocicas.gc(engine, grace_period=0)
        assert result.removed == ()
        assert result.leased == {digest}
        leaser.send_signal(signal.SIGKILL)
        await leaser.wait()
        assert await engine.leased_blobs() == frozenset()  # its flock died with it
        assert (await ocicas.gc(engine, grace_period=0)).removed == (digest,)


async def test_a_lease_that_ends_frees_its_blobs_across_processes(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with worker("leaser.py", layout) as (leaser, lines), await ocicas.open_layout(layout) as engine:
        digest = ocicas.Digest(lines[0].split()[1])
        assert leaser.stdin is not None
        await leaser.stdin.send(b"end\n")
        with anyio.fail_after(30):
            await leaser.wait()
        assert lines[-1] == "ended"
        assert await engine.leased_blobs() == frozenset()
        assert (await ocicas.gc(engine, grace_period=0)).removed == (digest,)


async def test_platform_filtered_copies_tag_partial_content_on_purpose(engine: Engine) -> None:
    amd64, _ = await put_image(engine, [b"amd64"], platform=ocicas.Platform(os="linux", architecture="amd64"))
    arm64, _ = await put_image(engine, [b"arm64"], platform=ocicas.Platform(os="linux", architecture="arm64"))
    index = await put_index(engine, [amd64, arm64])
    await engine.put_reference("multi", index)
    async with ocicas.MemoryEngine() as dst:
        result = await ocicas.copy(engine, "multi", dst, platforms=["linux/arm64"])
        assert result.excluded == (amd64.digest,)
        assert (await dst.get_reference("multi")).digest == index.digest
        with pytest.raises(ocicas.BlobNotFoundError, match=amd64.digest):
            await dst.put_reference("again", index)  # without partial the check still holds


async def tag_error(engine: Engine, name: str, descriptor: Descriptor) -> tuple[type[BaseException], str]:
    with pytest.raises(ocicas.OCICASError) as info:
        await engine.put_reference(name, descriptor)
    assert await engine.list_references() == []
    return type(info.value), str(info.value)


@pytest.mark.parametrize("root", ["manifest", "index"])
@pytest.mark.parametrize("fault", ["config", "layer", "manifest", "layer size"])
async def test_a_tag_is_refused_alike_by_every_engine(tmp_path: Path, fault: str, root: str) -> None:
    """The directory engine reads a tag's nodes and stats its leaves in one look; a fault it finds there
    is reported as the memory engine (and the usual walk) reports it, word for word."""
    await ocicas.create_layout(tmp_path / "layout")
    errors = []
    async with ocicas.MemoryEngine() as memory, await ocicas.open_layout(tmp_path / "layout") as directory:
        for engine in (memory, directory):
            image, digests = await put_image(engine, [b"one", b"two"])
            if fault == "layer size":
                layer = Descriptor(media_type=LAYER, digest=digests[2], size=4)  # it has 3 bytes
                document = {"schemaVersion": 2, "mediaType": MANIFEST, "config": {}, "layers": [layer.to_dict()]}
                document["config"] = json.loads(await engine.read_blob(image))["config"]
                image = await put(engine, json.dumps(document).encode(), MANIFEST)
            else:
                await engine.delete_blob(digests[{"manifest": 0, "config": 1, "layer": 3}[fault]])
            target = image if root == "manifest" else await put_index(engine, [image])
            errors.append(await tag_error(engine, "v1", target))
    assert errors[0] == errors[1]
    expected = ocicas.SizeMismatchError if fault == "layer size" else ocicas.BlobNotFoundError
    assert errors[0][0] is expected
    assert errors[0][1].startswith("cannot tag 'v1': ")


@pytest.mark.parametrize("damage", ["same size", "shorter", "longer", "not json"])
async def test_a_manifest_damaged_on_disk_is_refused_as_reading_it_reports(tmp_path: Path, damage: str) -> None:
    await ocicas.create_layout(tmp_path / "layout")
    async with await ocicas.open_layout(tmp_path / "layout") as engine:
        image, _ = await put_image(engine, [b"one"])
        data = await engine.read_blob(image)
        if damage == "not json":  # a manifest that verifies but does not parse
            image = await put(engine, b"[" * image.size, MANIFEST)
        else:
            damaged = {"same size": data[:-1] + b" ", "shorter": data[:-1], "longer": data + b" "}[damage]
            path = tmp_path / "layout" / "blobs" / "sha256" / image.digest.encoded
            await anyio.Path(path).unlink()
            await anyio.Path(path).write_bytes(damaged)
        with pytest.raises(ocicas.OCICASError) as walked:
            await ocicas.walk(engine, [image])
        assert await tag_error(engine, "v1", image) == (type(walked.value), str(walked.value))


async def test_a_waiting_collection_goes_before_a_new_tag_and_its_cancellation_lets_the_tag_in(
    engine: Engine,
) -> None:
    image, _ = await put_image(engine, [b"one"])
    order: list[str] = []

    async def collect(scope: anyio.CancelScope) -> None:
        with scope:
            async with engine.gc_lock():
                order.append("collection")

    async def tag(name: str) -> None:
        await engine.put_reference(name, image)
        order.append(name)

    async def waiting_tag() -> None:  # until the tag waits for the lock, behind the collection
        with anyio.fail_after(30):
            while engine._gc_rw._waiters < 2:  # noqa: ASYNC110
                await anyio.sleep(0.001)

    async def waiting_collection() -> None:
        with anyio.fail_after(30):
            while not engine._gc_rw._exclusive_waiting:  # noqa: ASYNC110
                await anyio.sleep(0.001)

    for cancelled in (False, True):
        order.clear()
        scope = anyio.CancelScope()
        async with anyio.create_task_group() as tg, engine._gc_shared():  # a tag or leased put in flight
            tg.start_soon(collect, scope)
            await waiting_collection()
            tg.start_soon(tag, f"v{int(cancelled)}")
            await waiting_tag()
            if cancelled:
                scope.cancel()
                with anyio.fail_after(30):
                    while not order:  # noqa: ASYNC110
                        await anyio.sleep(0.001)
        assert order == (["v1"] if cancelled else ["collection", "v0"])


async def test_the_directory_engine_hands_a_tag_check_a_small_manifest_and_its_leaf_stats(tmp_path: Path) -> None:
    await ocicas.create_layout(tmp_path / "layout")
    async with await ocicas.open_layout(tmp_path / "layout") as engine:
        image, digests = await put_image(engine, [b"one", b"two"])
        index = await put_index(engine, [image])
        heads, stats = await engine._closure_heads([image, index])
        manifest = json.loads(await engine.read_blob(image))
        leaves = [Descriptor.from_dict(manifest["config"]), *map(Descriptor.from_dict, manifest["layers"])]
        assert heads == {image.digest: (image, leaves), index.digest: (index, [image])}
        assert stats == await engine.stat_blobs(digests[1:])  # the config and layers; the index's manifest is a node
        await engine.delete_blob(digests[2])
        heads, stats = await engine._closure_heads([image])
        assert heads == {image.digest: (image, leaves)}
        assert set(stats) == {digests[1], digests[3]}  # the absent layer is left to the usual stat, which names it
        await engine.delete_blob(image.digest)
        assert await engine._closure_heads([index]) == ({index.digest: (index, [image])}, {})
