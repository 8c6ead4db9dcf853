"""What a tag's time under load is made of: ``put_reference`` split into phases and thread hops.

    python benchmarks/tag_phases.py [--dir DIR] [--seconds S] [--backend asyncio|trio] [BUILDERS ...]

Builders each store a small image and tag it, as ``run.py tagload`` does, while
the library's internals are wrapped to time each phase of the tags (the content
check, the reference update and its group commit) and each worker-thread hop a
tag makes: its wait for a thread (``queue``: the limiter, then the thread's start
and its turn at the GIL), its work (``run``) and the wait for the event loop to
resume the task (``resume``). Per phase: the mean time it adds to a tag, p50 and
p99 of each occurrence. The wrapping costs a few microseconds per hop; compare
runs of this script with each other, not with ``run.py``. Each run removes its
layout when done: on an ext4 without a journal that slows the next run's file
creations for minutes (see ``run.py``'s module doc), so give each run a fresh
``--dir`` (or wait).
"""

from __future__ import annotations

import argparse
import contextvars
import os
import resource
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

import ocicas
from ocicas import _threads
from ocicas._descriptor import Descriptor
from ocicas._dir import engine as dir_engine
from ocicas._dir import index as dir_index

_in_tag: contextvars.ContextVar[bool] = contextvars.ContextVar("in_tag", default=False)
_phases: dict[str, list[float]] = defaultdict(list)
_batches: list[int] = []


def _record(name: str, seconds: float) -> None:
    if _in_tag.get():
        _phases[name].append(seconds)


def _instrument() -> None:
    inner = _threads._run_in_thread

    async def hop(call: Callable[[], Any], limiter: anyio.CapacityLimiter | None = None) -> Any:
        job = None
        for cell in call.__closure__ or ():
            value = cell.cell_contents
            if isinstance(value, list) and value and callable(value[0]):
                job = value[0]
        name = getattr(job, "__qualname__", "?").replace("<locals>.", "")
        pool = "default" if limiter is None else "own"
        full = (limiter or anyio.to_thread.current_default_thread_limiter()).available_tokens == 0
        times: dict[str, float] = {}

        def timed() -> Any:
            times["start"] = time.perf_counter()
            try:
                return call()
            finally:
                times["end"] = time.perf_counter()

        submitted = time.perf_counter()
        try:
            return await inner(timed, limiter=limiter)
        finally:
            if "end" in times:
                _record(f"hop[{pool}] {name}: queue", times["start"] - submitted)
                _record(f"hop[{pool}] {name}: run", times["end"] - times["start"])
                _record(f"hop[{pool}] {name}: resume", time.perf_counter() - times["end"])
                _record(f"hops: queue, limiter {'full' if full else 'free'}", times["start"] - submitted)

    _threads._run_in_thread = hop  # type: ignore[assignment]

    def timed_entry(
        name: str, factory: Callable[[dir_engine.DirEngine], AbstractAsyncContextManager[None]]
    ) -> Callable[[dir_engine.DirEngine], AbstractAsyncContextManager[None]]:
        @asynccontextmanager
        async def wrapper(self: dir_engine.DirEngine) -> AsyncIterator[None]:
            start = time.perf_counter()
            async with factory(self):
                _record(name, time.perf_counter() - start)
                yield

        return wrapper

    engine_class: Any = dir_engine.DirEngine
    engine_class._gc_shared = timed_entry("collector's lock, shared: taking it", engine_class._gc_shared)

    engine_module: Any = dir_engine
    check = engine_module.check_closure

    async def timed_check(*args: Any) -> None:
        start = time.perf_counter()
        try:
            await check(*args)
        finally:
            _record("content check, the slow way (check_closure)", time.perf_counter() - start)

    engine_module.check_closure = timed_check

    update = engine_class._check_and_update_references

    async def timed_update(self: Any, changes: Mapping[str, Descriptor | None], replace: bool, targets: Any) -> None:
        start = time.perf_counter()
        try:
            await update(self, changes, replace, targets)
        finally:
            _record("reference update (check + group commit)", time.perf_counter() - start)

    engine_class._check_and_update_references = timed_update

    def timed_sync(owner: Any, attribute: str, name: str, on_batch: bool = False) -> None:
        inner = getattr(owner, attribute)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if on_batch:
                _batches.append(len(args[1]))
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                wall = time.perf_counter() - start
                _record(name, wall)
                # off this thread's CPU: the GIL, and system calls that block (fsync, a lock)
                _record(name + ", off-CPU", wall - (time.thread_time() - cpu))

        setattr(owner, attribute, wrapper)

    store: Any = dir_index.IndexStore
    timed_sync(engine_class, "_look_at_closure", "  in the hop: the look at the content (_look_at_closure)")
    timed_sync(store, "_commit", "  in the hop: a rewrite run (lock, rewrite, directory fsync)", on_batch=True)
    timed_sync(store, "_rewrite", "    in the rewrite: under the flock (load, apply, write)")
    timed_sync(store, "_write", "    in the rewrite: temp file written, fsynced, renamed")


def _run(root: str, seconds: float, builders: int, backend: str) -> None:
    layout = tempfile.mkdtemp(prefix="tag-phases-", dir=root)
    os.rmdir(layout)
    anyio.run(ocicas.create_layout, layout)
    latencies: list[float] = []
    loop_cpu: list[float] = []
    turns: list[float] = []

    async def main() -> None:
        started = time.thread_time()
        async with await ocicas.open_layout(layout) as engine:
            deadline = time.perf_counter() + seconds

            async def builder(worker: int) -> None:
                n = 0
                while time.perf_counter() < deadline:
                    image = await ocicas.build_image(engine, [f"{worker}/{n}".encode() + os.urandom(512)])
                    token = _in_tag.set(True)
                    start = time.perf_counter()
                    await engine.put_reference(f"b{worker}-{n}", image)
                    latencies.append(time.perf_counter() - start)
                    _in_tag.reset(token)
                    n += 1

            async def probe() -> None:  # how long a task that is ready waits for its turn on the loop
                while time.perf_counter() < deadline:
                    start = time.perf_counter()
                    await anyio.lowlevel.cancel_shielded_checkpoint()
                    turns.append(time.perf_counter() - start)
                    await anyio.sleep(0.005)

            async with anyio.create_task_group() as tg:
                tg.start_soon(probe)
                for worker in range(builders):
                    tg.start_soon(builder, worker)
        loop_cpu.append(time.thread_time() - started)

    before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    anyio.run(main, backend=backend)
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall
    shutil.rmtree(layout)
    latencies.sort()
    n = len(latencies)
    with open("/proc/loadavg") as file:
        load = file.read().split()[0]
    print(
        f"== {builders} builders, {root}, {backend}: {n} tags, {n / seconds:.1f}/s, "
        f"p50 {latencies[n // 2] * 1e3:.1f} ms, p99 {latencies[min(n - 1, int(n * 0.99))] * 1e3:.1f} ms; "
        f"{len(_batches)} commits of {statistics.mean(_batches) if _batches else 0:.1f} updates; load {load}"
    )
    print(
        f"   wall {wall:.2f} s; process CPU user {after.ru_utime - before.ru_utime:.2f} s, "
        f"system {after.ru_stime - before.ru_stime:.2f} s; event-loop thread {loop_cpu[0]:.2f} s; "
        f"context switches {after.ru_nvcsw - before.ru_nvcsw} voluntary, {after.ru_nivcsw - before.ru_nivcsw} forced"
    )
    turns.sort()
    print(
        f"   a ready task's wait for its loop turn: p50 {turns[len(turns) // 2] * 1e3:.1f} ms, "
        f"p99 {turns[int(len(turns) * 0.99)] * 1e3:.1f} ms, max {turns[-1] * 1e3:.1f} ms"
    )
    print(f"   {'phase':66s} {'count':>6s} {'per tag':>9s} {'p50':>9s} {'p99':>9s}  (ms)")
    for name in sorted(_phases, key=lambda k: -sum(_phases[k])):
        values = sorted(_phases[name])
        p50, p99 = values[len(values) // 2], values[min(len(values) - 1, int(len(values) * 0.99))]
        print(f"   {name:66s} {len(values):6d} {sum(values) / n * 1e3:9.2f} {p50 * 1e3:9.2f} {p99 * 1e3:9.2f}")
    _phases.clear()
    _batches.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("builders", nargs="*", type=int, default=[50])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = parser.parse_args()
    _instrument()
    for builders in args.builders:
        _run(args.dir, args.seconds, builders, args.backend)


if __name__ == "__main__":
    main()
