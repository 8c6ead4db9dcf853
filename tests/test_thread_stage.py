"""``_threads.ThreadStage``: items in order, one thread at a time, no thread held while idle, one hop a run of
items, errors and cancels reach the task serving it; and the puts built on it never deadlock on thread tokens,
and leave none taken (nor any of the put budget), whether they succeed or fail."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

import ocicas
from ocicas._budget import PUT_BUDGET
from ocicas._threads import CHUNK_SIZE, ThreadStage, checkpoint, run_sync

from .polling import until

pytestmark = pytest.mark.anyio


class Recorder:
    """A stage's work: records each item, and how many threads were working at once (the most seen)."""

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        self.items: list[int] = []
        self.most = 0
        self._working = 0
        self._lock = threading.Lock()
        self._then = then

    def __call__(self, item: int) -> None:
        with self._lock:
            self._working += 1
            self.most = max(self.most, self._working)
        try:
            checkpoint()
            self.items.append(item)
            if self._then is not None:
                self._then(item)
        finally:
            with self._lock:
                self._working -= 1


def tokens_out() -> int:
    return int(anyio.to_thread.current_default_thread_limiter().borrowed_tokens)


@pytest.fixture
async def one_token() -> AsyncIterator[None]:
    """anyio's default thread limiter with a single token, for the test (restored after)."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    total = limiter.total_tokens
    limiter.total_tokens = 1
    try:
        yield
    finally:
        limiter.total_tokens = total


async def test_items_from_the_loop_and_from_threads_are_worked_in_order_one_thread_at_a_time() -> None:
    second = Recorder()
    to_second = ThreadStage[int](second)
    first = Recorder(then=to_second.put)  # each item goes on from the first stage's thread
    to_first = ThreadStage[int](first)
    async with anyio.create_task_group() as tg:
        tg.start_soon(to_first.serve)
        tg.start_soon(to_second.serve)
        expected: list[int] = []

        def all_done() -> bool:
            return len(second.items) == len(expected)

        for burst in range(20):
            items = range(burst * 10, burst * 10 + burst % 7 + 1)
            for item in items:
                to_first.put(item)
            expected += items
            await until(all_done)
            await until(lambda: tokens_out() == 0)  # both stages stop between bursts, and hold no thread

        def put_from_a_thread() -> None:
            for item in range(1000, 1050):
                to_first.put(item)

        await run_sync(put_from_a_thread)
        expected += range(1000, 1050)
        await until(all_done)
        to_first.close()
        to_second.close()
    assert first.items == expected
    assert second.items == expected
    assert first.most == second.most == 1


async def test_a_stage_that_was_never_given_work_closes_without_a_hop(hops: list[str]) -> None:
    stage = ThreadStage[int](Recorder())
    async with anyio.create_task_group() as tg:
        tg.start_soon(stage.serve)
        await anyio.wait_all_tasks_blocked()
        assert tokens_out() == 0
        stage.close()
    assert hops == []


async def test_items_queued_before_the_thread_starts_take_one_hop(hops: list[str]) -> None:
    work = Recorder()
    stage = ThreadStage[int](work)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stage.serve)
        for item in range(100):
            stage.put(item)  # no await: all queued before serve runs
        await until(lambda: len(work.items) == 100)
        await until(lambda: tokens_out() == 0)
        stage.close()
    assert work.items == list(range(100))
    assert hops == ["hop"]  # one thread for the run, and none to close


async def test_an_error_in_the_work_reaches_serve_and_stops_the_stage() -> None:
    def fail_on_three(item: int) -> None:
        if item == 3:
            raise ValueError(f"bad item {item}")

    work = Recorder(then=fail_on_three)
    stage = ThreadStage[int](work)
    for item in range(10):
        stage.put(item)
    with pytest.raises(ValueError, match="bad item 3"):
        await stage.serve()
    assert work.items == [0, 1, 2, 3]


async def test_a_cancel_stops_a_working_stage_at_its_next_checkpoint() -> None:
    started = threading.Event()
    stopped: list[str] = []

    def spin(item: int) -> None:
        started.set()
        try:
            while True:
                checkpoint()
                threading.Event().wait(0.001)
        except BaseException as exc:
            stopped.append(type(exc).__name__)
            raise

    stage = ThreadStage[int](spin)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stage.serve)
            stage.put(1)
            await anyio.to_thread.run_sync(started.wait)
            scope.cancel()
    assert scope.cancelled_caught
    assert len(stopped) == 1  # the thread left at a checkpoint: the cancel reached it
    assert tokens_out() == 0


def pieces(seed: int, size: int) -> Iterator[bytes]:
    """``size`` bytes of seed ``seed``, in fresh 1 MiB pieces."""
    for start in range(0, size, 1 << 20):
        n = min(size - start, 1 << 20)
        yield (hashlib.sha256(f"{seed}:{start}".encode()).digest() * (n // 32 + 1))[:n]


async def chunks(seed: int, size: int) -> AsyncIterator[bytes]:
    for piece in pieces(seed, size):
        yield piece


async def test_concurrent_puts_finish_on_a_single_thread_token(tmp_path: Path, one_token: None) -> None:
    """Eight large puts at once, each with a hashing and a writing stage, and one thread token among them all:
    each stage gives its token back whenever it runs dry, so none waits forever for another's."""
    size = 3 * CHUNK_SIZE + 12345
    await ocicas.create_layout(tmp_path / "layout")
    async with await ocicas.open_layout(tmp_path / "layout") as engine:
        results: dict[int, tuple[ocicas.Digest, int]] = {}

        async def put(seed: int) -> None:
            results[seed] = await engine.put_blob(chunks(seed, size))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for seed in range(8):
                    tg.start_soon(put, seed)
        assert (tokens_out(), PUT_BUDGET.used) == (0, 0)
        for seed in range(8):
            data = b"".join(pieces(seed, size))
            assert results[seed] == (ocicas.Digest.from_bytes(data), size)
            async with await engine.get_blob(results[seed][0]) as reader:
                assert await reader.read() == data


class SourceFailed(Exception):
    pass


async def failing(size: int) -> AsyncIterator[bytes]:
    async for chunk in chunks(99, size):
        yield chunk
    raise SourceFailed(f"after {size} bytes")


@pytest.mark.parametrize("how", ["source error", "cancel scope", "cancel scope while waiting"])
async def test_failed_puts_leave_no_token_budget_or_file(tmp_path: Path, one_token: None, how: str) -> None:
    """Puts that fail mid-pipeline, eight at once on one thread token: each ends, and leaves nothing taken."""
    size = 2 * CHUNK_SIZE + 777
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        outcomes: list[str] = []

        async def put(n: int) -> None:
            try:
                if how == "source error":
                    await engine.put_blob(failing(size + n * CHUNK_SIZE))
                else:
                    # cancelled at once, or after the put has had time to fill its pipeline
                    with anyio.move_on_after(0 if how == "cancel scope" else 0.05) as scope:
                        await engine.put_blob(chunks(n, 64 * CHUNK_SIZE))
                    outcomes.append("cancelled" if scope.cancelled_caught else "finished")
            except SourceFailed:
                outcomes.append("failed")

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for n in range(8):
                    tg.start_soon(put, n)
        assert (tokens_out(), PUT_BUDGET.used) == (0, 0)
        if how == "source error":
            assert outcomes == ["failed"] * 8
            assert await engine.list_blobs() == []
        else:
            assert "cancelled" in outcomes
    temp = [f for d in layout.iterdir() if d.name.startswith(".ocicas-") for f in d.iterdir()]
    assert temp == []
