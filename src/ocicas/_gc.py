"""Mark-and-sweep garbage collection of blobs over the descriptor graph.

The safety rules, each learnt from a peer's bug report:

- Roots are every descriptor in the store's index, named or not.
- A referenced manifest or index that is missing or unparseable aborts the
  collection before anything is deleted (``broken_ok=True`` opts in to treating it
  as a leaf); a live set silently shrunk by one bad manifest would delete its layers.
- A blob written or freshened within the grace period is never deleted, so a
  writer that puts blobs and tags them a moment later is never robbed (quay's soak
  test, containerd #8570). ``put_blob`` of present content freshens it.
- Referrers are live: a manifest or index whose ``subject`` is live is kept, with
  what it points at (signatures, SBOMs; umoci #455, oras-go #1294).
- Leased blobs are live: a writer that puts content inside ``engine.lease()`` and
  tags it before the lease ends is never robbed, whatever the grace period
  (containerd's leases). Tagging checks, under the shared side of this collector's
  lock, that everything a tag names is present.
- A ``subject`` is a weak edge (image-spec). A rooted referrer keeps its subject
  and what that reaches, when present; an absent subject is no fault and aborts
  nothing. An *unrooted* referrer whose subject is absent is garbage like any
  unreachable manifest: nothing live points at it or is pointed at by it, so it
  goes (with what only it reaches) once older than the grace period, unless a
  policy vetoes it. Tag it, or keep its subject, to keep it.
- An ``index.json`` entry that does not parse as a descriptor
  (:meth:`Engine.list_broken_roots`) aborts the collection before anything is
  deleted: GC does not guess what it protects (its media type, hence its
  children, cannot be trusted). With ``broken_ok=True`` the collection runs and
  keeps the entry's blob, if its ``digest`` reads, as a leaf (reported in
  :attr:`GCResult.broken`); what that blob points at is not protected.
- The age check and the unlink are atomic with respect to the engine's own
  ``put_blob`` (the directory engine's in any process: both ``flock`` the blob
  directory, the collector exclusively per batch of blobs, writers shared), and
  collections of one store never overlap (``Engine.gc_lock``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Final, TypeVar

import anyio.lowlevel

from ._checks import check_async_callable, check_bool, check_ctx, check_engine, check_int, check_seconds, type_name
from ._context import Context, bound
from ._digest import Digest
from ._digestpack import Candidates
from ._engine import Engine
from ._errors import InvalidError
from ._graph import DEFAULT_CONCURRENCY, walk
from ._json import DEFAULT_JSON_LIMIT
from ._referrers import SNIFF_SIZE, find_referrers
from ._tasks import task_group
from ._threads import run_sync

__all__ = ["DEFAULT_GRACE_PERIOD", "GCPolicy", "GCResult", "gc"]

_T = TypeVar("_T")

#: Seconds a new or freshened blob is safe from collection by default.
DEFAULT_GRACE_PERIOD: Final = 3600.0

#: Blobs a collection hands the engine to delete at once (``Engine._gc_delete``): a bounded batch of text.
_SWEEP_RUN: Final = 8192
#: Per-blob work over fewer blobs than this runs on the event loop: a thread hop would cost more.
_INLINE: Final = 256
#: Candidates a policy worker asks about between two checkpoints.
_VETO_CHECKPOINT: Final = 256

#: ``async (digest) -> bool``: return ``False`` to keep a blob the collector would delete.
GCPolicy = Callable[[Digest], Awaitable[bool]]


@dataclasses.dataclass(frozen=True)
class GCResult:
    """What a collection removed (or, in a dry run, would remove) and what it kept."""

    #: Blobs removed, or that would be removed in a dry run: a compact, immutable, sorted
    #: ``Sequence[Digest]`` (32 bytes a ``sha256`` digest) that compares equal to, and hashes like, the
    #: tuple of the same digests; not a tuple (no ``+``, ``*`` or ``<`` with tuples).
    removed: Sequence[Digest]
    #: Bytes those blobs held.
    bytes_freed: int
    #: Blobs reachable from the roots (or from live referrers).
    live: frozenset[Digest]
    #: Unreachable manifests kept because their ``subject`` is live.
    referrers: frozenset[Digest]
    #: Unreachable blobs kept because they are younger than the grace period.
    fresh: frozenset[Digest]
    #: Unreachable blobs a policy vetoed.
    vetoed: frozenset[Digest]
    #: Nodes treated as leaves because they were missing or broken, and the digests of broken
    #: ``index.json`` entries kept as leaves (``broken_ok=True``).
    broken: frozenset[Digest]
    dry_run: bool
    #: Unreachable blobs kept because a live lease holds them (:meth:`Engine.lease`).
    leased: frozenset[Digest] = frozenset()


async def gc(
    engine: Engine,
    *,
    grace_period: float | datetime.timedelta = DEFAULT_GRACE_PERIOD,
    referrers: bool = True,
    broken_ok: bool = False,
    policy: GCPolicy | None = None,
    dry_run: bool = False,
    concurrency: int = DEFAULT_CONCURRENCY,
    max_size: int = DEFAULT_JSON_LIMIT,
    ctx: Context | None = None,
) -> GCResult:
    """Delete every blob not reachable from the store's roots; return what went.

    The seed's ``GC``, made safe for stores in use: see the module documentation.
    ``grace_period`` is in seconds or a ``datetime.timedelta`` (``0`` collects
    everything unreachable; an engine that cannot tell blob ages then keeps
    everything else). ``referrers=False`` drops unreachable referrers too.
    ``policy``, an async function of a digest returning ``True`` or ``False``, may
    veto single deletions. ``dry_run=True`` deletes nothing and reports what would
    go. After the sweep, the engine's own ``gc()`` removes its stale temporary files.
    Every argument is checked before anything is read.
    """
    check_engine(engine)
    grace_period = check_seconds(grace_period, "grace_period")
    check_bool(referrers, "referrers")
    check_bool(broken_ok, "broken_ok")
    check_async_callable(policy, "policy")
    check_bool(dry_run, "dry_run")
    check_int(concurrency, "concurrency", minimum=1)
    check_int(max_size, "max_size", minimum=1)
    check_ctx(ctx)
    async with bound(ctx), engine.gc_lock(ctx=ctx):
        cutoff = time.time() - grace_period
        roots = await engine.list_roots(ctx=ctx)
        bad_roots = await engine.list_broken_roots(ctx=ctx)
        if bad_roots and not broken_ok:
            raise InvalidError(
                f"{bad_roots[0]}: refusing to collect garbage while what it protects cannot be told "
                "(fix or remove the entry; broken_ok=True keeps only its digest, if readable)"
            )
        kept_roots = {root.digest for root in bad_roots if root.digest is not None}
        graph = await walk(engine, roots, concurrency=concurrency, broken_ok=broken_ok, max_size=max_size, ctx=ctx)
        leased = await engine.leased_blobs(ctx=ctx)  # put by writers that have not tagged them yet
        live = graph.descriptors

        def unreached(digest: str) -> bool:
            return digest not in live and digest not in kept_roots and digest not in leased

        # The listing streams through in batches (the engine hooks run inside gc_lock's operation: the public
        # methods would check every digest again, on the event loop). Per-blob state is kept packed, 40 bytes
        # a blob (Candidates), and per batch as plain text and ints, never one Digest or BlobInfo per blob: the
        # collector's memory is the live set's, a batch's and the candidates' packed bytes.
        candidates = Candidates()
        fresh_list: list[str] = []  # bounded by the grace period: what was written lately
        json_like: list[str] = []  # the unreachable manifests and indexes: a few, unless garbage is mostly those
        async with contextlib.aclosing(engine._gc_scan(unreached)) as batches:
            async for batch in batches:
                if not batch:  # a third-party engine's empty batch: nothing to triage
                    continue
                # only what is unreachable is stat-ed, and sniffed if old: a store of mostly live blobs costs no more
                sizes, fresh, old, found = await engine._gc_triage(
                    batch, cutoff if grace_period else None, SNIFF_SIZE if referrers else 0, max_size
                )
                fresh_list += fresh
                json_like += found
                await _compute(functools.partial(candidates.add, old, sizes), len(old))
        kept_referrers: set[Digest] = set()
        if json_like:
            kept_referrers = await find_referrers(
                engine,
                graph,
                [Digest(d) for d in json_like],
                None,
                lambda roots: walk(
                    engine, roots, graph=graph, concurrency=concurrency, broken_ok=broken_ok, max_size=max_size, ctx=ctx
                ),
                concurrency=concurrency,
                max_size=max_size,
                ctx=ctx,
            )
            del json_like
            if kept_referrers:
                await _compute(lambda: candidates.keep(lambda d: d not in live), len(candidates))
        vetoed: set[Digest] = set()
        if policy is not None:
            vetoed = await _vetoes(policy, iter(candidates), concurrency)
            if vetoed:
                await _compute(lambda: candidates.keep(lambda d: d not in vetoed), len(candidates))
        if not dry_run:
            clock = [time.monotonic()]
            # in runs of one algorithm, in the listing's order: the engine's fastest
            # one tuple a run (of up to _SWEEP_RUN entries): here, never worth a thread hop
            for algorithm, start, stop in candidates.runs(_SWEEP_RUN):
                texts = await _compute(functools.partial(candidates.texts, algorithm, start, stop), stop - start)
                gone = await engine._gc_delete(texts, cutoff if grace_period else None, clock)
                # what did not go was freshened by a writer meanwhile (or went already)
                fresh_list += await _compute(
                    functools.partial(candidates.settle, algorithm, start, texts, gone), len(texts)
                )
                del texts, gone
            await engine.gc(ctx=ctx)

    def result() -> GCResult:
        removed, freed = candidates.take_sorted()
        return GCResult(
            removed=removed,
            bytes_freed=freed,
            live=frozenset(graph.descriptors),
            referrers=frozenset(kept_referrers),
            fresh=frozenset(map(Digest._trusted, fresh_list)),
            vetoed=frozenset(vetoed),
            broken=frozenset(graph.broken.keys() | kept_roots),
            dry_run=dry_run,
            leased=frozenset(leased) - graph.descriptors.keys(),
        )

    return await _compute(result)


async def _compute(func: Callable[[], _T], items: int | None = None) -> _T:
    """Run pure-Python work over every blob in a worker thread; over fewer than ``_INLINE`` ``items``, here."""
    if items is not None and items < _INLINE:
        return func()
    return await run_sync(func)


async def _vetoes(policy: GCPolicy, candidates: Iterator[str], concurrency: int) -> set[Digest]:
    vetoed: set[Digest] = set()

    async def ask() -> None:
        # ``concurrency`` of these share the iterator: the candidates are asked in order, never all held as tasks
        for n, text in enumerate(candidates, 1):
            digest = Digest._trusted(text)
            keep = await policy(digest)
            if not isinstance(keep, bool):  # None from a forgotten return must not mean "delete"
                raise TypeError(f"policy must return True or False, not {type_name(keep)}")
            if not keep:
                vetoed.add(digest)
            if n % _VETO_CHECKPOINT == 0:  # a policy that never awaits must not hold the loop for the whole pass
                await anyio.lowlevel.checkpoint()

    async with task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(ask)
    return vetoed
