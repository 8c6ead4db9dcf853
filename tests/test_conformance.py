"""The shared Engine conformance suite against both built-in engines."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import ocicas
from ocicas.testing import EngineConformance


class TestMemoryEngine(EngineConformance):
    @pytest.fixture
    async def engine(self) -> AsyncIterator[ocicas.Engine]:
        async with ocicas.MemoryEngine() as engine:
            yield engine


class TestDirEngine(EngineConformance):
    @pytest.fixture
    async def engine(self, tmp_path: Path) -> AsyncIterator[ocicas.Engine]:
        await ocicas.create_layout(tmp_path / "layout")
        async with await ocicas.open_layout(tmp_path / "layout") as engine:
            yield engine


class TestDirEngineDirectWrites(EngineConformance):
    """The same protocol on a layout whose large puts write past the page cache (``direct_writes``)."""

    @pytest.fixture
    async def engine(self, tmp_path: Path) -> AsyncIterator[ocicas.Engine]:
        await ocicas.create_layout(tmp_path / "layout")
        async with await ocicas.open_layout(tmp_path / "layout", direct_writes=True) as engine:
            yield engine
