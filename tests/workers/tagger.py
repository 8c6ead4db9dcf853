"""A tagging process for ``tests/test_concurrency.py``.

``python tagger.py LAYOUT WORKER COUNT BACKEND``: opens the layout, prints
``ready``, waits for a line on stdin (so every tagger starts at once), then calls
``put_reference`` ``COUNT`` times, one reference per call (``wWORKER-I`` naming a
manifest descriptor whose digest is that of ``b"WORKER-I"``), and prints ``done``.
"""

from __future__ import annotations

import sys

import anyio
import anyio.to_thread

import ocicas
from ocicas.testing import sha256

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def descriptor(worker: int, i: int) -> ocicas.Descriptor:
    data = f"{worker}-{i}".encode()
    return ocicas.Descriptor(media_type=MANIFEST, digest=sha256(data), size=len(data))


async def main(layout: str, worker: int, count: int) -> None:
    async with await ocicas.open_layout(layout) as engine:
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        for i in range(count):
            await engine.put_reference(f"w{worker}-{i}", descriptor(worker, i), partial=True)  # index.json load only
    print("done", flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), backend=sys.argv[4])
