"""A process that collects a layout with no grace period, again and again, for ``tests/test_tagging.py``.

``python gc_loop.py LAYOUT SECONDS BACKEND``: prints ``ready``, then runs
``ocicas.gc(grace_period=0)`` until SECONDS have passed, printing ``removed N``
after each run; ``done RUNS`` at the end. With ``SECONDS`` of ``0`` it runs once.
"""

from __future__ import annotations

import sys
import time

import anyio

import ocicas


async def main(layout: str, seconds: float) -> None:
    runs = 0
    async with await ocicas.open_layout(layout) as engine:
        print("ready", flush=True)
        deadline = time.monotonic() + seconds
        while True:
            result = await ocicas.gc(engine, grace_period=0)
            runs += 1
            print(f"removed {len(result.removed)}", flush=True)
            if time.monotonic() >= deadline:
                break
    print(f"done {runs}", flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], float(sys.argv[2]), backend=sys.argv[3])
