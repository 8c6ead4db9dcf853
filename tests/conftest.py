from __future__ import annotations

import gc
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from blockbuster import blockbuster_ctx

import ocicas
import ocicas._threads
from ocicas import Engine
from tests.leaks import fd_targets, is_idle_worker

#: Idle worker threads: anyio's on asyncio, trio's thread cache (named so only while idle).


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on asyncio and on trio."""
    return str(request.param)


@pytest.fixture(params=["memory", "dir"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Engine]:
    """A fresh, empty engine of each local kind (modules and classes may define their own)."""
    if request.param == "memory":
        async with ocicas.MemoryEngine() as memory:
            yield memory
    else:
        await ocicas.create_layout(tmp_path / "layout")
        async with await ocicas.open_layout(tmp_path / "layout") as directory:
            yield directory


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count every worker-thread hop (the one seam ``ocicas._threads`` goes through)."""
    seen: list[str] = []
    inner = ocicas._threads._run_in_thread

    async def counting(func: Callable[[], Any], *, limiter: anyio.CapacityLimiter | None = None) -> Any:
        seen.append("hop")
        return await inner(func, limiter=limiter)

    monkeypatch.setattr(ocicas._threads, "_run_in_thread", counting)
    return seen


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[None]:
    """Fail any blocking call that ocicas makes on an asyncio event loop thread."""
    with blockbuster_ctx(["ocicas"]):
        yield


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what exists once the tests are collected: the leak check's collections then scan only the test's own.

    Hypothesis is imported first: its plugins (trio's) register objects it then
    looks for with ``gc.get_referrers``, which does not see frozen objects.
    """
    import hypothesis  # noqa: F401

    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a file descriptor, a busy thread or an unclosed reader behind.

    Autouse function fixtures are set up after the session- and module-scoped ones
    (registry servers) and before the test's own (engines), and torn down after
    those: what the snapshot does not hold, the test opened. Only descriptors and
    threads that are new since the snapshot count.
    """
    gc.collect()
    before_fds = fd_targets()
    before_threads = set(threading.enumerate())
    yield
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    leaked = {fd: target for fd, target in fd_targets().items() if before_fds.get(fd) != target}
    new_threads = [t for t in threading.enumerate() if t not in before_threads]
    for thread in new_threads:
        if thread.name.startswith("asyncio-waitpid-"):
            # asyncio's child watcher reaps a subprocess the test ran in a thread of its own, which hands the
            # exit status to the loop and then ends: the test may finish first
            thread.join(5)
    busy = [t for t in new_threads if t.is_alive() and not is_idle_worker(t)]
    problems = []
    if unclosed:
        problems.append(f"left to the garbage collector unclosed: {unclosed}")
    if leaked:
        problems.append(f"file descriptors left open: {leaked}")
    if busy:
        problems.append(f"threads left running: {[t.name for t in busy]}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)
