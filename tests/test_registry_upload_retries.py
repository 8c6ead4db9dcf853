"""Uploads whose questions fail too: every request of an upload step shares one bounded retry count.

When an upload's ``PATCH`` fails, the engine asks the registry how far it got (``GET``
on the upload, ``Range``). A transient failure of that question (a reset, a ``503``)
is one more retry of the same step under the client's :class:`RetryPolicy`, not a
retry loop of its own, nor taken for a lost session; when the count runs out, the
error names the blob, the step and the byte reached. A real ``docker-registry`` sits
behind the fault proxy (``tests/fault_proxy.py``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path

import httpx
import pytest

import ocicas
from ocicas.registry import RegistryEngine, RetryPolicy, open_registry
from ocicas.registry._upload import UPLOAD_BUDGET
from ocicas.testing import sha256
from tests import test_registry_faults as faulty
from tests.fault_proxy import FaultProxy, Faults
from tests.registry_fixtures import Registry
from tests.test_registry_faults import LAYERS, UPLOADS, check_pushed, layout_image

pytestmark = pytest.mark.anyio

# the fixtures of the faults tests: a registry (one for this module), the proxy in front of it
registry = faulty.registry
module_proxy = faulty.module_proxy
proxy = faulty.proxy

KiB = 1 << 10
RETRIES = 3
FAST = RetryPolicy(retries=RETRIES, backoff=0.001, max_delay=5)
SIZES = {sha256(layer): len(layer) for layer in LAYERS}


async def through(proxy: FaultProxy, repository: str) -> RegistryEngine:
    return await open_registry(f"{proxy.url}/{repository}", docker_config=False, retry=FAST, chunk_size=256 * KiB)


async def mock_registry(handler: Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]) -> RegistryEngine:
    """An engine for ``team/app`` on a registry that is ``handler`` (an ``httpx.MockTransport``)."""
    return await open_registry(
        "http://reg.test/team/app",
        docker_config=False,
        transport=httpx.MockTransport(handler),
        retry=FAST,
        chunk_size=256 * KiB,
    )


async def once(data: bytes) -> AsyncIterator[bytes]:
    """``data`` in 100 KiB pieces, as a stream that cannot be read again."""
    for start in range(0, len(data), 100 * KiB):
        yield data[start : start + 100 * KiB]


def upload_log(faults: Faults) -> list[tuple[str, str]]:
    """The ``PATCH`` and ``GET`` requests on upload sessions the proxy saw: (method, fault or status)."""
    return [(m, f) for m, p, f in faults.log if m in ("PATCH", "GET") and "/blobs/uploads/" in p]


def asking_faults(fault: str, count: int) -> Faults:
    """The first ``PATCH`` answered 503, then ``count`` status questions (``GET``) met by ``fault``."""
    faults = Faults(methods=frozenset({"PATCH", "GET"}), path=UPLOADS, fail=[503])
    if fault == "503":
        faults.fail += [503] * count
    else:
        faults.reset = count
    return faults


def dropped_or_503(fault: str, repository: str, proxy: FaultProxy) -> str:
    """How the client words a status question's failure (its start: the rest names the session's URL)."""
    where = f"repository {repository!r} on registry {proxy.url}"
    request = f"GET /v2/{repository}/blobs/uploads/"
    return (
        f"{where} answered HTTP 503 to {request}"
        if fault == "503"
        else f"connection to {where} dropped during {request}"
    )


@pytest.mark.parametrize("fault", ["503", "reset"])
async def test_status_questions_that_keep_failing_end_a_streamed_push_naming_blob_step_and_byte(
    registry: Registry, proxy: FaultProxy, tmp_path: Path, fault: str
) -> None:
    repository = registry.repository()
    src, _, _ = await layout_image(tmp_path / "src")
    proxy.faults = faults = asking_faults(fault, RETRIES)
    async with src, await through(proxy, repository) as dst:
        with pytest.raises(ocicas.RegistryError) as info:
            await ocicas.copy(src, "v1", dst, concurrency=1)
        # one count for the file: the PATCH's failure, then two failed questions; the third ends it
        assert dst._client.transfer_retries == RETRIES
        assert await dst.list_references() == []
    assert upload_log(faults) == [("PATCH", "503"), *[("GET", fault)] * RETRIES]
    error = info.value
    assert type(error) is (ocicas.RegistryError if fault == "503" else ocicas.RegistryUnreachableError)
    blob = ocicas.Digest(str(error).split()[2])
    size = SIZES[blob]
    prefix = f"pushing blob {blob} stopped at byte {size} of {size}: asking the registry how far the upload got: "
    assert str(error).startswith(prefix + dropped_or_503(fault, repository, proxy)), str(error)
    assert UPLOAD_BUDGET.used == 0
    async with await open_registry(registry.location(repository), docker_config=False) as engine:
        assert await engine.stat_blobs([blob]) == {}


@pytest.mark.parametrize("fault", ["503", "reset"])
async def test_status_questions_that_keep_failing_end_a_chunked_push_naming_blob_step_and_byte(
    registry: Registry, proxy: FaultProxy, fault: str
) -> None:
    repository = registry.repository()
    data = os.urandom(1100 * KiB)
    digest = sha256(data)
    proxy.faults = faults = asking_faults(fault, RETRIES)
    async with await through(proxy, repository) as dst:
        with pytest.raises(ocicas.RegistryError) as info:
            await dst.put_blob(once(data), expected_digest=digest, expected_size=len(data))
        assert dst._client.transfer_retries == RETRIES
    assert upload_log(faults) == [("PATCH", "503"), *[("GET", fault)] * RETRIES]
    prefix = (
        f"pushing blob {digest} stopped at byte {300 * KiB} of {len(data)}, and its source cannot be read again: "
        "asking the registry how far the upload got: "
    )
    assert str(info.value).startswith(prefix + dropped_or_503(fault, repository, proxy)), str(info.value)
    assert UPLOAD_BUDGET.used == 0


async def test_status_questions_that_fail_within_the_count_are_ridden_out(
    registry: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    repository = registry.repository()
    src, root, digests = await layout_image(tmp_path / "src")
    # the PATCH's failure and two failed questions: the step's three retries, the third question answers
    proxy.faults = faults = Faults(methods=frozenset({"PATCH", "GET"}), path=UPLOADS, fail=[503, 503], reset=1)
    async with src, await through(proxy, repository) as dst:
        result = await ocicas.copy(src, "v1", dst, concurrency=1)
    await check_pushed(registry, repository, root, digests)
    assert result.retries == RETRIES
    log = upload_log(faults)
    assert log[:4] == [("PATCH", "503"), ("GET", "503"), ("GET", "reset"), ("GET", "204")]
    # the cut blob's PATCH again, from the byte the registry reported (0), and one for each other large layer
    assert log[4:] == [("PATCH", "202")] * 3
    assert UPLOAD_BUDGET.used == 0


async def push_a_files_blob(tmp_path: Path, data: bytes, dst: RegistryEngine) -> None:
    """Push ``data`` to ``dst`` from a blob of a layout's (a file: one streamed ``PATCH``)."""
    await ocicas.create_layout(tmp_path / "src")
    async with await ocicas.open_layout(tmp_path / "src") as src:
        digest, size = await src.put_blob(data)
        async with await src.get_blob(digest) as reader:
            await dst.put_blob(reader, expected_digest=digest, expected_size=size)


async def test_a_status_question_asked_to_wait_too_long_ends_the_push_saying_so(tmp_path: Path) -> None:
    """A ``Retry-After`` over ``max_delay`` on the question ends the step at once, as on any request.

    A registry of our own (``httpx.MockTransport``): the proxy fails the ``PATCH`` and the ``GET`` alike.
    """
    data = os.urandom(300 * KiB)
    digest = sha256(data)
    seen: list[str] = []
    where = "/v2/team/app/blobs/uploads/u1"

    async def handler(request: httpx.Request) -> httpx.Response:
        method, path = request.method, request.url.path
        seen.append(method)
        if path == "/v2/":
            return httpx.Response(200, json={})
        if method == "HEAD":
            return httpx.Response(404)
        if method == "POST":
            return httpx.Response(202, headers={"Location": where})
        if method == "PATCH":
            raise httpx.WriteError("connection reset by peer")  # before a byte was read: it stopped at 0
        if method == "GET":
            return httpx.Response(503, headers={"Retry-After": "60"})
        assert method == "DELETE"
        return httpx.Response(204)

    dst = await mock_registry(handler)
    async with dst:
        with pytest.raises(ocicas.RegistryError) as info:
            await push_a_files_blob(tmp_path, data, dst)
        assert dst._client.transfer_retries == 1  # the PATCH's; the question's wait was refused
    assert seen[-4:] == ["POST", "PATCH", "GET", "DELETE"]
    assert type(info.value) is ocicas.RegistryError
    assert info.value.status == 503
    assert str(info.value) == (
        f"pushing blob {digest} stopped at byte 0 of {len(data)}: asking the registry how far the upload "
        f"got: repository 'team/app' on registry http://reg.test answered HTTP 503 to GET {where}; the registry "
        "asked to retry after 60 s, over the limit of 5 s"
    )
    assert UPLOAD_BUDGET.used == 0


async def test_a_retry_after_over_the_limit_on_opening_a_streamed_upload_is_said_once(tmp_path: Path) -> None:
    """start()'s count refuses the wait; the file's loop sharing that count hands the refusal on unchanged."""
    data = os.urandom(300 * KiB)
    digest = sha256(data)
    seen: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        if request.url.path == "/v2/":
            return httpx.Response(200, json={})
        if request.method == "HEAD":
            return httpx.Response(404)
        if request.method == "POST":
            return httpx.Response(503, headers={"Retry-After": "60"})
        return httpx.Response(204)

    dst = await mock_registry(handler)
    async with dst:
        with pytest.raises(ocicas.RegistryError) as info:
            await push_a_files_blob(tmp_path, data, dst)
        assert dst._client.transfer_retries == 0
    assert seen[-2:] == ["HEAD", "POST"]
    assert info.value.status == 503
    assert str(info.value) == (
        f"pushing blob {digest} stopped at byte 0 of {len(data)}: repository 'team/app' on registry "
        "http://reg.test answered HTTP 503 to POST /v2/team/app/blobs/uploads/; the registry "
        "asked to retry after 60 s, over the limit of 5 s"
    )
    assert UPLOAD_BUDGET.used == 0


@pytest.mark.parametrize("source", ["bytes", "short stream", "long stream"])
async def test_an_upload_whose_opening_keeps_failing_gets_one_count_and_says_no_byte_was_sent(source: str) -> None:
    """Content in hand (``_upload_whole``: bytes, a stream shorter than a chunk): the ``POST``s of every attempt
    share one count, not one each; a chunked stream's opening likewise. None of the source was sent, so the
    error does not say it cannot be read again."""
    data = b"small blob" if source != "long stream" else os.urandom(300 * KiB)
    digest = sha256(data)
    posts: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/":
            return httpx.Response(200, json={})
        if request.method == "HEAD":
            return httpx.Response(404)
        if request.method == "POST":
            posts.append("POST")
            return httpx.Response(503, headers={"Retry-After": "0"})
        return httpx.Response(204)

    dst = await mock_registry(handler)
    async with dst:
        with pytest.raises(ocicas.RegistryError) as info:
            await dst.put_blob(data if source == "bytes" else once(data), expected_digest=digest)
        assert (len(posts), dst._client.transfer_retries) == (RETRIES + 1, RETRIES)
    assert info.value.status == 503
    read = {"bytes": "", "short stream": f"pushing blob {digest} stopped at byte {len(data)}: "}
    assert str(info.value) == (
        f"{read.get(source, f'pushing blob {digest} stopped at byte {300 * KiB}: ')}repository 'team/app' on "
        "registry http://reg.test answered HTTP 503 to POST /v2/team/app/blobs/uploads/"
    )
    assert UPLOAD_BUDGET.used == 0
