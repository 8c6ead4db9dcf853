"""Review of e14ba21: tests that fail on it, each demonstrating one finding."""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import httpx
import pytest

import ocicas
from ocicas import Descriptor
from ocicas.registry import RetryPolicy, open_registry
from ocicas.registry._upload import UPLOAD_BUDGET
from ocicas.testing import sha256
from tests.images import put_image

pytestmark = pytest.mark.anyio

KiB = 1 << 10
RETRIES = 3
FAST = RetryPolicy(retries=RETRIES, backoff=0.001, max_delay=5)


async def test_a_users_expand_wrapping_children_with_functools_wraps_runs_on_the_loop(tmp_path: Path) -> None:
    """``functools.wraps`` copies ``__dict__``, so the marker too: the user's wrapper then runs in a worker thread."""
    await ocicas.create_layout(tmp_path / "layout")
    async with await ocicas.open_layout(tmp_path / "layout") as engine:
        images = [(await put_image(engine, [f"layer {n}".encode()], name=str(n)))[0] for n in range(4)]
        threads: set[int] = set()

        @functools.wraps(ocicas.children)
        def expand(descriptor: Descriptor, data: bytes) -> list[Descriptor]:
            threads.add(threading.get_ident())
            return ocicas.children(descriptor, data)

        await ocicas.walk(engine, images, expand=expand)
        assert threads == {threading.get_ident()}


async def test_a_retry_after_over_the_limit_on_opening_a_streamed_upload_is_said_once(tmp_path: Path) -> None:
    """The POST's refusal is restated by start()'s pause, then upload_file's pause restates it again."""
    data = os.urandom(300 * KiB)
    digest = sha256(data)

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/":
            return httpx.Response(200, json={})
        if request.method == "HEAD":
            return httpx.Response(404)
        if request.method == "POST":
            return httpx.Response(503, headers={"Retry-After": "60"})
        return httpx.Response(204)

    dst = await open_registry(
        "http://reg.test/team/app",
        docker_config=False,
        transport=httpx.MockTransport(handler),
        retry=FAST,
        chunk_size=256 * KiB,
    )
    async with dst:
        await ocicas.create_layout(tmp_path / "src")
        async with await ocicas.open_layout(tmp_path / "src") as src:
            await src.put_blob(data)
            async with await src.get_blob(digest) as reader:
                with pytest.raises(ocicas.RegistryError) as info:
                    await dst.put_blob(reader, expected_digest=digest, expected_size=len(data))
    message = str(info.value)
    assert message.count("asked to retry after 60 s") == 1, message
    assert UPLOAD_BUDGET.used == 0


async def test_a_whole_upload_whose_post_keeps_failing_gets_one_count() -> None:
    """Content in hand (``_upload_whole``): start() has its count, and the engine's loop around it another."""
    data = b"small blob"
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

    dst = await open_registry(
        "http://reg.test/team/app", docker_config=False, transport=httpx.MockTransport(handler), retry=FAST
    )
    async with dst:
        with pytest.raises(ocicas.RegistryError):
            await dst.put_blob(data, expected_digest=digest)
        retries = dst._client.transfer_retries
    assert (len(posts), retries) == (RETRIES + 1, RETRIES)


async def test_retrying_a_set_that_was_not_durable_makes_it_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After NotDurableError, the caller's natural retry is a no-op for ``apply`` (the name already holds it):
    nothing is written and only the directory is fsynced again, which (as index.py itself says) cannot tell,
    so the retry returns success for a change whose rename may still be lost in a crash. A rewrite after a
    failed directory sync should write and rename ``index.json`` again, re-dirtying the directory."""
    from tests.test_group_commit import fail_once, images

    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        (a,) = await images(engine, 1)
        made = fail_once(monkeypatch, "directory fsync", layout)
        with pytest.raises(ocicas.NotDurableError):
            await engine.put_reference("x", a)
        assert made == ["directory fsync"]
        before = os.stat(layout / "index.json").st_ino
        await engine.put_reference("x", a)  # the retry: told durable
        assert os.stat(layout / "index.json").st_ino != before  # ... but nothing was renamed again
