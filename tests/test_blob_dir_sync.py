"""A put's blob directory fsync that fails: every put whose rename it covered raises NotDurableError (the blob is
visible), and a retry renames again and syncs, until the directory is synced again."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import ocicas

pytestmark = pytest.mark.anyio


class DirFsyncs:
    """``os.fsync`` of one directory, from worker threads, done as planned: "ok", "fail" (EIO) or "hold" (wait for
    :attr:`release`, then ok); calls beyond the plan are ok. Other fsyncs are untouched."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, directory: Path, plan: list[str]) -> None:
        self.directory = str(directory)
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
            if step == "fail":
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            if step == "hold":
                self.release.wait(30)
            return fsync(fd)

        monkeypatch.setattr(os, "fsync", planned)


@pytest.fixture
async def layout(tmp_path: Path) -> Path:
    await ocicas.create_layout(tmp_path / "layout")
    return tmp_path / "layout"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def wait_until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(30):
        while not condition():  # noqa: ASYNC110 (state changed by worker threads: no event to wait on)
            await anyio.sleep(0.005)


async def test_a_failed_directory_fsync_is_not_durable_and_a_retry_renames_and_syncs(
    layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = layout / "blobs" / "sha256"
    fsyncs = DirFsyncs(monkeypatch, blobs, ["fail"])
    data = b"a blob whose directory fsync fails" * 10
    digest = digest_of(data)
    async with await ocicas.open_layout(layout) as engine:
        with pytest.raises(ocicas.NotDurableError) as info:
            await engine.put_blob(data)
        assert isinstance(info.value, OSError)
        assert info.value.errno == errno.EIO
        assert str(info.value) == (
            f"blob {digest} is stored and visible, but syncing its directory failed (Input/output error): it may "
            "not survive a crash; putting it again makes it durable"
        )
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == errno.EIO
        assert await engine.read_blob(digest) == data  # stored and visible
        first = (blobs / digest[7:]).stat().st_ino

        # the retry finds it present, but renames its copy over it and syncs, rather than freshen it
        assert await engine.put_blob(data) == (digest, len(data))
        assert fsyncs.calls == ["fail", "ok"]
        assert (blobs / digest[7:]).stat().st_ino != first
        assert await engine.read_blob(digest) == data

        # synced again: a put of present content freshens it, with no directory fsync
        again = (blobs / digest[7:]).stat().st_ino
        assert await engine.put_blob(data) == (digest, len(data))
        assert fsyncs.calls == ["fail", "ok"]
        assert (blobs / digest[7:]).stat().st_ino == again
        # a new blob is renamed and synced as usual
        assert await engine.put_blob(b"another") == (digest_of(b"another"), 7)
        assert fsyncs.calls == ["fail", "ok", "ok"]


async def test_every_put_a_failed_fsync_covered_gets_not_durable(layout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first directory fsync is held until three more puts wait for the next one, which fails: all three
    raise NotDurableError, each its own instance with the one failure as its cause; the first put succeeds."""
    fsyncs = DirFsyncs(monkeypatch, layout / "blobs" / "sha256", ["hold", "fail"])
    payloads = [f"covered blob {n}".encode() * 20 for n in range(4)]
    outcomes: dict[int, BaseException | None] = {}
    async with await ocicas.open_layout(layout) as engine:
        syncs = engine._dir_syncs["sha256"]

        async def put(n: int) -> None:
            try:
                assert await engine.put_blob(payloads[n]) == (digest_of(payloads[n]), len(payloads[n]))
                outcomes[n] = None
            except ocicas.NotDurableError as exc:
                outcomes[n] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(put, 0)
            await wait_until(lambda: fsyncs.calls == ["hold"])
            for n in (1, 2, 3):
                tg.start_soon(put, n)
            await wait_until(lambda: syncs._waiting.get(2) == 3)  # all three renamed, and wait for fsync 2
            fsyncs.release.set()
        assert fsyncs.calls == ["hold", "fail"]
        assert outcomes[0] is None
        failed = [outcomes[n] for n in (1, 2, 3)]
        assert [type(e) for e in failed] == [ocicas.NotDurableError] * 3
        assert len({id(e) for e in failed}) == 3  # each raised in its own task
        causes = {id(e.__cause__) for e in failed if e is not None}
        assert len(causes) == 1
        for payload in payloads:
            assert await engine.read_blob(digest_of(payload)) == payload
        assert (syncs._waiting, syncs._failed) == ({}, {})  # nothing kept once every caller looked
