"""A process that freshens blobs of a layout, for ``tests/test_gc_sweep.py``.

``python toucher.py BACKEND LAYOUT DIGEST...``: opens the layout, prints ``ready``,
touches the digests (``touch_blobs``, as ``ocicas.copy`` reuses blobs) and prints
the ones it freshened, one a line, then ``done``.
"""

from __future__ import annotations

import sys

import anyio

import ocicas


async def main(layout: str, digests: list[str]) -> None:
    async with await ocicas.open_layout(layout) as engine:
        print("ready", flush=True)
        touched = await engine.touch_blobs(digests)
    for digest in sorted(touched):
        print(digest)
    print("done", flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[2], sys.argv[3:], backend=sys.argv[1])
