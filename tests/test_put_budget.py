"""The process-wide budget of bytes that streaming puts hold: never exceeded, always given back."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import ocicas
from ocicas._budget import PUT_BUDGET

pytestmark = pytest.mark.anyio

KiB = 1 << 10


@pytest.fixture
def small_budget(monkeypatch: pytest.MonkeyPatch) -> int:
    limit = 512 * KiB
    monkeypatch.setattr(PUT_BUDGET, "limit", limit)
    return limit


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
