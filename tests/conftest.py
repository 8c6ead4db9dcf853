from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from blockbuster import blockbuster_ctx

import ocicas
from ocicas import Engine


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


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[None]:
    """Fail any blocking call that ocicas makes on an asyncio event loop thread."""
    with blockbuster_ctx(["ocicas"]):
        yield
