"""Waiting in a test for state that worker threads change, where there is no event to wait on."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio


async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` on the event loop until it holds; fail after 30 s."""
    with anyio.fail_after(30):
        while not condition():  # noqa: ASYNC110 (changed by worker threads: no event to wait on)
            await anyio.sleep(0.001)


def until_now(condition: Callable[[], bool]) -> None:
    """The same for a test without an event loop (plain threads): sleep-poll; fail after 30 s."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.002)
