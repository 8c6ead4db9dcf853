"""A collection in bounded batches: the listing streamed, candidates and ``GCResult.removed`` packed.

Exact sets across batch and run boundaries (real sizes, and forced small ones), dry runs that report what a
real run removes, and the packed sequence behaving as the sorted tuple it replaces.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

import anyio.lowlevel
import pytest

import ocicas
import ocicas._dir.engine
import ocicas._engine
import ocicas._gc
from ocicas import Digest, Engine
from ocicas._digestpack import Candidates, PackedDigests
from ocicas._errors import InvalidError
from tests.images import age, put, put_artifact, put_image

pytestmark = pytest.mark.anyio

OLD = time.time() - 7200


def sha256(n: int) -> Digest:
    return Digest("sha256:" + hashlib.sha256(b"%d" % n).hexdigest())


def sha512(n: int) -> Digest:
    return Digest("sha512:" + hashlib.sha512(b"%d" % n).hexdigest())


def test_packed_digests_behave_as_the_sorted_tuple() -> None:
    given = [sha256(n) for n in range(5000)] + [sha512(n) for n in range(300)]
    expected = tuple(sorted(given))
    packed = PackedDigests(given[::-1])
    assert packed == expected
    assert expected == packed
    assert not packed != expected  # noqa: SIM202  __ne__ itself
    assert (packed, 1) == (expected, 1)  # type: ignore[comparison-overlap]
    assert hash(packed) == hash(expected)
    assert len(packed) == 5300
    assert list(packed) == list(expected)
    assert list(reversed(packed)) == list(reversed(expected))
    assert all(type(d) is Digest for d in packed)
    assert [packed[n] for n in (0, 1, 4999, 5000, 5299, -1, -5300)] == [
        expected[n] for n in (0, 1, 4999, 5000, 5299, -1, -5300)
    ]
    assert packed[10:20] == expected[10:20]
    assert packed[::-997] == expected[::-997]
    assert type(packed[10:20]) is tuple
    with pytest.raises(IndexError):
        packed[5300]
    with pytest.raises(IndexError):
        packed[-5301]
    for digest in (expected[0], expected[2500], expected[4999], expected[5000], expected[-1]):
        assert digest in packed
        assert str(digest) in packed
        assert packed.index(digest) == expected.index(digest)
        assert packed.count(digest) == 1
    absent = [
        sha256(5000),
        sha512(300),
        Digest("sha384:" + "a" * 96),
        "sha256:" + expected[0][7:].upper(),
        "sha256:" + expected[0][7:-1],
        "sha256:" + "g" * 64,
        "nonsense",
        "",
        42,
        None,
    ]
    for value in absent:
        assert value not in packed
        assert packed.count(value) == 0
        with pytest.raises(ValueError, match="is not in PackedDigests"):
            packed.index(value)
    assert packed.index(expected[100], 100, 101) == 100
    with pytest.raises(ValueError, match="is not in PackedDigests"):
        packed.index(expected[100], 101)
    assert packed != list(expected)  # a tuple is not equal to a list either
    assert packed != expected[:-1]
    assert packed != (*expected[:-1], sha256(6000))
    assert pickle.loads(pickle.dumps(packed)) == packed
    assert PackedDigests() == ()
    assert not PackedDigests()
    assert len(PackedDigests()) == 0
    assert repr(PackedDigests([expected[0]])) == f"PackedDigests([{str(expected[0])!r}])"
    assert PackedDigests(given) == packed
    assert hash(PackedDigests(given)) == hash(packed)


def test_packed_digests_order_unregistered_algorithms_as_text() -> None:
    given = [Digest("sha256+b64u:abc"), Digest("md5:00ff"), sha256(1), Digest("sha256+b64u:ABC"), sha512(2)]
    packed = PackedDigests(given)
    assert packed == tuple(sorted(given))  # "sha256+b64u:" sorts before "sha256:", as text does
    assert all(d in packed for d in given)
    assert Digest("md5:00fe") not in packed
    assert [packed.index(d) for d in sorted(given)] == list(range(5))


def test_packed_digests_index_as_a_tuple_does() -> None:
    packed = PackedDigests([sha256(1), sha256(2)])
    for index in ("x", 1.0, None):
        with pytest.raises(TypeError):
            packed[index]  # type: ignore[call-overload]
    assert packed[True] == packed[1]  # an int, as for a tuple


def test_candidates_settle_keeps_only_what_went_over_many_runs() -> None:
    """Runs of 5 over 23 ``sha256`` and 7 ``sha512`` entries; some did not go: in the middle of a run, at its
    end, at the end of the last run, a whole run. What went keeps the size it freed; the rest is returned."""
    given = [str(sha256(n)) for n in range(23)] + [str(sha512(n)) for n in range(7)]
    candidates = Candidates()
    candidates.add(given, {d: 1000 + n for n, d in enumerate(given)})
    not_gone = {given[n] for n in (2, 4, 9, 10, 11, 12, 13, 17, 22, 23, 29)}
    freed = {d: n for n, d in enumerate(given) if d not in not_gone}  # a size other than the listed one
    runs = candidates.runs(5)
    assert [(a, stop - start) for a, start, stop in runs] == [("sha256", 5)] * 4 + [("sha256", 3), ("sha512", 5)] + [
        ("sha512", 2)
    ]
    left = []
    for algorithm, start, stop in runs:
        texts = candidates.texts(algorithm, start, stop)
        left += candidates.settle(algorithm, start, texts, {d: freed[d] for d in texts if d in freed})
    assert left == [d for d in given if d in not_gone]
    assert len(candidates) == len(freed)
    assert list(candidates) == [d for d in given if d in freed]
    removed, total = candidates.take_sorted()
    assert removed == tuple(sorted(map(Digest, freed)))
    assert total == sum(freed.values())
    assert len(candidates) == 0


@pytest.mark.parametrize("count", [10, 5000])
def test_candidates_count_a_name_listed_twice_once(count: int) -> None:
    """Packed (small, and bucketed past 4,096 records) and text entries: a repeated name is one blob."""
    given = [str(sha256(n)) for n in range(count)] + [str(sha512(n)) for n in range(3)] + ["md5:00ff", "md5:0a"]
    sizes = {d: n + 1 for n, d in enumerate(given)}
    candidates = Candidates()
    candidates.add(given, sizes)
    candidates.add(given[::3], sizes)
    candidates.add([given[0], given[0]], sizes)
    removed, total = candidates.take_sorted()
    assert removed == tuple(sorted(map(Digest, given)))
    assert len(removed) == len(given)
    assert total == sum(sizes.values())


@pytest.mark.parametrize(
    "text",
    [
        "sha256:" + sha256(1)[7:].upper(),
        "sha256:" + sha256(1)[7:-2] + " a",
        "sha256:" + sha256(1)[7:-2],
        "sha256:" + sha256(1)[7:] + "00",
        "sha256:" + "g" * 64,
        "sha512:" + sha256(1)[7:],
    ],
)
def test_candidates_refuse_what_is_not_a_digest(text: str) -> None:
    """An engine hook's text packed as given would name another file (uppercase: the live lowercase one) or
    misalign every record after it."""
    candidates = Candidates()
    with pytest.raises(InvalidError, match="not a sha"):
        candidates.add([text], {text: 1})
    assert len(candidates) == 0


class TwiceListing(ocicas.MemoryEngine):
    """A third-party engine whose listing names every blob twice."""

    async def _gc_list(self) -> list[str]:
        listed = await super()._gc_list()
        return listed + listed


async def test_a_name_listed_twice_is_removed_and_counted_once() -> None:
    async with TwiceListing() as engine:
        garbage = [await put(engine, b"garbage %d" % n, "application/octet-stream") for n in range(30)]
        result = await ocicas.gc(engine, grace_period=0)
    assert result.removed == tuple(sorted(d.digest for d in garbage))
    assert result.bytes_freed == sum(d.size for d in garbage)


class Triaged(ocicas.MemoryEngine):
    """A third-party engine that records the batches the collector triages, and lists an empty batch first."""

    def __init__(self) -> None:
        super().__init__()
        self.triaged: list[list[str]] = []

    async def _gc_scan(self, wanted: Callable[[str], bool]) -> AsyncGenerator[list[str], None]:
        yield []
        async for batch in super()._gc_scan(wanted):
            yield batch

    async def _gc_triage(
        self, digests: list[str], cutoff: float | None, head: int, limit: int
    ) -> tuple[dict[str, int], list[str], list[str], list[str]]:
        self.triaged.append(list(digests))
        return await super()._gc_triage(digests, cutoff, head, limit)


async def test_batches_of_live_blobs_only_are_not_triaged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ocicas._engine, "GC_SCAN_BATCH", 2)
    async with Triaged() as engine:
        image, live = await put_image(engine, [b"live layer"])
        await engine.put_reference("live", image)
        async with engine._operation(None):
            scan = ocicas.MemoryEngine._gc_scan(engine, lambda d: d not in live)  # the default, not the empty one
            assert [batch async for batch in scan] == []
        result = await ocicas.gc(engine, grace_period=0)
        assert engine.triaged == []
        garbage = await put(engine, b"garbage", "application/octet-stream")
        result = await ocicas.gc(engine, grace_period=0)
        assert engine.triaged == [[str(garbage.digest)]]
    assert result.removed == (garbage.digest,)


async def test_a_policy_that_never_awaits_lets_other_tasks_run() -> None:
    """600 candidates, a policy that returns at once: the workers checkpoint every 256 candidates (before, the
    ticker never ran during the pass: 600 equal values)."""
    ticks = 0
    seen: list[int] = []

    async def policy(digest: Digest) -> bool:
        seen.append(ticks)
        return True

    async def tick() -> None:
        nonlocal ticks
        while True:
            await anyio.lowlevel.checkpoint()
            ticks += 1

    async with ocicas.MemoryEngine() as engine:
        for n in range(600):
            await put(engine, b"garbage %d" % n, "application/octet-stream")
        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            result = await ocicas.gc(engine, grace_period=0, policy=policy, concurrency=1)
            tg.cancel_scope.cancel()
    assert len(result.vetoed) == 0
    assert len(result.removed) == 600
    assert len(seen) == 600
    # the ticker ran between checkpoints: on asyncio after each 256 candidates; trio orders a batch of runnable
    # tasks at random, so the ticker may run before one stretch and after the next
    assert max(len(list(same)) for _, same in itertools.groupby(seen)) <= 512


def write_blobs(blobs: Path, count: int, when: float, *, start: int = 0) -> dict[str, int]:
    """``count`` blob files written straight into ``blobs`` with mtime ``when``: their digests and sizes."""
    out = {}
    for n in range(start, start + count):
        data = n.to_bytes(4, "big") * (n % 3 + 1)
        if n % 500 == 0:
            data = b'{"n": %d}' % n  # looks like JSON: sniffed, read, not a referrer
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (blobs / digest[7:]).write_bytes(data)
        os.utime(blobs / digest[7:], (when, when))
        out[digest] = len(data)
    return out


async def test_a_collection_across_many_batches_and_runs_removes_exactly_the_garbage(tmp_path: Path) -> None:
    """9,000 old garbage blobs (3 listing batches, 2 sweep runs), young ones, live images, a kept referrer."""
    await ocicas.create_layout(tmp_path / "layout")
    blobs = tmp_path / "layout" / "blobs" / "sha256"
    garbage = write_blobs(blobs, 9000, OLD)
    young = write_blobs(blobs, 50, time.time(), start=9000)
    async with await ocicas.open_layout(tmp_path / "layout") as engine:
        image, live = await put_image(engine, [b"a live layer", b"another"])
        await engine.put_reference("live", image)
        signature, signed = await put_artifact(engine, image, b"signature payload")  # unreachable, kept
        age(engine, [*live, *signed])
        dry = await ocicas.gc(engine, dry_run=True)
        assert len(os.listdir(blobs)) == 9050 + len({*live, *signed})
        result = await ocicas.gc(engine)
    expected = tuple(sorted(map(Digest, garbage)))
    for report in (dry, result):
        assert report.removed == expected
        assert isinstance(report.removed, PackedDigests)
        assert report.bytes_freed == sum(garbage.values())
        assert report.fresh == set(young)
        assert report.referrers == {signature.digest}
        assert report.live == {*live, *signed}
    assert (dry.dry_run, result.dry_run) == (True, False)
    assert set(os.listdir(blobs)) == {d[7:] for d in (*young, *live, *signed)}


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing batches of 7, sweep runs of 5 and nothing done inline: a few blobs cross many boundaries."""
    monkeypatch.setattr(ocicas._engine, "GC_SCAN_BATCH", 7)
    monkeypatch.setattr(ocicas._dir.engine, "GC_SCAN_BATCH", 7)
    monkeypatch.setattr(ocicas._gc, "_SWEEP_RUN", 5)
    monkeypatch.setattr(ocicas._gc, "_INLINE", 2)


@pytest.mark.usefixtures("small_batches")
async def test_small_batches_keep_every_rule_exactly(engine: Engine) -> None:
    """Referrers kept (and what they reach, listed in earlier batches), vetoes, leases, young blobs, a dry run."""
    image, live = await put_image(engine, [b"live layer"])
    await engine.put_reference("live", image)
    signature, signed = await put_artifact(engine, image, b"signed payload")
    garbage = [await put(engine, b"garbage %d" % n, "application/octet-stream") for n in range(40)]
    vetoed = {d.digest for d in garbage[::9]}
    young = await put(engine, b"young garbage", "application/octet-stream")
    async with engine.lease():
        leased = await put(engine, b"leased garbage", "application/octet-stream")
        age(engine, [d for d in await engine.list_blobs() if d != young.digest])

        async def policy(digest: Digest) -> bool:
            return digest not in vetoed

        dry = await ocicas.gc(engine, policy=policy, dry_run=True)
        result = await ocicas.gc(engine, policy=policy)
    gone = {d.digest for d in garbage} - vetoed
    for report in (dry, result):
        assert report.removed == tuple(sorted(gone))
        assert report.bytes_freed == sum(len(b"garbage %d" % n) for n in range(40) if garbage[n].digest in gone)
        assert report.vetoed == vetoed
        assert report.leased == {leased.digest}
        assert report.fresh == {young.digest}
        assert report.referrers == {signature.digest}
    assert set(await engine.list_blobs()) == {*live, *signed, *vetoed, leased.digest, young.digest}
    assert (await ocicas.gc(engine, grace_period=0, referrers=False)).removed == tuple(
        sorted({*signed, *vetoed, leased.digest, young.digest})
    )


@pytest.mark.usefixtures("small_batches")
async def test_small_batches_of_a_layout_with_two_algorithms(tmp_path: Path) -> None:
    """A listing batch spans the end of ``blobs/sha256`` and the start of ``blobs/sha512``; the result sorts them."""
    await ocicas.create_layout(tmp_path / "layout")
    expected = {}
    for algorithm, count in (("sha256", 10), ("sha512", 12)):
        blobs = tmp_path / "layout" / "blobs" / algorithm
        blobs.mkdir(exist_ok=True)
        for n in range(count):
            data = b"%s garbage %d" % (algorithm.encode(), n)
            encoded = hashlib.new(algorithm, data).hexdigest()
            (blobs / encoded).write_bytes(data)
            os.utime(blobs / encoded, (OLD, OLD))
            expected[Digest(f"{algorithm}:{encoded}")] = len(data)
    (tmp_path / "layout" / "blobs" / "sha256" / "not-a-digest").write_bytes(b"left alone")
    async with await ocicas.open_layout(tmp_path / "layout") as engine:
        dry = await ocicas.gc(engine, dry_run=True)
        result = await ocicas.gc(engine)
    for report in (dry, result):
        assert report.removed == tuple(sorted(expected))
        assert report.bytes_freed == sum(expected.values())
    assert os.listdir(tmp_path / "layout" / "blobs" / "sha256") == ["not-a-digest"]
    assert os.listdir(tmp_path / "layout" / "blobs" / "sha512") == []
