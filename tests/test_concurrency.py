"""Concurrency: processes and tasks writing one layout at once lose nothing and never expose a torn file.

- Processes tagging at once: every ``put_reference`` lands (no lost update of
  ``index.json``), and a reader polling ``index.json`` meanwhile always parses it.
- Tasks putting the same blob at once: one blob, no error, no temporary file left.
- ``ocicas.gc`` running while tasks put and tag: nothing they tagged is lost, even
  when what they put is old garbage the collector is about to delete.
- Two collections from two processes never overlap (``gc_lock``'s ``flock``),
  with a control run, without the lock, that shows overlaps would be caught.

The process tests are plain (sync) tests: what they exercise happens in the
subprocesses, half of which run on asyncio and half on trio.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import pytest

import ocicas
from ocicas import Digest
from ocicas.testing import blob_bytes, sha256
from tests.images import LAYER, MANIFEST, put, put_image

pytestmark = pytest.mark.anyio

#: Processes tagging one layout at once, and the references each puts (one per call).
TAGGER_PROCESSES = 8
TAGS_PER_PROCESS = 200
#: Tasks putting the same content at once, spread over this many engines on one layout.
SAME_BLOB_TASKS = 64
SAME_BLOB_ENGINES = 2
#: Writer tasks racing ``ocicas.gc``, and the images each puts and tags.
GC_WRITERS = 4
IMAGES_PER_WRITER = 12
#: Collections per process in the overlap test, how long each holds every decision, and garbage blobs.
COLLECTOR_RUNS = 12
COLLECTOR_HOLD_MS = 4
COLLECTOR_GARBAGE = 6
PROCESS_TIMEOUT = 120.0
#: Rewrites of index.json by another engine, at most, waiting for the filesystem to reuse an inode.
INODE_REUSE_ATTEMPTS = 50
#: How long the forced race in the reuse test lets the writer run before the collector's unlink goes on.
RACE_WINDOW = 0.3

WORKERS = Path(__file__).parent / "workers"
BACKENDS = ("asyncio", "trio")


@contextmanager
def processes(
    script: str, argvs: Sequence[Sequence[object]], cwds: Sequence[Path] | None = None
) -> Iterator[list[subprocess.Popen[str]]]:
    """Start one worker per argv, wait until each says ``ready``; kill any left running on the way out."""
    started = [
        subprocess.Popen(
            [sys.executable, str(WORKERS / script), *map(str, argv)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=None if cwds is None else cwds[n],
        )
        for n, argv in enumerate(argvs)
    ]
    try:
        for process in started:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait(PROCESS_TIMEOUT)
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()


def go(started: Sequence[subprocess.Popen[str]]) -> None:
    for process in started:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()


def new_layout(path: Path) -> Path:
    anyio.run(ocicas.create_layout, path)
    return path


@dataclass
class Poller:
    """Re-reads and parses ``index.json`` in a loop on a thread, as a foreign reader would."""

    path: Path
    polls: int = 0
    failures: int = 0
    shrinks: int = 0
    most: int = 0
    first_failure: str = ""

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.polls += 1
            try:
                with open(self.path, "rb") as file:
                    manifests = json.loads(file.read())["manifests"]
                assert isinstance(manifests, list)
            except Exception as exc:  # a torn or missing file
                self.failures += 1
                self.first_failure = self.first_failure or repr(exc)
                continue
            if len(manifests) < self.most:  # only puts happen: fewer entries means an update was lost
                self.shrinks += 1
            self.most = max(self.most, len(manifests))

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_processes_tagging_at_once_lose_nothing_and_never_tear_the_index(tmp_path: Path) -> None:
    layout = new_layout(tmp_path / "layout")
    argvs = [(layout, w, TAGS_PER_PROCESS, BACKENDS[w % 2]) for w in range(TAGGER_PROCESSES)]
    cwds = [tmp_path / f"cwd-{w}" for w in range(TAGGER_PROCESSES)]  # unrelated processes: each its own
    for cwd in cwds:
        cwd.mkdir()
    with processes("tagger.py", argvs, cwds) as taggers, Poller(layout / "index.json") as poller:
        started = time.monotonic()
        go(taggers)
        for tagger in taggers:
            assert tagger.stdout is not None
            assert tagger.stdout.readline().strip() == "done"
            assert tagger.wait(PROCESS_TIMEOUT) == 0
        elapsed = time.monotonic() - started

    async def references() -> dict[str, Digest]:
        async with await ocicas.open_layout(layout) as engine:
            return {name: (await engine.get_reference(name)).digest for name in await engine.list_references()}

    found = anyio.run(references)
    expected = {
        f"w{w}-{i}": sha256(f"{w}-{i}".encode()) for w in range(TAGGER_PROCESSES) for i in range(TAGS_PER_PROCESS)
    }
    assert len(found) == TAGGER_PROCESSES * TAGS_PER_PROCESS
    assert found == expected
    assert poller.failures == 0, poller.first_failure
    assert poller.shrinks == 0
    assert poller.polls > 0
    print(
        f"\nconcurrency: {TAGGER_PROCESSES} processes x {TAGS_PER_PROCESS} put_reference -> {len(found)} references "
        f"in {elapsed:.1f} s; index.json polled {poller.polls} times, {poller.failures} failures, "
        f"{poller.shrinks} shrinks"
    )


async def test_tasks_putting_one_blob_at_once_store_it_once(tmp_path: Path) -> None:
    await ocicas.create_layout(tmp_path / "layout")
    large = blob_bytes(3 * ocicas.CHUNK_SIZE + 17, seed=1)  # several chunks: the writes overlap on disk
    small = b"small and shared"
    engines = [await ocicas.open_layout(tmp_path / "layout") for _ in range(SAME_BLOB_ENGINES)]
    results: list[tuple[Digest, int]] = []
    try:

        async def putter(n: int) -> None:
            engine = engines[n % len(engines)]
            results.append(await engine.put_blob(large if n % 2 else small))

        async with anyio.create_task_group() as tg:
            for n in range(SAME_BLOB_TASKS):
                tg.start_soon(putter, n)
        assert set(results) == {(sha256(large), len(large)), (sha256(small), len(small))}
        assert len(results) == SAME_BLOB_TASKS
        assert await engines[0].list_blobs() == sorted([sha256(large), sha256(small)])
        assert await engines[1].read_blob(sha256(large)) == large
        for path in (tmp_path / "layout").iterdir():
            if path.name.startswith(".ocicas-"):
                assert list(path.iterdir()) == []  # every temporary file went, renamed or removed
    finally:
        for engine in engines:
            await engine.close()
    assert {p.name for p in (tmp_path / "layout").iterdir()} == {"oci-layout", "index.json", "blobs"}


async def test_gc_running_while_tasks_put_and_tag_loses_nothing_they_tagged(tmp_path: Path) -> None:
    await ocicas.create_layout(tmp_path / "layout")
    async with await ocicas.open_layout(tmp_path / "layout") as engine:
        # old garbage, some of which the writers are about to put again (freshening it)
        reused = [f"reused layer {n}".encode() for n in range(GC_WRITERS * 2)]
        garbage = [await put(engine, data, LAYER) for data in reused]
        garbage += [await put(engine, f"plain garbage {n}".encode(), LAYER) for n in range(20)]
        old = time.time() - 2 * ocicas.DEFAULT_GRACE_PERIOD
        for descriptor in garbage:
            os.utime(tmp_path / "layout" / "blobs" / "sha256" / descriptor.digest.encoded, (old, old))
        tagged: dict[str, set[Digest]] = {}
        collections = 0
        writing = True

        async def writer(w: int) -> None:
            for n in range(IMAGES_PER_WRITER):
                layers = [reused[(w + n) % len(reused)], f"writer {w} image {n}".encode()]
                image, blobs = await put_image(engine, layers)
                await anyio.lowlevel.checkpoint()  # let the collector in between put and tag
                await engine.put_reference(f"w{w}-{n}", image)
                tagged[f"w{w}-{n}"] = set(blobs)

        async def collector() -> None:
            nonlocal collections
            while writing:
                await ocicas.gc(engine)
                collections += 1
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(collector)
            async with anyio.create_task_group() as writers:
                for w in range(GC_WRITERS):
                    writers.start_soon(writer, w)
            writing = False
        result = await ocicas.gc(engine)
        present = set(await engine.list_blobs())
        for name, blobs in tagged.items():
            assert blobs <= present, f"{name} lost {sorted(blobs - present)}"
        graph = await ocicas.walk(engine, await engine.list_roots())  # every tagged manifest verifies
        assert graph.digests() == present
        assert len(tagged) == GC_WRITERS * IMAGES_PER_WRITER
        assert collections > 0
        assert not {d.digest for d in garbage[len(reused) :]} & present  # the plain garbage went
        assert result.removed == ()


@pytest.mark.parametrize("reuse", ["put_blob", "touch_blobs"])
async def test_a_collection_never_deletes_what_another_engine_is_reusing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reuse: str
) -> None:
    """Two engines on one layout, as two processes would be: one reuses old garbage the other collects.

    The writer's ``put_blob`` of present content (or ``touch_blobs``, as ``ocicas.copy``
    reuses blobs) freshens the blob; the collector's ``delete_blobs`` checks its age,
    then unlinks it. The interleaving that loses data is forced: the writer freshens
    right between the collector's check and its unlink. Each engine's own lock
    cannot see the other engine; only a lock the two processes share can.
    """
    await ocicas.create_layout(tmp_path / "layout")
    data = b"old garbage, about to be reused"
    async with (
        await ocicas.open_layout(tmp_path / "layout") as collector,
        await ocicas.open_layout(tmp_path / "layout") as writer,
    ):
        digest, size = await writer.put_blob(data)
        old = time.time() - 2 * ocicas.DEFAULT_GRACE_PERIOD
        os.utime(tmp_path / "layout" / "blobs" / "sha256" / digest.encoded, (old, old))
        token = anyio.lowlevel.current_token()
        real_unlink = os.unlink
        reused: list[object] = []

        def reuse_now() -> None:
            if reuse == "put_blob":
                reused.append(anyio.from_thread.run(writer.put_blob, data, token=token))
            else:
                reused.append(anyio.from_thread.run(writer.touch_blobs, [digest], token=token))

        racer = threading.Thread(target=reuse_now)

        def unlink(path: str, *, dir_fd: int | None = None) -> None:
            if path == digest.encoded and not racer.is_alive() and not reused:
                racer.start()  # the writer reuses the blob now, between the age check and the unlink
                racer.join(RACE_WINDOW)  # (a writer that must wait for the collector waits this long)
            real_unlink(path, dir_fd=dir_fd)

        monkeypatch.setattr(os, "unlink", unlink)
        await ocicas.gc(collector)
        monkeypatch.undo()
        await anyio.to_thread.run_sync(racer.join, PROCESS_TIMEOUT)
        assert reused, "the race was not forced"
        if reuse == "put_blob":
            assert reused == [(digest, size)]
        elif digest not in reused[0]:  # type: ignore[operator]
            await writer.put_blob(data)  # reported gone: a writer (ocicas.copy) then puts it again
        await writer.put_reference("reused", ocicas.Descriptor(media_type=LAYER, digest=digest, size=size))
        assert await writer.read_blob(digest) == data, "the collector deleted a blob the writer had reused"
        assert (await ocicas.gc(collector)).removed == ()


async def test_a_rewrite_within_one_clock_tick_is_never_mistaken_for_the_cached_index(tmp_path: Path) -> None:
    """Two engines on one layout, as two processes would be: no stale read, and above all no lost update.

    Engine A caches the parsed ``index.json`` by the file's (device, inode, size,
    mtime). Engine B then rewrites it, keeping its size: each rewrite is a new file
    renamed over the old one, and the filesystem is free to give a new file the
    inode of one that was just freed (ext4 does, within a few rewrites). Within one
    tick of a coarse file clock, that file also gets the same mtime: kernels before
    6.13, and filesystems without fine-grained timestamps, stamp files at 1 to 10 ms
    granularity, and several rewrites fit in one tick on a fast disk. The tick is
    simulated by giving the file A's cached mtime back (``utime``). A must then
    neither read the old index nor write its next change over B's.
    """
    await ocicas.create_layout(tmp_path / "layout")
    index = tmp_path / "layout" / "index.json"

    def target(n: int) -> ocicas.Descriptor:
        data = f"manifest {n:04}".encode()  # the same size for every n
        return ocicas.Descriptor(media_type=MANIFEST, digest=sha256(data), size=len(data))

    async with (
        await ocicas.open_layout(tmp_path / "layout") as a,
        await ocicas.open_layout(tmp_path / "layout") as b,
    ):
        await a.put_reference("tag", target(0), partial=True)  # index.json is the point: no content
        cached = index.stat()
        latest = 0
        while latest < INODE_REUSE_ATTEMPTS and (latest == 0 or index.stat().st_ino != cached.st_ino):
            latest += 1
            await b.update_references({"tag": target(latest)}, replace=True, partial=True)
        reused = index.stat().st_ino == cached.st_ino
        assert index.stat().st_size == cached.st_size
        os.utime(index, ns=(cached.st_atime_ns, cached.st_mtime_ns))  # the same clock tick
        assert (await a.get_reference("tag")) == target(latest), f"stale read (inode reused: {reused})"
        await a.put_reference("other", target(9999), partial=True)
        assert (await b.get_reference("tag")) == target(latest), f"lost update (inode reused: {reused})"
        assert await b.list_references() == ["other", "tag"]


def test_two_collecting_processes_never_overlap(tmp_path: Path) -> None:
    def overlaps(unlocked: bool, attempt: int = 0) -> tuple[int, int]:
        layout = new_layout(tmp_path / f"layout-{'unlocked' if unlocked else 'locked'}-{attempt}")

        async def add_garbage() -> None:
            async with await ocicas.open_layout(layout) as engine:
                for n in range(COLLECTOR_GARBAGE):
                    await engine.put_blob(f"garbage {n}".encode())

        anyio.run(add_garbage)
        extra = ["unlocked"] if unlocked else []
        argvs = [(layout, COLLECTOR_RUNS, COLLECTOR_HOLD_MS, backend, *extra) for backend in BACKENDS]
        spans: list[list[tuple[float, float]]] = []
        with processes("collector.py", argvs) as collectors:
            go(collectors)
            for collector in collectors:
                assert collector.stdout is not None
                lines = [collector.stdout.readline().split() for _ in range(COLLECTOR_RUNS)]
                assert all(line[0] == "interval" for line in lines), lines
                spans.append([(float(start), float(end)) for _, start, end in lines])
                assert collector.stdout.readline().strip() == "done"
                assert collector.wait(PROCESS_TIMEOUT) == 0
        crossing = sum(1 for a in spans[0] for b in spans[1] if a[0] < b[1] and b[0] < a[1])
        return crossing, sum(len(s) for s in spans)

    crossing, runs = overlaps(unlocked=False)
    assert runs == len(BACKENDS) * COLLECTOR_RUNS
    assert crossing == 0
    for attempt in range(3):  # the control relies on the scheduler letting both run at once: give it chances
        control, _ = overlaps(unlocked=True, attempt=attempt)
        if control:
            break
    assert control > 0, "the control without gc_lock showed no overlap: this test could not see one"
    print(
        f"\nconcurrency: 2 processes x {COLLECTOR_RUNS} gc runs: {crossing} overlaps with gc_lock, "
        f"{control} without (control)"
    )
