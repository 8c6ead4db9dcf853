"""Writes into a layout while the system refuses writes, for ``tests/test_disk_full.py``.

``python limited_writer.py fsize LAYOUT LIMIT BACKEND SOURCE``
    Under ``RLIMIT_FSIZE`` = ``LIMIT`` bytes (SIGXFSZ ignored, so a write past the
    limit fails with EFBIG instead of killing the process), try the steps below on
    an existing layout; the kernel-copy steps put blobs of the layout ``SOURCE``
    (on the same filesystem: ``copy_file_range``, then each fallback in turn).
``python limited_writer.py enospc LAYOUT SIZE BACKEND COPY_TO SOURCE``
    On a filesystem of ``SIZE`` bytes (the test mounts a tmpfs there in a private
    mount namespace), create a layout, put some data, then write past the free
    space, by a put and by a kernel copy from the layout ``SOURCE`` (on another
    filesystem: ``copy_file_range`` fails with EXDEV and ``sendfile`` takes over);
    finally copy the layout to ``COPY_TO`` for the test to inspect.

Every step prints one JSON line: ``{"step": ..., "error": class name or null,
"errno": ..., "message": ..., "temp_files": [...]}``, ``temp_files`` being what is
left in ``.ocicas-*`` directories right after the step.
"""

from __future__ import annotations

import functools
import json
import resource
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import anyio.to_thread

import ocicas
from ocicas._digest import Verifier
from ocicas._dir.clone import CopyMethod, clone_blob
from ocicas._dir.engine import DirEngine
from ocicas.testing import blob_bytes, sha256

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def descriptor(data: bytes) -> ocicas.Descriptor:
    return ocicas.Descriptor(media_type=MANIFEST, digest=sha256(data), size=len(data))


def temp_files(layout: Path) -> list[str]:
    return sorted(f"{d.name}/{f.name}" for d in layout.iterdir() if d.name.startswith(".ocicas-") for f in d.iterdir())


async def step(layout: Path, name: str, action: Callable[[], Awaitable[object]]) -> None:
    report: dict[str, object] = {"step": name, "error": None, "errno": None, "message": None}
    try:
        await action()
    except Exception as exc:
        report.update(error=type(exc).__name__, errno=getattr(exc, "errno", None), message=str(exc))
    report["temp_files"] = temp_files(layout)
    print(json.dumps(report), flush=True)


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def kernel_copy(engine: ocicas.Engine, source: Path, size: int, method: CopyMethod | None = None) -> None:
    """Put the blob of ``size`` bytes of the layout ``source``: the public path (the kernel copies the bytes
    by the first method that works), or ``clone_blob`` held to one ``method``."""
    async with await ocicas.open_layout(source) as origin:
        for digest in await origin.list_blobs():
            if await origin.stat_blob(digest) == size:
                break
        else:
            raise LookupError(f"no blob of {size} bytes in {source}")
        async with await origin.get_blob(digest) as reader:
            if method is None:
                await engine.put_blob(reader, expected_digest=digest, expected_size=size)
                return
            assert isinstance(engine, DirEngine)
            async with reader._borrow_file() as fd:
                assert fd is not None
                await clone_blob(engine, fd, size, Verifier(digest, size), methods=(method,))


async def under_fsize_limit(layout: Path, limit: int, source: Path) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    async with await ocicas.open_layout(layout) as engine:
        sizes = {d: await engine.stat_blob(d) for d in await engine.list_blobs()}
        existing = await engine.read_blob(max(sizes, key=sizes.__getitem__), max_size=None)
        await step(layout, "put at the limit", lambda: engine.put_blob(blob_bytes(limit, 1)))
        await step(layout, "put one byte over", lambda: engine.put_blob(blob_bytes(limit + 1, 2)))
        await step(layout, "put streamed far over", lambda: engine.put_blob(chunks(blob_bytes(3 << 20, 3), 100_000)))
        await step(layout, "put of present content over the limit", lambda: engine.put_blob(existing))
        await step(layout, "put_reference", lambda: engine.put_reference("new", descriptor(b"new"), partial=True))
        await step(
            layout,
            "update_references",
            lambda: engine.update_references({f"batch-{i}": descriptor(b"%d" % i) for i in range(10)}, partial=True),
        )
        await step(layout, "put under the limit", lambda: engine.put_blob(blob_bytes(limit // 2, 4)))
        big, small = 4 * limit, limit // 4  # the sizes of SOURCE's two blobs
        await step(layout, "kernel copy over the limit", lambda: kernel_copy(engine, source, big))
        methods: tuple[CopyMethod, ...] = ("sendfile", "pread")
        for method in methods:
            await step(
                layout, f"{method} copy over the limit", functools.partial(kernel_copy, engine, source, big, method)
            )
        await step(layout, "kernel copy under the limit", lambda: kernel_copy(engine, source, small))


async def on_a_full_disk(layout: Path, copy_to: Path, source: Path) -> None:
    await ocicas.create_layout(layout)
    filler = layout.parent / "filler"
    async with await ocicas.open_layout(layout) as engine:
        for i in range(300):  # an index.json of tens of KiB
            await engine.put_reference(f"tag-{i}", descriptor(b"%d" % i), partial=True)
        await engine.put_blob(blob_bytes(100_000, 5))
        await step(layout, "put larger than the disk", lambda: engine.put_blob(blob_bytes(16 << 20, 6)))

        def fill() -> None:
            with open(filler, "wb") as file:
                try:
                    while True:
                        file.write(bytes(1 << 16))
                        file.flush()
                except OSError:
                    pass

        await anyio.to_thread.run_sync(fill)
        await step(layout, "put on a full disk", lambda: engine.put_blob(blob_bytes(50_000, 7)))
        await step(layout, "kernel copy on a full disk", lambda: kernel_copy(engine, source, 16 << 20))
        await step(
            layout,
            "put_reference on a full disk",
            lambda: engine.put_reference("new", descriptor(b"new"), partial=True),
        )
        filler.unlink()
        await step(
            layout,
            "put_reference with room again",
            lambda: engine.put_reference("new", descriptor(b"new"), partial=True),
        )
    shutil.copytree(layout, copy_to, symlinks=True)


if __name__ == "__main__":
    mode, path, number, backend = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if mode == "fsize":
        anyio.run(under_fsize_limit, path, number, Path(sys.argv[5]), backend=backend)
    else:
        anyio.run(on_a_full_disk, path, Path(sys.argv[5]), Path(sys.argv[6]), backend=backend)
