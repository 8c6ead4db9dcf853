"""Disk full and file too large: a clear error, no partial blob, no temporary file, nothing else harmed.

``RLIMIT_FSIZE`` (with SIGXFSZ ignored) makes every write past the limit fail with
EFBIG, as a quota or a small filesystem would; a tmpfs of a few MiB mounted in a
private mount namespace (root only) makes them fail with ENOSPC. The writes run in
a subprocess (``tests/workers/limited_writer.py``) on both backends. ocicas
documents that operating-system failures propagate as the ``OSError`` the system
raised: that is the "clear error" expected here, with the temporary file removed
at once and the layout exactly as it was. The same holds when the kernel copies a
blob from another layout (``copy_file_range``, ``sendfile`` or ``pread``/``pwrite``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import ocicas
from ocicas.testing import blob_bytes, sha256

pytestmark = pytest.mark.anyio

#: RLIMIT_FSIZE given to the writer, in bytes (the layout's index.json is made larger than this).
FSIZE_LIMIT = 64 << 10
#: Size of the tmpfs the ENOSPC test fills, in bytes.
TMPFS_SIZE = 4 << 20
WORKER = Path(__file__).parent / "workers" / "limited_writer.py"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def identity(layout: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every file in the layout (temporary directories excepted) with its inode, size, mtime and hash."""
    out = {}
    for path in sorted(layout.rglob("*")):
        relative = path.relative_to(layout)
        if relative.parts[0].startswith(".ocicas-") or not path.is_file():
            continue
        st = path.stat()
        out[str(relative)] = (st.st_ino, st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def verify_blobs(layout: Path) -> set[str]:
    found = set()
    for path in (layout / "blobs" / "sha256").iterdir():
        assert path.is_file()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, f"{path.name} is damaged or partial"
        found.add(f"sha256:{path.name}")
    return found


async def run_worker(*args: object) -> tuple[int, list[dict[str, Any]], str]:
    result = await anyio.run_process([*map(str, args)], check=False)
    steps = [json.loads(line) for line in result.stdout.decode().splitlines() if line.startswith("{")]
    return result.returncode, steps, result.stderr.decode()


async def test_writes_over_the_file_size_limit_fail_cleanly(tmp_path: Path, anyio_backend: str) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        await engine.update_references(  # an index.json over the limit, so rewriting it fails too
            {
                f"existing-{i}": ocicas.Descriptor(media_type=MANIFEST, digest=sha256(b"%d" % i), size=1)
                for i in range(FSIZE_LIMIT // 150)
            },
            partial=True,  # only the size of index.json matters here
        )
        big = blob_bytes(FSIZE_LIMIT * 4, seed=11)  # present already, and over the limit
        await engine.put_blob(big)
        await engine.put_blob(b"small and old")
    assert (layout / "index.json").stat().st_size > FSIZE_LIMIT
    source = await source_layout(tmp_path / "source", FSIZE_LIMIT * 4, FSIZE_LIMIT // 4)
    before = identity(layout)

    code, steps, stderr = await run_worker(sys.executable, WORKER, "fsize", layout, FSIZE_LIMIT, anyio_backend, source)
    assert code == 0, stderr
    outcome = {s["step"]: (s["error"], s["errno"]) for s in steps}
    too_big = ("OSError", errno.EFBIG)
    assert outcome == {
        "put at the limit": (None, None),
        "put one byte over": too_big,
        "put streamed far over": too_big,
        "put of present content over the limit": too_big,
        "put_reference": too_big,
        "update_references": too_big,
        "put under the limit": (None, None),
        "kernel copy over the limit": too_big,
        "sendfile copy over the limit": too_big,
        "pread copy over the limit": too_big,
        "kernel copy under the limit": (None, None),
    }, stderr
    for s in steps:
        assert s["temp_files"] == [], f"{s['step']} left {s['temp_files']}"
    assert not [p for p in layout.iterdir() if p.name.startswith(".ocicas-")]

    after = identity(layout)
    added = {name for name in after if name not in before}
    assert added == {
        f"blobs/sha256/{sha256(blob_bytes(size, seed)).encoded}"
        for size, seed in ((FSIZE_LIMIT, 1), (FSIZE_LIMIT // 2, 4), (FSIZE_LIMIT // 4, 21))
    }
    for name, value in before.items():
        assert after[name] == value, f"{name} changed"
    verify_blobs(layout)


async def source_layout(path: Path, *sizes: int) -> Path:
    """A layout holding one blob of each of ``sizes`` (``blob_bytes(size, seed=20 + i)``), for kernel copies."""
    await ocicas.create_layout(path)
    async with await ocicas.open_layout(path) as engine:
        for i, size in enumerate(sizes):
            await engine.put_blob(blob_bytes(size, seed=20 + i))
    return path


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and sys.platform == "linux"


@pytest.mark.skipif(not can_mount(), reason="needs root and unshare(1) to mount a small tmpfs privately")
async def test_writes_on_a_full_disk_fail_cleanly(tmp_path: Path, anyio_backend: str) -> None:
    mount = tmp_path / "mnt"
    mount.mkdir()
    copy = tmp_path / "copy"
    source = await source_layout(tmp_path / "source", 16 << 20)  # on another filesystem than the tmpfs
    script = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
    code, steps, stderr = await run_worker(
        "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", TMPFS_SIZE, mount,
        sys.executable, WORKER, "enospc", mount / "layout", TMPFS_SIZE, anyio_backend, copy, source,
    )  # fmt: skip
    if code != 0 and not steps and "mount" in stderr:
        pytest.skip(f"cannot mount a tmpfs here: {stderr.strip()[:200]}")
    assert code == 0, stderr
    full = ("OSError", errno.ENOSPC)
    outcome = {s["step"]: (s["error"], s["errno"]) for s in steps}
    assert outcome == {
        "put larger than the disk": full,
        "put on a full disk": full,
        "kernel copy on a full disk": full,
        "put_reference on a full disk": full,
        "put_reference with room again": (None, None),
    }, stderr
    for s in steps:
        assert s["temp_files"] == [], f"{s['step']} left {s['temp_files']}"
    assert not [p for p in copy.iterdir() if p.name.startswith(".ocicas-")]
    assert verify_blobs(copy) == {sha256(blob_bytes(100_000, 5))}
    async with await ocicas.open_layout(copy) as engine:
        assert len(await engine.list_references()) == 301
        assert (await engine.get_reference("new")).digest == sha256(b"new")
