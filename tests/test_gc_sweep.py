"""The collector's own hooks (plain-text digests, no per-blob objects) and a walk's batched fast path."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

import ocicas
from ocicas import Descriptor, Digest, Engine
from tests.images import INDEX, MANIFEST, age, put, put_image

pytestmark = pytest.mark.anyio

OLD = time.time() - 7200


async def test_triage_sorts_blobs_exactly(engine: Engine) -> None:
    blobs = {
        "json": b'{"a": 1}',
        "spaced json": b' \n\t {"b": 2}',
        "empty": b"",
        "binary": b"\x1f\x8b binary",
        "text": b"plain text",
        "large json": b'{"c": "' + b"x" * 40 + b'"}',
        "young": b'{"young": true}',
    }
    digests = {name: (await engine.put_blob(data))[0] for name, data in blobs.items()}
    for name, digest in digests.items():
        if name != "young":
            age(engine, [digest])
    absent = Digest("sha256:" + "0" * 64)
    given = sorted([*map(str, digests.values()), absent])
    cutoff = time.time() - 3600
    async with engine._operation(None):
        sizes, fresh, old, json_like = await engine._gc_triage(given, cutoff, 64, 20)
    assert sizes == {digests[n]: len(data) for n, data in blobs.items()}
    assert fresh == [digests["young"]]
    assert old == [d for d in given if d in sizes and d != digests["young"]]
    assert set(json_like) == {digests["json"], digests["spaced json"], digests["empty"]}
    assert json_like == [d for d in old if d in json_like]
    # no sniff asked for: nothing is JSON-like; no cutoff: nothing is fresh
    async with engine._operation(None):
        sizes2, fresh2, old2, json_like2 = await engine._gc_triage(given, None, 0, 20)
    assert (sizes2, fresh2, old2, json_like2) == (sizes, [], [d for d in given if d in sizes], [])


async def test_gc_delete_keeps_young_blobs_and_reports_sizes(engine: Engine) -> None:
    old = (await engine.put_blob(b"old one"))[0]
    young = (await engine.put_blob(b"young one"))[0]
    age(engine, [old])
    absent = "sha256:" + "1" * 64
    async with engine._operation(None):
        removed = await engine._gc_delete([absent, str(old), str(young)], time.time() - 3600)
    assert removed == {old: 7}
    assert await engine.list_blobs() == [young]
    async with engine._operation(None):
        assert await engine._gc_delete([str(young)], None) == {young: 9}
    assert await engine.list_blobs() == []


async def test_gc_list_is_the_listing_as_text(engine: Engine) -> None:
    for n in range(40):
        await engine.put_blob(f"blob {n}".encode())
    async with engine._operation(None):
        listed = await engine._gc_list()
    assert sorted(listed) == await engine.list_blobs()  # in the engine's own order
    assert len(listed) == 40


async def test_gc_keeps_special_files_and_symlinks_at_blob_paths(tmp_path: Path) -> None:
    await ocicas.create_layout(tmp_path / "layout")
    async with await ocicas.open_layout(tmp_path / "layout") as engine:
        garbage = (await engine.put_blob(b"garbage"))[0]
        age(engine, [garbage])
        blobs = tmp_path / "layout" / "blobs" / "sha256"
        fifo, link, directory = "a" * 64, "b" * 64, "c" * 64
        os.mkfifo(blobs / fifo)
        os.symlink(blobs / garbage.encoded, blobs / link)
        os.mkdir(blobs / directory)
        result = await ocicas.gc(engine, grace_period=0)
        assert result.removed == (garbage,)
        assert sorted(os.listdir(blobs)) == [fifo, link, directory]


async def test_a_batched_walk_reaches_everything_and_names_the_one_bad_node(tmp_path: Path) -> None:
    """More roots than one fast-path batch, a node too large for it, and one corrupt node among them."""
    await ocicas.create_layout(tmp_path / "layout")
    async with await ocicas.open_layout(tmp_path / "layout") as engine:
        roots: list[Descriptor] = []
        reached: set[Digest] = set()
        images: list[list[Digest]] = []
        for n in range(150):
            image, digests = await put_image(engine, [b"shared", f"layer {n}".encode()])
            roots.append(image)
            images.append(digests)
            reached.update(digests)
        big_layers = [
            Descriptor(media_type="text/plain", digest=Digest(f"sha256:{n:064x}"), size=1) for n in range(9000)
        ]
        big_doc = {"schemaVersion": 2, "mediaType": INDEX, "manifests": [d.to_dict() for d in big_layers]}
        big_digest, big_size = await engine.put_blob_json(big_doc)
        big = Descriptor(media_type=INDEX, digest=big_digest, size=big_size)
        assert big.size >= 1 << 20  # read the usual way, not by the fast path
        roots.append(big)
        reached.add(big.digest)
        reached.update(d.digest for d in big_layers)
        graph = await ocicas.walk(engine, roots)
        assert set(graph.descriptors) == reached
        for root, digests in zip(roots[:150], images, strict=True):
            assert [d.digest for d in graph.edges[root.digest]] == digests[1:]  # config, then layers
        assert [d.digest for d in graph.edges[big.digest]] == [d.digest for d in big_layers]
        bad = await put(engine, b'{"not": "a manifest"', MANIFEST)  # truncated JSON
        with pytest.raises(ocicas.InvalidError, match=bad.digest):
            await ocicas.walk(engine, [*roots[:100], bad, *roots[100:]])
        graph = await ocicas.walk(engine, [*roots[:100], bad, *roots[100:]], broken_ok=True)
        assert set(graph.broken) == {bad.digest}
        assert set(graph.descriptors) == reached | {bad.digest}


async def test_a_large_triage_keeps_every_answer_in_order(tmp_path: Path) -> None:
    """5,000 blobs (many checkpoints), given out of directory order: the exact answer, in the order given."""
    await ocicas.create_layout(tmp_path / "layout")
    blobs = tmp_path / "layout" / "blobs" / "sha256"
    expected_sizes: dict[str, int] = {}
    young: set[str] = set()
    json_like: set[str] = set()
    for n in range(5000):
        data = (b'{"n": %d}' % n) if n % 7 == 0 else n.to_bytes(4, "big") * (n % 5 + 1)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (blobs / digest[7:]).write_bytes(data)
        when = time.time() if n % 11 == 0 else OLD
        os.utime(blobs / digest[7:], (when, when))
        expected_sizes[digest] = len(data)
        if n % 11 == 0:
            young.add(digest)
        elif n % 7 == 0:
            json_like.add(digest)
    async with await ocicas.open_layout(tmp_path / "layout") as engine, engine._operation(None):
        listed = await engine._gc_list()
        given = listed[::2] + listed[1::2]  # any order: the answer keeps it
        sizes, fresh, old, found = await engine._gc_triage(given, time.time() - 3600, 64, 1 << 20)
    assert sizes == expected_sizes
    assert fresh == [d for d in given if d in young]
    assert old == [d for d in given if d not in young]
    assert found == [d for d in given if d in json_like]
