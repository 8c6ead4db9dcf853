"""Group commit of ``index.json``: reference updates that arrive while a rewrite runs share the next one.

Each caller's change set applies on top of the earlier ones, in arrival order, all
or nothing; a set that fails (a clobber) fails its caller only; a caller cancelled
before any rewrite took its set changes nothing. To make the updates queue up, the
test holds the layout's ``flock`` as another process would while they arrive.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import gc
import json
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import anyio.abc
import pytest

import ocicas
from ocicas import ClobberError, Descriptor
from tests.images import put_image
from tests.polling import until

pytestmark = pytest.mark.anyio

REF_NAME = "org.opencontainers.image.ref.name"


@contextmanager
def layout_locked(layout: Path) -> Iterator[Callable[[], None]]:
    """Hold the layout's ``flock`` (another open file description, as another process would); yield a release."""
    fd = os.open(layout, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            os.close(fd)

    try:
        yield release
    finally:
        release()


async def images(engine: ocicas.Engine, count: int) -> list[Descriptor]:
    return [(await put_image(engine, [f"layer {n}".encode()], name=str(n)))[0] for n in range(count)]


async def queued(
    engine: ocicas.DirEngine,
    calls: list[Callable[[], Awaitable[None]]],
    outcomes: dict[int, BaseException | None],
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Start ``calls`` one after another, each waiting in the index's queue before the next starts.

    A call first checks its content and takes the collector's lock (thread hops that
    finish in any order), so arrival is watched in the queue itself: the first call
    leads the rewrite (and waits for the layout's lock), the others queue behind it.
    """
    store = engine._index

    async def run(index: int) -> None:
        try:
            await calls[index]()
            outcomes[index] = None
        except ocicas.OCICASError as exc:
            outcomes[index] = exc

    async with anyio.create_task_group() as tg:
        for index in range(len(calls)):
            tg.start_soon(run, index)
            with anyio.fail_after(30):
                while not (store._committing if index == 0 else len(store._queue) >= index):  # noqa: ASYNC110
                    await anyio.sleep(0.001)
        task_status.started()  # every call waits in the queue: the test may release the layout now


async def assert_references(engine: ocicas.Engine, expected: dict[str, Descriptor]) -> None:
    """``engine`` holds exactly the references ``expected``, each naming its descriptor."""
    assert await engine.list_references() == sorted(expected)
    for name, descriptor in expected.items():
        assert await engine.get_reference(name) == descriptor


async def test_updates_waiting_together_all_land(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        descriptors = await images(engine, 40)
        outcomes: dict[int, BaseException | None] = {}
        with layout_locked(layout) as release:
            calls: list[Callable[[], Awaitable[None]]] = [
                functools.partial(engine.put_reference, f"tag{n}", descriptors[n]) for n in range(40)
            ]
            async with anyio.create_task_group() as tg:
                await tg.start(queued, engine, calls, outcomes)
                release()
        assert outcomes == dict.fromkeys(range(40))
        await assert_references(engine, {f"tag{n}": descriptors[n] for n in range(40)})
    async with await ocicas.open_layout(layout) as reopened:  # durable, and one well-formed file
        assert await reopened.list_references() == sorted(f"tag{n}" for n in range(40))


async def test_each_set_applies_on_top_of_the_earlier_ones_and_a_clobber_fails_its_caller_only(
    tmp_path: Path,
) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        a, b, c, d = await images(engine, 4)
        await engine.put_reference("held", a)
        outcomes: dict[int, BaseException | None] = {}
        calls: list[Callable[[], Awaitable[None]]] = [
            lambda: engine.update_references({"x": b}),  # 0: lands
            lambda: engine.update_references({"x": c}),  # 1: clobbers what 0 put: fails
            lambda: engine.update_references({"y": c, "held": d}),  # 2: clobbers "held": fails whole, no "y"
            lambda: engine.update_references({"x": c}, replace=True),  # 3: moves "x" on top of 0
            lambda: engine.update_references({"z": d, "held": None}),  # 4: lands whole
            lambda: engine.update_references({"held": b}),  # 5: "held" was deleted by 4: lands
            lambda: engine.update_references({"x": c}),  # 6: same as what 3 put: idempotent
        ]
        with layout_locked(layout) as release:
            async with anyio.create_task_group() as tg:
                await tg.start(queued, engine, calls, outcomes)
                release()
        assert {n: type(e) for n, e in outcomes.items()} == {
            0: type(None),
            1: ClobberError,
            2: ClobberError,
            3: type(None),
            4: type(None),
            5: type(None),
            6: type(None),
        }
        await assert_references(engine, {"held": b, "x": c, "z": d})


async def test_a_caller_cancelled_while_queued_changes_nothing(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        a, b = await images(engine, 2)
        outcomes: dict[int, BaseException | None] = {}
        with layout_locked(layout) as release:
            async with anyio.create_task_group() as tg:
                first: list[Callable[[], Awaitable[None]]] = [functools.partial(engine.put_reference, "kept", a)]
                await tg.start(queued, engine, first, outcomes)
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as doomed:
                        doomed.start_soon(engine.put_reference, "cancelled", b)
                        await anyio.wait_all_tasks_blocked()
                        scope.cancel()
                release()
        assert outcomes == {0: None}
        assert await engine.list_references() == ["kept"]
        await engine.put_reference("later", b)  # the store still works after the cancelled caller
        assert await engine.list_references() == ["kept", "later"]


async def test_a_tag_of_incomplete_content_fails_alone_with_the_error_a_lone_tag_gets(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        a, c = await images(engine, 2)
        broken, digests = await put_image(engine, [b"a layer that goes missing"], name="broken")
        await engine.delete_blob(digests[0])
        with pytest.raises(ocicas.BlobNotFoundError) as alone:
            await engine.put_reference("b", broken)  # the error a tag alone gets
        store = engine._index
        outcomes: dict[str, BaseException | None] = {}

        async def tag(name: str, descriptor: Descriptor) -> None:
            try:
                await engine.put_reference(name, descriptor)
                outcomes[name] = None
            except ocicas.OCICASError as exc:
                outcomes[name] = exc

        with layout_locked(layout) as release:
            async with anyio.create_task_group() as tg:
                tg.start_soon(tag, "a", a)
                await until(lambda: store._committing)  # "a" runs the rewrite: it waits for the layout's lock
                tg.start_soon(tag, "b", broken)
                await until(lambda: "b" in outcomes)  # refused by its own check, while the rewrite waits
                tg.start_soon(tag, "c", c)
                await until(lambda: len(store._queue) == 1)  # "c" waits for the next rewrite
                release()
        assert set(outcomes) == {"a", "b", "c"}
        assert outcomes["a"] is None
        assert outcomes["c"] is None
        assert type(outcomes["b"]) is ocicas.BlobNotFoundError
        assert str(outcomes["b"]) == str(alone.value)
        await assert_references(engine, {"a": a, "c": c})
    async with await ocicas.open_layout(layout) as reopened:
        assert await reopened.list_references() == ["a", "c"]


async def test_the_caller_that_runs_the_rewrite_fails_alone_when_its_own_set_clobbers(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        a, b, c = await images(engine, 3)
        await engine.put_reference("held", a)
        outcomes: dict[int, BaseException | None] = {}
        calls: list[Callable[[], Awaitable[None]]] = [
            lambda: engine.update_references({"held": b, "x": b}),  # 0 runs the rewrite: clobbers, no "x"
            lambda: engine.update_references({"y": c}),  # 1: lands
            lambda: engine.update_references({"x": c}),  # 2: lands ("x" was never put by 0)
        ]
        with layout_locked(layout) as release:
            async with anyio.create_task_group() as tg:
                await tg.start(queued, engine, calls, outcomes)
                release()
        assert {n: type(e) for n, e in outcomes.items()} == {0: ClobberError, 1: type(None), 2: type(None)}
        assert str(outcomes[0]) == f"reference 'held' already holds {a.digest}, not {b.digest}"
        await assert_references(engine, {"held": a, "x": c, "y": c})


async def behind_a_cancelled_leader(
    engine: ocicas.DirEngine,
    tg: anyio.abc.TaskGroup,
    leader: Descriptor,
    calls: list[Callable[[], Coroutine[Any, Any, None]]],
) -> None:
    """With the layout locked: a leader's tag runs a rewrite (waiting for the lock), ``calls`` start in ``tg``
    and queue behind it, the leader is cancelled; returns once another caller runs one rewrite of all of them."""
    store = engine._index
    with anyio.CancelScope() as doomed:
        async with anyio.create_task_group() as first:
            first.start_soon(engine.put_reference, "leader", leader)
            await until(lambda: store._committing)
            for call in calls:
                tg.start_soon(call)
            await until(lambda: len(store._queue) == len(calls))
            doomed.cancel()  # stops the leader before anything is written
    await until(lambda: store._committing and not store._queue)


async def test_when_the_caller_running_the_rewrite_is_cancelled_the_next_one_runs_it(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        descriptors = await images(engine, 4)
        outcomes: dict[int, BaseException | None] = {}
        tag = tagger(engine, descriptors, outcomes)
        with layout_locked(layout) as release:
            async with anyio.create_task_group() as tg:
                await behind_a_cancelled_leader(
                    engine, tg, descriptors[0], [functools.partial(tag, n) for n in range(1, 4)]
                )
                release()
        assert outcomes == {1: None, 2: None, 3: None}
        assert await engine.list_references() == ["tag1", "tag2", "tag3"]
    async with await ocicas.open_layout(layout) as reopened:
        assert await reopened.list_references() == ["tag1", "tag2", "tag3"]


def tagger(
    engine: ocicas.Engine, descriptors: list[Descriptor], outcomes: dict[int, BaseException | None]
) -> Callable[[int], Coroutine[Any, Any, None]]:
    """``tag(n)``: put ``tagn`` on ``descriptors[n]``, and record in ``outcomes`` that it returned."""

    async def tag(index: int) -> None:
        await engine.put_reference(f"tag{index}", descriptors[index])
        outcomes[index] = None

    return tag


async def until_committing() -> int:
    """The number in the tag name of the caller whose worker thread runs a rewrite (from its stack)."""
    with anyio.fail_after(30):
        while True:
            for top in list(sys._current_frames().values()):
                frame: FrameType | None = top
                while frame is not None:
                    if frame.f_code.co_name == "_commit" and "own" in frame.f_locals:
                        return int(next(iter(frame.f_locals["own"].changes))[3:])
                    frame = frame.f_back
            await anyio.sleep(0.001)


async def test_a_set_whose_caller_left_never_lands_after_its_rewrite_failed(tmp_path: Path) -> None:
    """Two callers wait in one batch; one leaves (cancelled), then the one running the rewrite is cancelled too.

    The set of the caller that left must not go back to the queue, for a later rewrite to land it with
    nobody holding the collector's shared lock for it; the other's set goes back only while its caller waits.
    """
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        descriptors = await images(engine, 4)
        store = engine._index
        outcomes: dict[int, BaseException | None] = {}
        scopes = {1: anyio.CancelScope(), 2: anyio.CancelScope()}
        done = {1: anyio.Event(), 2: anyio.Event()}
        tag = tagger(engine, descriptors, outcomes)

        async def cancellable(index: int) -> None:
            try:
                with scopes[index]:
                    await tag(index)
            finally:
                done[index].set()

        with layout_locked(layout) as release:
            async with anyio.create_task_group() as tg:
                await behind_a_cancelled_leader(
                    engine, tg, descriptors[0], [functools.partial(cancellable, n) for n in (1, 2)]
                )
                runner = await until_committing()
                for index in sorted((1, 2), key=lambda i: i == runner):  # the other caller leaves, then the runner
                    scopes[index].cancel()
                    await done[index].wait()
            assert not store._committing
            assert store._queue == []  # nothing waits for a later rewrite
            release()
        assert outcomes == {}
        await engine.put_reference("tag3", descriptors[3])
        assert await engine.list_references() == ["tag3"]
    async with await ocicas.open_layout(layout) as reopened:
        assert await reopened.list_references() == ["tag3"]


STEPS = ["write", "file fsync", "rename", "directory fsync"]


def fail_once(monkeypatch: pytest.MonkeyPatch, step: str, layout: Path) -> list[str]:
    """Make the next ``step`` of an ``index.json`` rewrite fail with EIO, as a failing disk would; returns a log.

    Only ``os`` calls in worker threads on the rewrite's own files are touched: the temporary index
    (``index-…``), its rename to ``index.json``, the layout directory's fsync.
    """
    made: list[str] = []

    def target(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def hit(wanted: bool) -> bool:
        if made or not wanted:
            return False
        made.append(step)
        return True

    def eio() -> OSError:
        return OSError(errno.EIO, os.strerror(errno.EIO))

    in_worker = threading.current_thread  # the event loop runs in the main thread
    if step == "write":
        write = os.write

        def failing_write(fd: int, data: Any) -> int:
            if in_worker() is not threading.main_thread() and hit(target(fd).rpartition("/")[2][:6] == "index-"):
                raise eio()
            return write(fd, data)

        monkeypatch.setattr(os, "write", failing_write)
    elif step == "rename":
        rename = os.rename

        def failing_rename(src: Any, dst: Any, **kwargs: Any) -> None:
            if hit(dst == "index.json"):
                raise eio()
            rename(src, dst, **kwargs)

        monkeypatch.setattr(os, "rename", failing_rename)
    else:
        fsync = os.fsync

        def failing_fsync(fd: Any) -> None:
            if in_worker() is not threading.main_thread() and isinstance(fd, int):
                path = target(fd)
                if hit(path == str(layout) if step == "directory fsync" else path.rpartition("/")[2][:6] == "index-"):
                    raise eio()
            fsync(fd)

        monkeypatch.setattr(os, "fsync", failing_fsync)
    return made


def index_names(layout: Path) -> dict[str, str]:
    """The references ``index.json`` holds on disk: name -> digest."""
    document = json.loads((layout / "index.json").read_bytes())
    return {
        m["annotations"][REF_NAME]: m["digest"] for m in document["manifests"] if REF_NAME in m.get("annotations", {})
    }


@pytest.mark.parametrize("step", STEPS)
async def test_a_failed_step_of_a_rewrite_reports_to_each_caller_what_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """A rewrite of three sets (two apply, one clobbers) meets a failure at ``step``.

    Before the rename nothing changed: ``index.json`` is as it was, and the two callers whose sets applied get
    the system's error (each its own instance). After it (the directory's fsync), their sets are in
    ``index.json`` and visible: they get :class:`~ocicas.NotDurableError` with the system's errno, not "not set".
    Either way nothing waits for a later rewrite, and the next one starts from what is on disk.
    """
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        a, b, c, d = await images(engine, 4)
        await engine.put_reference("held", a)
        before = (layout / "index.json").read_bytes()
        store = engine._index
        outcomes: dict[int, BaseException | None] = {}

        async def call(index: int, changes: dict[str, Descriptor]) -> None:
            try:
                await engine.update_references(changes)
                outcomes[index] = None
            except OSError as exc:
                outcomes[index] = exc

        calls: list[Callable[[], Coroutine[Any, Any, None]]] = [
            functools.partial(call, 1, {"x": b}),
            functools.partial(call, 2, {"held": b}),  # clobbers: refused whatever happens after
            functools.partial(call, 3, {"y": c, "z": d}),
        ]
        with layout_locked(layout) as release:
            async with anyio.create_task_group() as tg:
                await behind_a_cancelled_leader(engine, tg, a, calls)
                made = fail_once(monkeypatch, step, layout)
                release()
        assert made == [step]
        assert sorted(outcomes) == [1, 2, 3]
        assert type(outcomes[2]) is ClobberError
        failed = [outcomes[1], outcomes[3]]
        where = repr(str(layout))
        if step == "directory fsync":
            assert [type(e) for e in failed] == [ocicas.NotDurableError, ocicas.NotDurableError]
            assert [str(e) for e in failed] == [
                f"the change to reference 'x' is in the index.json of {where} and visible, but syncing the layout "
                "directory failed (Input/output error): it may not survive a crash",
                f"the change to references 'y', 'z' is in the index.json of {where} and visible, but syncing the "
                "layout directory failed (Input/output error): it may not survive a crash",
            ]
            on_disk = {"held": a, "x": b, "y": c, "z": d}
        else:
            assert [type(e) for e in failed] == [OSError, OSError]
            assert (layout / "index.json").read_bytes() == before
            on_disk = {"held": a}
        assert {e.errno for e in failed if isinstance(e, OSError)} == {errno.EIO}
        assert failed[0] is not failed[1]  # each raised in its own task, with its own traceback
        causes = [e.__cause__ for e in failed if e is not None]
        assert len(causes) == 2
        assert causes[0] is causes[1]  # the one failure, raised by neither
        assert isinstance(causes[0], OSError)
        assert causes[0].errno == errno.EIO
        assert index_names(layout) == {name: str(descriptor.digest) for name, descriptor in on_disk.items()}
        await assert_references(engine, on_disk)
        assert not store._committing
        assert store._queue == []
        assert [p.name for p in layout.glob(".ocicas-*/index-*")] == []  # no temporary index left
        await engine.put_reference("later", d)  # the next rewrite starts from what is on disk
        on_disk["later"] = d
        await assert_references(engine, on_disk)
    async with await ocicas.open_layout(layout) as reopened:
        await assert_references(reopened, on_disk)


def inode(layout: Path) -> int:
    return os.stat(layout / "index.json").st_ino


@pytest.mark.parametrize("retry", ["the same engine", "an engine opened after the first closed"])
async def test_after_a_failed_directory_sync_the_retry_renames_index_json_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retry: str
) -> None:
    """After NotDurableError, the caller's retry (the same set: nothing changes) writes and renames
    ``index.json`` again, dirtying the directory anew, before it is told durable, through the same engine or a
    new one of the same process; once a rename was followed by a successful directory fsync, a rewrite that
    changes nothing renames nothing."""
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with contextlib.AsyncExitStack() as stack:
        engine = await stack.enter_async_context(await ocicas.open_layout(layout))
        (a,) = await images(engine, 1)
        made = fail_once(monkeypatch, "directory fsync", layout)
        with pytest.raises(ocicas.NotDurableError):
            await engine.put_reference("x", a)
        assert made == ["directory fsync"]
        failed = inode(layout)
        if retry != "the same engine":
            await stack.aclose()
            gc.collect()  # nothing of the first engine is left to remember the failure
            engine = await stack.enter_async_context(await ocicas.open_layout(layout))
        await engine.put_reference("x", a)  # the retry
        renewed = inode(layout)
        assert renewed != failed
        await engine.put_reference("x", a)  # synced since: a no-op
        assert inode(layout) == renewed
        assert index_names(layout) == {"x": str(a.digest)}


@pytest.mark.parametrize("second", ["the same set", "another set"])
async def test_a_set_joining_while_a_directory_sync_fails_is_not_told_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, second: str
) -> None:
    """A second caller's rewrite runs while the first one's directory fsync is in progress; that fsync fails
    before the second one's returns. The second one's success cannot vouch (the error is reported once, and the
    same set rests on the first rewrite's rename): NotDurableError too. Its retry renames and is durable."""
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        a, b = await images(engine, 2)
        first_syncing, second_syncing, first_told = threading.Event(), threading.Event(), threading.Event()
        syncs: list[str] = []
        fsync = os.fsync

        def ordered_fsync(fd: Any) -> None:
            if threading.current_thread() is not threading.main_thread() and os.readlink(f"/proc/self/fd/{fd}") == str(
                layout
            ):
                syncs.append("directory")
                if len(syncs) == 1:
                    first_syncing.set()
                    assert second_syncing.wait(60)
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                if len(syncs) == 2:
                    second_syncing.set()
                    assert first_told.wait(60)
            fsync(fd)

        monkeypatch.setattr(os, "fsync", ordered_fsync)
        outcomes: dict[str, BaseException | None] = {}

        async def first() -> None:
            try:
                await engine.put_reference("x", a)
                outcomes["first"] = None
            except ocicas.NotDurableError as exc:
                outcomes["first"] = exc
            first_told.set()

        name, descriptor = ("x", a) if second == "the same set" else ("y", b)
        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            assert await anyio.to_thread.run_sync(first_syncing.wait, 60)
            with pytest.raises(ocicas.NotDurableError) as info:
                await engine.put_reference(name, descriptor)
        assert syncs == ["directory", "directory"]
        assert type(outcomes["first"]) is ocicas.NotDurableError
        assert str(info.value) == (
            f"the change to reference {name!r} is in the index.json of {str(layout)!r} and visible, but syncing "
            "the layout directory failed (Input/output error): it may not survive a crash"
        )
        assert info.value.errno == errno.EIO
        before = inode(layout)
        await engine.put_reference(name, descriptor)  # the retry: renamed again, then synced
        assert inode(layout) != before
        assert syncs == ["directory"] * 3
        assert index_names(layout) == {n: str(d.digest) for n, d in {"x": a, name: descriptor}.items()}


async def test_a_failure_before_the_rewrite_leaves_the_layout_unlocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding the layout directory's sync state fails (its ``fstat``): the update fails with that error, the
    layout's ``flock`` is free for other engines and processes, and the next update goes through."""
    from ocicas._dir import index

    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    real = index._directory_syncs
    calls: list[int] = []

    def failing_once(fd: int) -> object:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd)

    async with await ocicas.open_layout(layout) as engine:
        (a,) = await images(engine, 1)
        monkeypatch.setattr(index, "_directory_syncs", failing_once)
        with pytest.raises(OSError, match="Input/output error") as info:
            await engine.put_reference("x", a)
        assert info.value.errno == errno.EIO
        assert type(info.value) is OSError  # not NotDurableError: nothing was renamed
        fd = os.open(layout, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if the engine still held it
        finally:
            os.close(fd)
        await engine.put_reference("x", a)
        assert index_names(layout) == {"x": str(a.digest)}


async def test_a_failure_to_unlock_or_close_after_the_rename_does_not_fail_the_applied_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once renamed, the set is applied: the layout's ``flock`` release failing (its descriptor is then closed,
    which releases it) and the replaced index's close failing (closed anyway, as Linux does) are not reported."""
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        a, b = await images(engine, 2)
        await engine.put_reference("x", a)  # index.json is cached, its file held open
        made: list[str] = []
        flock, close = fcntl.flock, os.close

        def failing_flock(fd: int, operation: int) -> None:
            if operation == fcntl.LOCK_UN and "unlock" not in made:
                made.append("unlock")
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            flock(fd, operation)

        def failing_close(fd: int) -> None:
            replaced = (
                threading.current_thread() is not threading.main_thread()
                and os.readlink(f"/proc/self/fd/{fd}") == f"{layout / 'index.json'} (deleted)"
            )
            close(fd)
            if replaced and "close" not in made:
                made.append("close")
                raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(fcntl, "flock", failing_flock)
        monkeypatch.setattr(os, "close", failing_close)
        await engine.put_reference("y", b)
        assert sorted(made) == ["close", "unlock"]
        assert index_names(layout) == {"x": str(a.digest), "y": str(b.digest)}
        with layout_locked(layout) as release:  # free: another process may take it
            release()
        await engine.put_reference("z", b)
        assert index_names(layout) == {"x": str(a.digest), "y": str(b.digest), "z": str(b.digest)}


async def test_a_failed_rename_reports_its_own_error_whatever_the_cleanup_meets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        (a,) = await images(engine, 1)
        made = fail_once(monkeypatch, "rename", layout)
        unlink = os.unlink

        def refused_unlink(path: Any, **kwargs: Any) -> None:
            if str(path).startswith("index-"):
                made.append("unlink")
                raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
            unlink(path, **kwargs)

        monkeypatch.setattr(os, "unlink", refused_unlink)
        with pytest.raises(OSError, match="Input/output error") as info:
            await engine.put_reference("x", a)
        assert made == ["rename", "unlink"]
        assert (type(info.value), info.value.errno) == (OSError, errno.EIO)
        assert index_names(layout) == {}
