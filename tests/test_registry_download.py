"""Blob bodies received straight into a consumer's buffers, past h11 (``registry._net.open_body``).

A directory put of a registry blob at least ``BYPASS_MIN`` long takes this path
(``ResumingRaw.readinto``). Checked against a real ``docker-registry``, plain and
TLS, and through the fault proxy: exact bytes, cuts resumed, a registry ignoring
``Range``, a stalled body, cancellation; the ``no_leaks`` fixture checks that no
connection is left open.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import trustme

import ocicas
from ocicas import Engine
from ocicas._copy import copy
from ocicas._errors import BlobNotFoundError
from ocicas._reader import BlobReader
from ocicas.registry import RegistryEngine, RetryPolicy, open_registry
from ocicas.registry._download import BYPASS_MIN, ResumingRaw
from ocicas.testing import sha256
from tests import test_registry_faults as faulty
from tests.fault_proxy import FaultProxy, Faults
from tests.images import put_image
from tests.registry_fixtures import Registry, start_registry
from tests.tools import require

pytestmark = pytest.mark.anyio

MiB = 1 << 20
FAST = RetryPolicy(retries=3, backoff=0.001, max_delay=5)
BIG = os.urandom(13 * MiB + 12345)
LAYERS = [BIG, os.urandom(BYPASS_MIN + 1), b"a small layer"]


registry = faulty.registry  # the fault tests' fixtures: a docker-registry and a proxy before it, per module
module_proxy = faulty.module_proxy
proxy = faulty.proxy


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    started = start_registry(require("docker-registry").path, tmp_path_factory.mktemp("tls"), ca=trustme.CA())
    yield started
    started.stop()


def verify_of(registry: Registry) -> bool | ssl.SSLContext:
    return True if registry.ca_file is None else ssl.create_default_context(cafile=str(registry.ca_file))


async def pushed(registry: Registry) -> str:
    """A new repository on ``registry`` holding an image of :data:`LAYERS`, tagged ``v1``."""
    repository = registry.repository()
    async with await open_registry(
        registry.location(repository), docker_config=False, verify=verify_of(registry)
    ) as engine:
        root, _ = await put_image(engine, LAYERS)
        await engine.put_reference("v1", root)
    return repository


async def new_layout(path: Path) -> Engine:
    await ocicas.create_layout(path)
    return await ocicas.open_layout(path)


async def pull(source: RegistryEngine, path: Path) -> ocicas.CopyResult:
    """Copy ``v1`` into a new layout at ``path``; every layer must be there, exactly."""
    async with await new_layout(path) as dst:
        result = await copy(source, "v1", dst)
        for layer in LAYERS:
            assert await dst.read_blob(sha256(layer)) == layer
    return result


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_pull_receives_big_bodies_past_h11_exactly(
    registry: Registry, tls_registry: Registry, tmp_path: Path, tls: bool
) -> None:
    server = tls_registry if tls else registry
    repository = await pushed(server)
    async with await open_registry(
        server.location(repository), docker_config=False, verify=verify_of(server)
    ) as source:
        result = await pull(source, tmp_path / "dst")
    assert result.retries == 0


async def test_a_reader_lends_a_body_read_past_h11(registry: Registry) -> None:
    """The bypass is what a big blob's ``readinto`` takes; the connection is closed after it, and not reused."""
    repository = await pushed(registry)
    async with await open_registry(registry.location(repository), docker_config=False) as source:
        reader = await source.get_blob(sha256(BIG))
        assert isinstance(reader, BlobReader)
        async with reader, reader._borrow_raw() as raw:
            assert isinstance(raw, ResumingRaw)
            buffer = bytearray(3 * MiB)
            got = []
            while n := await raw.readinto(memoryview(buffer)):
                # the transport receives into the buffer (asyncio), or the socket does (trio)
                assert type(raw._body).__name__ in {"_AsyncioBody", "_TrioBody"}
                got.append(bytes(buffer[:n]))
        assert b"".join(got) == BIG
        assert await source.read_blob(sha256(LAYERS[2])) == LAYERS[2]  # the next request: a new connection


async def test_cut_bodies_resume_past_h11_with_exact_bytes(
    registry: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    repository = await pushed(registry)
    cut = 5 * MiB
    proxy.faults = Faults(methods=frozenset({"GET"}), path=r"/blobs/", cut_after=cut)
    async with await open_registry(f"{proxy.url}/{repository}", docker_config=False, retry=FAST) as source:
        result = await pull(source, tmp_path / "dst")
    assert result.retries == len(BIG) // cut  # 13 MiB: cut at 5 and 10 (answers of 13 and 8 MiB read past h11)
    assert len(proxy.faults.made("cut")) == result.retries


async def test_a_registry_ignoring_range_past_h11_gives_exact_bytes(
    registry: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    """Each answer is the whole blob again: its head is received and skipped, never delivered twice."""
    repository = await pushed(registry)
    proxy.faults = Faults(methods=frozenset({"GET"}), path=r"/blobs/", cut_after=6 * MiB, cuts=2, strip_range=True)
    async with await open_registry(f"{proxy.url}/{repository}", docker_config=False, retry=FAST) as source:
        result = await pull(source, tmp_path / "dst")
    assert result.retries == 2
    assert len(proxy.faults.made("cut")) == 2


async def test_a_stalled_body_past_h11_times_out_and_resumes(
    registry: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    repository = await pushed(registry)
    proxy.faults = Faults(methods=frozenset({"GET"}), path=r"/blobs/", stall=1, stall_seconds=3)
    async with await open_registry(
        f"{proxy.url}/{repository}", docker_config=False, retry=FAST, request_timeout=0.5
    ) as source:
        result = await pull(source, tmp_path / "dst")
    assert result.retries == 1
    assert len(proxy.faults.made("stall")) == 1


async def test_a_pull_cancelled_mid_body_leaves_no_connection_or_file(
    registry: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    """Cancelled while waiting for a stalled body read past h11: nothing stays open (``no_leaks``), no blob lands."""
    repository = await pushed(registry)
    proxy.faults = Faults(methods=frozenset({"GET"}), path=r"/blobs/", stall=10, stall_seconds=3)
    target = tmp_path / "dst"
    async with (
        await open_registry(f"{proxy.url}/{repository}", docker_config=False) as source,
        await new_layout(target) as dst,
    ):
        with anyio.move_on_after(1) as scope:
            await copy(source, "v1", dst)
        assert scope.cancelled_caught
        with pytest.raises(BlobNotFoundError):
            await dst.stat_blob(sha256(BIG))
    assert not [p for p in target.rglob("*") if p.is_file() and p.name.startswith("blob-")]


async def test_reads_after_a_readinto_past_h11_go_on_from_the_same_body(registry: Registry) -> None:
    repository = await pushed(registry)
    async with await open_registry(registry.location(repository), docker_config=False) as source:
        reader = await source.get_blob(sha256(BIG))
        async with reader, reader._borrow_raw() as raw:
            assert isinstance(raw, ResumingRaw)
            head = bytearray(MiB + 7)
            assert await raw.readinto(memoryview(head)) == len(head)
            middle = await raw.read_some(3 * MiB)
            rest = [await raw.read(len(BIG))]
            assert raw._body is not None
            while piece := await raw.read(len(BIG)):
                rest.append(piece)
        assert bytes(head) + middle + b"".join(rest) == BIG
