"""The collector's own hooks (plain-text digests, no per-blob objects) and a walk's batched fast path."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio.to_thread
import pytest

import ocicas
import ocicas._gc
from ocicas import Descriptor, Digest, Engine
from tests.images import INDEX, MANIFEST, age, put, put_image

pytestmark = pytest.mark.anyio

OLD = time.time() - 7200
WORKERS = Path(__file__).parent / "workers"
#: How long the forced race lets the writer process run before the collector's unlink goes on.
RACE_WINDOW = 0.3
PROCESS_TIMEOUT = 120.0


async def test_triage_sorts_blobs_exactly(engine: Engine) -> None:
    blobs = {
        "json": b'{"a": 1}',
        "spaced json": b' \n\t {"b": 2}',
        "empty": b"",
        "binary": b"\x1f\x8b binary",
        "text": b"plain text",
        "large json": b'{"c": "' + b"x" * 40 + b'"}',
        "young": b'{"young": true}',
    }
    digests = {name: (await engine.put_blob(data))[0] for name, data in blobs.items()}
    for name, digest in digests.items():
        if name != "young":
            age(engine, [digest])
    absent = Digest("sha256:" + "0" * 64)
    given = sorted([*map(str, digests.values()), absent])
    cutoff = time.time() - 3600
    async with engine._operation(None):
        sizes, fresh, old, json_like = await engine._gc_triage(given, cutoff, 64, 20)
    assert sizes == {digests[n]: len(data) for n, data in blobs.items()}
    assert fresh == [digests["young"]]
    assert old == [d for d in given if d in sizes and d != digests["young"]]
    assert set(json_like) == {digests["json"], digests["spaced json"], digests["empty"]}
    assert json_like == [d for d in old if d in json_like]
    # no sniff asked for: nothing is JSON-like; no cutoff: nothing is fresh
    async with engine._operation(None):
        sizes2, fresh2, old2, json_like2 = await engine._gc_triage(given, None, 0, 20)
    assert (sizes2, fresh2, old2, json_like2) == (sizes, [], [d for d in given if d in sizes], [])


async def test_gc_delete_keeps_young_blobs_and_reports_sizes(engine: Engine) -> None:
    old = (await engine.put_blob(b"old one"))[0]
    young = (await engine.put_blob(b"young one"))[0]
    age(engine, [old])
    absent = "sha256:" + "1" * 64
    async with engine._operation(None):
        removed = await engine._gc_delete([absent, str(old), str(young)], time.time() - 3600, [time.monotonic()])
    assert removed == {old: 7}
    assert await engine.list_blobs() == [young]
    async with engine._operation(None):
        assert await engine._gc_delete([str(young)], None, [time.monotonic()]) == {young: 9}
    assert await engine.list_blobs() == []


async def test_gc_list_is_the_listing_as_text(engine: Engine) -> None:
    for n in range(40):
        await engine.put_blob(f"blob {n}".encode())
    async with engine._operation(None):
        listed = await engine._gc_list()
    assert sorted(listed) == await engine.list_blobs()  # in the engine's own order
    assert len(listed) == 40


async def test_gc_keeps_special_files_and_symlinks_at_blob_paths(tmp_path: Path) -> None:
    await ocicas.create_layout(tmp_path / "layout")
    async with await ocicas.open_layout(tmp_path / "layout") as engine:
        garbage = (await engine.put_blob(b"garbage"))[0]
        age(engine, [garbage])
        blobs = tmp_path / "layout" / "blobs" / "sha256"
        fifo, link, directory = "a" * 64, "b" * 64, "c" * 64
        os.mkfifo(blobs / fifo)
        os.symlink(blobs / garbage.encoded, blobs / link)
        os.mkdir(blobs / directory)
        result = await ocicas.gc(engine, grace_period=0)
        assert result.removed == (garbage,)
        assert sorted(os.listdir(blobs)) == [fifo, link, directory]


async def test_a_batched_walk_reaches_everything_and_names_the_one_bad_node(tmp_path: Path) -> None:
    """More roots than one fast-path batch, a node too large for it, and one corrupt node among them."""
    await ocicas.create_layout(tmp_path / "layout")
    async with await ocicas.open_layout(tmp_path / "layout") as engine:
        roots: list[Descriptor] = []
        reached: set[Digest] = set()
        images: list[list[Digest]] = []
        for n in range(150):
            image, digests = await put_image(engine, [b"shared", f"layer {n}".encode()])
            roots.append(image)
            images.append(digests)
            reached.update(digests)
        big_layers = [
            Descriptor(media_type="text/plain", digest=Digest(f"sha256:{n:064x}"), size=1) for n in range(9000)
        ]
        big_doc = {"schemaVersion": 2, "mediaType": INDEX, "manifests": [d.to_dict() for d in big_layers]}
        big_digest, big_size = await engine.put_blob_json(big_doc)
        big = Descriptor(media_type=INDEX, digest=big_digest, size=big_size)
        assert big.size >= 1 << 20  # read the usual way, not by the fast path
        roots.append(big)
        reached.add(big.digest)
        reached.update(d.digest for d in big_layers)
        graph = await ocicas.walk(engine, roots)
        assert set(graph.descriptors) == reached
        for root, digests in zip(roots[:150], images, strict=True):
            assert [d.digest for d in graph.edges[root.digest]] == digests[1:]  # config, then layers
        assert [d.digest for d in graph.edges[big.digest]] == [d.digest for d in big_layers]
        bad = await put(engine, b'{"not": "a manifest"', MANIFEST)  # truncated JSON
        with pytest.raises(ocicas.InvalidError, match=bad.digest):
            await ocicas.walk(engine, [*roots[:100], bad, *roots[100:]])
        graph = await ocicas.walk(engine, [*roots[:100], bad, *roots[100:]], broken_ok=True)
        assert set(graph.broken) == {bad.digest}
        assert set(graph.descriptors) == reached | {bad.digest}


async def test_a_large_triage_keeps_every_answer_in_order(tmp_path: Path) -> None:
    """5,000 blobs (many checkpoints), given out of directory order: the exact answer, in the order given."""
    await ocicas.create_layout(tmp_path / "layout")
    blobs = tmp_path / "layout" / "blobs" / "sha256"
    expected_sizes: dict[str, int] = {}
    young: set[str] = set()
    json_like: set[str] = set()
    for n in range(5000):
        data = (b'{"n": %d}' % n) if n % 7 == 0 else n.to_bytes(4, "big") * (n % 5 + 1)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (blobs / digest[7:]).write_bytes(data)
        when = time.time() if n % 11 == 0 else OLD
        os.utime(blobs / digest[7:], (when, when))
        expected_sizes[digest] = len(data)
        if n % 11 == 0:
            young.add(digest)
        elif n % 7 == 0:
            json_like.add(digest)
    async with await ocicas.open_layout(tmp_path / "layout") as engine, engine._operation(None):
        listed = await engine._gc_list()
        given = listed[::2] + listed[1::2]  # any order: the answer keeps it
        sizes, fresh, old, found = await engine._gc_triage(given, time.time() - 3600, 64, 1 << 20)
    assert sizes == expected_sizes
    assert fresh == [d for d in given if d in young]
    assert old == [d for d in given if d not in young]
    assert found == [d for d in given if d in json_like]


def write_garbage(blobs: Path, count: int, when: float) -> dict[str, int]:
    """``count`` blob files written straight into ``blobs`` with mtime ``when``: their digests and sizes."""
    out = {}
    for n in range(count):
        data = n.to_bytes(4, "big") * (n % 3 + 1)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (blobs / digest[7:]).write_bytes(data)
        os.utime(blobs / digest[7:], (when, when))
        out[digest] = len(data)
    return out


async def test_a_sweep_of_many_rounds_removes_exactly_the_old_blobs(tmp_path: Path) -> None:
    """2,500 blobs: several rounds, each deleted by several threads at once; young ones and absent ones kept out."""
    await ocicas.create_layout(tmp_path / "layout")
    blobs = tmp_path / "layout" / "blobs" / "sha256"
    sizes = write_garbage(blobs, 2500, OLD)
    young = set(list(sizes)[::7])
    now = time.time()
    for digest in young:
        os.utime(blobs / digest[7:], (now, now))
    absent = ["sha256:" + f"{n:064x}" for n in range(3)]
    async with await ocicas.open_layout(tmp_path / "layout") as engine, engine._operation(None):
        listed = await engine._gc_list()
        removed = await engine._gc_delete([*absent[:1], *listed, *absent[1:]], time.time() - 3600, [time.monotonic()])
        assert removed == {d: s for d, s in sizes.items() if d not in young}
        assert list(removed) == [d for d in listed if d not in young]  # in the order asked, not as threads ended
        assert set(await engine._gc_list()) == young
        assert await engine._gc_delete(sorted(young), None, [time.monotonic()]) == {d: sizes[d] for d in young}
    assert os.listdir(blobs) == []


@pytest.mark.parametrize("run", [None, 1000])
async def test_a_writer_in_another_process_is_never_robbed_by_a_parallel_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str, run: int | None
) -> None:
    """3,000 old garbage blobs (rounds of blobs deleted by threads at once under one exclusive hold).

    Between the age check and the unlink of one blob in the second round, another
    process freshens it, blobs of the first round and blobs of the third. The
    writer waits for the round: what it reports freshened stays, the rest goes.
    With ``run``, the collector hands the engine runs of that many blobs: the
    rounds are those of three runs.
    """
    if run is not None:
        monkeypatch.setattr(ocicas._gc, "_SWEEP_RUN", run)
    await ocicas.create_layout(tmp_path / "layout")
    blobs = tmp_path / "layout" / "blobs" / "sha256"
    sizes = write_garbage(blobs, 3000, OLD)
    async with await ocicas.open_layout(tmp_path / "layout") as engine:
        image, live = await put_image(engine, [b"a live layer"])
        await engine.put_reference("live", image)
        async with engine._operation(None):
            order = [d for d in await engine._gc_list() if d in sizes]  # the sweep's order
        target = order[1500]
        wanted = [target, *order[100:105], *order[2600:2610]]
        started: list[subprocess.Popen[str]] = []
        real_unlink = os.unlink
        lock = threading.Lock()

        def unlink(path: str, *, dir_fd: int | None = None) -> None:
            with lock:
                first = path == target[7:] and not started
                if first:
                    started.append(
                        subprocess.Popen(
                            [sys.executable, str(WORKERS / "toucher.py"), anyio_backend, str(engine.path), *wanted],
                            stdout=subprocess.PIPE,
                            text=True,
                        )
                    )
            if first:
                stdout = started[0].stdout
                assert stdout is not None
                assert stdout.readline().strip() == "ready"
                try:  # the writer runs now, between this blob's age check and its unlink
                    started[0].wait(RACE_WINDOW)
                except subprocess.TimeoutExpired:
                    pass  # waiting for the collector's round, as it must
            real_unlink(path, dir_fd=dir_fd)

        with monkeypatch.context() as patching:
            patching.setattr(os, "unlink", unlink)
            try:
                result = await ocicas.gc(engine)
            finally:
                patching.undo()  # os.unlink is the real one again; the _SWEEP_RUN patch stays to the end
                outs = [(await anyio.to_thread.run_sync(p.communicate, None, PROCESS_TIMEOUT))[0] for p in started]
        assert outs, "the race was not forced"
        assert started[0].returncode == 0
        lines = outs[0].split()
        assert lines[-1] == "done"
        touched = set(lines[:-1])
        assert touched <= set(order[2600:2610])  # the rest was gone when the writer got its turn
        gone = set(sizes) - touched
        assert result.removed == tuple(sorted(map(Digest, gone)))  # exact: no entry twice, none left over
        assert result.bytes_freed == sum(sizes[d] for d in gone)
        assert result.fresh == set(map(Digest, touched))  # all else was old garbage or live
        assert set(os.listdir(blobs)) == {d.encoded for d in live} | {d[7:] for d in touched}


async def test_a_round_never_waits_for_a_thread_that_a_writer_waiting_for_it_holds(tmp_path: Path) -> None:
    """Review of 3b67e75: a round takes its exclusive flock in one thread hop, then asks for more threads to unlink.

    A writer of this process whose hop waits for that flock (``touch_blobs``, a put's commit) holds a worker
    thread while it waits. Once such writers hold every token of the default limiter (1 here, to force it; 40 by
    default: 40 puts committing at once), the round's unlink hops never start, so the flock is never dropped and
    the writers never go on: a deadlock that only cancellation ends. Before 3b67e75 the round's lock, checks and
    unlinks were one hop.
    """
    await ocicas.create_layout(tmp_path / "layout")
    blobs = tmp_path / "layout" / "blobs" / "sha256"
    sizes = write_garbage(blobs, 100, OLD)
    digests = list(sizes)
    results: dict[str, dict[Digest, int] | dict[Digest, ocicas.BlobInfo]] = {}
    limiter = anyio.to_thread.current_default_thread_limiter()
    total = limiter.total_tokens
    # another holder of the writers' (shared) flock: the collector's first hop waits for it, holding the token
    held = await anyio.to_thread.run_sync(os.open, str(blobs), os.O_RDONLY | os.O_DIRECTORY)
    try:
        await anyio.to_thread.run_sync(fcntl.flock, held, fcntl.LOCK_SH)
        async with await ocicas.open_layout(tmp_path / "layout") as engine:

            async def delete() -> None:
                results["removed"] = await engine.delete_blobs(digests)

            async def touch() -> None:
                results["touched"] = await engine.touch_blobs(digests[:1])

            limiter.total_tokens = 1
            try:
                with anyio.fail_after(10):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(delete)
                        while limiter.statistics().borrowed_tokens < 1:  # noqa: ASYNC110  no event tells: the round's hop
                            await anyio.sleep(0.01)
                        tg.start_soon(touch)
                        while limiter.statistics().tasks_waiting < 1:  # noqa: ASYNC110  the writer's hop, queued
                            await anyio.sleep(0.01)
                        os.close(held)  # the round gets its flock; its thread goes to the writer
                        held = -1
            finally:
                limiter.total_tokens = total
    finally:
        if held >= 0:
            os.close(held)
    assert results["removed"] == {Digest(d): s for d, s in sizes.items()}
    assert results["touched"] == {}  # it waited for the round, which removed the blob
