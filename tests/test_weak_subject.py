"""A weak ``subject``: a referrer stored without its subject walks, copies, collects and checks cleanly.

The image-spec calls ``subject`` a weak association, and oras and regclient keep
signatures and SBOMs in another repository than what they describe. The layouts
here are written by hand, file by file, as such a tool leaves them: a referrer
(an artifact manifest with an empty config, as oras-go writes one) whose
subject was never stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ocicas
from ocicas import Descriptor, Digest
from ocicas.cli._fsck import Problem, check_store
from tests.images import EMPTY, MANIFEST, put_image

pytestmark = pytest.mark.anyio

#: A subject no layout here holds (the digest of a manifest stored elsewhere).
ABSENT = Descriptor(media_type=MANIFEST, digest=Digest("sha256:" + "5" * 64), size=527)


def sha256(data: bytes) -> Digest:
    return Digest(f"sha256:{hashlib.sha256(data).hexdigest()}")


def write_blob(layout: Path, data: bytes, age: float = 7200) -> Digest:
    digest = sha256(data)
    path = layout / "blobs" / "sha256" / digest.encoded
    path.write_bytes(data)
    when = time.time() - age
    os.utime(path, (when, when))
    return digest


def write_referrer(layout: Path, subject: Descriptor, payload: bytes) -> tuple[Descriptor, set[Digest]]:
    """An oras-style artifact manifest (empty config, one blob) pointing at ``subject``; its blobs."""
    empty = write_blob(layout, b"{}")
    blob = write_blob(layout, payload)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "artifactType": "application/vnd.example.sbom",
        "config": {"mediaType": EMPTY, "digest": empty, "size": 2, "data": "e30="},
        "layers": [{"mediaType": "application/spdx+json", "digest": blob, "size": len(payload)}],
        "subject": subject.to_dict(),
        "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
    }
    data = json.dumps(manifest, indent=2).encode()
    digest = write_blob(layout, data)
    descriptor = Descriptor(
        media_type=MANIFEST, digest=digest, size=len(data), artifact_type="application/vnd.example.sbom"
    )
    return descriptor, {digest, empty, blob}


def write_layout(layout: Path, named: dict[str, Descriptor]) -> None:
    """oci-layout and index.json, by hand."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    manifests = [
        {**d.to_dict(), "annotations": {ocicas.ANNOTATION_REF_NAME: name}} for name, d in sorted(named.items())
    ]
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}, indent=2))


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Descriptor, set[Digest], Descriptor, set[Digest]]:
    """A layout with a tagged SBOM whose subject is absent, and an untagged one whose subject is absent too."""
    path = tmp_path / "layout"
    (path / "blobs" / "sha256").mkdir(parents=True)
    sbom, sbom_blobs = write_referrer(path, ABSENT, b'{"spdxVersion":"SPDX-2.3"}')
    orphan, orphan_blobs = write_referrer(path, ABSENT, b'{"spdxVersion":"SPDX-2.2"}')
    write_layout(path, {"sbom": sbom})
    return path, sbom, sbom_blobs, orphan, orphan_blobs - sbom_blobs


Fixture = tuple[Path, Descriptor, set[Digest], Descriptor, set[Digest]]


async def test_walk_records_an_absent_subject_and_does_not_fail(layout: Fixture) -> None:
    path, sbom, sbom_blobs, _, _ = layout
    async with await ocicas.open_layout(path) as engine:
        graph = await ocicas.walk(engine, [sbom])
    assert graph.digests() == sbom_blobs | {ABSENT.digest}
    assert (graph.absent_subjects, graph.weak, graph.broken) == ({ABSENT.digest}, {ABSENT.digest}, {})


async def test_a_subject_also_reached_by_a_strong_edge_must_be_there(engine: ocicas.Engine) -> None:
    referrer_data = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": EMPTY, "digest": sha256(b"{}"), "size": 2},
            "layers": [],
            "subject": ABSENT.to_dict(),
        }
    ).encode()
    await engine.put_blob(b"{}")
    digest, size = await engine.put_blob(referrer_data)
    referrer = Descriptor(media_type=MANIFEST, digest=digest, size=size)
    index_data = json.dumps({"schemaVersion": 2, "manifests": [referrer.to_dict(), ABSENT.to_dict()]}).encode()
    digest, size = await engine.put_blob(index_data)
    index = Descriptor(media_type="application/vnd.oci.image.index.v1+json", digest=digest, size=size)
    for roots in ([index], [referrer, index], [index, referrer]):
        with pytest.raises(ocicas.BlobNotFoundError) as caught:
            await ocicas.walk(engine, roots)
        # named with a node that points at it: which one depends on which was read first
        assert str(caught.value) in {
            f"{MANIFEST} {ABSENT.digest} (referenced by {parent}) is missing"
            for parent in (index.digest, referrer.digest)
        }
        graph = await ocicas.walk(engine, roots, broken_ok=True)
        assert (set(graph.broken), graph.absent_subjects, graph.weak) == ({ABSENT.digest}, set(), set())
    # reached weakly by one walk, strongly by the next one that extends it
    graph = await ocicas.walk(engine, [referrer])
    assert graph.absent_subjects == {ABSENT.digest}
    with pytest.raises(ocicas.BlobNotFoundError):
        await ocicas.walk(engine, [index], graph=graph)


async def test_gc_keeps_a_rooted_referrer_and_collects_an_unrooted_one_whose_subject_is_absent(
    layout: Fixture,
) -> None:
    path, _, sbom_blobs, orphan, orphan_blobs = layout
    async with await ocicas.open_layout(path) as engine:
        dry = await ocicas.gc(engine, grace_period=0, dry_run=True)
        assert set(dry.removed) == orphan_blobs == {orphan.digest, *orphan_blobs}
        result = await ocicas.gc(engine)  # the default grace period: everything is two hours old
        assert set(result.removed) == orphan_blobs
        assert (result.referrers, result.broken) == (frozenset(), frozenset())
        assert result.live == frozenset(sbom_blobs | {ABSENT.digest})
        assert set(await engine.list_blobs()) == sbom_blobs


async def put_referrer(engine: ocicas.Engine, subject: Descriptor, **annotations: str) -> Descriptor:
    """A referrer with an empty config and no layers, pointing at ``subject``."""
    await engine.put_blob(b"{}")
    data = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": EMPTY, "digest": sha256(b"{}"), "size": 2},
            "layers": [],
            "subject": subject.to_dict(),
            **({"annotations": annotations} if annotations else {}),
        }
    ).encode()
    digest, size = await engine.put_blob(data)
    return Descriptor(media_type=MANIFEST, digest=digest, size=size)


async def test_gc_keeps_the_referrers_of_a_live_subject_but_not_of_an_absent_one(engine: ocicas.Engine) -> None:
    image, image_blobs = await put_image(engine, [b"layer"])
    await engine.put_reference("v1", image)
    live = await put_referrer(engine, image)
    # a rooted referrer of the absent subject puts it in the graph: still, it keeps no other referrer of it
    signature = await put_referrer(engine, ABSENT)
    await engine.put_reference("sig", signature)
    another = await put_referrer(engine, ABSENT, n="2")
    result = await ocicas.gc(engine, grace_period=0)
    assert result.referrers == frozenset({live.digest})
    assert set(result.removed) == {another.digest}
    assert set(await engine.list_blobs()) == {*image_blobs, live.digest, signature.digest, sha256(b"{}")}


async def test_copy_brings_a_referrer_without_its_subject(layout: Fixture, tmp_path: Path) -> None:
    path, sbom, sbom_blobs, _, _ = layout
    for referrers in (False, True):
        dst_path = tmp_path / f"dst-{referrers}"
        await ocicas.create_layout(dst_path)
        async with await ocicas.open_layout(path) as src, await ocicas.open_layout(dst_path) as dst:
            result = await ocicas.copy(src, "sbom", dst, referrers=referrers)
            # the empty config travels embedded in its descriptor: copied from memory all the same
            assert (set(result.copied), result.skipped, result.referrers) == (sbom_blobs, (), ())
            assert await dst.get_reference("sbom") == sbom
            assert set(await dst.list_blobs()) == sbom_blobs
            report = await check_store(dst)
            assert report.problems == ()


async def test_fsck_notes_an_absent_subject_as_information(layout: Fixture) -> None:
    path, sbom, _, _, _ = layout
    async with await ocicas.open_layout(path) as engine:
        report = await check_store(engine)
    assert report.ok
    assert report.notes == (
        Problem(
            "absent-subject",
            ABSENT.digest,
            f"{MANIFEST} {ABSENT.digest}, subject of {sbom.digest} in reference 'sbom', is absent (weak: not damage)",
        ),
    )


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OCICAS_PROGRESS": "never"}
    return subprocess.run(
        [sys.executable, "-m", "ocicas", *map(str, args)], capture_output=True, text=True, env=env, timeout=60
    )


def test_the_commands_show_an_absent_subject_and_exit_0(layout: Fixture) -> None:
    path, sbom, _, _, _ = layout
    tree = run_cli("tree", f"{path}:sbom")
    assert (tree.returncode, tree.stderr) == (0, "")
    lines = tree.stdout.splitlines()
    assert lines[0] == f"sbom: {MANIFEST} {sbom.digest} {sbom.size} B"
    assert lines[-1] == f"└── subject: {MANIFEST} {ABSENT.digest} 527 B (subject absent (weak))"
    as_json = json.loads(run_cli("tree", "--json", f"{path}:sbom").stdout)
    assert [c["state"] for c in as_json[0]["root"]["children"]] == ["ok", "ok", "absent"]
    fsck = run_cli("fsck", path)
    assert fsck.returncode == 0
    assert fsck.stdout.splitlines()[0] == (
        f"note: {MANIFEST} {ABSENT.digest}, subject of {sbom.digest} in reference 'sbom', is absent (weak: not damage)"
    )
    fsck_json = json.loads(run_cli("fsck", "--json", path).stdout)
    assert (fsck_json["ok"], [n["kind"] for n in fsck_json["notes"]]) == (True, ["absent-subject"])
    assert run_cli("gc", path).returncode == 0
