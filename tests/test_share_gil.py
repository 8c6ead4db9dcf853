"""A worker thread running Python between quick system calls lets the event loop have the GIL (``share_gil``).

Without it CPython can starve the loop: each release of the GIL for a quick call starts the waiting thread's
switch interval over, and the worker takes the GIL back before the woken loop runs.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import types

import anyio
import pytest

from ocicas import _threads
from ocicas._threads import GIL_SLICE, run_sync, share_gil, shared

pytestmark = pytest.mark.anyio


def python_between_stats(stop: threading.Event, *, sharing: bool) -> int:
    """0.3 ms of Python, then a ``stat``, until ``stop``; ``sharing``: each item through :func:`shared`."""
    done = 0
    endless = iter(int, 1)
    for _ in shared(endless, every=1) if sharing else endless:
        start = time.perf_counter()
        while time.perf_counter() - start < 0.0003:
            pass
        os.stat(".")
        done += 1
        if stop.is_set():
            break
    return done


async def loop_turns_while(sharing: bool) -> tuple[int, int]:
    """Turns of a 1 ms sleep on the loop in 0.5 s while a worker runs :func:`python_between_stats`; its items."""
    stop = threading.Event()
    turns = 0
    items: list[int] = []

    async def work() -> None:
        items.append(await run_sync(functools.partial(python_between_stats, stop, sharing=sharing)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(work)
        await anyio.sleep(0.01)  # the worker is running
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            await anyio.sleep(0.001)
            turns += 1
        stop.set()
    return turns, items[0]


async def test_the_loop_turns_while_a_worker_shares_the_gil() -> None:
    turns, items = await loop_turns_while(sharing=True)
    # on this project's 2-core machine: 300-450 turns (without sharing, the control below: 1-3)
    assert turns >= 50, turns
    assert items >= 100, items  # nor is the worker starved


async def test_without_sharing_the_loop_starves() -> None:
    """The control: what the test above guards against, where this interpreter has the problem."""
    turns, _ = await loop_turns_while(sharing=False)
    if turns >= 50:
        pytest.skip(f"this interpreter did not starve the loop ({turns} turns): no contrast to show")
    assert turns < 50


class Clock:
    """A stand-in for the ``time`` module in :mod:`ocicas._threads`: a clock moved by hand; sleeps recorded."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[tuple[float, bool]] = []  # (seconds, in a run_sync worker)

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append((seconds, getattr(_threads._local, "hosted", False)))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(_threads, "time", types.SimpleNamespace(perf_counter=clock.perf_counter, sleep=clock.sleep))
    return clock


def test_outside_a_worker_it_never_sleeps(clock: Clock) -> None:
    share_gil()
    clock.now += 1.0
    share_gil()  # on an event loop's thread, a sleep would block the loop
    assert clock.slept == []


async def test_in_a_worker_it_sleeps_once_a_slice_has_passed(clock: Clock) -> None:
    def worker() -> list[int]:
        counts = []
        for step in (0.0, GIL_SLICE * 0.9, GIL_SLICE * 0.2, 0.0, GIL_SLICE):
            clock.now += step
            share_gil()
            counts.append(len(clock.slept))
        return counts

    # the hop starts a slice; 0.9 of one: no; 1.1: a sleep, which starts the next; then 0: no; a whole slice: yes
    assert await run_sync(worker) == [0, 0, 1, 1, 2]
    assert {hosted for _, hosted in clock.slept} == {True}
    assert all(0 < seconds < GIL_SLICE for seconds, _ in clock.slept)


async def test_each_hop_starts_a_new_slice(clock: Clock) -> None:
    await run_sync(lambda: None)
    clock.now += 1.0  # between two hops: not time the next one held the GIL
    await run_sync(share_gil)
    assert clock.slept == []


def test_shared_yields_every_item_in_order() -> None:
    assert list(shared(range(100), every=7)) == list(range(100))
    assert list(shared(iter([]))) == []
    with pytest.raises(ValueError, match="every"):
        list(shared(range(3), every=0))
