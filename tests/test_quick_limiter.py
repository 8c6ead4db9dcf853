"""``_threads.QuickLimiter``: tokens taken at once when free, first come first served when not, none lost."""

from __future__ import annotations

import anyio
import pytest

from ocicas._threads import QuickLimiter, run_sync

pytestmark = pytest.mark.anyio


async def test_a_free_token_is_taken_without_a_turn_of_the_loop() -> None:
    limiter = QuickLimiter(2)
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        await limiter.acquire()  # the other task would run if this yielded to the loop
        assert ran == []
        limiter.release()
    assert ran == ["other"]
    assert limiter._used == 0


async def test_waiters_get_tokens_in_arrival_order_and_a_cancelled_one_loses_its_place() -> None:
    limiter = QuickLimiter(1)
    await limiter.acquire()
    order: list[int] = []

    async def waiter(n: int) -> None:
        async with limiter:
            order.append(n)

    async with anyio.create_task_group() as tg:
        for n in range(3):
            tg.start_soon(waiter, n)
            await anyio.wait_all_tasks_blocked()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await limiter.acquire()  # cancelled while waiting: never holds a token
        assert len(limiter._waiting) == 3
        limiter.release()
    assert order == [0, 1, 2]
    assert limiter._used == 0
    assert not limiter._waiting


async def test_a_token_handed_to_a_waiter_cancelled_meanwhile_is_not_lost() -> None:
    limiter = QuickLimiter(1)
    await limiter.acquire()
    got: list[str] = []

    async def take(name: str, scope: anyio.CancelScope) -> None:
        with scope:
            async with limiter:
                got.append(name)

    async with anyio.create_task_group() as tg:
        doomed = anyio.CancelScope()
        tg.start_soon(take, "first", doomed)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(take, "second", anyio.CancelScope())
        await anyio.wait_all_tasks_blocked()
        limiter.release()  # hands the token to "first" ...
        doomed.cancel()  # ... cancelled before it runs: it gives the token on (asyncio) or uses it (trio)
    assert got in (["second"], ["first", "second"])
    assert limiter._used == 0
    assert not limiter._waiting


async def test_hops_through_it_run_and_give_every_token_back() -> None:
    limiter = QuickLimiter(2)
    results: list[int] = []

    async def hop(n: int) -> None:
        results.append(await run_sync(lambda: n * n, limiter=limiter))

    async with anyio.create_task_group() as tg:
        for n in range(10):
            tg.start_soon(hop, n)
    assert sorted(results) == [n * n for n in range(10)]
    assert limiter._used == 0
