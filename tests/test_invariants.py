"""The engine's invariants, tried the way embedders break them (issue 12).

- Readers release their file at the end of data, on error, when their engine
  closes and, with one ``ResourceWarning``, when collected unclosed; two tasks
  reading one reader get ``anyio.BusyResourceError``; a corrupt blob's last chunk
  is withheld.
- A Starlette service answering ``StreamingResponse(reader)`` 200 times under a
  low ``RLIMIT_NOFILE`` leaks nothing.
- The host's cancel scope reaches worker threads: a long read, a long put and a
  wait on another process's lock stop within the scope.
- ``close()`` under load: every failing call raises ``EngineClosedError`` and
  nothing else, no released descriptor is touched (a decoy directory reusing
  their numbers stays empty), the layout stays consistent.
- Narrow OS errors: ``EMFILE`` propagates as itself, never as "absent" or "removed".
- A task group's failures all reach the caller.

Sizes and counts are exact; nothing asserts how long anything took: a stop
"within the scope" is shown by what was read, written or stored.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import os
import random
import resource
import sys
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

import ocicas
import ocicas._threads
from ocicas import (
    BlobReader,
    Descriptor,
    DigestMismatchError,
    DirEngine,
    Engine,
    EngineClosedError,
    MemoryEngine,
)
from ocicas._tasks import task_group
from ocicas._threads import CHUNK_SIZE
from ocicas.testing import blob_bytes, sha256

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.anyio

SRC = Path(__file__).parents[1] / "src"
#: The long read and put of point 2: large enough that reading it takes many thread hops.
LARGE_SIZE = 384 << 20
LARGE_CHUNK = 1 << 20


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
async def layout(tmp_path: Path) -> Path:
    path = tmp_path / "layout"
    await ocicas.create_layout(path)
    return path


@pytest.fixture
async def dir_engine(layout: Path) -> AsyncIterator[DirEngine]:
    async with await ocicas.open_layout(layout) as engine:
        yield engine


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, encoded = digest.split(":")
    return layout / "blobs" / algorithm / encoded


def temp_files(layout: Path) -> list[str]:
    """Everything inside the layout's ``.ocicas-*`` temporary directories."""
    return sorted(
        f"{entry.name}/{name}"
        for entry in layout.iterdir()
        if entry.name.startswith(".ocicas-")
        for name in os.listdir(entry)
    )


@contextlib.contextmanager
def collected(expect_warnings: int) -> Iterator[list[str]]:
    """Drop references in the block; then ``gc.collect()``: exactly ``expect_warnings`` ResourceWarnings must come."""
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield messages
        gc.collect()
    messages.extend(str(w.message) for w in caught)
    assert [w.category for w in caught] == [ResourceWarning] * expect_warnings, messages


# -- 1. readers release themselves --------------------------------------------------------


async def test_readers_read_to_the_end_hold_no_file(dir_engine: DirEngine) -> None:
    data = blob_bytes(CHUNK_SIZE + 1000, 1)
    digest, _ = await dir_engine.put_blob(data)
    baseline = fd_count()
    readers = []
    for _ in range(50):
        reader = await dir_engine.get_blob(digest)
        received = [chunk async for chunk in reader]
        assert b"".join(received) == data
        readers.append(reader)
    assert fd_count() == baseline  # released at the end of data, while still referenced
    with collected(expect_warnings=0):
        del reader, readers
    assert fd_count() == baseline


async def test_readers_dropped_part_read_release_when_collected(dir_engine: DirEngine) -> None:
    data = blob_bytes(5000, 2)
    digest, _ = await dir_engine.put_blob(data)
    baseline = fd_count()
    readers = []
    for index in range(10):
        reader = await dir_engine.get_blob(digest)
        assert await reader.read(index + 1) == data[: index + 1]
        readers.append(reader)
    del reader
    assert fd_count() == baseline + 10
    for dropped in range(1, 11):
        with collected(expect_warnings=1) as messages:
            readers.pop()
        assert messages[0].startswith(f"unclosed <BlobReader {digest} ")
        assert fd_count() == baseline + 10 - dropped


async def test_reader_of_a_closed_engine(layout: Path) -> None:
    engine = await ocicas.open_layout(layout)
    data = blob_bytes(3000, 3)
    digest, _ = await engine.put_blob(data)
    reader = await engine.get_blob(digest)
    assert await reader.read(1000) == data[:1000]
    await engine.close()
    assert reader.closed
    with pytest.raises(EngineClosedError):
        await reader.read(1000)
    with pytest.raises(EngineClosedError):
        await reader.__anext__()
    await reader.aclose()  # idempotent
    with collected(expect_warnings=0):
        del reader


async def test_two_tasks_reading_one_reader(dir_engine: DirEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    data = blob_bytes(2 * CHUNK_SIZE + 10, 4)
    digest, _ = await dir_engine.put_blob(data)
    reader = await dir_engine.get_blob(digest)
    inside, proceed = anyio.Event(), anyio.Event()
    inner = ocicas._threads._run_in_thread

    async def parked(func: Callable[[], Any], *, limiter: anyio.CapacityLimiter | None = None) -> Any:
        inside.set()  # the first reader is now inside read(), about to hop to a thread
        await proceed.wait()
        return await inner(func, limiter=limiter)

    monkeypatch.setattr(ocicas._threads, "_run_in_thread", parked)
    received: list[bytes] = []

    async def first() -> None:
        received.append(await reader.read(CHUNK_SIZE))

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await inside.wait()
        with pytest.raises(anyio.BusyResourceError):
            await reader.read(10)
        with pytest.raises(anyio.BusyResourceError):
            await reader.__anext__()
        proceed.set()
    assert received == [data[:CHUNK_SIZE]]
    async with reader:  # the reader is intact: the refused reads took nothing
        assert await reader.read() == data[CHUNK_SIZE:]


async def test_corrupt_blob_withholds_its_last_chunk(dir_engine: DirEngine, layout: Path) -> None:
    data = blob_bytes(2 * CHUNK_SIZE + 777, 5)
    digest, _ = await dir_engine.put_blob(data)

    def corrupt() -> None:  # same size, last byte flipped
        fd = os.open(blob_path(layout, digest), os.O_WRONLY)
        try:
            os.pwrite(fd, bytes([data[-1] ^ 0xFF]), len(data) - 1)
        finally:
            os.close(fd)

    await anyio.to_thread.run_sync(corrupt)
    baseline = fd_count()
    reader = await dir_engine.get_blob(digest)
    assert fd_count() == baseline + 1
    received: list[bytes] = []

    async def read_all(reader: BlobReader) -> None:
        async for chunk in reader:
            received.append(chunk)

    with pytest.raises(DigestMismatchError):
        await read_all(reader)
    assert received == [data[:CHUNK_SIZE], data[CHUNK_SIZE : 2 * CHUNK_SIZE]]
    assert fd_count() == baseline  # released at the error, unclosed
    with pytest.raises(DigestMismatchError):
        await reader.read(1)  # the failure sticks
    with pytest.raises(DigestMismatchError):
        await dir_engine.read_blob(digest)
    assert fd_count() == baseline
    with collected(expect_warnings=0):
        del reader


# -- 1b. an ASGI service -------------------------------------------------------------------


@pytest.fixture
def low_fd_limit() -> Iterator[int]:
    """Lower the soft RLIMIT_NOFILE to 64 above the descriptors open now; restore it after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = fd_count() + 64
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_starlette_streaming_response_leaks_nothing(dir_engine: DirEngine, low_fd_limit: int) -> None:
    """The embedding guide's ``StreamingResponse(reader)``, 200 times with 64 spare descriptors.

    httpx's ASGITransport drives the app through the same ASGI calls a server
    makes (each chunk one ``http.response.body`` message); Starlette iterates the
    reader to its end and drops it, as under any server.
    """
    blobs = [b"", blob_bytes(1000, 6), blob_bytes(300_000, 7), blob_bytes(CHUNK_SIZE + 7, 8)]
    digests = [(await dir_engine.put_blob(data))[0] for data in blobs]

    async def get_blob(request: Request) -> Response:
        try:
            reader = await dir_engine.get_blob(request.path_params["digest"])
        except ocicas.BlobNotFoundError:
            return Response(status_code=404)
        return StreamingResponse(
            reader, media_type="application/octet-stream", headers={"content-length": str(reader.size)}
        )

    app = Starlette(routes=[Route("/blobs/{digest}", get_blob)])
    baseline = fd_count()
    results: dict[int, tuple[int, bytes]] = {}
    limiter = anyio.CapacityLimiter(8)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ocicas.test") as client:

        async def fetch(index: int) -> None:
            async with limiter:
                response = await client.get(f"/blobs/{digests[index % len(blobs)]}")
                results[index] = (response.status_code, response.content)

        async with anyio.create_task_group() as tg:
            for index in range(200):
                tg.start_soon(fetch, index)
    assert results == {index: (200, blobs[index % len(blobs)]) for index in range(200)}
    with collected(expect_warnings=0):
        pass
    assert fd_count() == baseline


# -- 2. the host's cancellation reaches worker threads -----------------------------------


def large_chunk(index: int) -> bytes:
    return index.to_bytes(8, "big") * (LARGE_CHUNK // 8)


async def large_stream(count: list[int]) -> AsyncIterator[bytes]:
    for index in range(LARGE_SIZE // LARGE_CHUNK):
        count.append(index)
        yield large_chunk(index)  # fresh bytes each time


async def test_cancel_scope_stops_a_long_read(dir_engine: DirEngine, hops: list[str]) -> None:
    yielded: list[int] = []
    digest, size = await dir_engine.put_blob(large_stream(yielded))
    assert size == LARGE_SIZE
    whole_read = LARGE_SIZE // CHUNK_SIZE  # hops a read to the end takes, at least

    hops.clear()
    with anyio.move_on_after(0.01) as scope:
        await dir_engine.read_blob(digest, max_size=None)
    assert scope.cancelled_caught
    assert len(hops) < whole_read

    hops.clear()
    received = 0
    baseline = fd_count()
    with anyio.move_on_after(0.01) as scope:
        async with await dir_engine.get_blob(digest) as reader:
            async for chunk in reader:
                received += len(chunk)
    assert scope.cancelled_caught
    assert received < LARGE_SIZE
    assert len(hops) < whole_read
    assert fd_count() == baseline


async def test_cancel_scope_stops_a_long_put(dir_engine: DirEngine, layout: Path) -> None:
    yielded: list[int] = []
    with anyio.move_on_after(0.05) as scope:
        await dir_engine.put_blob(large_stream(yielded))
    assert scope.cancelled_caught
    assert len(yielded) < LARGE_SIZE // LARGE_CHUNK
    assert await dir_engine.list_blobs() == []
    assert await anyio.to_thread.run_sync(temp_files, layout) == []


LOCK_SCRIPT = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("held", ["blob", "blobs", "layout"])
async def test_cancel_scope_stops_a_wait_on_another_process_lock(
    dir_engine: DirEngine, layout: Path, held: str
) -> None:
    """Another process holds a lock ocicas waits for: ``blobs/sha256/`` (a put of present content
    freshens it holding that lock shared), ``blobs/`` (gc_lock), the layout directory (a reference update)."""
    data = b"locked content"
    digest, _ = await dir_engine.put_blob(data)
    descriptor = Descriptor(media_type="application/octet-stream", digest=digest, size=len(data))
    target = {"blob": layout / "blobs" / "sha256", "blobs": layout / "blobs", "layout": layout}[held]

    async def call() -> None:
        if held == "blob":
            await dir_engine.put_blob(data)
        elif held == "blobs":
            async with dir_engine.gc_lock():
                pass
        else:
            await dir_engine.put_reference("v1", descriptor)

    async with await anyio.open_process([sys.executable, "-c", LOCK_SCRIPT, str(target)]) as process:
        try:
            assert process.stdout is not None
            said = b""
            while not said.endswith(b"\n"):
                said += await process.stdout.receive()
            assert said == b"locked\n"
            with anyio.move_on_after(0.5) as scope:
                await call()
            assert scope.cancelled_caught
        finally:
            process.kill()
    assert await dir_engine.read_blob(digest) == data
    assert await dir_engine.list_references() == []
    assert await anyio.to_thread.run_sync(temp_files, layout) == []
    await call()  # the lock is gone with the process: the same call now completes
    if held == "layout":
        assert await dir_engine.get_reference("v1") == descriptor


# -- 3. close() under load -------------------------------------------------------------------


def open_and_close(directory: Path, count: int) -> None:
    """Take ``count`` descriptor numbers (likely those a closed engine just freed) and give them back."""
    fds = [os.open(directory, os.O_RDONLY | os.O_DIRECTORY) for _ in range(count)]
    for fd in fds:
        os.close(fd)


async def fsck(layout: Path) -> dict[str, Any]:
    result = await anyio.run_process(
        [sys.executable, "-m", "ocicas", "fsck", str(layout), "--json"],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    report: dict[str, Any] = json.loads(result.stdout)
    return report


async def load_round(layout: Path, decoy: Path, rng: random.Random, round_: int) -> tuple[list[BaseException], int]:
    """20 workers on a fresh engine, closed at a random moment; the failures other than EngineClosedError,
    and how many workers stopped with EngineClosedError."""
    engine = await ocicas.open_layout(layout)
    unexpected: list[BaseException] = []
    closed_errors = 0
    done = anyio.Event()

    async def worker(index: int) -> None:
        nonlocal closed_errors
        wrng = random.Random(rng.random())
        mine: list[tuple[bytes, Descriptor]] = []
        step = 0
        try:
            while True:
                step += 1
                roll = wrng.random()
                if roll < 0.35 or not mine:
                    data = blob_bytes(wrng.choice([10, 5000, 200_000, CHUNK_SIZE + 3]), wrng.randrange(1 << 30))
                    digest, size = await engine.put_blob(data)
                    mine.append((data, Descriptor(media_type="application/octet-stream", digest=digest, size=size)))
                elif roll < 0.55:
                    data, descriptor = wrng.choice(mine)
                    async with await engine.get_blob(descriptor) as reader:
                        assert b"".join([chunk async for chunk in reader]) == data
                elif roll < 0.7:
                    data, descriptor = wrng.choice(mine)
                    assert await engine.read_blob(descriptor) == data
                elif roll < 0.85:
                    await engine.put_reference(f"r{round_}-w{index}-{step}", wrng.choice(mine)[1])
                elif roll < 0.95:
                    await engine.list_references()
                else:
                    await ocicas.gc(engine, grace_period=3600)  # blobs are fresh: nothing goes
        except EngineClosedError:
            closed_errors += 1
        except BaseException as exc:  # every other failure is the finding
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            unexpected.append(exc)

    async def decoy_fds() -> None:
        while not done.is_set():
            await anyio.to_thread.run_sync(open_and_close, decoy, 8)

    async def closer() -> None:
        await anyio.sleep(rng.uniform(0, 0.3))
        await engine.close()
        assert engine.closed

    async with anyio.create_task_group() as outer:
        outer.start_soon(decoy_fds)
        async with anyio.create_task_group() as tg:
            for index in range(20):
                tg.start_soon(worker, index)
            tg.start_soon(closer)
        done.set()
    return unexpected, closed_errors


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_close_under_load(layout: Path, tmp_path: Path, seed: int) -> None:
    """Three rounds per seed of 20 workers (puts, gets, tags, gc) closed at a random moment,
    while a decoy task keeps reusing freed descriptor numbers for another directory."""
    rng = random.Random(seed)
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    baseline = fd_count()
    for round_ in range(3):
        unexpected, closed_errors = await load_round(layout, decoy, rng, round_)
        assert unexpected == []
        assert closed_errors == 20  # every worker ran until the close stopped it
        assert await anyio.to_thread.run_sync(os.listdir, decoy) == []
        with collected(expect_warnings=0):
            pass
        assert fd_count() == baseline
    report = await fsck(layout)
    assert report["ok"] is True, report
    assert await anyio.to_thread.run_sync(temp_files, layout) == []


async def closed_calls(engine: Engine) -> dict[str, Callable[[], Awaitable[object]]]:
    digest = sha256(b"x")
    descriptor = Descriptor(media_type="application/octet-stream", digest=digest, size=1)
    manifest = Descriptor(media_type=ocicas.MEDIA_TYPE_IMAGE_MANIFEST, digest=digest, size=1)
    other = MemoryEngine()

    async def gc_lock() -> None:
        async with engine.gc_lock():
            pass

    async def enter() -> None:
        async with engine:
            pass

    async def lease() -> None:
        async with engine.lease():
            pass

    return {
        "put_blob": lambda: engine.put_blob(b"x"),
        "put_blob_json": lambda: engine.put_blob_json({}),
        "get_blob": lambda: engine.get_blob(digest),
        "read_blob": lambda: engine.read_blob(digest),
        "stat_blob": lambda: engine.stat_blob(digest),
        "delete_blob": lambda: engine.delete_blob(digest),
        "list_blobs": lambda: engine.list_blobs(),
        "stat_blobs": lambda: engine.stat_blobs([digest]),
        "touch_blobs": lambda: engine.touch_blobs([digest]),
        "delete_blobs": lambda: engine.delete_blobs([digest]),
        "gc_lock": gc_lock,
        "lease": lease,
        "leased_blobs": lambda: engine.leased_blobs(),
        "referrers": lambda: engine.referrers(digest),
        "list_broken_roots": lambda: engine.list_broken_roots(),
        "mount_blob_from": lambda: engine.mount_blob_from(other, digest, size=1),
        "put_reference": lambda: engine.put_reference("v1", descriptor),
        "delete_reference": lambda: engine.delete_reference("v1"),
        "update_references": lambda: engine.update_references({"v1": descriptor}),
        "get_reference": lambda: engine.get_reference("v1"),
        "list_references": lambda: engine.list_references(),
        "list_roots": lambda: engine.list_roots(),
        "gc": lambda: engine.gc(),
        "__aenter__": enter,
        "ocicas.gc": lambda: ocicas.gc(engine),
        "ocicas.walk": lambda: ocicas.walk(engine, [manifest]),  # a manifest: walk must read it
    }


async def test_every_call_of_a_closed_engine_raises_engine_closed(engine: Engine) -> None:
    await engine.put_blob(b"x")
    await engine.close()
    await engine.close()  # idempotent
    assert engine.closed
    calls = await closed_calls(engine)
    public = {
        name
        for name, member in inspect.getmembers(Engine)
        if not name.startswith("_") and (inspect.iscoroutinefunction(member) or name in ("gc_lock", "lease"))
    }
    assert public - {"close"} <= set(calls), "a public method is not tried closed"
    not_refused = []
    for name, call in calls.items():
        try:
            await call()
        except EngineClosedError:
            continue
        not_refused.append(name)
    assert not_refused == []


# -- 4. narrow OS errors -------------------------------------------------------------------------

EMFILE_SCRIPT = """
import errno, json, os, resource, sys
import anyio, ocicas

async def main(path, backend):
    engine = await ocicas.open_layout(path)
    digests = [(await engine.put_blob(os.urandom(100) + bytes([i])))[0] for i in range(64)]
    fresh = await ocicas.open_layout(path)  # its temporary directory is made at its first put
    before = sorted(os.listdir(path))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(int(f) for f in os.listdir("/proc/self/fd")) + 16, hard))
    fillers = []
    while True:  # fill the descriptor table
        try:
            fillers.append(os.dup(0))
        except OSError as exc:
            assert exc.errno == errno.EMFILE
            break
    out = {}
    for name, call in [
        ("stat_blobs", lambda: engine.stat_blobs(digests, head=64)),
        ("stat_blobs_nohead", lambda: engine.stat_blobs(digests)),
        ("touch_blobs", lambda: engine.touch_blobs(digests)),
        ("delete_blobs", lambda: engine.delete_blobs(digests)),
        ("gc", lambda: ocicas.gc(engine, grace_period=0)),
        ("put_blob_fresh_engine", lambda: fresh.put_blob(b"new")),
    ]:
        try:
            out[name] = repr(await call())
        except OSError as exc:
            out[name] = errno.errorcode.get(exc.errno, repr(exc))
    for fd in fillers:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    out["present"] = len(await engine.stat_blobs(digests))
    out["new_entries"] = sorted(set(os.listdir(path)) - set(before))
    await engine.close()
    await fresh.close()
    print(json.dumps(out))

anyio.run(main, sys.argv[1], sys.argv[2], backend=sys.argv[2])
"""


async def test_emfile_propagates(layout: Path, anyio_backend: str) -> None:
    """With the descriptor table full, calls raise ``OSError(EMFILE)``: no blob is reported absent or removed."""
    result = await anyio.run_process(
        [sys.executable, "-c", EMFILE_SCRIPT, str(layout), anyio_backend],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    out = json.loads(result.stdout)
    assert out == {
        "stat_blobs": "EMFILE",
        "stat_blobs_nohead": "EMFILE",
        "touch_blobs": "EMFILE",
        "delete_blobs": "EMFILE",
        "gc": "EMFILE",
        "put_blob_fresh_engine": "EMFILE",
        "present": 64,
        "new_entries": [],
    }


# -- 5. a task group's failures all reach the caller --------------------------------------------


async def test_task_group_chains_every_failure() -> None:
    first, second = ValueError("first"), KeyError("second")
    arrived = 0
    both = anyio.Event()

    async def fail(exc: Exception) -> None:
        nonlocal arrived
        arrived += 1
        if arrived == 2:
            both.set()
        with anyio.CancelScope(shield=True):  # the sibling's failure must not cancel this one first
            await both.wait()
        raise exc

    async def both_fail() -> None:
        async with task_group() as tg:
            tg.start_soon(fail, first)
            tg.start_soon(fail, second)

    with pytest.raises((ValueError, KeyError)) as info:
        await both_fail()
    assert info.value in (first, second)
    cause = info.value.__cause__
    assert isinstance(cause, BaseExceptionGroup)
    leaves = []
    stack: list[BaseException] = [cause]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    assert sorted(map(id, leaves)) == sorted([id(first), id(second)])


async def test_task_group_single_failure_is_raised_bare() -> None:
    async def fail() -> None:
        raise ValueError("only")

    async def one_fails() -> None:
        async with task_group() as tg:
            tg.start_soon(fail)
            tg.start_soon(anyio.sleep, 10)

    with pytest.raises(ValueError, match="only") as info:
        await one_fails()
    assert info.value.__cause__ is None
