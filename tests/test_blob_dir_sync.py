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
from ocicas._dir.fs import GroupSync, MadeDirs, group_sync, made_dirs
from ocicas._threads import wait_for
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


# -- blobs/<algorithm>: the directory a blob is renamed into must itself survive a crash ---------------------------


def sha512_of(data: bytes) -> str:
    return "sha512:" + hashlib.sha512(data).hexdigest()


async def put_sha512(engine: ocicas.DirEngine, data: bytes) -> None:
    assert await engine.put_blob(data, expected_digest=sha512_of(data)) == (sha512_of(data), len(data))


def made_dirs_of(layout: Path) -> MadeDirs:
    fd = os.open(layout / "blobs", os.O_RDONLY | os.O_DIRECTORY)
    try:
        return made_dirs(fd)
    finally:
        os.close(fd)


def no_temp_files(layout: Path) -> bool:
    return not [p for p in layout.rglob("*") if p.is_file() and p.parent.name.startswith(".")]


async def test_each_engine_syncs_blobs_once_before_its_first_rename_into_an_algorithm_dir(
    layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = DirFsyncs(monkeypatch, layout / "blobs", [])
    async with await ocicas.open_layout(layout) as engine:
        await put_sha512(engine, b"first")  # makes blobs/sha512
        assert fsyncs.calls == ["ok"]
        await put_sha512(engine, b"second")
        await engine.put_blob(b"sha256 content")  # blobs/sha256, made by create_layout: covered once too
        await engine.put_blob(b"more sha256 content")
        assert fsyncs.calls == ["ok", "ok"]
    async with await ocicas.open_layout(layout) as engine:  # another process may have made it a moment ago
        await put_sha512(engine, b"third")
        assert fsyncs.calls == ["ok", "ok", "ok"]
    assert sorted(p.name for p in (layout / "blobs" / "sha512").iterdir()) == sorted(
        sha512_of(d)[7:] for d in (b"first", b"second", b"third")
    )


async def test_a_failed_sync_of_a_new_algorithm_dir_stores_nothing_and_the_next_put_makes_it_anew(
    layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = DirFsyncs(monkeypatch, layout / "blobs", ["fail"])
    sha512 = layout / "blobs" / "sha512"
    async with await ocicas.open_layout(layout) as engine:
        with pytest.raises(OSError, match="no blob was stored") as info:
            await put_sha512(engine, b"lost with its directory")
        assert type(info.value) is OSError
        assert info.value.errno == errno.EIO
        assert info.value.strerror == (
            "syncing blobs/, which holds blobs/sha512, failed (Input/output error): no blob was stored"
        )
        assert list(sha512.iterdir()) == []  # made, but no blob relies on it
        assert no_temp_files(layout)
        assert made_dirs_of(layout).suspect == {"sha512"}
        made = os.open(sha512, os.O_RDONLY | os.O_DIRECTORY)  # held: its inode cannot be reused
        try:
            await put_sha512(engine, b"lost with its directory")
            assert os.fstat(made).st_nlink == 0  # removed while empty, made again, then covered
            assert sha512.stat().st_ino != os.fstat(made).st_ino
        finally:
            os.close(made)
        assert fsyncs.calls == ["fail", "ok"]
        assert [p.name for p in sha512.iterdir()] == [sha512_of(b"lost with its directory")[7:]]
        assert made_dirs_of(layout).suspect == set()


async def test_a_put_that_finds_an_algorithm_dir_being_made_waits_and_makes_it_anew_if_its_sync_fails(
    layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = DirFsyncs(monkeypatch, layout / "blobs", ["hold-fail"])
    refused = []  # attempts to take the lock that found it held

    def counted(attempt: Any) -> None:
        def recorded() -> bool:
            taken = bool(attempt())
            if not taken:
                refused.append(threading.current_thread().name)
            return taken

        wait_for(recorded)

    monkeypatch.setattr("ocicas._dir.engine.wait_for", counted)
    outcomes: dict[str, BaseException | None] = {}

    async def put(engine: ocicas.DirEngine, data: bytes) -> None:
        try:
            await put_sha512(engine, data)
            outcomes[data.decode()] = None
        except OSError as exc:
            outcomes[data.decode()] = exc

    async with await ocicas.open_layout(layout) as maker, await ocicas.open_layout(layout) as finder:
        async with anyio.create_task_group() as tg:
            tg.start_soon(put, maker, b"maker")
            await until(lambda: fsyncs.calls == ["hold-fail"])  # blobs/sha512 made, its fsync under way
            tg.start_soon(put, finder, b"finder")
            await until(lambda: bool(refused))  # the finder waits for the maker
            assert outcomes == {}
            fsyncs.release.set()
        assert fsyncs.calls == ["hold-fail", "ok"]
        maker_error = outcomes["maker"]
        assert type(maker_error) is OSError
        assert maker_error.errno == errno.EIO
        assert outcomes["finder"] is None  # it found the directory suspect, empty: made it anew, and synced
        assert [p.name for p in (layout / "blobs" / "sha512").iterdir()] == [sha512_of(b"finder")[7:]]
        assert made_dirs_of(layout).suspect == set()


async def test_puts_that_find_a_suspect_algorithm_dir_at_once_make_it_anew_once(
    layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = DirFsyncs(monkeypatch, layout / "blobs", ["fail"])
    async with await ocicas.open_layout(layout) as first, await ocicas.open_layout(layout) as second:
        with pytest.raises(OSError, match="no blob was stored"):
            await put_sha512(first, b"failed")
        made = os.open(layout / "blobs" / "sha512", os.O_RDONLY | os.O_DIRECTORY)
        try:
            async with anyio.create_task_group() as tg:
                for engine, data in ((first, b"one"), (second, b"two"), (first, b"three"), (second, b"four")):
                    tg.start_soon(put_sha512, engine, data)
            assert os.fstat(made).st_nlink == 0
        finally:
            os.close(made)
        # one remake and its fsync; the other engine's first put covers it with one more; the rest trust them
        assert fsyncs.calls == ["fail", "ok", "ok"]
        assert sorted(p.name for p in (layout / "blobs" / "sha512").iterdir()) == sorted(
            sha512_of(d)[7:] for d in (b"one", b"two", b"three", b"four")
        )


async def test_a_suspect_algorithm_dir_that_holds_blobs_is_left_as_it_is(
    layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    DirFsyncs(monkeypatch, layout / "blobs", ["fail"])
    sha512 = layout / "blobs" / "sha512"
    async with await ocicas.open_layout(layout) as engine:
        with pytest.raises(OSError, match="no blob was stored"):
            await put_sha512(engine, b"content")
        # meanwhile another process stored a blob there, which relies on the directory
        other = sha512 / sha512_of(b"other")[7:]
        other.write_bytes(b"other")
        with pytest.raises(OSError, match="no blob was stored") as info:
            await put_sha512(engine, b"content")
        assert info.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
        assert info.value.strerror == (
            "blobs/sha512 may not survive a crash (an fsync of blobs/ failed after this process made it) and "
            "another process has put blobs into it, so it cannot be made anew: no blob was stored"
        )
        assert [p.name for p in sha512.iterdir()] == [other.name]
        assert other.read_bytes() == b"other"
        assert no_temp_files(layout)
        assert await engine.put_blob(b"sha256 content") == (digest_of(b"sha256 content"), 14)  # others unaffected


async def test_a_failed_sync_covering_an_existing_algorithm_dir_leaves_it_unsuspected(
    layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = DirFsyncs(monkeypatch, layout / "blobs", ["fail"])
    sha256 = layout / "blobs" / "sha256"
    made = sha256.stat().st_ino
    async with await ocicas.open_layout(layout) as engine:
        with pytest.raises(OSError, match="no blob was stored") as info:
            await engine.put_blob(b"content")
        assert info.value.errno == errno.EIO
        assert list(sha256.iterdir()) == []
        assert made_dirs_of(layout).suspect == set()  # not made here: the next fsync that succeeds covers it
        assert await engine.put_blob(b"content") == (digest_of(b"content"), 7)
        assert fsyncs.calls == ["fail", "ok"]
        assert sha256.stat().st_ino == made
