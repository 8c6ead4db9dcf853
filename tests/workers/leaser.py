"""A process that holds a lease on a layout, for ``tests/test_tagging.py``.

``python leaser.py LAYOUT``: opens a lease, puts the bytes ``leased by PID`` inside
it, prints ``leased DIGEST`` and waits to be killed (or for a line on stdin, after
which it ends the lease and prints ``ended``).
"""

from __future__ import annotations

import os
import sys

import anyio
import anyio.to_thread

import ocicas


async def main(layout: str) -> None:
    async with await ocicas.open_layout(layout) as engine, engine.lease():
        digest, _ = await engine.put_blob(f"leased by {os.getpid()}".encode())
        print(f"leased {digest}", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
    print("ended", flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
