"""The store from a plain trio program: nurseries, cancel scopes, and deadlines through ``ocicas.Context``.

    python examples/trio_program.py [LAYOUT_DIR]

Builds two images at once and tags them, reads them back concurrently (every
layer verified as it streams), abandons one slow upload with a trio cancel scope
and another with a context deadline (neither leaves anything behind), and
collects the garbage under a deadline.
"""

from __future__ import annotations

import io
import sys
import tarfile
import tempfile
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import trio

import ocicas

#: The two images: reference name -> files of its single layer.
IMAGES: dict[str, dict[str, bytes]] = {
    "app": {"bin/app": b"#!/bin/sh\necho app\n", "etc/app.conf": b"verbose = true\n"},
    "tools": {"bin/lint": b"#!/bin/sh\necho lint\n", "bin/fmt": b"#!/bin/sh\necho fmt\n"},
}
#: An upload nobody ever tags: garbage.
STRAY = b"an upload nobody tagged\n"


def tar_layer(files: dict[str, bytes]) -> bytes:
    """A reproducible tar archive of ``files``, built in memory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o755, 0
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


async def slow_source() -> AsyncIterator[bytes]:
    """An upload that sends one chunk, then stalls forever."""
    yield b"the first megabyte of something big\n"
    await trio.sleep_forever()


async def read_back(engine: ocicas.Engine, name: str, found: dict[str, list[str]]) -> None:
    """Record the files in the layers of image ``name``, reading every layer verified."""
    manifest = (await ocicas.from_descriptor(engine, await engine.get_reference(name))).data
    assert isinstance(manifest, ocicas.Manifest)
    names = []
    for layer in manifest.layers:
        async with await ocicas.from_descriptor(engine, layer) as blob:
            assert isinstance(blob.data, ocicas.BlobReader)
            data = await blob.data.read()  # raises if the bytes do not hash to the digest
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names += tar.getnames()
    found[name] = names


async def main(path: Path) -> None:
    await ocicas.create_layout(path)
    async with await ocicas.open_layout(path) as engine:
        async with trio.open_nursery() as nursery:  # both images are built at once
            for name, files in IMAGES.items():
                nursery.start_soon(partial(ocicas.build_image, engine, [tar_layer(files)], reference=name))
        print(f"tagged: {', '.join(await engine.list_references())}")

        await engine.put_blob(STRAY)
        before = await engine.list_blobs()

        with trio.move_on_after(0.2) as scope:  # trio's own cancellation
            await engine.put_blob(slow_source())
        print(f"upload abandoned by a cancel scope: {scope.cancelled_caught}")

        ctx = ocicas.Context.background().with_timeout(0.2)  # a deadline that travels with the call
        try:
            await engine.put_blob(slow_source(), ctx=ctx)
        except ocicas.DeadlineExceededError:
            print("upload stopped by its context's deadline")
        print(f"nothing half-written: {await engine.list_blobs() == before}")

        found: dict[str, list[str]] = {}
        async with trio.open_nursery() as nursery:  # both images read back at once
            for name in IMAGES:
                nursery.start_soon(read_back, engine, name, found)
        for name in sorted(found):
            print(f"{name}: {' '.join(found[name])}")

        ctx = ocicas.Context.background().with_timeout(30)
        result = await ocicas.gc(engine, grace_period=0, ctx=ctx)
        print(f"gc removed {' '.join(result.removed)}; {len(result.live)} blobs live")


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="ocicas-")) / "layout")
