"""Store a small OCI image in a layout, tag it, and read it back.

    python examples/quickstart.py [LAYOUT_DIR]

Runs on asyncio; pass ``--trio`` to run the same code on trio.
"""

from __future__ import annotations

import io
import sys
import tarfile
import tempfile
from pathlib import Path

import anyio

import ocicas


def make_layer() -> bytes:
    """A tar archive holding one file (built in memory, no disk I/O)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        content = b"hello from ocicas\n"
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mode, info.mtime = len(content), 0o644, 0
        tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


async def main(path: Path) -> None:
    await ocicas.create_layout(path)
    async with await ocicas.open_layout(path) as engine:
        layer = make_layer()
        layer_digest, layer_size = await engine.put_blob(layer)
        config = {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "config": {"Cmd": ["/bin/cat", "/hello.txt"]},
        }
        config_digest, config_size = await engine.put_blob_json(config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_size,
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}
            ],
        }
        manifest_digest, manifest_size = await engine.put_blob_json(manifest)
        await engine.put_reference(
            "latest",
            ocicas.Descriptor(
                media_type="application/vnd.oci.image.manifest.v1+json", digest=manifest_digest, size=manifest_size
            ),
        )

        descriptor = await engine.get_reference("latest")
        print(f"latest -> {descriptor.digest} ({descriptor.size} bytes)")
        async with await engine.get_blob(layer_digest) as reader:
            received = b"".join([chunk async for chunk in reader])
        print(f"layer {layer_digest}: {len(received)} bytes, verified")
        print(f"blobs: {len(await engine.list_blobs())}, references: {await engine.list_references()}")
    print(f"layout written to {path}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--trio"]
    target = Path(args[0]) if args else Path(tempfile.mkdtemp(prefix="ocicas-")) / "layout"
    anyio.run(main, target, backend="trio" if "--trio" in sys.argv else "asyncio")
