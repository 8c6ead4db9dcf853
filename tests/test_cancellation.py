"""Cancellation at every checkpoint in turn leaves the store consistent and nothing behind.

Each operation (``put_blob``, ``put_reference``, a batched ``update_references``,
``from_descriptor``, ``walk``, ``gc``) is run again and again against one layout,
and cancelled at its k-th checkpoint for k = 0, 1, 2, … until a run completes
without reaching k. Checkpoints are counted by wrapping, for the duration of the
operation only, the seams every await of ocicas goes through:

- ``ocicas._threads`` (the one seam every worker-thread hop goes through): one checkpoint before
  the hop, and one *inside* the worker thread once its function returned (so the
  cancellation arrives while the hop is in flight and lands after it did its work);
- ``anyio.lowlevel.checkpoint`` (what ocicas awaits between items);
- every chunk a ``put_blob`` source yields.

Three ways to cancel, on asyncio and on trio:

``cancel``    ``Context.cancel()``; the operation raises ContextCancelledError or completes.
``deadline``  the context's clock jumps past its deadline; DeadlineExceededError or completion.
``scope``     an enclosing ``anyio.CancelScope`` is cancelled; the scope swallows it, and no
              ContextError may appear (ambient cancellation is never turned into one).

A last test cancels by real, short deadlines. After every run: the change is all
or nothing (a blob present is complete, a batch applied entirely or not at all),
nothing live was deleted, no file descriptor leaked, no temporary file is left in
the engine's temporary directory, and once the engine is closed no ``.ocicas-*``
directory is left at all.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import pytest

import ocicas
from ocicas import Context, Descriptor, Digest, Engine
from ocicas.testing import blob_bytes, sha256
from tests.images import LAYER, MANIFEST, put, put_image, put_index

pytestmark = pytest.mark.anyio

MODES = ("cancel", "deadline", "scope")
#: The most checkpoints any one operation may take before the test calls it a runaway.
MAX_CHECKPOINTS = 400
#: A put_blob source: this many chunks of this size, then a short tail (several pipeline batches).
SOURCE_CHUNKS = 10
SOURCE_CHUNK_SIZE = 512 << 10
#: References a batched update puts (it also deletes two and moves one).
BATCH_SIZE = 20
#: Images (each under its own tag, and all under one index) for walk and gc; garbage blobs per gc run.
GRAPH_IMAGES = 6
GC_GARBAGE = 6
#: How long the lock tests wait before they cancel, in seconds.
LOCK_WAIT = 0.05
#: Real deadlines, in seconds, of the last test.
REAL_DEADLINES = (0.0, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)

#: Checkpoints counted per operation by the last run of each test, for the report.
FIGURES: dict[str, int] = {}


class Clock:
    """Stands in for ``time`` in ``ocicas._context``: ``monotonic()`` that can jump ahead."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


@dataclass
class Canceller:
    """Cancels, in its mode, at checkpoint number ``k`` (counted from 0)."""

    mode: str
    k: int
    ctx: Context
    clock: Clock
    scope: anyio.CancelScope
    count: int = 0
    fired: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def tick(self, *, in_worker_thread: bool = False) -> None:
        with self._lock:
            hit = self.count == self.k
            self.count += 1
        if not hit:
            return
        self.fired = True
        if self.mode == "cancel":
            self.ctx.cancel()
        elif self.mode == "deadline":
            self.clock.offset += 10 * 3600
        elif in_worker_thread:
            anyio.from_thread.run_sync(self.scope.cancel)
        else:
            self.scope.cancel()


@dataclass
class Seams:
    """Counts checkpoints through anyio's thread hops and checkpoints while ``active`` is set."""

    clock: Clock
    active: Canceller | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_run_sync = ocicas._threads._run_in_thread
        real_checkpoint = anyio.lowlevel.checkpoint
        seams = self

        async def run_sync(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            canceller = seams.active
            if canceller is None:
                return await real_run_sync(func, *args, **kwargs)
            canceller.tick()

            def hop(*inner: Any) -> Any:
                result = func(*inner)
                canceller.tick(in_worker_thread=True)
                return result

            return await real_run_sync(hop, *args, **kwargs)

        async def checkpoint() -> None:
            if seams.active is not None:
                seams.active.tick()
            await real_checkpoint()

        monkeypatch.setattr(ocicas._threads, "_run_in_thread", run_sync)
        monkeypatch.setattr(anyio.lowlevel, "checkpoint", checkpoint)
        monkeypatch.setattr(ocicas._context, "time", self.clock)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def temp_files(layout: Path) -> list[str]:
    return [f"{d.name}/{f.name}" for d in layout.iterdir() if d.name.startswith(".ocicas-") for f in d.iterdir()]


def temp_dirs(layout: Path) -> list[str]:
    return [d.name for d in layout.iterdir() if d.name.startswith(".ocicas-")]


#: An operation: given the engine, the trial number and a ctx, do it (the Canceller ticks meanwhile);
#: ``check`` (uncancelled, afterwards) asserts the store is consistent.
@dataclass
class Operation:
    name: str
    prepare: Callable[[Engine, int], Awaitable[None]]
    run: Callable[[Engine, int, Context, Callable[[], None]], Awaitable[object]]
    check: Callable[[Engine, int, bool], Awaitable[None]]


class Scenario:
    """The store every operation works on, and what it must keep."""

    def __init__(self) -> None:
        self.live: set[Digest] = set()
        self.index: Descriptor | None = None
        self.layer: Descriptor | None = None
        self.manifest: Descriptor | None = None
        self.references: dict[str, Descriptor] = {}

    async def build(self, engine: Engine) -> None:
        manifests = []
        for n in range(GRAPH_IMAGES):
            manifest, blobs = await put_image(engine, [f"layer {n}".encode(), blob_bytes(3 * 1024, seed=n)])
            await engine.put_reference(f"image-{n}", manifest)
            self.live.update(blobs)
            manifests.append(manifest)
        self.manifest = manifests[0]
        self.index = await put_index(engine, manifests)
        await engine.put_reference("all", self.index)
        self.live.add(self.index.digest)
        self.layer = await put(
            engine, blob_bytes(3 * ocicas.CHUNK_SIZE + 5, seed=99), "application/vnd.oci.image.layer.v1.tar"
        )
        await engine.put_reference("big-layer", self.layer)
        self.live.add(self.layer.digest)
        self.references = {name: await engine.get_reference(name) for name in await engine.list_references()}

    async def assert_live(self, engine: Engine) -> None:
        infos = await engine.stat_blobs(sorted(self.live))
        assert set(infos) == self.live, f"live blobs deleted: {sorted(self.live - set(infos))[:3]}"
        graph = await ocicas.walk(engine, await engine.list_roots())
        assert self.live <= graph.digests() | {d for d in self.live if d not in graph}


def source_content(trial: int) -> bytes:
    return blob_bytes(SOURCE_CHUNKS * SOURCE_CHUNK_SIZE + 77, seed=1000 + trial)


def operations(scenario: Scenario) -> dict[str, Operation]:
    async def nothing(engine: Engine, trial: int) -> None:
        pass

    # -- put_blob --------------------------------------------------------------------
    async def put_blob(engine: Engine, trial: int, ctx: Context, tick: Callable[[], None]) -> object:
        data = source_content(trial)

        async def source() -> AsyncIterator[bytes]:
            for start in range(0, len(data), SOURCE_CHUNK_SIZE):
                tick()
                yield data[start : start + SOURCE_CHUNK_SIZE]

        return await engine.put_blob(source(), ctx=ctx)

    async def check_put_blob(engine: Engine, trial: int, completed: bool) -> None:
        data = source_content(trial)
        present = sha256(data) in await engine.list_blobs()
        assert present or not completed, "put_blob returned, but its blob is not there"
        if present:
            assert await engine.read_blob(sha256(data), max_size=None) == data
            await engine.delete_blob(sha256(data))  # the next trial starts from the same store

    # -- put_reference ---------------------------------------------------------------
    def target(trial: int) -> Descriptor:
        data = f"layer {trial}".encode()
        return Descriptor(media_type=LAYER, digest=sha256(data), size=len(data))

    async def store_targets(engine: Engine, trials: list[int]) -> None:
        """The content the tags name: a tag names only what is present."""
        for trial in trials:
            await engine.put_blob(f"layer {trial}".encode())

    async def prepare_put_reference(engine: Engine, trial: int) -> None:
        await store_targets(engine, [trial])

    async def put_reference(engine: Engine, trial: int, ctx: Context, tick: Callable[[], None]) -> object:
        await engine.put_reference(f"single-{trial}", target(trial), ctx=ctx)
        return None

    async def check_put_reference(engine: Engine, trial: int, completed: bool) -> None:
        names = set(await engine.list_references())
        assert names - {f"single-{trial}"} == set(scenario.references)
        if completed:
            assert f"single-{trial}" in names
        if f"single-{trial}" in names:
            assert await engine.get_reference(f"single-{trial}") == target(trial)
            await engine.delete_reference(f"single-{trial}")

    # -- update_references (batched) ---------------------------------------------------
    def batch(trial: int) -> dict[str, Descriptor | None]:
        changes: dict[str, Descriptor | None] = {
            f"batch-{trial}-{i}": target(trial * 100 + i) for i in range(BATCH_SIZE)
        }
        changes["moved"] = target(trial)  # present from the previous trial: moved with replace=True
        changes[f"doomed-{trial}-a"] = changes[f"doomed-{trial}-b"] = None
        return changes

    async def prepare_batch(engine: Engine, trial: int) -> None:
        await store_targets(engine, [-1, -2, -3, trial, *(trial * 100 + i for i in range(BATCH_SIZE))])
        await engine.update_references(
            {f"doomed-{trial}-a": target(-1), f"doomed-{trial}-b": target(-2), "moved": target(-3)}, replace=True
        )

    async def update_references(engine: Engine, trial: int, ctx: Context, tick: Callable[[], None]) -> object:
        await engine.update_references(batch(trial), replace=True, ctx=ctx)
        return None

    async def check_batch(engine: Engine, trial: int, completed: bool) -> None:
        references = {name: await engine.get_reference(name) for name in await engine.list_references()}
        before = {**scenario.references, f"doomed-{trial}-a": target(-1), f"doomed-{trial}-b": target(-2)}
        before["moved"] = target(-3)
        after = {**scenario.references, **{n: d for n, d in batch(trial).items() if d is not None}}
        assert references in (before, after), "a batch was applied in part"
        assert references == after or not completed
        await engine.update_references(
            {name: None for name in references if name not in scenario.references}, replace=True
        )

    # -- from_descriptor ---------------------------------------------------------------
    async def read_typed(engine: Engine, trial: int, ctx: Context, tick: Callable[[], None]) -> object:
        assert scenario.manifest is not None
        assert scenario.layer is not None
        manifest = await ocicas.from_descriptor(engine, scenario.manifest, ctx=ctx)
        assert isinstance(manifest.data, ocicas.Manifest)
        async with await ocicas.from_descriptor(engine, scenario.layer, ctx=ctx) as layer:
            assert isinstance(layer.data, ocicas.BlobReader)
            data = await layer.data.read()
        assert sha256(data) == scenario.layer.digest
        return None

    # -- walk ----------------------------------------------------------------------------
    async def walk(engine: Engine, trial: int, ctx: Context, tick: Callable[[], None]) -> object:
        graph = await ocicas.walk(engine, await engine.list_roots(ctx=ctx), concurrency=3, ctx=ctx)
        assert graph.digests() == scenario.live
        return None

    # -- gc ------------------------------------------------------------------------------
    garbage: list[Digest] = []

    async def prepare_gc(engine: Engine, trial: int) -> None:
        garbage.clear()
        for n in range(GC_GARBAGE):
            digest, _ = await engine.put_blob(f"garbage {trial} {n}".encode())
            garbage.append(digest)

    async def collect(engine: Engine, trial: int, ctx: Context, tick: Callable[[], None]) -> object:
        return await ocicas.gc(engine, grace_period=0, concurrency=3, ctx=ctx)

    async def check_gc(engine: Engine, trial: int, completed: bool) -> None:
        left = set(garbage) & set(await engine.list_blobs())
        assert not left or not completed
        for digest in left:
            await engine.delete_blob(digest)

    async def check_nothing(engine: Engine, trial: int, completed: bool) -> None:
        pass

    return {
        op.name: op
        for op in (
            Operation("put_blob", nothing, put_blob, check_put_blob),
            Operation("put_reference", prepare_put_reference, put_reference, check_put_reference),
            Operation("update_references", prepare_batch, update_references, check_batch),
            Operation("from_descriptor", nothing, read_typed, check_nothing),
            Operation("walk", nothing, walk, check_nothing),
            Operation("gc", prepare_gc, collect, check_gc),
        )
    }


OPERATIONS = ("put_blob", "put_reference", "update_references", "from_descriptor", "walk", "gc")


@dataclass
class Outcome:
    fired: bool
    checkpoints: int
    completed: bool


async def run_trial(
    layout: Path,
    scenario: Scenario,
    operation: Operation,
    k: int,
    mode: str,
    seams: Seams,
    ctx: Context,
    *,
    real_deadline: bool = False,
) -> Outcome:
    """Run ``operation`` once, cancelled at checkpoint ``k``, and check what it left."""
    fds = open_fds()
    async with await ocicas.open_layout(layout) as engine:
        await operation.prepare(engine, k)
        error: ocicas.ContextError | None = None
        completed = False
        with anyio.CancelScope() as scope:
            canceller = Canceller(mode, k, ctx, seams.clock, scope)
            seams.active = canceller
            try:
                await operation.run(engine, k, ctx, canceller.tick)
                completed = True
            except ocicas.ContextError as exc:
                error = exc
            finally:
                seams.active = None
        where = f"{operation.name} cancelled by {mode} at checkpoint {k}"
        if mode == "cancel":
            assert error is None or type(error) is ocicas.ContextCancelledError, where
        elif mode == "deadline":
            assert error is None or type(error) is ocicas.DeadlineExceededError, where
        else:
            assert error is None, f"{where}: ambient cancellation became {error!r}"
            assert completed != scope.cancelled_caught, where
        assert completed or canceller.fired or real_deadline, f"{where}: failed without being cancelled"
        assert temp_files(layout) == [], where
        await operation.check(engine, k, completed)
        await scenario.assert_live(engine)
    assert temp_dirs(layout) == [], f"{where}: a temporary directory outlived its engine"
    assert open_fds() == fds, f"{where}: file descriptors leaked"
    return Outcome(canceller.fired, canceller.count, completed)


@pytest.fixture
async def store(tmp_path: Path) -> tuple[Path, Scenario]:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    scenario = Scenario()
    async with await ocicas.open_layout(layout) as engine:
        await scenario.build(engine)
    return layout, scenario


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", OPERATIONS)
async def test_cancelled_at_every_checkpoint_in_turn(
    store: tuple[Path, Scenario], monkeypatch: pytest.MonkeyPatch, name: str, mode: str, anyio_backend: str
) -> None:
    layout, scenario = store
    seams = Seams(Clock())
    seams.install(monkeypatch)
    operation = operations(scenario)[name]
    cancelled = 0
    for k in range(MAX_CHECKPOINTS):
        ctx = Context.background().with_timeout(3600)  # on the jumping clock
        outcome = await run_trial(layout, scenario, operation, k, mode, seams, ctx)
        if not outcome.fired:
            break
        cancelled += not outcome.completed
    else:
        raise AssertionError(f"{name} still had checkpoints after {MAX_CHECKPOINTS}")
    assert cancelled > 0
    FIGURES[f"{name}/{mode}/{anyio_backend}"] = k
    print(f"\ncancellation: {name} by {mode} on {anyio_backend}: {k} checkpoints, {cancelled} runs ended cancelled")


@pytest.mark.parametrize("name", OPERATIONS)
async def test_real_short_deadlines(store: tuple[Path, Scenario], monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Deadlines on the real clock, reached wherever the operation happens to be."""
    layout, scenario = store
    seams = Seams(Clock())
    seams.install(monkeypatch)
    operation = operations(scenario)[name]
    stopped = 0
    for trial, timeout in enumerate(REAL_DEADLINES):
        ctx = Context.background().with_timeout(timeout)
        outcome = await run_trial(
            layout, scenario, operation, MAX_CHECKPOINTS + trial, "deadline", seams, ctx, real_deadline=True
        )
        assert not outcome.fired
        stopped += not outcome.completed
    assert stopped > 0  # a zero deadline at least stops it


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lock", ["index.json", "gc"])
async def test_waiting_for_a_lock_another_process_holds_is_cancellable(tmp_path: Path, lock: str, mode: str) -> None:
    """``update_references`` and ``gc`` wait, cancellably, for a ``flock`` held elsewhere."""
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    before = (layout / "index.json").read_bytes()
    # held as another process would hold it: another open file description of the same directory
    held = os.open(layout if lock == "index.json" else layout / "blobs", os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        async with await ocicas.open_layout(layout) as engine:
            ctx = Context.background().with_timeout(LOCK_WAIT if mode == "deadline" else 3600)

            async def operation() -> None:
                if lock == "index.json":
                    await engine.put_reference(
                        "waiting", Descriptor(media_type=MANIFEST, digest=sha256(b"m"), size=1), partial=True, ctx=ctx
                    )
                else:
                    await ocicas.gc(engine, ctx=ctx)

            started = time.monotonic()
            with anyio.fail_after(10):
                if mode == "cancel":
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(cancel_later, ctx)
                        with pytest.raises(ocicas.ContextCancelledError):
                            await operation()
                elif mode == "deadline":
                    with pytest.raises(ocicas.DeadlineExceededError):
                        await operation()
                else:
                    with anyio.move_on_after(LOCK_WAIT) as scope:
                        await operation()
                    assert scope.cancelled_caught
            assert time.monotonic() - started < 5
            assert temp_files(layout) == []
    finally:
        os.close(held)
    assert (layout / "index.json").read_bytes() == before
    assert temp_dirs(layout) == []


async def cancel_later(ctx: Context) -> None:
    await anyio.sleep(LOCK_WAIT)
    ctx.cancel()
