"""The process-wide gate of blob fsyncs: at most its limit at once, first come first served, left on cancellation;
a tag's ``index.json`` commit never waits for it."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

import ocicas
from ocicas._syncs import BLOB_SYNCS, DEFAULT_SYNC_LIMIT, SyncGate
from tests.polling import until, until_now
from tests.test_cancellation import temp_files


@pytest.fixture
def limit_two() -> Iterator[None]:
    before = ocicas.set_sync_limit(2)
    yield
    ocicas.set_sync_limit(before)
    assert (BLOB_SYNCS._used, len(BLOB_SYNCS._waiting)) == (0, 0), "a slot was not given back"


@asynccontextmanager
async def every_slot_held() -> AsyncIterator[None]:
    """Hold all of :data:`BLOB_SYNCS` (from worker threads: its lock is for them) for the block."""
    held = 0
    try:
        for _ in range(BLOB_SYNCS.limit):
            await anyio.to_thread.run_sync(BLOB_SYNCS._acquire)
            held += 1
        yield
    finally:
        for _ in range(held):
            await anyio.to_thread.run_sync(BLOB_SYNCS._release)


@pytest.mark.anyio
async def test_a_put_waits_for_a_slot_and_a_cancelled_wait_leaves_nothing(tmp_path: Path, limit_two: None) -> None:
    await ocicas.create_layout(tmp_path / "layout")
    data = b"waits for its fsync" * 100
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with await ocicas.open_layout(tmp_path / "layout") as engine:
        async with every_slot_held():
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()

                async def cancelled_put() -> None:
                    with scope:
                        await engine.put_blob(data)  # cannot fsync while every slot is out
                    assert scope.cancelled_caught

                tg.start_soon(cancelled_put)
                await until(lambda: len(BLOB_SYNCS._waiting) == 1)
                scope.cancel()
            assert len(BLOB_SYNCS._waiting) == 0  # the cancelled wait left the line
            assert temp_files(tmp_path / "layout") == []
            assert not (tmp_path / "layout" / "blobs" / "sha256" / digest[7:]).exists()

            # a put that waits goes on once a slot is free
            stored: list[ocicas.Digest] = []

            async def put() -> None:
                stored.append((await engine.put_blob(data))[0])

            async with anyio.create_task_group() as tg:
                tg.start_soon(put)
                await until(lambda: len(BLOB_SYNCS._waiting) == 1)
                assert stored == []
                await anyio.to_thread.run_sync(BLOB_SYNCS._release)
                await until(lambda: bool(stored))
                await anyio.to_thread.run_sync(BLOB_SYNCS._acquire)  # every_slot_held gives back what it took
        assert stored == [digest]
        assert await engine.read_blob(digest) == data


@pytest.mark.anyio
async def test_a_tag_never_waits_for_blob_syncs(tmp_path: Path, limit_two: None) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        image = await ocicas.build_image(engine, [b"a layer"])
        async with every_slot_held():
            with anyio.fail_after(30):
                await engine.put_reference("v1", image)
                await engine.update_references({"v2": image, "v3": image})
        index = json.loads(await anyio.Path(layout / "index.json").read_bytes())
    names = sorted(m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"])
    assert names == ["v1", "v2", "v3"]
    assert {m["digest"] for m in index["manifests"]} == {image.digest}


def start(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target)
    thread.start()
    return thread


def test_at_most_the_limit_hold_a_slot_at_once() -> None:
    gate = SyncGate(2)
    inside: list[int] = []
    most = 0
    go = threading.Event()
    order: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        nonlocal most
        with gate.admitted():
            with lock:
                inside.append(n)
                most = max(most, len(inside))
                order.append(n)
            go.wait(30)
            with lock:
                inside.remove(n)

    threads = [start(lambda: worker(0)), start(lambda: worker(1))]
    until_now(lambda: len(inside) == 2)
    for n in range(2, 6):  # each arrives once the one before is in line
        threads.append(start(lambda n=n: worker(n)))  # type: ignore[misc]
        until_now(lambda n=n: len(gate._waiting) == n - 1)  # type: ignore[misc]
    assert sorted(inside) == [0, 1]
    go.set()
    for thread in threads:
        thread.join(30)
    assert most == 2
    assert sorted(order[:2]) == [0, 1]
    assert sorted(order) == [0, 1, 2, 3, 4, 5]
    assert (gate._used, len(gate._waiting)) == (0, 0)


def test_one_slot_is_handed_on_in_arrival_order() -> None:
    gate = SyncGate(1)
    order: list[int] = []
    release = threading.Event()

    def first() -> None:
        with gate.admitted():
            release.wait(30)

    def later(n: int) -> None:
        with gate.admitted():
            order.append(n)

    threads = [start(first)]
    until_now(lambda: gate._used == 1)
    for n in range(1, 6):
        threads.append(start(lambda n=n: later(n)))  # type: ignore[misc]
        until_now(lambda n=n: len(gate._waiting) == n)  # type: ignore[misc]
    assert order == []
    release.set()
    for thread in threads:
        thread.join(30)
    assert order == [1, 2, 3, 4, 5]
    assert (gate._used, len(gate._waiting)) == (0, 0)


def test_raising_the_limit_lets_waiters_in_and_lowering_it_lets_holders_finish() -> None:
    gate = SyncGate(1)
    release = threading.Event()
    entered: list[int] = []

    def hold(n: int) -> None:
        with gate.admitted():
            entered.append(n)
            release.wait(30)

    threads = [start(lambda: hold(0))]
    until_now(lambda: entered == [0])
    threads += [start(lambda: hold(1)), start(lambda: hold(2))]
    until_now(lambda: len(gate._waiting) == 2)
    gate.set_limit(3)
    until_now(lambda: sorted(entered) == [0, 1, 2])
    gate.set_limit(1)  # three hold a slot of one: none is taken away, and none is handed on until one is left
    late = start(lambda: hold(3))
    until_now(lambda: len(gate._waiting) == 1)
    release.set()
    for thread in [*threads, late]:
        thread.join(30)
    assert sorted(entered) == [0, 1, 2, 3]
    assert (gate._used, len(gate._waiting)) == (0, 0)


def test_set_sync_limit_checks_its_argument_and_returns_the_old_limit() -> None:
    assert BLOB_SYNCS.limit == DEFAULT_SYNC_LIMIT
    before = ocicas.set_sync_limit(5)
    try:
        assert before == DEFAULT_SYNC_LIMIT
        with pytest.raises(ocicas.InvalidError, match="limit must be at least 1, not 0") as info:
            ocicas.set_sync_limit(0)
        assert isinstance(info.value, ValueError)
        for wrong in ("2", 2.0, True, None):
            with pytest.raises(TypeError, match="limit must be an int"):
                ocicas.set_sync_limit(wrong)  # type: ignore[arg-type]
        assert BLOB_SYNCS.limit == 5
    finally:
        assert ocicas.set_sync_limit(before) == 5


def test_no_slot_is_handed_on_while_holders_are_over_a_lowered_limit() -> None:
    gate = SyncGate(2)
    gate._acquire()
    gate._acquire()
    entered = threading.Event()

    def waiter() -> None:
        with gate.admitted():
            entered.set()

    thread = start(waiter)
    until_now(lambda: len(gate._waiting) == 1)
    assert gate.set_limit(1) == 2
    gate._release()  # two held, one allowed: this slot is gone, not handed on
    assert not entered.is_set()
    assert (gate._used, len(gate._waiting)) == (1, 1)
    gate._release()
    thread.join(30)
    assert entered.is_set()
    assert (gate._used, len(gate._waiting)) == (0, 0)


def test_a_slot_handed_to_a_waiter_as_it_leaves_goes_to_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder hands its slot to the first waiter just as that waiter's cancellation check raises: the
    waiter passes the slot on to the next in line, and nothing is lost."""
    gate = SyncGate(1)
    gate._acquire()
    left: list[BaseException] = []
    second_in = threading.Event()
    checks = threading.local()

    def first() -> None:
        checks.leaving = True
        try:
            with gate.admitted():
                pass
        except RuntimeError as exc:
            left.append(exc)

    def second() -> None:
        with gate.admitted():
            second_in.set()

    def checkpoint() -> None:
        if getattr(checks, "leaving", False):
            gate._release()  # the holder leaves now: its slot is handed to this waiter, the first in line
            raise RuntimeError("cancelled")

    threads = [start(first)]
    until_now(lambda: len(gate._waiting) == 1)
    threads.append(start(second))
    until_now(lambda: len(gate._waiting) == 2)
    monkeypatch.setattr("ocicas._syncs.checkpoint", checkpoint)
    for thread in threads:
        thread.join(30)
    assert [str(e) for e in left] == ["cancelled"]
    assert second_in.is_set()
    assert (gate._used, len(gate._waiting)) == (0, 0)
