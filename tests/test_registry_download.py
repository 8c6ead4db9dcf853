"""Blob bodies received straight into a consumer's buffers, past h11 (``registry._net.open_body``).

A directory put of a registry blob at least ``BYPASS_MIN`` long takes this path:
worker threads receive the body and hash and write it themselves on a plain
socket (``ResumingRaw.pour``), the event loop receives it into the put's buffers
otherwise (``ResumingRaw.readinto``: TLS). Checked against a real ``docker-registry``, plain and
TLS, and through the fault proxy: exact bytes, cuts resumed, a registry ignoring
``Range``, a stalled body, cancellation; the ``no_leaks`` fixture checks that no
connection is left open.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import httpx
import pytest
import trustme

import ocicas
import ocicas._threads
from ocicas import Engine
from ocicas._copy import copy
from ocicas._errors import BlobNotFoundError
from ocicas._reader import BlobReader
from ocicas._threads import checkpoint
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


async def test_a_reader_pours_a_body_past_h11_from_worker_threads(registry: Registry) -> None:
    """``pour``: worker threads receive the body and hand it to the sink themselves, a buffer at a time."""
    repository = await pushed(registry)
    async with await open_registry(registry.location(repository), docker_config=False) as source:
        reader = await source.get_blob(sha256(BIG))
        async with reader, reader._borrow_raw() as raw:
            assert isinstance(raw, ResumingRaw)
            buffer = memoryview(bytearray(MiB))
            got: list[bytes] = []
            threads: set[int] = set()

            def sink(chunk: memoryview) -> None:
                threads.add(threading.get_ident())
                got.append(bytes(chunk))

            moved = []
            while n := await raw.pour(buffer, sink, 3 * MiB):
                moved.append(n)
            assert raw._body is not None
            assert raw._body.poured == len(BIG)  # all of it in the threads: none through the event loop
        assert moved == [3 * MiB] * 4 + [MiB + 12345]
        assert [len(chunk) for chunk in got] == [MiB] * 13 + [12345]
        assert b"".join(got) == BIG
        assert threading.get_ident() not in threads


async def test_a_tls_body_is_not_poured_and_is_read_as_before(tls_registry: Registry) -> None:
    repository = await pushed(tls_registry)
    async with await open_registry(
        tls_registry.location(repository), docker_config=False, verify=verify_of(tls_registry)
    ) as source:
        reader = await source.get_blob(sha256(BIG))
        async with reader, reader._borrow_raw() as raw:
            assert isinstance(raw, ResumingRaw)
            sunk: list[bytes] = []
            assert await raw.pour(memoryview(bytearray(MiB)), lambda chunk: sunk.append(bytes(chunk)), MiB) is None
            buffer = bytearray(len(BIG))
            done = 0
            while n := await raw.readinto(memoryview(buffer)[done:]):
                done += n
        assert (sunk, bytes(buffer)) == ([], BIG)


async def test_a_pour_cut_and_resumed_hands_over_exact_bytes(registry: Registry, proxy: FaultProxy) -> None:
    """Cuts at 5 and 10 MiB: the pour resumes at the exact byte, within one call, and says so."""
    repository = await pushed(registry)
    proxy.faults = Faults(methods=frozenset({"GET"}), path=r"/blobs/", cut_after=5 * MiB)
    async with await open_registry(f"{proxy.url}/{repository}", docker_config=False, retry=FAST) as source:
        reader = await source.get_blob(sha256(BIG))
        async with reader, reader._borrow_raw() as raw:
            assert isinstance(raw, ResumingRaw)
            got: list[bytes] = []
            assert await raw.pour(memoryview(bytearray(MiB)), lambda chunk: got.append(bytes(chunk)), len(BIG)) == (
                len(BIG)
            )
            assert raw.retries == 2
        assert b"".join(got) == BIG
        assert len(proxy.faults.made("cut")) == 2


async def test_a_pour_cancelled_while_bytes_flow_stops_at_its_next_buffer(registry: Registry) -> None:
    """A cancel scope cancelled by the sink (a put's writer checks between buffers): nothing more is handed
    over, and nothing stays open (``no_leaks``)."""
    repository = await pushed(registry)
    async with await open_registry(registry.location(repository), docker_config=False) as source:
        reader = await source.get_blob(sha256(BIG))
        got: list[int] = []
        async with reader, reader._borrow_raw() as raw:
            assert isinstance(raw, ResumingRaw)
            with anyio.CancelScope() as scope:

                def sink(chunk: memoryview) -> None:
                    checkpoint()
                    got.append(len(chunk))
                    if len(got) == 2:
                        anyio.from_thread.run_sync(scope.cancel)

                await raw.pour(memoryview(bytearray(MiB)), sink, len(BIG))
            assert scope.cancelled_caught
            assert raw._body is not None
            assert isinstance(raw._body.error, httpx.ReadError)  # what was received past the sink is lost
            assert raw._body.poured == 2 * MiB
        assert got == [MiB, MiB]
        assert await source.read_blob(sha256(LAYERS[2])) == LAYERS[2]


async def test_a_stalled_pour_whose_sink_never_checks_is_cancelled(registry: Registry, proxy: FaultProxy) -> None:
    """The pour's own wait is a cancellation point: a stalled body, a sink that never checks, no resume."""
    repository = await pushed(registry)
    proxy.faults = Faults(methods=frozenset({"GET"}), path=r"/blobs/", stall=1, stall_seconds=3)
    async with await open_registry(
        f"{proxy.url}/{repository}", docker_config=False, retry=FAST, request_timeout=30
    ) as source:
        reader = await source.get_blob(sha256(BIG))
        got: list[int] = []
        async with reader, reader._borrow_raw() as raw:
            assert isinstance(raw, ResumingRaw)
            with anyio.move_on_after(0.5) as scope:
                await raw.pour(memoryview(bytearray(MiB)), lambda chunk: got.append(len(chunk)), len(BIG))
            assert scope.cancelled_caught
            assert raw.retries == 0
        assert sum(got) < len(BIG)
        assert await source.read_blob(sha256(LAYERS[2])) == LAYERS[2]
    assert len(proxy.faults.made("stall")) == 1


async def test_a_sink_failing_mid_pour_propagates_and_leaves_no_temporary_file(
    registry: Registry, tmp_path: Path
) -> None:
    """A directory put of a poured blob past ``RLIMIT_FSIZE``: the write's EFBIG, no ``blob-*`` file, and the
    engines serve the next request."""
    repository = await pushed(registry)
    target = tmp_path / "dst"
    async with (
        await open_registry(registry.location(repository), docker_config=False) as source,
        await new_layout(target) as dst,
    ):
        reader = await source.get_blob(sha256(BIG))
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3 * MiB, hard))
        try:
            async with reader:
                with pytest.raises(OSError, match="File too large") as caught:
                    await dst.put_blob(reader, expected_digest=sha256(BIG), expected_size=len(BIG))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)
        assert caught.value.errno == errno.EFBIG
        assert not [p for p in target.rglob("*") if p.is_file() and p.name.startswith("blob-")]
        with pytest.raises(BlobNotFoundError):
            await dst.stat_blob(sha256(BIG))
        assert await source.read_blob(sha256(LAYERS[1])) == LAYERS[1]
        async with await source.get_blob(sha256(BIG)) as again:
            await dst.put_blob(again, expected_digest=sha256(BIG), expected_size=len(BIG))
        assert await dst.read_blob(sha256(BIG)) == BIG


async def test_a_pulled_blob_is_poured_a_few_mib_a_hop(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory put of a big registry blob: a worker-thread hop per few MiB, not one per MiB."""
    repository = await pushed(registry)
    hops: list[str] = []
    inner = ocicas._threads._run_in_thread

    async def counting(func: Callable[[], Any], *, limiter: anyio.CapacityLimiter | None = None) -> Any:
        hops.append("hop")
        return await inner(func, limiter=limiter)

    async with (
        await open_registry(registry.location(repository), docker_config=False) as source,
        await new_layout(tmp_path / "dst") as dst,
    ):
        reader = await source.get_blob(sha256(BIG))
        monkeypatch.setattr(ocicas._threads, "_run_in_thread", counting)
        async with reader:
            await dst.put_blob(reader, expected_digest=sha256(BIG), expected_size=len(BIG))
        monkeypatch.undo()
        assert await dst.read_blob(sha256(BIG)) == BIG
    assert len(hops) < len(BIG) // MiB  # 4 pours of up to 4 MiB and the commit, and the put's own few


async def test_a_stalled_pour_under_a_default_socket_timeout_is_cancelled_not_resumed(
    registry: Registry, proxy: FaultProxy
) -> None:
    """``socket.setdefaulttimeout`` does not reach the pour's socket: a stall is waited out (polled, cancellable)
    up to the read timeout, never turned into a timeout of the default's length and a resume."""
    repository = await pushed(registry)
    proxy.faults = Faults(methods=frozenset({"GET"}), path=r"/blobs/", stall=1, stall_seconds=3)
    async with await open_registry(
        f"{proxy.url}/{repository}", docker_config=False, retry=FAST, request_timeout=30
    ) as source:
        reader = await source.get_blob(sha256(BIG))
        got: list[int] = []
        async with reader, reader._borrow_raw() as raw:
            assert isinstance(raw, ResumingRaw)
            default = socket.getdefaulttimeout()
            socket.setdefaulttimeout(0.2)
            try:
                with anyio.move_on_after(1) as scope:
                    await raw.pour(memoryview(bytearray(MiB)), lambda chunk: got.append(len(chunk)), len(BIG))
            finally:
                socket.setdefaulttimeout(default)
            assert scope.cancelled_caught
            assert raw.retries == 0
        assert sum(got) < len(BIG)
        assert len(proxy.faults.made("stall")) == 1


async def test_a_stalled_pour_does_not_hold_a_worker_thread(registry: Registry, proxy: FaultProxy) -> None:
    """With one default worker thread, a hop of anyone else's runs while a pour waits for a stalled body."""
    repository = await pushed(registry)
    proxy.faults = Faults(methods=frozenset({"GET"}), path=r"/blobs/", stall=1, stall_seconds=3)
    limiter = anyio.to_thread.current_default_thread_limiter()
    tokens = limiter.total_tokens
    events: list[str] = []
    async with await open_registry(
        f"{proxy.url}/{repository}", docker_config=False, retry=FAST, request_timeout=30
    ) as source:
        reader = await source.get_blob(sha256(BIG))
        async with reader, reader._borrow_raw() as raw:
            assert isinstance(raw, ResumingRaw)
            limiter.total_tokens = 1
            try:
                async with anyio.create_task_group() as tg:

                    async def pour() -> None:
                        with anyio.CancelScope() as scope:
                            await raw.pour(memoryview(bytearray(MiB)), lambda chunk: None, len(BIG))
                            events.append("poured")
                        if scope.cancelled_caught:
                            events.append("pour cancelled")

                    tg.start_soon(pour)
                    await anyio.sleep(0.3)  # the pour is in its thread (or back on the loop, waiting)
                    await anyio.to_thread.run_sync(lambda: events.append("other hop"))
                    tg.cancel_scope.cancel()
            finally:
                limiter.total_tokens = tokens
            assert raw.retries == 0
    assert events == ["other hop"]
    assert len(proxy.faults.made("stall")) == 1


async def test_bytes_a_sink_refused_on_the_read_path_are_poured_again(registry: Registry, proxy: FaultProxy) -> None:
    """After a cut, a registry ignoring ``Range`` sends the whole blob again: its head is skipped and the rest
    read and handed over in turn. A buffer the sink raised on is the first of the next pour, not lost."""
    repository = await pushed(registry)
    proxy.faults = Faults(methods=frozenset({"GET"}), path=r"/blobs/", cut_after=6 * MiB, cuts=1, strip_range=True)
    got: list[bytes] = []
    refused: list[int] = []

    def sink(chunk: memoryview) -> None:
        if sum(map(len, got)) >= 6 * MiB and not refused:
            refused.append(len(chunk))
            raise RuntimeError("refused")
        got.append(bytes(chunk))

    async with await open_registry(f"{proxy.url}/{repository}", docker_config=False, retry=FAST) as source:
        reader = await source.get_blob(sha256(BIG))
        async with reader, reader._borrow_raw() as raw:
            assert isinstance(raw, ResumingRaw)
            buffer = memoryview(bytearray(MiB))
            with pytest.raises(RuntimeError, match="refused"):
                await raw.pour(buffer, sink, len(BIG))
            assert raw.retries == 1
            assert await raw.pour(buffer, sink, len(BIG)) == len(BIG) - 6 * MiB
    assert refused == [MiB]
    assert b"".join(got) == BIG
    assert len(proxy.faults.made("cut")) == 1
