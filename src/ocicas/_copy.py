"""Copy what a reference reaches from one engine to another.

:func:`copy` works in three steps:

1. **Plan.** Walk the descriptor graph in the source (indexes, manifests and
   ``subject`` edges, as :func:`ocicas.walk` does: a subject the source lacks is
   weak and left out, not an error), keeping the bytes of every
   manifest and index it reads; with ``referrers=True`` also find the referrers of
   what will be copied; then ask the destination which blobs it already has
   (:meth:`Engine.stat_blobs`, one call) and the source whether it has the rest.
   Nothing is written before the whole plan stands.
2. **Land.** Move the missing blobs with at most ``concurrency`` transfers at once,
   children before parents: a manifest starts only after its config and layers
   landed, an index only after its manifests. Present blobs are never read.
   Every byte is verified: the source's reader streams into the destination's
   ``put_blob(expected_digest=, expected_size=)``, which stores nothing that does
   not match (the directory engine takes the verifying reader's word rather than
   hashing every byte a second time; other engines hash again). Between two
   directory engines the bytes never enter Python: the kernel copies the file
   (``copy_file_range``) and the destination hashes what landed before it commits.
3. **Tag.** Everything runs inside a lease of the destination (:meth:`Engine.lease`):
   no collector removes what the copy reuses or lands. The reference is written
   through :meth:`Engine.update_references`, which checks under the collector's
   lock that everything it names is present (a blob removed behind the lease's
   back is copied again, once).

So an interrupted copy never leaves a reference pointing at missing content, and
running it again moves only what is still missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Final, Literal

import anyio

from ._checks import (
    check_bool,
    check_callable,
    check_ctx,
    check_engine,
    check_int,
    check_reference_name,
    type_name,
)
from ._context import Context, bound
from ._descriptor import Descriptor, Platform
from ._digest import Digest
from ._engine import Engine
from ._errors import BlobNotFoundError, NotFoundError, SizeMismatchError, UnsupportedError
from ._graph import (
    DEFAULT_CONCURRENCY,
    Children,
    Graph,
    _to_platform,
    children,
    platform_matches,
    thread_safe_expand,
    walk,
)
from ._json import DEFAULT_JSON_LIMIT
from ._media_types import INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES
from ._models import Index
from ._referrers import SNIFF_SIZE, find_referrers
from ._tasks import task_group

__all__ = ["DEFAULT_COPY_CONCURRENCY", "TRANSFER_RETRY", "CopyEvent", "CopyProgress", "CopyResult", "copy"]

#: Blobs transferred at once by default.
DEFAULT_COPY_CONCURRENCY: Final = 4


CopyEventKind = Literal["planned", "skipped", "started", "progress", "retry", "finished"]

# issue 16: transfer retries
#: Set by :func:`copy` around each blob's transfer; an engine calls it (in the task that moves the bytes)
#: each time it resumes or retries part of that transfer (the registry engine: a dropped download resumed
#: with ``Range``, an upload chunk sent again, a request retried after a 5xx).
TRANSFER_RETRY: ContextVar[Callable[[], None] | None] = ContextVar("ocicas_transfer_retry", default=None)


@dataclasses.dataclass(frozen=True)
class CopyEvent:
    """One step of a copy, with the running totals, as passed to a :data:`CopyProgress` callback.

    ``kind`` is ``"planned"`` once, when the totals are known (``descriptor`` is
    ``None``); then, per blob, either ``"skipped"`` (already at the destination) or
    ``"started"``, any number of ``"progress"`` (``nbytes`` more bytes moved) and of
    ``"retry"`` (the engine resumed or retried part of the transfer, ``nbytes`` 0), and
    ``"finished"``. Skipped blobs count as done. In the rare case that a blob
    vanished from the destination during the copy and had to be moved again, it
    is reported again and the totals grow to match.
    """

    kind: CopyEventKind
    #: The blob concerned (``None`` for ``"planned"``).
    descriptor: Descriptor | None
    #: Bytes this event accounts for: the chunk of a ``"progress"``, the size of a ``"skipped"`` blob.
    nbytes: int
    blobs_done: int
    blobs_total: int
    bytes_done: int
    bytes_total: int


#: ``progress(event)``: called on the event loop thread at every step; must not block.
CopyProgress = Callable[[CopyEvent], None]


@dataclasses.dataclass(frozen=True)
class CopyResult:
    """What :func:`copy` did."""

    #: The descriptor that was copied (and that the destination reference now holds).
    root: Descriptor
    #: The reference written at the destination, or ``None``.
    reference: str | None
    #: Blobs moved, sorted.
    copied: tuple[Digest, ...]
    #: Blobs already at the destination (never read), sorted.
    skipped: tuple[Digest, ...]
    bytes_copied: int
    bytes_skipped: int
    #: Referrers found and copied (or present) with ``referrers=True``, sorted.
    referrers: tuple[Digest, ...]
    #: Index entries left out by the ``platforms`` filter, sorted.
    excluded: tuple[Digest, ...]
    #: Times the engines resumed or retried part of a transfer (``"retry"`` events).
    retries: int = 0


class _Plan:
    """The graph to copy (with the bytes of every node read) and what the platform filter left out."""

    def __init__(self, src: Engine, platforms: list[Platform] | None, max_size: int, ctx: Context | None) -> None:
        self.src = src
        self.platforms = platforms
        self.max_size = max_size
        self.ctx = ctx
        self.graph = Graph()
        self.excluded: set[Digest] = set()
        self.referrers: set[Digest] = set()

    @property
    def data(self) -> dict[Digest, bytes]:
        """Manifests and indexes as read while planning: never read twice."""
        return self.graph.data

    @thread_safe_expand  # its one write, a set's add, is atomic; the set is read once the walk ended
    def _keep(self, parent: Descriptor, data: bytes) -> Children:
        """The children of ``parent`` to copy: all of them, less index entries of other platforms."""
        if self.platforms is None or parent.media_type not in INDEX_MEDIA_TYPES:
            return children(parent, data)
        index = Index.from_json(data, media_type=parent.media_type)
        kept = []
        for entry in index.manifests:
            if entry.media_type in MANIFEST_MEDIA_TYPES and not any(
                platform_matches(entry.platform, wanted) for wanted in self.platforms
            ):
                self.excluded.add(entry.digest)
            else:
                kept.append(entry)
        return Children(kept, index.subject)

    async def walk(self, roots: list[Descriptor]) -> None:
        """Add ``roots`` and everything they reach to the plan, reading each node once."""
        try:
            await walk(
                self.src,
                roots,
                graph=self.graph,
                expand=self._keep,
                keep_data=True,
                max_size=self.max_size,
                ctx=self.ctx,
            )
        except BlobNotFoundError as exc:
            raise BlobNotFoundError(f"{exc} from the source") from exc
        for digest, descriptor in self.graph.descriptors.items():
            if descriptor.data is not None:  # embedded content: copied from memory
                self.graph.data.setdefault(digest, descriptor.data)

    async def add_referrers(self) -> None:
        """Add every manifest or index in the source whose ``subject`` is in the plan, to a fixed point.

        A source that lists its blobs is searched once for all subjects; one that
        cannot (a registry) is asked :meth:`Engine.referrers` of each manifest and index.
        """
        src, ctx = self.src, self.ctx
        try:
            blobs = await src.list_blobs(ctx=ctx)
        except UnsupportedError:
            await self._ask_referrers()
            return
        candidates = sorted(set(blobs) - self.graph.descriptors.keys())
        infos = await src.stat_blobs(candidates, head=SNIFF_SIZE, ctx=ctx)
        found = await find_referrers(
            src,
            self.graph,
            list(infos),
            infos,
            self.walk,
            concurrency=DEFAULT_CONCURRENCY,
            max_size=self.max_size,
            ctx=ctx,
        )
        self.referrers.update(found)

    async def _ask_referrers(self) -> None:
        """Ask the source for the referrers of every manifest and index in the plan, theirs too, to a fixed point."""
        asked: set[Digest] = set()
        limiter = anyio.CapacityLimiter(DEFAULT_CONCURRENCY)
        documents = MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES
        found: dict[Digest, Descriptor] = {}

        async def ask(subject: Digest) -> None:
            async with limiter:
                listed = await self.src.referrers(subject, ctx=self.ctx)
            for referrer in listed:
                if referrer.media_type in documents:
                    found.setdefault(referrer.digest, referrer)

        while True:
            nodes = self.graph.descriptors
            subjects = sorted(d for d, node in nodes.items() if d not in asked and node.media_type in documents)
            if not subjects:
                return
            asked.update(subjects)
            async with task_group() as tg:
                for subject in subjects:
                    tg.start_soon(ask, subject)
            new = [found[d] for d in sorted(found) if d not in self.graph.descriptors]
            if new:
                self.referrers.update(d.digest for d in new)
                await self.walk(new)


class _Mover:
    """Lands blobs at the destination, children first, and reports progress."""

    def __init__(
        self,
        src: Engine,
        dst: Engine,
        plan: _Plan,
        concurrency: int,
        progress: CopyProgress | None,
        ctx: Context | None,
    ) -> None:
        self.src, self.dst, self.plan, self.ctx = src, dst, plan, ctx
        self.limiter = anyio.CapacityLimiter(concurrency)
        self.progress = progress
        self.copied: dict[Digest, int] = {}
        self.blobs_done = self.blobs_total = self.bytes_done = self.bytes_total = 0
        self.retries = 0

    def report(self, kind: CopyEventKind, descriptor: Descriptor | None, nbytes: int = 0) -> None:
        if kind == "progress" or kind == "skipped":
            self.bytes_done += nbytes
        if kind == "finished" or kind == "skipped":
            self.blobs_done += 1
        if kind == "retry":
            self.retries += 1
        if self.progress is not None:
            self.progress(
                CopyEvent(
                    kind,
                    descriptor,
                    nbytes,
                    self.blobs_done,
                    self.blobs_total,
                    self.bytes_done,
                    self.bytes_total,
                )
            )

    async def land(self, missing: list[Descriptor]) -> None:
        """Copy ``missing`` (in bottom-up order); each starts once its missing children landed."""
        waiting = {d.digest: 0 for d in missing}
        for descriptor in missing:
            for child in {c.digest for c in self.plan.graph.edges.get(descriptor.digest, ())}:
                if child in waiting:
                    waiting[descriptor.digest] += 1

        async def run(descriptor: Descriptor) -> None:
            async with self.limiter:
                await self.transfer(descriptor)
            for parent in sorted(self.plan.graph.parents.get(descriptor.digest, ())):
                if parent in waiting:
                    waiting[parent] -= 1
                    if waiting[parent] == 0:
                        tg.start_soon(run, self.plan.graph.descriptors[parent])

        async with task_group() as tg:
            for descriptor in missing:
                if waiting[descriptor.digest] == 0:
                    tg.start_soon(run, descriptor)

    async def transfer(self, descriptor: Descriptor) -> None:
        token = TRANSFER_RETRY.set(lambda: self.report("retry", descriptor))
        try:
            await self._transfer(descriptor)
        finally:
            TRANSFER_RETRY.reset(token)

    async def _transfer(self, descriptor: Descriptor) -> None:
        digest, size, ctx = descriptor.digest, descriptor.size, self.ctx
        data = self.plan.data.get(digest)
        dst = self.dst
        # an engine that can link the blob from the source (two repositories of one registry): no byte moves
        if data is None and await dst.mount_blob_from(self.src, digest, size=size, ctx=ctx):
            self.report("started", descriptor)
            self.report("progress", descriptor, size)
            self.copied[digest] = size
            self.report("finished", descriptor)
            return
        if data is not None:  # a manifest or index read while planning: no second read
            self.report("started", descriptor)
            await self.dst.put_blob(data, expected_digest=digest, expected_size=size, ctx=ctx)
            self.report("progress", descriptor, size)
        else:
            reader = await self.src.get_blob(digest, ctx=ctx)
            async with reader:
                if reader.size != size:
                    raise SizeMismatchError(
                        f"blob {digest}{self.plan.graph.where(digest)} has {reader.size} bytes in the source, "
                        f"but its descriptor says {size}"
                    )
                self.report("started", descriptor)
                reader.on_read = lambda n: self.report("progress", descriptor, n)
                # the reader verifies as it goes: an engine may take its word rather than hash again
                await dst.put_blob(reader, expected_digest=digest, expected_size=size, ctx=ctx)
        self.copied[digest] = size
        self.report("finished", descriptor)


async def copy(
    src: Engine,
    src_ref: str | Descriptor,
    dst: Engine,
    dst_ref: str | None = None,
    *,
    referrers: bool = False,
    platforms: Iterable[str | Platform] | None = None,
    replace: bool = True,
    concurrency: int = DEFAULT_COPY_CONCURRENCY,
    progress: CopyProgress | None = None,
    max_size: int = DEFAULT_JSON_LIMIT,
    ctx: Context | None = None,
) -> CopyResult:
    """Copy everything ``src_ref`` reaches in ``src`` to ``dst``, then name it ``dst_ref`` there.

    ``src_ref`` is a reference name or a :class:`Descriptor`. ``dst_ref`` defaults
    to the same name; a descriptor copied without ``dst_ref`` is not named (its
    blobs are then only protected from :func:`ocicas.gc` by the grace period).
    An existing ``dst_ref`` is moved unless ``replace=False``
    (:class:`~ocicas.ClobberError`). Digests never change: blobs are copied byte
    for byte, and verified.

    ``referrers=True`` also copies every manifest or index stored in ``src``
    (named or not) whose ``subject`` is copied content, and their referrers in
    turn, with what they point at; the destination's reference does not name them
    (:func:`ocicas.gc` keeps referrers of live content). Finding them reads every
    blob of ``src`` that is not otherwise copied, is at most ``max_size`` bytes and
    starts like JSON (the first bytes of every blob are looked at: layers are not read);
    a source that cannot list its blobs (a registry) is asked :meth:`Engine.referrers`
    of every manifest and index instead.

    ``platforms`` (``["linux/amd64", "linux/arm/v7"]``) copies only the manifests
    of those platforms out of every index: the index itself is copied unchanged,
    so the destination holds a *partial* index whose other entries are missing, as
    regclient's ``--platforms`` and containerd's ``--platform`` pulls do (legal in
    an image layout; :func:`ocicas.gc` of it then needs ``broken_ok=True``).
    Entries without a platform are left out; a manifest reference is copied
    whatever its platform. To copy only the one manifest of a platform, as skopeo
    and oras do, resolve it first and copy its descriptor::

        path = (await ocicas.resolve_reference(src, "v1", platform="linux/amd64"))[0]
        await ocicas.copy(src, path.descriptor, dst, "v1")

    ``concurrency`` is the number of blobs moved at once (manifests are read up to
    16 at once while planning); ``progress`` is called with a :class:`CopyEvent`
    at every step. Raises :class:`~ocicas.BlobNotFoundError` before writing
    anything if content the copy needs is in neither engine,
    :class:`~ocicas.NotFoundError` if ``platforms`` matches no manifest, and the
    engines' errors otherwise; whatever it raises, the destination reference is
    untouched and what landed stays (a rerun skips it).
    """
    check_engine(src, "src")
    if not isinstance(src_ref, Descriptor):
        check_reference_name(src_ref, "src_ref")
    check_engine(dst, "dst")
    if dst_ref is not None:
        check_reference_name(dst_ref, "dst_ref")
    elif isinstance(src_ref, str):
        dst_ref = src_ref
    check_bool(referrers, "referrers")
    wanted = None if platforms is None else _platforms(platforms)
    check_bool(replace, "replace")
    check_int(concurrency, "concurrency", minimum=1)
    check_callable(progress, "progress")
    check_int(max_size, "max_size", minimum=1)
    check_ctx(ctx)

    async with bound(ctx), dst.lease(ctx=ctx) as lease:  # what lands is kept from collectors until it is tagged
        root = src_ref if isinstance(src_ref, Descriptor) else await src.get_reference(src_ref, ctx=ctx)

        plan = _Plan(src, wanted, max_size, ctx)
        await plan.walk([root])
        plan.excluded -= plan.graph.digests()
        if plan.excluded and not any(d.media_type in MANIFEST_MEDIA_TYPES for d in plan.graph.descriptors.values()):
            names = ", ".join(str(p) for p in wanted or ())
            raise NotFoundError(f"no manifest of {root.digest} is for platform {names}")
        if referrers:
            await plan.add_referrers()
        # a subject is a weak edge: one the source lacks is not copied, and is no fault
        order = [d for d in plan.graph.bottom_up() if d.digest not in plan.graph.absent_subjects]

        # leased, not just looked at: from now on no collector removes what we reuse
        present = await lease.add([d.digest for d in order], ctx=ctx)
        skipped = [d for d in order if d.digest in present and present[d.digest].size == d.size]
        skipped_digests = {d.digest for d in skipped}
        missing = [d for d in order if d.digest not in skipped_digests]
        await _check_source(src, plan, missing, ctx)

        mover = _Mover(src, dst, plan, concurrency, progress, ctx)
        mover.blobs_total = len(order)
        mover.bytes_total = sum(d.size for d in order)
        mover.report("planned", None)
        for descriptor in skipped:
            mover.report("skipped", descriptor, descriptor.size)
        await mover.land(missing)

        if dst_ref is not None:
            # the tag checks, under the collector's lock, that all it names is there; a blob removed
            # behind the lease's back (not by a collector) is copied again, once
            partial = bool(plan.excluded)  # a platform-filtered index is partial on purpose
            try:
                await dst.update_references({dst_ref: root}, replace=replace, partial=partial, ctx=ctx)
            except BlobNotFoundError:
                present = await dst.stat_blobs([d.digest for d in order], ctx=ctx)
                lost = [d for d in order if d.digest not in present or present[d.digest].size != d.size]
                if not lost:
                    raise
                await _check_source(src, plan, lost, ctx)
                mover.blobs_total += len(lost)
                mover.bytes_total += sum(d.size for d in lost)
                await mover.land(lost)
                await dst.update_references({dst_ref: root}, replace=replace, partial=partial, ctx=ctx)

    copied = mover.copied
    return CopyResult(
        root=root,
        reference=dst_ref,
        copied=tuple(sorted(copied)),
        skipped=tuple(sorted(skipped_digests - set(copied))),
        bytes_copied=sum(copied.values()),
        bytes_skipped=sum(d.size for d in skipped if d.digest not in copied),
        referrers=tuple(sorted(plan.referrers)),
        excluded=tuple(sorted(plan.excluded - plan.graph.digests())),
        retries=mover.retries,
    )


def _platforms(platforms: object) -> list[Platform]:
    """``platforms`` as a list: an iterable of ``"os/arch[/variant]"`` strings or :class:`Platform` objects."""
    if isinstance(platforms, str | bytes | Platform) or not isinstance(platforms, Iterable):
        raise TypeError(
            f"platforms must be an iterable of platforms (str or ocicas.Platform), not {type_name(platforms)}"
            + (f": write [{platforms!r}]" if isinstance(platforms, str) else "")
        )
    return [_to_platform(p, "each of platforms") for p in platforms]


async def _check_source(src: Engine, plan: _Plan, needed: list[Descriptor], ctx: Context | None) -> None:
    """Fail before moving anything if a blob to read from ``src`` is absent or of the wrong size there."""
    to_read = [d for d in needed if d.digest not in plan.data]
    infos = await src.stat_blobs([d.digest for d in to_read], ctx=ctx)
    for descriptor in to_read:
        digest = descriptor.digest
        info = infos.get(digest)
        if info is None:
            raise BlobNotFoundError(
                f"{descriptor.media_type} {digest}{plan.graph.where(digest)} "
                "is missing from the source and the destination"
            )
        if info.size != descriptor.size:
            raise SizeMismatchError(
                f"blob {digest}{plan.graph.where(digest)} has {info.size} bytes in the source, "
                f"but its descriptor says {descriptor.size}"
            )
