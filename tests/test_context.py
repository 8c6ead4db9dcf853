"""Context: cancellation and deadlines across tasks, threads and backends."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

import ocicas
from ocicas._context import bound


def test_background_is_live_without_deadline() -> None:
    ctx = ocicas.Context.background()
    assert (ctx.done, ctx.error(), ctx.deadline) == (False, None, None)
    ctx.check()


def test_cancel_reaches_children_not_parents() -> None:
    root = ocicas.Context.background()
    child = root.with_cancel()
    grandchild = child.with_timeout(100)
    sibling = root.with_cancel()
    child.cancel()
    assert (root.done, child.done, grandchild.done, sibling.done) == (False, True, True, False)
    with pytest.raises(ocicas.ContextCancelledError):
        grandchild.check()
    root.cancel()
    assert sibling.done


def test_children_of_a_cancelled_context_start_cancelled() -> None:
    root = ocicas.Context.background()
    root.cancel("stop")
    with pytest.raises(ocicas.ContextCancelledError, match="stop"):
        root.with_timeout(10).check()


def test_child_deadline_is_never_later_than_the_parent() -> None:
    parent = ocicas.Context.background().with_deadline(time.monotonic() + 10)
    assert parent.with_timeout(100).deadline == parent.deadline
    sooner = parent.with_timeout(1)
    assert sooner.deadline is not None
    assert parent.deadline is not None
    assert sooner.deadline < parent.deadline


def test_expired_deadline_is_a_timeout_error() -> None:
    ctx = ocicas.Context.background().with_timeout(0)
    error = ctx.error()
    assert isinstance(error, ocicas.DeadlineExceededError)
    assert isinstance(error, TimeoutError)
    assert isinstance(error, ocicas.ContextError)
    with pytest.raises(TimeoutError):
        ctx.check()


def test_cancel_is_thread_safe_and_idempotent() -> None:
    ctx = ocicas.Context.background()
    children = [ctx.with_cancel() for _ in range(100)]
    threads = [threading.Thread(target=ctx.cancel) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(child.done for child in children)


@pytest.mark.anyio
async def test_bound_turns_context_cancellation_into_its_error() -> None:
    ctx = ocicas.Context.background()

    async def cancel_soon() -> None:
        await anyio.sleep(0.01)
        ctx.cancel()

    async def body() -> None:
        async with bound(ctx), anyio.create_task_group() as tg:
            tg.start_soon(anyio.sleep_forever)
            tg.start_soon(cancel_soon)

    with anyio.fail_after(5), pytest.raises(ocicas.ContextCancelledError):
        await body()


@pytest.mark.anyio
async def test_bound_applies_the_deadline() -> None:
    start = time.monotonic()
    with anyio.fail_after(5), pytest.raises(ocicas.DeadlineExceededError):
        async with bound(ocicas.Context.background().with_timeout(0.05)):
            await anyio.sleep_forever()
    assert time.monotonic() - start >= 0.04


@pytest.mark.anyio
async def test_cancel_from_a_plain_thread_wakes_the_loop() -> None:
    ctx = ocicas.Context.background()
    timer = threading.Timer(0.05, ctx.cancel)
    timer.start()
    try:
        with anyio.fail_after(5), pytest.raises(ocicas.ContextCancelledError):
            async with bound(ctx):
                await anyio.sleep_forever()
    finally:
        timer.cancel()


@pytest.mark.anyio
async def test_ambient_cancellation_is_not_swallowed() -> None:
    ctx = ocicas.Context.background().with_timeout(100)
    with anyio.move_on_after(0.02) as scope:
        async with bound(ctx):
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert not ctx.done


@pytest.mark.anyio
async def test_bound_leaves_no_watcher_behind() -> None:
    ctx = ocicas.Context.background()
    for _ in range(100):
        async with bound(ctx):
            await anyio.lowlevel.checkpoint()
    assert ctx._watchers == []
