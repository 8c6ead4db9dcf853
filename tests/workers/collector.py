"""A garbage-collecting process for ``tests/test_concurrency.py``.

``python collector.py LAYOUT RUNS HOLD_MS BACKEND [unlocked]``: opens the layout,
prints ``ready``, waits for a line on stdin (so collectors start together), then
runs ``ocicas.gc`` ``RUNS`` times with a policy that holds every decision for
``HOLD_MS`` milliseconds and vetoes it (so the garbage stays for the next run).
For each run it prints ``interval START END``: the ``time.monotonic()`` span of its
policy calls, which happen inside ``gc_lock``. ``unlocked`` replaces the engine's
``gc_lock`` with a no-op: the control that shows overlaps would be seen.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.to_thread

import ocicas


@asynccontextmanager
async def _no_lock(*, ctx: ocicas.Context | None = None) -> AsyncIterator[None]:
    yield


async def main(layout: str, runs: int, hold: float, unlocked: bool) -> None:
    async with await ocicas.open_layout(layout) as engine:
        if unlocked:
            engine.gc_lock = _no_lock  # type: ignore[method-assign]
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        for _ in range(runs):
            span: list[float] = []

            async def policy(digest: ocicas.Digest, span: list[float] = span) -> bool:
                span.append(time.monotonic())
                await anyio.sleep(hold)
                span.append(time.monotonic())
                return False

            await ocicas.gc(engine, grace_period=0, policy=policy)
            assert span, "the policy was never asked: no garbage to decide on"
            print(f"interval {min(span)} {max(span)}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    anyio.run(
        main,
        sys.argv[1],
        int(sys.argv[2]),
        float(sys.argv[3]) / 1000,
        sys.argv[5:] == ["unlocked"],
        backend=sys.argv[4],
    )
