from __future__ import annotations

from collections.abc import Iterator

import pytest
from blockbuster import blockbuster_ctx


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on asyncio and on trio."""
    return str(request.param)


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[None]:
    """Fail any blocking call that ocicas makes on an asyncio event loop thread."""
    with blockbuster_ctx(["ocicas"]):
        yield
