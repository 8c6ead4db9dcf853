"""A blob directory fsync that fails: every put whose change it covered or overlapped raises NotDurableError (the
blob is visible), a put of present content syncs too (the copy it found may rest on a rename not yet synced),
and a retry renames again and syncs."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import ocicas
from ocicas._dir.fs import GroupSync, group_sync
from tests.polling import until, until_now

pytestmark = pytest.mark.anyio


class DirFsyncs:
    """``os.fsync`` of one directory, from worker threads, done as planned: "ok", "fail" (EIO), "hold" (wait
    for :attr:`release`, then ok), "hold-fail" or "hold-memoryerror" (as CPython raises when it cannot build the
    OSError of a failed fsync); calls beyond the plan are ok. Other fsyncs are untouched."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, directory: Path, plan: list[str]) -> None:
        self.directory = os.path.realpath(directory)
        self.plan = plan
        self.calls: list[str] = []
        self.release = threading.Event()
        fsync = os.fsync

        def planned(fd: Any) -> None:
            if threading.current_thread() is threading.main_thread() or not isinstance(fd, int):
                return fsync(fd)
            if os.readlink(f"/proc/self/fd/{fd}") != self.directory:
                return fsync(fd)
            step = self.plan[len(self.calls)] if len(self.calls) < len(self.plan) else "ok"
            self.calls.append(step)
            if step.startswith("hold"):
                self.release.wait(30)
            if step.endswith("fail"):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            if step.endswith("memoryerror"):
                raise MemoryError
            return fsync(fd)

        monkeypatch.setattr(os, "fsync", planned)


@pytest.fixture
async def layout(tmp_path: Path) -> Path:
    await ocicas.create_layout(tmp_path / "layout")
    return tmp_path / "layout"


def group_of(directory: Path) -> GroupSync:
    """The process's directory fsync of ``directory`` (kept alive by the caller's reference)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return group_sync(fd)
    finally:
        os.close(fd)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Puts:
    """Puts run as tasks, each outcome kept: ``None`` or the NotDurableError raised."""

    def __init__(self, engine: ocicas.DirEngine) -> None:
        self.engine = engine
        self.outcomes: dict[str, BaseException | None] = {}

    async def put(self, key: str, data: bytes) -> None:
        try:
            assert await self.engine.put_blob(data) == (digest_of(data), len(data))
            self.outcomes[key] = None
        except (ocicas.NotDurableError, MemoryError) as exc:
            self.outcomes[key] = exc


def assert_not_durable(error: BaseException | None, data: bytes) -> None:
    assert type(error) is ocicas.NotDurableError
    assert error.errno == errno.EIO
    assert str(error) == (
        f"blob {digest_of(data)} is stored and visible, but syncing its directory failed (Input/output error): it "
        "may not survive a crash; putting it again (put_blob, in this process) makes it durable"
    )
    assert isinstance(error.__cause__, OSError)
    assert error.__cause__.errno == errno.EIO


async def test_a_failed_fsync_is_not_durable_and_the_retry_renames_even_after_other_puts(
    layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = layout / "blobs" / "sha256"
    fsyncs = DirFsyncs(monkeypatch, blobs, ["fail"])
    data = b"a blob whose directory fsync fails" * 10
    digest = digest_of(data)
    async with await ocicas.open_layout(layout) as engine:
        with pytest.raises(ocicas.NotDurableError) as info:
            await engine.put_blob(data)
        assert_not_durable(info.value, data)
        assert await engine.read_blob(digest) == data  # stored and visible
        first = (blobs / digest[7:]).stat().st_ino

        # another blob's successful fsync does not vouch for this one
        assert await engine.put_blob(b"another") == (digest_of(b"another"), 7)
        assert fsyncs.calls == ["fail", "ok"]

        # the retry finds it present, but renames its copy over it and syncs, rather than freshen it
        assert await engine.put_blob(data) == (digest, len(data))
        assert fsyncs.calls == ["fail", "ok", "ok"]
        assert (blobs / digest[7:]).stat().st_ino != first
        assert await engine.read_blob(digest) == data

        # durable now: a put of present content freshens it (and syncs the directory, as every put does)
        again = (blobs / digest[7:]).stat().st_ino
        assert await engine.put_blob(data) == (digest, len(data))
        assert await engine.put_blob(b"another") == (digest_of(b"another"), 7)
        assert fsyncs.calls == ["fail", "ok", "ok", "ok", "ok"]
        assert (blobs / digest[7:]).stat().st_ino == again
        assert group_of(blobs)._suspect == {}


async def test_a_retry_through_another_engine_renames_too(layout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What failed is known to the process, not to the engine: the layout closed and opened again, the retry
    still renames over the blob and syncs."""
    blobs = layout / "blobs" / "sha256"
    fsyncs = DirFsyncs(monkeypatch, blobs, ["fail"])
    data = b"retried through a new engine" * 10
    digest = digest_of(data)
    async with await ocicas.open_layout(layout) as engine:
        with pytest.raises(ocicas.NotDurableError):
            await engine.put_blob(data)
    first = (blobs / digest[7:]).stat().st_ino
    async with await ocicas.open_layout(layout) as engine, await ocicas.open_layout(layout) as other:
        assert await other.put_blob(data) == (digest, len(data))
        assert fsyncs.calls == ["fail", "ok"]
        assert (blobs / digest[7:]).stat().st_ino != first
        assert await engine.read_blob(digest) == data
    assert group_of(blobs)._suspect == {}


async def test_every_put_a_failed_fsync_covered_gets_not_durable(layout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first directory fsync is held until three more puts renamed and wait for the next one, which fails:
    all three raise NotDurableError, each its own instance with the one failure as its cause."""
    fsyncs = DirFsyncs(monkeypatch, layout / "blobs" / "sha256", ["hold", "fail"])
    payloads = [f"covered blob {n}".encode() * 20 for n in range(4)]
    async with await ocicas.open_layout(layout) as engine:
        syncs = group_of(layout / "blobs" / "sha256")
        puts = Puts(engine)
        async with anyio.create_task_group() as tg:
            tg.start_soon(puts.put, "0", payloads[0])
            await until(lambda: fsyncs.calls == ["hold"])
            for n in (1, 2, 3):
                tg.start_soon(puts.put, str(n), payloads[n])
            # all three renamed and wait in sync() for an fsync to begin after the held one (only sync() waits on
            # the condition): released earlier, a put still before its rename would need a third fsync
            await until(lambda: len(syncs._cond._waiters) == 3)  # type: ignore[attr-defined]
            fsyncs.release.set()
        assert fsyncs.calls == ["hold", "fail"]
        assert puts.outcomes["0"] is None
        failed = [puts.outcomes[str(n)] for n in (1, 2, 3)]
        for n, error in zip((1, 2, 3), failed, strict=True):
            assert_not_durable(error, payloads[n])
        assert len({id(e) for e in failed}) == 3  # each raised in its own task
        assert len({id(e.__cause__) for e in failed if e is not None}) == 1
        for payload in payloads:
            assert await engine.read_blob(digest_of(payload)) == payload
        assert set(syncs._suspect) == {digest_of(payloads[n])[7:] for n in (1, 2, 3)}
        assert syncs._changing == {}
        for n in (1, 2, 3):  # each retry renames over its blob and syncs
            assert await engine.put_blob(payloads[n]) == (digest_of(payloads[n]), len(payloads[n]))
        assert fsyncs.calls == ["hold", "fail", "ok", "ok", "ok"]
        assert syncs._suspect == {}


@pytest.mark.parametrize("failure", ["hold-fail", "hold-memoryerror"])
async def test_a_rename_made_while_an_fsync_fails_is_not_durable(
    layout: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """A put renames while the fsync of an earlier one runs and fails: its own fsync, after, succeeds, but cannot
    vouch for a rename the failed writeback may have held. An fsync that raised something else than OSError
    failed as well (CPython raises only once fsync returned an error): the put that ran it gets that."""
    fsyncs = DirFsyncs(monkeypatch, layout / "blobs" / "sha256", [failure])
    first, second = b"first" * 30, b"second" * 30
    async with await ocicas.open_layout(layout) as engine:
        syncs = group_of(layout / "blobs" / "sha256")
        puts = Puts(engine)
        async with anyio.create_task_group() as tg:
            tg.start_soon(puts.put, "first", first)
            await until(lambda: fsyncs.calls == [failure])
            tg.start_soon(puts.put, "second", second)
            await until(lambda: len(syncs._changing) == 2)
            fsyncs.release.set()
        assert fsyncs.calls == [failure, "ok"]
        if failure == "hold-fail":
            assert_not_durable(puts.outcomes["first"], first)
        else:
            assert type(puts.outcomes["first"]) is MemoryError
        assert_not_durable(puts.outcomes["second"], second)
        assert set(syncs._suspect) == {digest_of(first)[7:], digest_of(second)[7:]}
        # each retry renames over its blob and syncs
        for data in (first, second):
            assert await engine.put_blob(data) == (digest_of(data), len(data))
        assert fsyncs.calls == [failure, "ok", "ok", "ok"]
        assert syncs._suspect == {}


async def test_a_put_of_present_content_syncs_and_fails_with_the_rename_it_found(
    layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two puts of the same bytes: the second finds the first's copy and freshens it, but returns only once a
    directory fsync that began after it ended; the first's fsync fails meanwhile, so both raise
    NotDurableError, and a retry renames."""
    blobs = layout / "blobs" / "sha256"
    fsyncs = DirFsyncs(monkeypatch, blobs, ["hold-fail"])
    data = b"shared base layer" * 40
    async with await ocicas.open_layout(layout) as engine:
        syncs = group_of(layout / "blobs" / "sha256")
        puts = Puts(engine)
        async with anyio.create_task_group() as tg:
            tg.start_soon(puts.put, "renames", data)
            await until(lambda: fsyncs.calls == ["hold-fail"])
            tg.start_soon(puts.put, "freshens", data)
            await until(lambda: syncs._changing == {digest_of(data)[7:]: 2})
            assert puts.outcomes == {}  # fsync 1 holds, and the freshening put waits for one after it
            fsyncs.release.set()
        assert fsyncs.calls == ["hold-fail", "ok"]  # the freshening put's own fsync succeeded: too late
        assert_not_durable(puts.outcomes["renames"], data)
        assert_not_durable(puts.outcomes["freshens"], data)
        before = (blobs / digest_of(data)[7:]).stat().st_ino
        assert await engine.put_blob(data) == (digest_of(data), len(data))
        assert fsyncs.calls == ["hold-fail", "ok", "ok"]
        assert (blobs / digest_of(data)[7:]).stat().st_ino != before
        assert syncs._suspect == {}


def test_a_rename_left_unsynced_stays_suspect_past_an_fsync_begun_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put that renamed and then failed before syncing leaves its name suspect; another put's fsync that had
    begun before that rename succeeds, but cannot vouch for it: the name stays suspect, and the next put of it
    renames. An fsync begun after it clears it."""
    directory = tmp_path / "blobs"
    directory.mkdir()
    fsyncs = DirFsyncs(monkeypatch, directory, ["hold"])
    group = group_of(directory)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:

        def freshen() -> None:
            with group.change("x") as change:
                assert not change.suspect
                change.sync(fd)  # runs fsync 1, held

        thread = threading.Thread(target=freshen)
        thread.start()
        until_now(lambda: fsyncs.calls == ["hold"])
        with pytest.raises(RuntimeError), group.change("x"):
            raise RuntimeError("failed before renaming")
        assert group._suspect == {}  # nothing renamed, nothing suspect

        def renamed_then_failed() -> None:
            with group.change("x") as change:
                change.renaming = True
                raise RuntimeError("renamed, then failed before its sync")

        with pytest.raises(RuntimeError):
            renamed_then_failed()
        assert set(group._suspect) == {"x"}
        fsyncs.release.set()
        thread.join(30)
        assert set(group._suspect) == {"x"}  # fsync 1 began before the failed put's rename
        with group.change("x") as change:
            assert change.suspect  # so this put renames
            change.sync(fd)
        assert group._suspect == {}
        assert (group._started, group._done, group._failures) == (2, 2, 0)
    finally:
        os.close(fd)
