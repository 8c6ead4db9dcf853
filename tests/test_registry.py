"""The registry engine against real ``docker-registry`` processes on loopback (and fakes, for failures).

One registry of each kind per module (plain, htpasswd, TLS), started from
``tests/registry_fixtures.py``; each test works in a repository of its own. The
conformance suite runs on the plain one. Failures a real registry cannot be made
to produce on demand (5xx, dropped connections, bearer tokens, lying digests) are
played by ``httpx.MockTransport`` fakes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

import ocicas
from ocicas.registry import RegistryEngine, open_registry
from ocicas.testing import EngineConformance
from tests.registry_fixtures import Registry, start_registry
from tests.tools import require

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain ``docker-registry`` (deletes enabled), for the module."""
    started = start_registry(require("docker-registry").path, tmp_path_factory.mktemp("registry"))
    yield started
    started.stop()


async def open_repository(registry: Registry, prefix: str = "test", **options: object) -> RegistryEngine:
    options.setdefault("docker_config", False)
    return await open_registry(registry.location(registry.repository(prefix)), **options)  # type: ignore[arg-type]


class TestRegistryEngine(EngineConformance):
    """The shared conformance suite, on a fresh repository of a real registry per test."""

    unsupported = frozenset({"list_blobs", "list_roots"})
    references_are_tags = True

    @pytest.fixture
    async def engine(self, registry: Registry) -> AsyncIterator[ocicas.Engine]:
        async with await open_repository(registry, "conformance") as engine:
            yield engine
