"""Registry transfers through a loopback proxy that cuts, resets, stalls and fails (``tests/fault_proxy.py``).

A real ``docker-registry`` sits behind the proxy; each test sets the faults it
wants and checks the exact outcome: the bytes that landed, the retries counted
in :class:`~ocicas.CopyResult` and reported as ``"retry"`` events, and, when the
retries run out, an error that names the blob and the byte reached, with
nothing partial left at the destination.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import ocicas
from ocicas import Descriptor, Digest, Engine
from ocicas._copy import CopyEvent, copy
from ocicas._errors import InvalidError, RegistryUnreachableError
from ocicas.registry import RegistryEngine, RetryPolicy, _upload, open_registry
from ocicas.registry._upload import UPLOAD_BUDGET
from ocicas.testing import sha256
from tests.fault_proxy import FaultProxy, Faults, running_proxy
from tests.images import put_image
from tests.registry_fixtures import Registry, start_registry
from tests.tools import require

pytestmark = pytest.mark.anyio

KiB = 1 << 10
FAST = RetryPolicy(retries=3, backoff=0.001, max_delay=5)
LAYERS = [os.urandom(1100 * KiB), os.urandom(700 * KiB), os.urandom(300 * KiB), b"a small layer"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    started = start_registry(require("docker-registry").path, tmp_path_factory.mktemp("registry"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def module_proxy(registry: Registry) -> Iterator[FaultProxy]:
    with running_proxy(registry.url) as proxy:
        yield proxy


@pytest.fixture
def proxy(module_proxy: FaultProxy) -> Iterator[FaultProxy]:
    """The proxy, with no faults yet (each test sets its own); idle again (no socket open) afterwards."""
    module_proxy.faults = Faults()
    yield module_proxy
    module_proxy.wait_idle()


async def through(proxy: FaultProxy, repository: str, **options: Any) -> RegistryEngine:
    options.setdefault("retry", FAST)
    return await open_registry(f"{proxy.url}/{repository}", docker_config=False, **options)


async def direct(registry: Registry, repository: str) -> RegistryEngine:
    return await open_registry(registry.location(repository), docker_config=False)


async def pushed_image(registry: Registry, layers: list[bytes] = LAYERS) -> tuple[str, Descriptor, list[Digest]]:
    """A new repository on ``registry`` holding an image of ``layers``, tagged ``v1``."""
    repository = registry.repository()
    async with await direct(registry, repository) as engine:
        root, digests = await put_image(engine, layers)
        await engine.put_reference("v1", root)
    return repository, root, digests


async def new_layout(path: Path) -> Engine:
    await ocicas.create_layout(path)
    return await ocicas.open_layout(path)


def layout_files(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


def cuts_needed(sizes: list[int], cut: int) -> int:
    """Answers cut after ``cut`` bytes, each resumed one starting where the last stopped."""
    return sum(math.ceil(size / cut) - 1 for size in sizes if size > cut)


async def test_a_pull_through_cuts_resumes_every_blob_and_counts_the_retries(
    registry: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    repository, root, digests = await pushed_image(registry)
    cut = 256 * KiB
    proxy.faults = Faults(methods=frozenset({"GET"}), path=r"/blobs/", cut_after=cut)
    events: list[CopyEvent] = []
    async with await through(proxy, repository) as src, await new_layout(tmp_path / "dst") as dst:
        result = await copy(src, "v1", dst, progress=events.append)
        for digest in digests:
            assert sha256(await dst.read_blob(digest)) == digest
        assert await dst.get_reference("v1") == root
    expected = cuts_needed([len(layer) for layer in LAYERS], cut)
    assert expected == 7
    assert len(proxy.faults.made("cut")) == expected
    assert result.retries == expected
    assert sorted(result.copied) == sorted(digests)
    retried = [e.descriptor.digest for e in events if e.kind == "retry" and e.descriptor is not None]
    per_blob = {sha256(layer): math.ceil(len(layer) / cut) - 1 for layer in LAYERS if len(layer) > cut}
    assert {d: retried.count(d) for d in set(retried)} == per_blob


async def test_get_blob_readers_resume_on_their_own(registry: Registry, proxy: FaultProxy) -> None:
    repository, _, _ = await pushed_image(registry)
    proxy.faults = Faults(methods=frozenset({"GET"}), cut_after=100 * KiB)
    async with await through(proxy, repository) as src:
        for layer in LAYERS:
            async with await src.get_blob(sha256(layer)) as reader:
                assert b"".join([chunk async for chunk in reader]) == layer
        assert src._client.transfer_retries == cuts_needed([len(layer) for layer in LAYERS], 100 * KiB)


async def test_manifests_by_digest_resume_too(registry: Registry, proxy: FaultProxy) -> None:
    manifest_layers = [os.urandom(64) for _ in range(40)]  # a manifest of ≈ 4 KiB
    repository, root, _ = await pushed_image(registry, manifest_layers)
    # distribution ignores Range on the manifest store (a whole 200 each time): the head is skipped
    proxy.faults = Faults(methods=frozenset({"GET"}), path=r"/manifests/sha256:", cut_after=1000, cuts=2)
    async with await through(proxy, repository) as src:
        assert await src.get_reference("v1") == root  # now known as a manifest: read from the manifest store
        data = await src.read_blob(root.digest)
        assert src._client.transfer_retries == 2
    assert sha256(data) == root.digest
    assert len(proxy.faults.made("cut")) == 2


async def test_a_registry_that_ignores_range_still_gives_exact_bytes(
    registry: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    repository, _, digests = await pushed_image(registry)
    proxy.faults = Faults(methods=frozenset({"GET"}), path=r"/blobs/", cut_after=300 * KiB, cuts=2, strip_range=True)
    async with await through(proxy, repository) as src, await new_layout(tmp_path / "dst") as dst:
        result = await copy(src, "v1", dst)
        for digest in digests:
            assert sha256(await dst.read_blob(digest)) == digest
    assert result.retries == 2
    assert len(proxy.faults.made("cut")) == 2
    assert 1 <= len(proxy.faults.made("range stripped")) <= 2  # a resume from byte 0 sends no Range


async def test_exhausted_retries_name_the_blob_and_byte_and_leave_nothing(
    registry: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    big = LAYERS[0]
    repository, _, _ = await pushed_image(registry, [big])
    # every answer is cut at the same byte, and a resumed one starts from the top again: no progress
    proxy.faults = Faults(methods=frozenset({"GET"}), path=r"/blobs/", cut_after=100 * KiB, strip_range=True)
    target = tmp_path / "dst"
    async with await through(proxy, repository) as src, await new_layout(target) as dst:
        before = layout_files(target)
        with pytest.raises(RegistryUnreachableError) as info:
            await copy(src, "v1", dst, concurrency=1)
        assert await dst.list_references() == []
    message = str(info.value)
    assert message.startswith(
        f"connection to repository {repository!r} on registry {proxy.url} dropped while reading blob "
        f"{sha256(big)} at byte {100 * KiB}: "
    )
    assert message.endswith(" (gave up after 3 retries without progress)")
    added = layout_files(target) - before  # no temporary file, no partial blob: only whole, verified blobs
    assert all(name.startswith("blobs/sha256/") for name in added), added
    assert all(sha256((target / name).read_bytes()).encoded == name.rsplit("/", 1)[1] for name in added)
    assert f"blobs/sha256/{sha256(big).encoded}" not in added


async def test_a_range_answer_from_elsewhere_is_refused(registry: Registry, tmp_path: Path) -> None:
    """A ``206`` that does not start where the download stopped is never mixed in."""
    data = os.urandom(50 * KiB)
    digest = sha256(data)
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        if request.url.path == "/v2/":
            return httpx.Response(200, json={})
        calls += 1
        if "range" not in request.headers:
            return httpx.Response(200, headers={"Content-Length": str(len(data))}, stream=_Cut(data, 20 * KiB))
        return httpx.Response(206, headers={"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"}, content=data)

    transport = httpx.MockTransport(handler)
    async with await open_registry(
        "http://reg.test/team/app", docker_config=False, transport=transport, retry=FAST
    ) as engine:
        with pytest.raises(InvalidError) as info:
            await engine.read_blob(digest)
    assert str(info.value) == (
        f"repository 'team/app' on registry http://reg.test answered a request for bytes {20 * KiB}- of blob "
        f"{digest} with Content-Range 'bytes 0-{len(data) - 1}/{len(data)}': refusing to mix bytes"
    )
    assert calls == 2


class _Cut(httpx.AsyncByteStream):
    """A response body that breaks off after ``at`` bytes."""

    def __init__(self, data: bytes, at: int) -> None:
        self._data, self._at = data, at

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._data[: self._at]
        raise httpx.ReadError("connection reset by peer")


async def test_stalls_and_5xx_are_ridden_out(registry: Registry, proxy: FaultProxy, tmp_path: Path) -> None:
    repository, _, digests = await pushed_image(registry)
    proxy.faults = Faults(methods=frozenset({"GET"}), path=r"/blobs/", fail=[503, 500], stall=1, stall_seconds=3)
    async with (
        await through(proxy, repository, request_timeout=0.5) as src,
        await new_layout(tmp_path / "dst") as dst,
    ):
        result = await copy(src, "v1", dst, concurrency=1)
        for digest in digests:
            assert sha256(await dst.read_blob(digest)) == digest
    assert [fault for _, _, fault in proxy.faults.log if not fault.isdigit() or int(fault) >= 500] == [
        "503",
        "500",
        "stall",
    ]
    assert result.retries == 3


# -- pushes ---------------------------------------------------------------------------------


async def layout_image(path: Path) -> tuple[Engine, Descriptor, list[Digest]]:
    engine = await new_layout(path)
    root, digests = await put_image(engine, LAYERS)
    await engine.put_reference("v1", root)
    return engine, root, digests


async def check_pushed(registry: Registry, repository: str, root: Descriptor, digests: list[Digest]) -> None:
    async with await direct(registry, repository) as engine:
        assert await engine.get_reference("v1") == root
        for digest in digests:
            assert sha256(await engine.read_blob(digest)) == digest


UPLOADS = r"/blobs/uploads/"


@pytest.mark.parametrize("fault", ["503", "reset"])
async def test_a_push_resumes_chunks_the_registry_did_not_get(
    registry: Registry, proxy: FaultProxy, tmp_path: Path, fault: str
) -> None:
    repository = registry.repository()
    src, root, digests = await layout_image(tmp_path / "src")
    faults = Faults(methods=frozenset({"PATCH"}), path=UPLOADS)
    if fault == "503":
        faults.fail = [503, 503]
    else:
        faults.reset = 2
    proxy.faults = faults
    events: list[CopyEvent] = []
    async with src, await through(proxy, repository, chunk_size=256 * KiB) as dst:
        result = await copy(src, "v1", dst, concurrency=1, progress=events.append)
    await check_pushed(registry, repository, root, digests)
    assert len(faults.made(fault)) == 2
    assert result.retries == 2
    assert [e.kind for e in events].count("retry") == 2


async def test_a_monolithic_upload_cut_midway_is_made_again(
    registry: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    repository = registry.repository()
    src, root, digests = await layout_image(tmp_path / "src")
    # the first PUT carrying more than 100 bytes (the config, in hand) is cut: distribution drops that session
    proxy.faults = Faults(methods=frozenset({"PUT"}), path=UPLOADS, cut_request_after=100, cuts=1)
    async with src, await through(proxy, repository, chunk_size=256 * KiB) as dst:
        result = await copy(src, "v1", dst, concurrency=1)
    await check_pushed(registry, repository, root, digests)
    assert len(proxy.faults.made("request cut")) == 1
    # one failure, one count: the cut PUT (its session found lost, a new upload goes under the same count)
    assert result.retries == 1


async def test_a_push_through_5xx_on_every_upload_step_lands_verified(
    registry: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    repository = registry.repository()
    src, root, digests = await layout_image(tmp_path / "src")
    # the uploads' POST, PATCH and PUT alike (what is retried while a blob moves is what the copy counts)
    proxy.faults = Faults(
        methods=frozenset({"POST", "PATCH", "PUT"}), path=UPLOADS, fail=[503, 500, 503, 503, 500, 503]
    )
    # retries enough for all six to hit one request: which requests they hit depends on timing
    patient = RetryPolicy(retries=6, backoff=0.001, max_delay=5)
    async with src, await through(proxy, repository, chunk_size=256 * KiB, retry=patient) as dst:
        result = await copy(src, "v1", dst)
    await check_pushed(registry, repository, root, digests)
    assert len([f for _, _, f in proxy.faults.log if f in ("500", "503")]) == 6
    assert result.retries == 6


async def test_concurrent_pushes_hold_at_most_the_upload_budget(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # two 256 KiB chunks in flight across all four transfers: each chunk is reserved before it is read
    monkeypatch.setattr(UPLOAD_BUDGET, "limit", 512 * KiB)
    repository = registry.repository()
    src, root, digests = await layout_image(tmp_path / "src")
    held: list[int] = []
    async with src, await direct_options(registry, repository, chunk_size=256 * KiB) as dst:
        await copy(src, "v1", dst, concurrency=4, progress=lambda event: held.append(UPLOAD_BUDGET.used))
    await check_pushed(registry, repository, root, digests)
    assert 0 < max(held) <= 512 * KiB
    assert UPLOAD_BUDGET.used == 0


async def test_a_failed_push_gives_its_budget_back(registry: Registry, proxy: FaultProxy, tmp_path: Path) -> None:
    repository = registry.repository()
    src, _, _ = await layout_image(tmp_path / "src")
    proxy.faults = Faults(methods=frozenset({"PATCH"}), path=UPLOADS, fail=[503] * 100)
    async with src, await through(proxy, repository, chunk_size=256 * KiB) as dst:
        with pytest.raises(ocicas.RegistryError):
            await copy(src, "v1", dst)
    assert UPLOAD_BUDGET.used == 0


async def test_a_chunk_bigger_than_the_whole_budget_goes_alone(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(UPLOAD_BUDGET, "limit", 100 * KiB)
    repository = registry.repository()
    src, root, digests = await layout_image(tmp_path / "src")
    async with src, await direct_options(registry, repository, chunk_size=256 * KiB) as dst:
        await copy(src, "v1", dst, concurrency=4)
    await check_pushed(registry, repository, root, digests)
    assert UPLOAD_BUDGET.used == 0


async def direct_options(registry: Registry, repository: str, **options: Any) -> RegistryEngine:
    return await open_registry(registry.location(repository), docker_config=False, **options)


# -- streamed pushes (a layout's blob goes up as one PATCH, read from its file) ----------------


def uploads_left(registry: Registry, repository: str) -> list[str]:
    """Upload sessions the registry still keeps for ``repository``."""
    path = registry.directory / "data" / "docker" / "registry" / "v2" / "repositories" / repository / "_uploads"
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


async def test_a_streamed_push_cut_midway_starts_a_new_upload_and_lands_verified(
    registry: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    repository = registry.repository()
    src, root, digests = await layout_image(tmp_path / "src")
    # distribution keeps the 300 KiB it got, and then refuses the session: the blob goes again from byte 0
    proxy.faults = Faults(methods=frozenset({"PATCH"}), path=UPLOADS, cut_request_after=300 * KiB, cuts=1)
    events: list[CopyEvent] = []
    async with src, await through(proxy, repository, chunk_size=256 * KiB) as dst:
        result = await copy(src, "v1", dst, concurrency=1, progress=events.append)
    await check_pushed(registry, repository, root, digests)
    assert len(proxy.faults.made("request cut")) == 1
    # one PATCH per blob over the chunk size (three), and the cut one again
    assert sorted(f for m, _, f in proxy.faults.log if m == "PATCH") == ["202", "202", "202", "request cut"]
    assert result.retries == 1
    assert [e.kind for e in events].count("retry") == 1
    # every byte is reported once, though the cut blob was read twice
    assert sum(e.nbytes for e in events if e.kind == "progress") == result.bytes_copied
    assert UPLOAD_BUDGET.used == 0
    # distribution keeps the cut session's directory (its state no longer matches, so even DELETE is refused)
    # until its upload purger runs; the upload that landed left nothing
    assert len(uploads_left(registry, repository)) == 1


async def test_streamed_pushes_that_keep_being_cut_name_the_blob_and_byte_and_tag_nothing(
    registry: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    repository = registry.repository()
    src, _, _ = await layout_image(tmp_path / "src")
    proxy.faults = Faults(methods=frozenset({"PATCH"}), path=UPLOADS, cut_request_after=100 * KiB)
    async with src, await through(proxy, repository, chunk_size=256 * KiB) as dst:
        with pytest.raises(RegistryUnreachableError) as info:
            await copy(src, "v1", dst, concurrency=1)
        assert await dst.list_references() == []
    found = re.match(
        r"pushing blob (\S+) stopped at byte (\d+) of (\d+): connection to repository '(.+?)' ", str(info.value)
    )
    assert found is not None, str(info.value)
    blob, reached, size = Digest(found[1]), int(found[2]), int(found[3])
    assert found[4] == repository
    assert size == {sha256(layer): len(layer) for layer in LAYERS}[blob] > 256 * KiB
    assert 100 * KiB <= reached <= size
    assert len(proxy.faults.made("request cut")) == 4  # the first PATCH, then 3 retries
    assert UPLOAD_BUDGET.used == 0
    async with await direct(registry, repository) as engine:
        assert await engine.stat_blobs([blob]) == {}


async def test_a_stream_that_cannot_be_read_again_fails_clearly_when_cut(registry: Registry, proxy: FaultProxy) -> None:
    repository = registry.repository()
    data = os.urandom(1100 * KiB)
    digest = sha256(data)

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 100 * KiB):
            yield data[start : start + 100 * KiB]

    proxy.faults = Faults(methods=frozenset({"PATCH"}), path=UPLOADS, cut_request_after=300 * KiB, cuts=1)
    async with await through(proxy, repository, chunk_size=512 * KiB) as dst:
        with pytest.raises(RegistryUnreachableError) as info:
            await dst.put_blob(pieces(), expected_digest=digest, expected_size=len(data))
    message = str(info.value)
    assert message.startswith(
        f"pushing blob {digest} stopped at byte {600 * KiB} of {len(data)}, and its source cannot be read again: "
    )
    assert len(proxy.faults.made("request cut")) == 1
    assert UPLOAD_BUDGET.used == 0
    async with await direct(registry, repository) as engine:
        assert await engine.stat_blobs([digest]) == {}


async def test_a_streamed_push_resumes_at_the_byte_the_registry_reports(tmp_path: Path) -> None:
    """Against a registry that keeps what a cut PATCH brought (and says so), the next PATCH starts there."""
    data = os.urandom(1500 * KiB)
    digest = sha256(data)
    kept = bytearray()
    ranges: list[str] = []
    cut_at = 300 * KiB + 1  # not on a piece boundary: the piece before is read and hashed again, not sent

    async def handler(request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        if path == "/v2/":
            return httpx.Response(200, json={})
        if method == "HEAD":
            return httpx.Response(404)
        if method == "POST":
            return httpx.Response(202, headers={"Location": "/v2/team/app/blobs/uploads/u1"})
        if method == "GET":
            return httpx.Response(
                204, headers={"Location": "/v2/team/app/blobs/uploads/u1", "Range": f"0-{len(kept) - 1}"}
            )
        if method == "PATCH":
            ranges.append(request.headers["content-range"])
            assert isinstance(request.stream, httpx.AsyncByteStream)
            async for piece in request.stream:
                if not ranges[1:] and len(kept) + len(piece) > cut_at:
                    kept.extend(piece[: cut_at - len(kept)])
                    raise httpx.WriteError("connection reset by peer")
                kept.extend(piece)
            return httpx.Response(202, headers={"Location": "/v2/team/app/blobs/uploads/u1"})
        assert method == "PUT"
        assert request.url.params["digest"] == digest
        return httpx.Response(201 if sha256(bytes(kept)) == digest else 400)

    await ocicas.create_layout(tmp_path / "src")
    async with (
        await ocicas.open_layout(tmp_path / "src") as src,
        await open_registry(
            "http://reg.test/team/app",
            docker_config=False,
            transport=httpx.MockTransport(handler),
            retry=FAST,
            chunk_size=256 * KiB,
        ) as dst,
    ):
        await src.put_blob(data)
        before = dst._client.transfer_retries
        async with await src.get_blob(digest) as reader:
            assert await dst.put_blob(reader, expected_digest=digest, expected_size=len(data)) == (digest, len(data))
        assert dst._client.transfer_retries - before == 1
    assert ranges == [f"0-{len(data) - 1}", f"{cut_at}-{len(data) - 1}"]
    assert bytes(kept) == data
    assert UPLOAD_BUDGET.used == 0


async def test_a_file_body_from_any_byte_gives_exactly_the_rest_and_one_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # three hash states at most: resuming reads (and hashes, without sending) from the last one before the byte
    monkeypatch.setattr(_upload, "MAX_STATES", 3)
    piece = _upload.FILE_PIECE
    data = os.urandom(5 * piece + 1234)
    path = anyio.Path(tmp_path / "blob")
    await path.write_bytes(data)
    fd = await anyio.to_thread.run_sync(os.open, str(path), os.O_RDONLY)
    try:
        source = _upload.FileSource(fd, len(data), sha256(data))
        progress: list[int] = []
        assert b"".join([p async for p in _upload.FileBody(source, 0, progress.append)]) == data
        source.verify()
        for start in (len(data) - 1, 3 * piece + 7, 2 * piece, piece, 1, 0):
            body = _upload.FileBody(source, start, progress.append)
            assert b"".join([p async for p in body]) == data[start:]
            source.verify()
        assert sum(progress) == len(data)  # every byte reported once
        assert len(source._states) <= 3
        assert UPLOAD_BUDGET.used == 0
    finally:
        os.close(fd)
