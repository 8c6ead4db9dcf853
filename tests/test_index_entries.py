"""index.json entries parsed one by one: a malformed entry is refused on its own and kept as written.

The layouts are written by umoci (``umoci init`` and ``umoci new``), then given a
bad entry the way the image-spec's own schema fixture spells one
(``"mediaType": "invalid"``, pretty-printed), as another tool might leave it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ocicas
from ocicas import BrokenRoot, Descriptor, Digest
from ocicas._layout_format import IndexDocument
from ocicas.cli._fsck import Problem, check_store
from tests.images import put_image
from tests.tools import Tool, require

pytestmark = pytest.mark.anyio

#: The entry of the image-spec's ``mediatype_invalid_pattern`` schema fixture, as it is indented there.
BAD_DIGEST = "sha256:e692418e4cbaf90ca69d05a66403747baa33ee08806650b51fab815ad7fc331f"
BAD_ENTRY = (
    "{\n"
    '      "mediaType": "invalid",\n'
    '      "size": 7143,\n'
    f'      "digest": "{BAD_DIGEST}",\n'
    '      "platform": {"architecture": "ppc64le", "os": "linux"},\n'
    '      "annotations": {"org.opencontainers.image.ref.name": "bad"}\n'
    "    }"
)
BAD_ERROR = "invalid mediaType 'invalid'"
BAD_MESSAGE = f"index.json entry for reference 'bad': {BAD_ERROR}"


@pytest.fixture
def umoci() -> Tool:
    return require("umoci")


def with_bad_entry(layout: Path, entry: str = BAD_ENTRY, at: int = 1) -> bytes:
    """Rewrite ``layout``'s index.json pretty-printed, with ``entry`` as written inserted at position ``at``."""
    index = json.loads((layout / "index.json").read_bytes())
    texts = [json.dumps(e, indent=2) for e in index["manifests"]]
    texts.insert(at, entry)
    rest = {k: v for k, v in index.items() if k != "manifests"}
    data = "{\n" + "".join(f"  {json.dumps(k)}: {json.dumps(v)},\n" for k, v in rest.items())
    data += '  "manifests": [\n    ' + ",\n    ".join(texts) + "\n  ]\n}\n"
    (layout / "index.json").write_text(data)
    return data.encode()


async def umoci_layout(umoci: Tool, layout: Path) -> dict[str, Descriptor]:
    """A layout umoci wrote, with images ``v1`` and ``v2``; their descriptors."""
    await umoci.run("init", "--layout", layout)
    await umoci.run("new", "--image", f"{layout}:v1")
    await umoci.run("new", "--image", f"{layout}:v2")
    async with await ocicas.open_layout(layout) as engine:
        return {name: await engine.get_reference(name) for name in ("v1", "v2")}


async def test_the_other_names_list_and_resolve_and_the_bad_one_is_refused_naming_the_fault(
    tmp_path: Path, umoci: Tool
) -> None:
    layout = tmp_path / "layout"
    good = await umoci_layout(umoci, layout)
    with_bad_entry(layout)
    async with await ocicas.open_layout(layout) as engine:
        assert await engine.list_references() == ["bad", "v1", "v2"]
        assert {name: await engine.get_reference(name) for name in ("v1", "v2")} == good
        with pytest.raises(ocicas.InvalidError) as caught:
            await engine.get_reference("bad")
        assert str(caught.value) == BAD_MESSAGE
        roots = await engine.list_roots()
        assert [(r.annotations or {})[ocicas.ANNOTATION_REF_NAME] for r in roots] == ["v1", "v2"]
        assert await engine.list_broken_roots() == [BrokenRoot(1, "bad", Digest(BAD_DIGEST), BAD_ERROR)]
        paths = await ocicas.resolve_reference(engine, "v2")
        assert [p.descriptor for p in paths] == [good["v2"]]
        graph = await ocicas.walk(engine, roots)
        assert {good["v1"].digest, good["v2"].digest} <= graph.digests()
    assert sorted(await umoci.lines("ls", "--layout", layout)) == ["bad", "v1", "v2"]  # umoci lists it too


async def test_every_rewrite_keeps_the_bad_entry_byte_for_byte(tmp_path: Path, umoci: Tool) -> None:
    layout = tmp_path / "layout"
    good = await umoci_layout(umoci, layout)
    with_bad_entry(layout)
    async with await ocicas.open_layout(layout) as engine:
        await engine.put_reference("v3", good["v1"])  # an addition
        assert BAD_ENTRY.encode() in (layout / "index.json").read_bytes()
        await engine.delete_reference("v2")  # a removal: the index is rebuilt
        await engine.update_references({"v1": good["v2"]}, replace=True)  # a move
        data = (layout / "index.json").read_bytes()
        assert data.count(BAD_ENTRY.encode()) == 1
        assert await engine.list_references() == ["bad", "v1", "v3"]
        assert await engine.get_reference("v1") == good["v2"]
        with pytest.raises(ocicas.ClobberError) as clobber:  # the bad name holds something: not moved quietly
            await engine.put_reference("bad", good["v1"])
        assert str(clobber.value) == (
            f"reference 'bad' already holds an invalid entry ({BAD_ERROR}), not {good['v1'].digest}"
        )
        assert (layout / "index.json").read_bytes() == data
        await engine.update_references({"bad": good["v1"]}, replace=True)  # replacing it is allowed
        assert await engine.get_reference("bad") == good["v1"]
        assert await engine.list_broken_roots() == []
    assert BAD_ENTRY.encode() not in (layout / "index.json").read_bytes()
    assert sorted(await umoci.lines("ls", "--layout", layout)) == ["bad", "v1", "v3"]


def test_entries_as_read_are_written_back_as_read() -> None:
    good = '{ "mediaType" : "application/vnd.oci.image.manifest.v1+json", "digest": "' + BAD_DIGEST + '", "size": 3 }'
    data = f'{{ "schemaVersion": 2,\n "manifests": [ {good} ,\n\t{BAD_ENTRY}, 7, [] ] }}'.encode()
    document = IndexDocument.parse(data)
    assert document.serialize() == f'{{"schemaVersion":2,"manifests":[{good},{BAD_ENTRY},7,[]]}}'.encode()
    assert [(b.position, b.name, b.digest) for b in document.broken()] == [
        (1, "bad", BAD_DIGEST),
        (2, None, None),
        (3, None, None),
    ]
    assert [str(b) for b in document.broken()[1:]] == [
        "index.json entry #2: descriptor must be an object, not 7",
        "index.json entry #3: descriptor must be an object, not []",
    ]
    assert [r.digest for r in document.roots()] == [BAD_DIGEST]


async def test_gc_refuses_unless_broken_ok_and_then_keeps_the_entry_digest(tmp_path: Path, umoci: Tool) -> None:
    layout = tmp_path / "layout"
    good = await umoci_layout(umoci, layout)
    async with await ocicas.open_layout(layout) as engine:
        protected, protected_blobs = await put_image(engine, [b"what the bad entry names"])
        _, garbage_blobs = await put_image(engine, [b"garbage"])
    entry = BAD_ENTRY.replace(BAD_DIGEST, protected.digest)
    with_bad_entry(layout, entry, at=0)
    before = sorted(p.name for p in (layout / "blobs" / "sha256").iterdir())
    async with await ocicas.open_layout(layout) as engine:
        with pytest.raises(ocicas.InvalidError) as caught:
            await ocicas.gc(engine, grace_period=0)
        assert str(caught.value) == (
            "index.json entry for reference 'bad': " + BAD_ERROR + ": refusing to collect garbage while what it "
            "protects cannot be told (fix or remove the entry; broken_ok=True keeps only its digest, if readable)"
        )
        assert sorted(p.name for p in (layout / "blobs" / "sha256").iterdir()) == before
        result = await ocicas.gc(engine, grace_period=0, broken_ok=True)
        # the entry's own blob is kept as a leaf; what it points at is not protected (no guessing)
        assert set(result.removed) == set(protected_blobs[1:]) | set(garbage_blobs)
        assert protected.digest in result.broken
        assert await engine.stat_blob(protected.digest) == protected.size
        assert await engine.get_reference("v1") == good["v1"]
    assert (layout / "index.json").read_text().count(entry) == 1


async def test_an_entry_without_a_readable_digest_protects_nothing(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        kept, kept_blobs = await put_image(engine, [b"named"])
        await engine.put_reference("ok", kept)
        _, garbage = await put_image(engine, [b"garbage"])
    with_bad_entry(layout, '{"mediaType": "a/b", "digest": "sha256:abc", "size": 1}')
    async with await ocicas.open_layout(layout) as engine:
        [broken] = await engine.list_broken_roots()
        assert (broken.position, broken.name, broken.digest) == (1, None, None)
        assert (
            str(broken)
            == "index.json entry #1: invalid sha256 digest 'sha256:abc': expected lowercase hex of the right length"
        )
        with pytest.raises(ocicas.InvalidError):
            await ocicas.gc(engine, grace_period=0)
        result = await ocicas.gc(engine, grace_period=0, broken_ok=True)
        assert set(result.removed) == set(garbage)
        assert result.broken == frozenset()
        assert set(await engine.list_blobs()) == set(kept_blobs)


async def test_fsck_reports_the_bad_entry_and_checks_the_rest(tmp_path: Path, umoci: Tool) -> None:
    layout = tmp_path / "layout"
    await umoci_layout(umoci, layout)
    with_bad_entry(layout)
    async with await ocicas.open_layout(layout) as engine:
        report = await check_store(engine)
    assert report.problems == (Problem("invalid", "index.json manifests[1]", BAD_MESSAGE),)
    assert report.roots == 2


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OCICAS_PROGRESS": "never"}
    return subprocess.run(
        [sys.executable, "-m", "ocicas", *map(str, args)], capture_output=True, text=True, env=env, timeout=60
    )


async def test_the_commands_show_the_good_names_and_exit_4_naming_the_bad_entry(tmp_path: Path, umoci: Tool) -> None:
    layout = tmp_path / "layout"
    good = await umoci_layout(umoci, layout)
    data = with_bad_entry(layout)
    refs = run_cli("refs", layout)
    assert (refs.returncode, refs.stderr) == (4, f"ocicas: error: {BAD_MESSAGE}\n")
    assert [line.split()[:3] for line in refs.stdout.splitlines()] == [
        [name, good[name].media_type, good[name].digest] for name in ("v1", "v2")
    ]
    tree = run_cli("tree", layout)
    assert (tree.returncode, tree.stderr) == (4, f"ocicas: error: {BAD_MESSAGE}\n")
    assert [block.split(":")[0] for block in tree.stdout.split("\n\n")] == ["v1", "v2"]
    assert run_cli("tree", f"{layout}:v1").returncode == 0
    bad = run_cli("tree", f"{layout}:bad")
    assert (bad.returncode, bad.stdout, bad.stderr) == (4, "", f"ocicas: error: {BAD_MESSAGE}\n")
    fsck = run_cli("fsck", layout)
    assert fsck.returncode == 4
    assert fsck.stdout.splitlines()[0] == f"invalid: {BAD_MESSAGE}"
    gc = run_cli("gc", layout)
    assert gc.returncode == 4
    assert gc.stderr.startswith(f"ocicas: error: {BAD_MESSAGE}: refusing to collect garbage")
    assert (layout / "index.json").read_bytes() == data
