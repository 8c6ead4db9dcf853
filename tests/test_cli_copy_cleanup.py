"""``ocicas copy`` that fails removes the destination layout it created, and only that."""

from __future__ import annotations

from pathlib import Path

from tests.test_cli import blob_files, blob_path, build_images, ocicas_run, out


def tree_of(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_failed_copy_removes_the_layout_it_created_with_the_parents_it_made(tmp_path: Path) -> None:
    images = build_images(tmp_path / "src")
    src = tmp_path / "src"
    blob_path(src, images.arm64_blobs[-1]).unlink()  # the source lacks a layer of v1
    (tmp_path / "out").mkdir()
    ocicas_run("copy", f"{src}:v1", tmp_path / "out" / "new" / "dst", code=3)
    assert list((tmp_path / "out").iterdir()) == []  # dst and its new parent "new" are gone; "out" was ours
    ocicas_run("copy", "--platform", "linux/s390x", f"{src}:v1", tmp_path / "none", code=3)
    assert not (tmp_path / "none").exists()
    # every reference: solo copies, then v1 fails; the layout this command created goes, solo's blobs too
    ocicas_run("copy", src, tmp_path / "all", code=3)
    assert not (tmp_path / "all").exists()


def test_a_failed_copy_leaves_a_layout_the_user_had_as_it_was(tmp_path: Path) -> None:
    images = build_images(tmp_path / "src")
    src, dst = tmp_path / "src", tmp_path / "dst"
    out("copy", f"{src}:solo", dst)
    before = tree_of(dst)
    blob_path(src, images.arm64_blobs[-1]).unlink()
    ocicas_run("copy", f"{src}:v1", dst, code=3)
    assert tree_of(dst) == before
    assert blob_files(dst) == set(images.solo_blobs)
    empty = tmp_path / "empty"
    out("init", empty)
    ocicas_run("copy", f"{src}:v1", empty, code=3)
    assert sorted(tree_of(empty)) == ["index.json", "oci-layout"]
