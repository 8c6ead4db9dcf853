"""The bytes streamed puts hold: within the process-wide and per-put bounds, counted for as long as they live."""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

import ocicas
from ocicas._budget import DEFAULT_PER_PUT, DEFAULT_PUT_BUDGET, PUT_BUDGET

pytestmark = pytest.mark.anyio

KiB = 1 << 10


@pytest.fixture
def small_budget() -> Iterator[int]:
    limit = 512 * KiB
    before = ocicas.set_put_budget(limit)
    yield limit
    ocicas.set_put_budget(*before)


@pytest.fixture
def restore_budget() -> Iterator[None]:
    before = ocicas.set_put_budget()
    yield
    ocicas.set_put_budget(*before)


async def test_concurrent_puts_stay_within_the_budget_and_give_it_back(tmp_path: Path, small_budget: int) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    seen: list[int] = []
    blobs = {n: [bytes([n, k]) * (64 * KiB) for k in range(12)] for n in range(16)}  # 12 fresh 128 KiB chunks each

    async def source(n: int) -> AsyncIterator[bytes]:
        for chunk in blobs[n]:
            seen.append(PUT_BUDGET.used)
            yield bytes(chunk)  # a new object each time, as a network stream yields

    results: dict[int, ocicas.Digest] = {}
    async with await ocicas.open_layout(layout) as engine:

        async def put(n: int) -> None:
            results[n], _ = await engine.put_blob(source(n))

        async with anyio.create_task_group() as tg:
            for n in blobs:
                tg.start_soon(put, n)
        for n, chunks in blobs.items():
            assert results[n] == "sha256:" + hashlib.sha256(b"".join(chunks)).hexdigest()
            assert await engine.read_blob(results[n]) == b"".join(chunks)
    # a put reserves the size of its last chunk (1 MiB at first) before reading the next: over it only when
    # a chunk is bigger than the one before, by that difference
    assert max(seen) <= small_budget
    assert PUT_BUDGET.used == 0


async def test_a_failed_or_cancelled_put_gives_its_budget_back(tmp_path: Path, small_budget: int) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield bytes(128 * KiB)

    async def failing() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield bytes(128 * KiB)
        raise OSError("source broke")

    async with await ocicas.open_layout(layout) as engine:
        with anyio.move_on_after(0.5):
            await engine.put_blob(endless())
        assert PUT_BUDGET.used == 0
        with pytest.raises(OSError, match="source broke"):
            await engine.put_blob(failing())
        assert PUT_BUDGET.used == 0
        with pytest.raises(ocicas.SizeMismatchError):
            await engine.put_blob(endless(), expected_size=300 * KiB)
        assert PUT_BUDGET.used == 0
        assert await engine.list_blobs() == []


async def test_a_put_cancelled_while_it_waits_for_admission_gives_back_nothing(
    tmp_path: Path, small_budget: int
) -> None:
    """A put waiting for room (the budget all taken) and cancelled there never held any: it must give none back,
    or the budget would admit that much more, for good (it did: ``used`` went below zero)."""
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    await PUT_BUDGET.acquire(small_budget)  # all of it, as puts in progress would hold it
    try:
        async with await ocicas.open_layout(layout) as engine:
            for _ in range(3):
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(engine.put_blob, bytes_of(KiB))
                        await anyio.wait_all_tasks_blocked()
                        assert len(PUT_BUDGET._waiters) == 1  # waiting for admission
                        scope.cancel()
                assert PUT_BUDGET.used == small_budget
                assert not PUT_BUDGET._waiters
    finally:
        PUT_BUDGET.release(small_budget)
    assert PUT_BUDGET.used == 0


async def bytes_of(n: int) -> AsyncIterator[bytes]:
    yield bytes(n)


def test_set_put_budget_sets_either_bound_and_returns_the_previous(restore_budget: None) -> None:
    assert ocicas.set_put_budget() == ocicas.PutBudget(DEFAULT_PUT_BUDGET, DEFAULT_PER_PUT) == (16 << 20, 16 << 20)
    assert ocicas.set_put_budget(64 << 20) == (16 << 20, 16 << 20)
    assert ocicas.set_put_budget(per_put=4 << 20) == (64 << 20, 16 << 20)
    assert ocicas.set_put_budget(1 << 20, per_put=64 * KiB) == (64 << 20, 4 << 20)
    assert ocicas.set_put_budget() == (1 << 20, 64 * KiB)
    assert (PUT_BUDGET.limit, PUT_BUDGET.holder_limit) == (1 << 20, 64 * KiB)
    ocicas.set_put_budget(128 * KiB, per_put=1 << 20)  # a put never holds more than the whole budget
    assert PUT_BUDGET.holder_limit == 128 * KiB


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ({"total": 64 * KiB - 1}, ocicas.InvalidError, "total must be at least 65536, not 65535"),
        ({"per_put": 0}, ocicas.InvalidError, "per_put must be at least 65536, not 0"),
        ({"total": -1}, ocicas.InvalidError, "total must be at least 65536, not -1"),
        ({"total": "16M"}, TypeError, "total must be an int or None, not str"),
        ({"total": 16.0 * (1 << 20)}, TypeError, "total must be an int or None, not float"),
        ({"per_put": True}, TypeError, "per_put must be an int or None, not bool"),
    ],
)
def test_set_put_budget_refuses_bad_bounds_and_keeps_the_old(
    restore_budget: None, args: dict[str, object], error: type[Exception], message: str
) -> None:
    before = ocicas.set_put_budget()
    with pytest.raises(error, match=f"^{message}$"):
        ocicas.set_put_budget(**args)  # type: ignore[arg-type]
    assert ocicas.set_put_budget() == before
    assert issubclass(ocicas.InvalidError, ValueError)


def _chunk(tag: int, k: int, size: int) -> memoryview:
    """A fresh chunk that can be watched with a weak reference (a memoryview of bytes is passed through as is)."""
    return memoryview(tag.to_bytes(4, "big") + k.to_bytes(4, "big") + bytes(size - 8))


@pytest.mark.parametrize(("total", "per_put"), [(512 * KiB, 512 * KiB), (1 << 20, 192 * KiB), (64 * KiB, 64 * KiB)])
async def test_every_chunk_alive_is_counted(tmp_path: Path, restore_budget: None, total: int, per_put: int) -> None:
    """Whenever a source is asked for more, the chunks still alive fit in what the budget counts, within its bounds."""
    ocicas.set_put_budget(total, per_put=per_put)
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    size = 64 * KiB
    alive: list[weakref.ref[memoryview]] = []
    violations: list[tuple[int, int]] = []

    def check() -> None:
        live = sum(size for ref in alive if ref() is not None)
        if live > PUT_BUDGET.used or PUT_BUDGET.used > max(total, size):
            violations.append((live, PUT_BUDGET.used))

    async def source(n: int) -> AsyncIterator[memoryview]:
        for k in range(20):
            check()
            chunk = _chunk(n, k, size)
            alive.append(weakref.ref(chunk))
            yield chunk
            del chunk
        check()

    expected = {n: hashlib.sha256(b"".join(_chunk(n, k, size) for k in range(20))).hexdigest() for n in range(8)}
    async with await ocicas.open_layout(layout) as engine:
        results: dict[int, ocicas.Digest] = {}

        async def put(n: int) -> None:
            results[n], _ = await engine.put_blob(source(n))  # type: ignore[arg-type]  # memoryview chunks pass at run time

        async with anyio.create_task_group() as tg:
            for n in expected:
                tg.start_soon(put, n)
        assert {n: d.encoded for n, d in results.items()} == expected
    assert violations == []
    assert PUT_BUDGET.used == 0


async def test_one_put_holds_at_most_its_own_bound(tmp_path: Path, restore_budget: None) -> None:
    ocicas.set_put_budget(8 << 20, per_put=256 * KiB)
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    seen: list[int] = []

    async def source() -> AsyncIterator[bytes]:
        for k in range(64):
            seen.append(PUT_BUDGET.used)  # the only put: all the budget used is its own
            yield k.to_bytes(8, "big") * (8 * KiB)  # 64 KiB each

    async with await ocicas.open_layout(layout) as engine:
        digest, size = await engine.put_blob(source())
        assert size == 64 * 64 * KiB
        assert await engine.read_blob(digest) == b"".join(k.to_bytes(8, "big") * (8 * KiB) for k in range(64))
    assert 0 < max(seen) <= 256 * KiB
    assert PUT_BUDGET.used == 0


async def test_a_file_is_read_in_pieces_that_fit_the_bound(tmp_path: Path, restore_budget: None) -> None:
    ocicas.set_put_budget(per_put=256 * KiB)
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    data = bytes(range(256)) * (4 * 1024 + 3)  # 1 MiB and a bit
    (tmp_path / "source").write_bytes(data)
    sizes: list[int] = []

    class Recording:
        def __init__(self, file: anyio.AsyncFile[bytes]) -> None:
            self._file = file

        async def read(self, size: int = -1) -> bytes:
            sizes.append(size)
            seen.append(PUT_BUDGET.used)
            return await self._file.read(size)

    seen: list[int] = []
    async with await ocicas.open_layout(layout) as engine, await anyio.open_file(tmp_path / "source", "rb") as f:
        digest, _ = await engine.put_blob(Recording(f))
        assert digest.encoded == hashlib.sha256(data).hexdigest()
    assert set(sizes) == {64 * KiB}  # a quarter of the bound: room for the pipeline
    assert max(seen) <= 256 * KiB


async def test_a_file_with_readinto_is_read_into_reused_buffers(tmp_path: Path, restore_budget: None) -> None:
    ocicas.set_put_budget(512 * KiB, per_put=256 * KiB)
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    blobs = {n: bytes([n]) * 8 + bytes(range(256)) * (4 * 1024 + n) for n in range(6)}  # 1 MiB and a bit each
    for n, data in blobs.items():
        (tmp_path / f"source-{n}").write_bytes(data)
    buffers: dict[int, set[int]] = {n: set() for n in blobs}
    seen: list[int] = []

    class Recording:
        def __init__(self, n: int, file: anyio.AsyncFile[bytes]) -> None:
            self._n = n
            self._file = file

        async def read(self, size: int = -1) -> bytes:
            raise AssertionError("read() is not used when readinto() is there")

        async def readinto(self, buffer: memoryview) -> int:
            assert len(buffer) == 64 * KiB  # a quarter of the per-put bound
            buffers[self._n].add(id(buffer.obj))
            seen.append(PUT_BUDGET.used)
            return await self._file.readinto(buffer)

    async with await ocicas.open_layout(layout) as engine:
        results: dict[int, ocicas.Digest] = {}

        async def put(n: int) -> None:
            async with await anyio.open_file(tmp_path / f"source-{n}", "rb") as f:
                results[n], _ = await engine.put_blob(Recording(n, f))

        async with anyio.create_task_group() as tg:
            for n in blobs:
                tg.start_soon(put, n)
        for n, data in blobs.items():
            assert results[n].encoded == hashlib.sha256(data).hexdigest()
            assert await engine.read_blob(results[n]) == data
    # 17 reads or more each, into at most 4 buffers of 64 KiB: those the per-put bound allows
    assert all(1 <= len(ids) <= 4 for ids in buffers.values())
    assert max(seen) <= 512 * KiB
    assert PUT_BUDGET.used == 0
