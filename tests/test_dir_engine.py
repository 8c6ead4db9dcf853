"""Behaviour specific to the directory engine: the files on disk and what they may hold."""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from blockbuster import BlockingError

import ocicas
from ocicas._dir import engine as _dir_engine
from ocicas.testing import blob_bytes, sha256

pytestmark = pytest.mark.anyio

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
EMPTY_INDEX = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}'


def descriptor(data: bytes, **fields: object) -> ocicas.Descriptor:
    return ocicas.Descriptor(media_type=MANIFEST, digest=sha256(data), size=len(data), **fields)  # type: ignore[arg-type]


@pytest.fixture
async def layout(tmp_path: Path) -> Path:
    path = tmp_path / "layout"
    await ocicas.create_layout(path)
    return path


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, encoded = digest.split(":")
    return layout / "blobs" / algorithm / encoded


def visible_files(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# -- creating and opening ------------------------------------------------------------------


async def test_create_layout_writes_exactly_the_layout_files(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "layout"
    await ocicas.create_layout(path)
    assert visible_files(path) == {"oci-layout", "index.json", "blobs", "blobs/sha256"}
    assert (path / "oci-layout").read_bytes() == b'{"imageLayoutVersion":"1.0.0"}'
    assert (path / "index.json").read_bytes() == EMPTY_INDEX


async def test_create_layout_refuses_an_existing_path(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep").write_bytes(b"mine")
    with pytest.raises(ocicas.LayoutExistsError) as info:
        await ocicas.create_layout(tmp_path / "taken")
    assert isinstance(info.value, FileExistsError)
    assert "taken" in str(info.value)
    assert visible_files(tmp_path / "taken") == {"keep"}


async def test_open_layout_of_a_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ocicas.LayoutNotFoundError) as info:
        await ocicas.open_layout(tmp_path / "nothing")
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "oci-layout").unlink(), "no oci-layout"),
        (lambda p: (p / "oci-layout").write_text('{"imageLayoutVersion":"2.0.0"}'), "2.0.0"),
        (lambda p: (p / "oci-layout").write_text("{"), "not valid JSON"),
        (lambda p: (p / "index.json").unlink(), "no index.json"),
        (lambda p: (p / "index.json").write_text('{"schemaVersion":2,"manifests":{}}'), "not an array"),
        (lambda p: (p / "index.json").write_text('{"schemaVersion":1,"manifests":[]}'), "schemaVersion"),
        (lambda p: (p / "index.json").write_text('{"manifests":[],"manifests":[]}'), "duplicate"),
        (lambda p: (p / "index.json").write_text("[" * 100000), "not valid JSON"),
        (lambda p: (p / "blobs" / "sha256").rmdir() or (p / "blobs").rmdir(), "no blobs"),
        (lambda p: (p / "blobs" / "sha256").rmdir() or (p / "blobs").rmdir() or (p / "blobs").write_text(""), "blobs"),
    ],
)
async def test_open_layout_refuses_invalid_layouts(layout: Path, damage: object, message: str) -> None:
    damage(layout)  # type: ignore[operator]
    with pytest.raises(ocicas.InvalidError, match=message):
        await ocicas.open_layout(layout)


async def test_open_layout_of_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ocicas.InvalidError, match="not a directory"):
        await ocicas.open_layout(tmp_path / "file")


async def test_index_with_null_manifests_opens_and_is_rewritten_as_an_array(layout: Path) -> None:
    (layout / "index.json").write_text('{"schemaVersion":2,"manifests":null}')
    async with await ocicas.open_layout(layout) as engine:
        assert await engine.list_references() == []
        await engine.put_reference("v1", descriptor(b"m"), partial=True)
    written = json.loads((layout / "index.json").read_bytes())
    assert written["manifests"] == [descriptor(b"m").to_dict() | {"annotations": {ocicas.ANNOTATION_REF_NAME: "v1"}}]


async def test_rewrites_keep_unknown_fields_annotations_and_unnamed_entries(layout: Path) -> None:
    unnamed = {"mediaType": MANIFEST, "digest": sha256(b"u"), "size": 1, "com.example.extra": {"x": [1]}}
    named = {
        "mediaType": MANIFEST,
        "digest": sha256(b"n"),
        "size": 1,
        "annotations": {ocicas.ANNOTATION_REF_NAME: "old", "org.example.note": "kept"},
    }
    original = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [unnamed, named],
        "annotations": {"org.example.index": "yes"},
        "com.example.top": True,
    }
    (layout / "index.json").write_text(json.dumps(original))
    async with await ocicas.open_layout(layout) as engine:
        await engine.put_reference("new", descriptor(b"new"), partial=True)
        await engine.delete_reference("absent")
        assert await engine.get_reference("old") == ocicas.Descriptor.from_dict(
            {**named, "annotations": {"org.example.note": "kept"}}
        )
    new_entry = descriptor(b"new").to_dict() | {"annotations": {ocicas.ANNOTATION_REF_NAME: "new"}}
    assert json.loads((layout / "index.json").read_bytes()) == {**original, "manifests": [unnamed, named, new_entry]}


async def test_unknown_files_in_the_layout_are_ignored(layout: Path) -> None:
    (layout / "README").write_text("hi")
    (layout / "blobs" / "md5").mkdir()
    (layout / "blobs" / "md5" / "abc").write_text("x")
    (layout / "blobs" / "sha256" / "not-a-digest").write_text("x")
    (layout / "blobs" / "sha256" / ("A" * 64)).write_text("x")
    (layout / "blobs" / "sha256" / ("a" * 64)).mkdir()
    async with await ocicas.open_layout(layout) as engine:
        digest, _ = await engine.put_blob(b"real")
        assert await engine.list_blobs() == [digest]


# -- blobs on disk -------------------------------------------------------------------------


async def test_blobs_are_stored_by_digest_with_normal_permissions(layout: Path) -> None:
    old = os.umask(0o022)
    try:
        async with await ocicas.open_layout(layout) as engine:
            digest, _ = await engine.put_blob(b"content")
            sha512 = ocicas.Digest("sha512:" + __import__("hashlib").sha512(b"content").hexdigest())
            await engine.put_blob(b"content", expected_digest=sha512)
    finally:
        os.umask(old)
    path = blob_path(layout, digest)
    assert path.read_bytes() == b"content"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert blob_path(layout, sha512).read_bytes() == b"content"
    assert visible_files(layout / "blobs") == {
        "sha256",
        "sha512",
        f"sha256/{digest.encoded}",
        f"sha512/{sha512.encoded}",
    }


async def test_put_of_a_present_blob_freshens_it_without_rewriting(layout: Path) -> None:
    async with await ocicas.open_layout(layout) as engine:
        digest, _ = await engine.put_blob(b"old")
        path = blob_path(layout, digest)
        os.utime(path, (1_000_000, 1_000_000))
        inode = path.stat().st_ino
        await engine.put_blob(b"old")
        assert path.stat().st_ino == inode
        assert path.stat().st_mtime > 1_000_000


async def test_put_replaces_a_damaged_copy_of_the_wrong_size(layout: Path) -> None:
    async with await ocicas.open_layout(layout) as engine:
        digest, _ = await engine.put_blob(b"good bytes")
        blob_path(layout, digest).write_bytes(b"bad")
        await engine.put_blob(b"good bytes")
        assert await engine.read_blob(digest) == b"good bytes"


@pytest.mark.parametrize(
    ("corrupt", "error"),
    [
        (lambda b: bytes([b[0] ^ 1]) + b[1:], ocicas.DigestMismatchError),
        (lambda b: b[:-1], ocicas.DigestMismatchError),  # by digest alone, the file's size is all we know
        (lambda b: b + b"!", ocicas.DigestMismatchError),
        (lambda b: b"x" * len(b), ocicas.DigestMismatchError),
    ],
    ids=["bit-flip", "truncated", "extended", "replaced"],
)
async def test_every_read_path_refuses_a_corrupt_blob(layout: Path, corrupt: object, error: type[Exception]) -> None:
    data = blob_bytes(2 * ocicas.CHUNK_SIZE + 10)
    async with await ocicas.open_layout(layout) as engine:
        digest, size = await engine.put_blob(data)
        path = blob_path(layout, digest)
        path.write_bytes(corrupt(data))  # type: ignore[operator]
        with pytest.raises(error):
            await engine.read_blob(digest, max_size=None)
        received: list[bytes] = []

        async def stream() -> None:
            async with await engine.get_blob(digest) as reader:
                async for chunk in reader:
                    received.append(chunk)

        with pytest.raises(error):
            await stream()
        assert sum(map(len, received)) < size  # the completing chunk is never handed out


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
async def test_blob_paths_that_are_not_regular_files_are_refused(layout: Path, tmp_path: Path, kind: str) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"outside")
    digest = sha256(b"outside")
    path = blob_path(layout, digest)
    if kind == "symlink":
        path.symlink_to(secret)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    async with await ocicas.open_layout(layout) as engine:
        with anyio.fail_after(10):
            for call in (engine.get_blob, engine.read_blob, engine.stat_blob):
                with pytest.raises(ocicas.InvalidError):
                    await call(digest)
            with pytest.raises(ocicas.InvalidError):
                await engine.put_blob(b"outside")
        assert await engine.list_blobs() == []
    assert secret.read_bytes() == b"outside"


async def test_a_symlinked_blobs_directory_is_refused(layout: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    (layout / "blobs").rename(elsewhere)
    (layout / "blobs").symlink_to(elsewhere)
    with pytest.raises(ocicas.InvalidError, match="symlink"):
        await ocicas.open_layout(layout)


async def test_a_symlinked_index_is_refused(layout: Path, tmp_path: Path) -> None:
    (layout / "index.json").rename(tmp_path / "index.json")
    (layout / "index.json").symlink_to(tmp_path / "index.json")
    with pytest.raises(ocicas.InvalidError, match="symlink"):
        await ocicas.open_layout(layout)


async def test_blobs_replaced_by_a_symlink_after_opening_are_refused(layout: Path, tmp_path: Path) -> None:
    async with await ocicas.open_layout(layout) as engine:
        digest, _ = await engine.put_blob(b"x")
        (layout / "blobs").rename(tmp_path / "moved")
        (layout / "blobs").symlink_to(tmp_path / "moved")
        with pytest.raises(ocicas.InvalidError, match="symlink"):
            await engine.read_blob(digest)
        with pytest.raises(ocicas.InvalidError, match="symlink"):
            await engine.put_blob(b"y")
    assert visible_files(tmp_path / "moved") == {"sha256", f"sha256/{digest.encoded}"}


# -- temporary files and engine gc -----------------------------------------------------------


async def test_temporary_directory_lives_with_the_engine(layout: Path) -> None:
    async with await ocicas.open_layout(layout) as engine:
        assert not [p for p in layout.iterdir() if p.name.startswith(".ocicas-")]  # created lazily
        await engine.put_blob(b"x")
        temps = [p for p in layout.iterdir() if p.name.startswith(".ocicas-")]
        assert len(temps) == 1
        assert list(temps[0].iterdir()) == []
    assert {p.name for p in layout.iterdir()} == {"oci-layout", "index.json", "blobs"}


async def test_cancelled_put_leaves_no_temporary_file(layout: Path) -> None:
    ctx = ocicas.Context.background()
    seen: list[str] = []

    async def source() -> AsyncIterator[bytes]:
        for _ in range(3):  # past one pipeline batch: the writer creates the temp file
            yield b"a" * ocicas.CHUNK_SIZE
        with anyio.fail_after(10):
            while not seen:  # looked at from a thread: this runs inside put_blob, on the event loop
                seen.extend(
                    await anyio.to_thread.run_sync(
                        lambda: [p.name for t in layout.glob(".ocicas-*") for p in t.iterdir()]
                    )
                )
                await anyio.sleep(0.005)
        ctx.cancel()
        yield b"b"

    async with await ocicas.open_layout(layout) as engine:
        with pytest.raises(ocicas.ContextCancelledError):
            await engine.put_blob(source(), ctx=ctx)
        assert seen[0].startswith("blob-")
        temps = [p for p in layout.iterdir() if p.name.startswith(".ocicas-")]
        assert [list(t.iterdir()) for t in temps] == [[]]
        assert await engine.list_blobs() == []


async def test_engine_gc_removes_dead_engines_files_only(layout: Path) -> None:
    dead = layout / ".ocicas-deadbeefdeadbeef"
    dead.mkdir()
    (dead / "blob-0123").write_bytes(b"partial")
    other_tool = layout / ".umoci-123"
    other_tool.mkdir()
    (other_tool / "x").write_bytes(b"theirs")
    async with await ocicas.open_layout(layout) as live, await ocicas.open_layout(layout) as engine:
        await live.put_blob(b"live")  # holds its own flock-ed temp dir
        live_temp = live._temp_name
        await engine.put_blob(b"mine")
        await engine.gc()
        names = {p.name for p in layout.iterdir()}
        assert names == {"oci-layout", "index.json", "blobs", ".umoci-123", live_temp, engine._temp_name}
        assert (other_tool / "x").read_bytes() == b"theirs"
        assert await engine.list_blobs() == sorted([sha256(b"live"), sha256(b"mine")])


# -- index.json ---------------------------------------------------------------------------


async def test_index_changes_made_by_others_are_seen(layout: Path) -> None:
    async with await ocicas.open_layout(layout) as engine:
        await engine.put_reference("a", descriptor(b"a"), partial=True)
        async with await ocicas.open_layout(layout) as other:
            await other.put_reference("b", descriptor(b"b"), partial=True)
        assert await engine.list_references() == ["a", "b"]
        (layout / "index.json").write_bytes(EMPTY_INDEX)
        assert await engine.list_references() == []


async def test_batch_updates_rewrite_the_index_once(layout: Path) -> None:
    async with await ocicas.open_layout(layout) as engine:
        inode = (layout / "index.json").stat().st_ino
        await engine.update_references({f"t{i}": descriptor(str(i).encode()) for i in range(1000)}, partial=True)
        assert (layout / "index.json").stat().st_ino != inode
        assert len(json.loads((layout / "index.json").read_bytes())["manifests"]) == 1000
        inode = (layout / "index.json").stat().st_ino
        await engine.put_reference("t5", descriptor(b"5"), partial=True)  # no change: no rewrite
        assert (layout / "index.json").stat().st_ino == inode


async def test_a_refused_reference_change_leaves_the_index_untouched(layout: Path) -> None:
    async with await ocicas.open_layout(layout) as engine:
        await engine.put_reference("tag", descriptor(b"one"), partial=True)
        before = (layout / "index.json").read_bytes()
        with pytest.raises(ocicas.ClobberError):
            await engine.put_reference("tag", descriptor(b"two"), partial=True)
        with pytest.raises(ocicas.InvalidError):
            await engine.put_reference("../x", descriptor(b"two"), partial=True)
    assert (layout / "index.json").read_bytes() == before


TAGGER = textwrap.dedent(
    """
    import sys, anyio, ocicas
    from ocicas.testing import sha256

    MANIFEST = "application/vnd.oci.image.manifest.v1+json"

    async def main(path, worker, count):
        async with await ocicas.open_layout(path) as engine:
            for i in range(count):
                data = f"{worker}-{i}".encode()
                await engine.put_reference(
                    f"w{worker}-{i}",
                    ocicas.Descriptor(media_type=MANIFEST, digest=sha256(data), size=len(data)),
                    partial=True,
                )

    anyio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    """
)

PROCESSES = 4
TAGS_PER_PROCESS = 50


async def test_processes_tagging_at_once_lose_nothing(layout: Path) -> None:
    async def tagger(worker: int) -> None:
        await anyio.run_process(
            [sys.executable, "-c", TAGGER, str(layout), str(worker), str(TAGS_PER_PROCESS)], check=True
        )

    async with anyio.create_task_group() as tg:
        for worker in range(PROCESSES):
            tg.start_soon(tagger, worker)
    async with await ocicas.open_layout(layout) as engine:
        expected = sorted(f"w{w}-{i}" for w in range(PROCESSES) for i in range(TAGS_PER_PROCESS))
        assert await engine.list_references() == expected
        assert (await engine.get_reference("w2-7")).digest == sha256(b"2-7")


# -- the event loop never blocks -------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # blockbuster watches asyncio loops
async def test_blocking_calls_on_the_event_loop_are_caught(tmp_path: Path) -> None:
    with pytest.raises(BlockingError):
        _dir_engine._create_layout(tmp_path / "x")  # the synchronous half, called on the loop


async def test_a_verified_reader_is_trusted_but_still_refuses_bad_content(tmp_path: Path) -> None:
    data = blob_bytes(3 * ocicas.CHUNK_SIZE + 5)
    await ocicas.create_layout(tmp_path / "a")
    await ocicas.create_layout(tmp_path / "b")
    async with await ocicas.open_layout(tmp_path / "a") as src, await ocicas.open_layout(tmp_path / "b") as dst:
        digest, size = await src.put_blob(data)
        async with await src.get_blob(digest) as reader:
            assert reader.vouches_for(digest, size)
            assert await dst.put_blob(reader, expected_digest=digest, expected_size=size) == (digest, size)
        assert await dst.read_blob(digest, max_size=None) == data
        await dst.delete_blob(digest)
        blob_path(tmp_path / "a", digest).write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, one bit off
        async with await src.get_blob(digest) as reader:
            with pytest.raises(ocicas.DigestMismatchError):
                await dst.put_blob(reader, expected_digest=digest, expected_size=size)
        assert await dst.list_blobs() == []
        async with await src.get_blob(digest) as reader:
            assert not reader.vouches_for(sha256(b"other"), size)  # another digest: hashed as usual
            with pytest.raises(ocicas.DigestMismatchError):
                await dst.put_blob(reader, expected_digest=sha256(b"other"))
