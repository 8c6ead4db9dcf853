"""The descriptor graph: what a node points at, a concurrent walk, and reference resolution.

Edges: an index (or Docker manifest list) points at its manifests and its
``subject``; a manifest at its config, its layers and its ``subject``; a
descriptor blob at the descriptor it holds. Everything else is a leaf and is
never opened, so a walk reads manifests and indexes only, never layers.

A ``subject`` edge is weak (image-spec: "a weak association"; a signature or an
SBOM may be stored apart from what it describes): a subject that is present is
walked like any node, but one that is absent is no fault. A walk records it in
:attr:`Graph.absent_subjects`, and nothing (walk, copy, gc, fsck) fails for it.
Content reached both through a subject edge and a strong edge is strong.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from typing import Final, TypeVar

import anyio

from ._blob import read_described
from ._checks import (
    check_bool,
    check_callable,
    check_ctx,
    check_descriptor,
    check_engine,
    check_instance,
    check_int,
    check_reference_name,
    type_name,
)
from ._context import Context, bound
from ._descriptor import Descriptor, Platform
from ._digest import Digest
from ._engine import Engine
from ._errors import BlobNotFoundError, InvalidError, OCICASError
from ._json import DEFAULT_JSON_LIMIT, load_json
from ._media_types import INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES, MEDIA_TYPE_DESCRIPTOR
from ._models import Index, Manifest
from ._tasks import task_group
from ._threads import run_sync, shared

__all__ = [
    "DEFAULT_CONCURRENCY",
    "Children",
    "DescriptorPath",
    "Expand",
    "Graph",
    "children",
    "is_node",
    "parse_platform",
    "platform_matches",
    "resolve_reference",
    "walk",
]

_S = TypeVar("_S", bound=str)
_F = TypeVar("_F", bound=Callable[..., object])

#: The ``expand`` functions of this library's own that may run in a worker thread (see :func:`thread_safe_expand`),
#: known by identity: a marker attribute would be copied by ``functools.wraps`` onto a user's wrapper.
_THREAD_SAFE: Final[set[Callable[..., object]]] = set()


def thread_safe_expand(function: _F) -> _F:
    """Mark ``function``, an ``expand`` of ours, safe in a worker thread: a walk parses with it where it reads.

    A user's ``expand`` is never marked: :func:`walk` calls it on the event loop's thread. A method
    marked here counts bound to any instance.
    """
    _THREAD_SAFE.add(function)
    return function


def _is_thread_safe(expand: Callable[..., object]) -> bool:
    """Whether ``expand`` is one of ours marked by :func:`thread_safe_expand` (or such a method, bound)."""
    function = expand.__func__ if inspect.ismethod(expand) else expand
    return any(function is ours for ours in _THREAD_SAFE)  # by identity: a user's __eq__ is not asked


def _unexpanded(descriptor: Descriptor, data: bytes) -> list[Descriptor]:
    """The expand an engine's fast path is given for a user's ``expand``: read and verify only."""
    return []


#: Manifests and indexes fetched at once by default.
DEFAULT_CONCURRENCY = 16


def sorted_in_pieces(items: list[_S]) -> list[_S]:
    """``sorted(items)`` of digests, sorted in buckets by their first hex digits: no one sort call holds the
    GIL (and so the event loop) for the milliseconds one over 200,000 items would take, and a worker thread
    running it shares the GIL between pieces (:func:`~ocicas._threads.share_gil`)."""
    buckets: dict[str, list[_S]] = {}
    for item in shared(items):
        key = item[: item.find(":") + 3]
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = []
        bucket.append(item)
    out: list[_S] = []
    for key in shared(sorted(buckets), every=4):
        bucket = buckets.pop(key)
        bucket.sort()
        out += bucket
    return out


def is_node(descriptor: Descriptor) -> bool:
    """Whether ``descriptor`` is of a media type that points at other content."""
    media_type = descriptor.media_type
    return media_type in MANIFEST_MEDIA_TYPES or media_type in INDEX_MEDIA_TYPES or media_type == MEDIA_TYPE_DESCRIPTOR


class Children(list[Descriptor]):
    """The descriptors a node points at, as :func:`children` returns them.

    A list whose last item, when :attr:`subject` is set, is that subject: the
    node's one weak edge. An ``expand`` function given to :func:`walk` may return
    a plain list (every edge strong) or a ``Children``.
    """

    def __init__(self, strong: Iterable[Descriptor] = (), subject: Descriptor | None = None) -> None:
        super().__init__(strong)
        #: The node's ``subject`` (also the last item), or ``None``.
        self.subject = subject
        if subject is not None:
            self.append(subject)


@thread_safe_expand
def children(descriptor: Descriptor, data: bytes) -> Children:
    """The descriptors the blob ``data`` (described by ``descriptor``) points at, its ``subject`` last.

    Raises :class:`~ocicas.InvalidError` if the blob does not parse as its media type.
    """
    check_descriptor(descriptor)
    check_instance(data, (bytes, bytearray, memoryview), "data", "bytes")
    media_type = descriptor.media_type
    if media_type in MANIFEST_MEDIA_TYPES:
        manifest = Manifest.from_json(data, media_type=media_type)
        return Children([manifest.config, *manifest.layers], manifest.subject)
    if media_type in INDEX_MEDIA_TYPES:
        index = Index.from_json(data, media_type=media_type)
        return Children(index.manifests, index.subject)
    if media_type == MEDIA_TYPE_DESCRIPTOR:
        return Children([Descriptor.from_dict(load_json(data, "descriptor blob"))])
    return Children()


@dataclasses.dataclass
class Graph:
    """What a :func:`walk` reached."""

    #: Every descriptor reached, by digest (the first descriptor seen for it).
    descriptors: dict[Digest, Descriptor] = dataclasses.field(default_factory=dict)
    #: The children of every node that was opened.
    edges: dict[Digest, tuple[Descriptor, ...]] = dataclasses.field(default_factory=dict)
    #: Nodes that were absent or unreadable, when the walk was told to treat them as leaves.
    broken: dict[Digest, OCICASError] = dataclasses.field(default_factory=dict)
    #: The nodes that point at each digest reached.
    parents: dict[Digest, set[Digest]] = dataclasses.field(default_factory=dict)
    #: The bytes of every node read, with ``walk(keep_data=True)``; a walk uses bytes found here instead of reading.
    data: dict[Digest, bytes] = dataclasses.field(default_factory=dict)
    #: Digests reached only through ``subject`` edges (weak: their absence is no fault).
    weak: set[Digest] = dataclasses.field(default_factory=set)
    #: Subjects (of :attr:`weak`) that are absent: in :attr:`descriptors`, but not content to copy or check.
    absent_subjects: set[Digest] = dataclasses.field(default_factory=set)

    def where(self, digest: Digest) -> str:
        """`` (referenced by …)`` naming a node that points at ``digest``, for messages."""
        parents = self.parents.get(digest)
        return f" (referenced by {min(parents)})" if parents else ""

    def __contains__(self, digest: object) -> bool:
        return digest in self.descriptors

    def __len__(self) -> int:
        return len(self.descriptors)

    def digests(self) -> set[Digest]:
        """Every digest reached."""
        return set(self.descriptors)

    def bottom_up(self) -> list[Descriptor]:
        """Every descriptor, children before the nodes that point at them (for copies)."""
        order: list[Descriptor] = []
        done: set[Digest] = set()
        for root in list(self.descriptors):
            stack: list[tuple[Digest, bool]] = [(root, False)]
            while stack:
                digest, expanded = stack.pop()
                if digest in done:
                    continue
                if expanded:
                    done.add(digest)
                    order.append(self.descriptors[digest])
                    continue
                stack.append((digest, True))
                for child in self.edges.get(digest, ()):
                    if child.digest not in done:
                        stack.append((child.digest, False))
        return order


#: ``expand(descriptor, data) -> children``: which edges of a node a walk follows.
Expand = Callable[[Descriptor, bytes], list[Descriptor]]

#: Documents at least this big are parsed in a worker thread, off the event loop.
_THREAD_PARSE_SIZE: Final = 1 << 20
#: Nodes an engine's fast path (``Engine._read_nodes``) is given at once.
_BATCH: Final = 64


async def walk(
    engine: Engine,
    roots: Iterable[Descriptor],
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    broken_ok: bool = False,
    max_size: int = DEFAULT_JSON_LIMIT,
    graph: Graph | None = None,
    expand: Expand = children,
    keep_data: bool = False,
    ctx: Context | None = None,
) -> Graph:
    """Walk the descriptor graph from ``roots`` and return everything reached.

    Each manifest and index is fetched once (verified against its digest and
    size, capped at ``max_size`` bytes), however many roots share it, with at most
    ``concurrency`` fetches at a time. A node that is missing or does not parse
    raises :class:`~ocicas.BlobNotFoundError` or :class:`~ocicas.InvalidError`
    naming it and a node that points at it, unless ``broken_ok`` is true: it is
    then recorded in :attr:`Graph.broken` and treated as a leaf. Missing leaves
    (layers, configs) are fine: partial layouts are legal.

    Pass ``graph`` to extend an earlier walk, ``expand`` to follow only some edges
    (the default, :func:`children`, follows all), and ``keep_data=True`` to keep
    the bytes of every node read in :attr:`Graph.data`.

    A ``subject`` edge is weak: a subject reached only that way that is absent
    is recorded in :attr:`Graph.absent_subjects`, never raised (nor put in
    :attr:`Graph.broken`). An ``expand`` marks its weak edge by returning a
    :class:`Children` with :attr:`Children.subject` set. ``expand`` is called on
    the event loop's thread, one node at a time, whatever the engine (never in a
    worker thread), so it may use the caller's state without locks; it holds the
    loop while it runs, so keep it quick.
    """
    check_engine(engine)
    roots = _descriptors(roots, "roots")
    check_int(concurrency, "concurrency", minimum=1)
    check_bool(broken_ok, "broken_ok")
    check_int(max_size, "max_size", minimum=1)
    if graph is not None:
        check_instance(graph, Graph, "graph", "an ocicas.Graph or None")
    check_callable(expand, "expand", optional=False)
    check_bool(keep_data, "keep_data")
    check_ctx(ctx)
    graph = Graph() if graph is None else graph
    limiter = anyio.CapacityLimiter(concurrency)

    def missing(descriptor: Descriptor, exc: BlobNotFoundError) -> None:
        digest = descriptor.digest
        if not broken_ok:
            raise BlobNotFoundError(f"{descriptor.media_type} {digest}{graph.where(digest)} is missing") from exc
        graph.broken[digest] = exc

    def failed(descriptor: Descriptor, exc: BlobNotFoundError | InvalidError) -> None:
        """A node that could not be read or expanded: raised, naming it, or recorded."""
        digest = descriptor.digest
        if isinstance(exc, BlobNotFoundError):
            if digest in graph.weak:  # only a subject so far: no fault, unless a strong edge reaches it later
                graph.absent_subjects.add(digest)
            else:
                missing(descriptor, exc)
        elif not broken_ok:
            raise type(exc)(f"{descriptor.media_type} {digest}{graph.where(digest)}: {exc}") from exc
        else:
            graph.broken[digest] = exc

    async def visit(descriptor: Descriptor) -> None:
        digest = descriptor.digest
        try:
            data = graph.data.get(digest)
            if data is None:
                async with limiter:
                    data = await read_described(engine, descriptor, max_size=max_size, ctx=ctx)
            if in_threads and len(data) >= _THREAD_PARSE_SIZE:
                found = await run_sync(expand, descriptor, data)
            else:
                found = expand(descriptor, data)
        except (BlobNotFoundError, InvalidError) as exc:
            failed(descriptor, exc)
            return
        expanded(descriptor, data, found)
        start_batches()

    async def visit_batch(batch: list[Descriptor]) -> None:
        # one thread hop reads, verifies and (with an expand of ours) expands many nodes (an engine's fast
        # path); what it left out is read the usual way, which reports it exactly
        async with limiter, engine._operation(ctx):  # a hook: refused once the engine is closed
            done = await engine._read_nodes(batch, expand if in_threads else _unexpanded)
        for descriptor in batch:
            got = done.get(descriptor.digest)
            if got is None:
                tg.start_soon(visit, descriptor)
                continue
            data, found = got
            if not in_threads:  # a user's expand: here, on the event loop's thread
                try:
                    found = expand(descriptor, data)
                except (BlobNotFoundError, InvalidError) as exc:
                    failed(descriptor, exc)
                    continue
            expanded(descriptor, data, found)
        start_batches()

    def expanded(descriptor: Descriptor, data: bytes, found: list[Descriptor]) -> None:
        digest = descriptor.digest
        if keep_data:
            graph.data[digest] = data
        else:
            graph.data.pop(digest, None)
        graph.edges[digest] = tuple(found)
        subject = getattr(found, "subject", None)
        for child in found:
            reach(child, digest, weak=child is subject)

    def start_batches() -> None:
        while queued:
            batch = queued[:_BATCH]
            del queued[:_BATCH]
            tg.start_soon(visit_batch, batch)

    def reach(descriptor: Descriptor, parent: Digest | None, *, weak: bool = False) -> None:
        digest = descriptor.digest
        if parent is not None:
            graph.parents.setdefault(digest, set()).add(parent)
        if digest in graph.descriptors:
            if not weak and digest in graph.weak:  # a strong edge to a former subject: it must be there now
                graph.weak.discard(digest)
                if digest in graph.absent_subjects:
                    graph.absent_subjects.discard(digest)
                    missing(graph.descriptors[digest], BlobNotFoundError(f"blob {digest} not found"))
            return
        graph.descriptors[digest] = descriptor
        if weak:
            graph.weak.add(digest)
        if is_node(descriptor):
            if batched and descriptor.data is None and descriptor.size <= max_size and digest not in graph.data:
                queued.append(descriptor)
            else:
                tg.start_soon(visit, descriptor)

    batched = type(engine)._read_nodes is not Engine._read_nodes
    in_threads = _is_thread_safe(expand)
    queued: list[Descriptor] = []
    async with bound(ctx), task_group() as tg:
        for root in roots:
            reach(root, None)
        start_batches()
    return graph


@dataclasses.dataclass(frozen=True)
class DescriptorPath:
    """A path through the graph: from a reference's descriptor down to a manifest."""

    walk: tuple[Descriptor, ...]

    @property
    def root(self) -> Descriptor:
        """The descriptor the path starts at (the reference's)."""
        return self.walk[0]

    @property
    def descriptor(self) -> Descriptor:
        """The descriptor the path ends at (a manifest)."""
        return self.walk[-1]


def platform_matches(candidate: Platform | None, wanted: Platform) -> bool:
    """Whether an index entry's ``platform`` is ``wanted`` (a variant or OS version only if ``wanted`` names one)."""
    if candidate is None:
        return False
    return (
        candidate.os == wanted.os
        and candidate.architecture == wanted.architecture
        and (wanted.variant is None or candidate.variant == wanted.variant)
        and (wanted.os_version is None or candidate.os_version == wanted.os_version)
    )


def parse_platform(value: str | Platform) -> Platform:
    """``"linux/arm64/v8"`` (os/architecture[/variant]) or a :class:`Platform` as a Platform."""
    return _to_platform(value, "platform")


def _to_platform(value: object, name: str) -> Platform:
    """:func:`parse_platform`, its messages naming the parameter ``name``."""
    if isinstance(value, Platform):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str such as 'linux/amd64' or an ocicas.Platform, not {type_name(value)}")
    parts = value.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidError(f"invalid {name} {value!r}: expected os/architecture[/variant]")
    return Platform(os=parts[0], architecture=parts[1], variant=parts[2] if len(parts) == 3 else None)


def _descriptors(values: object, name: str) -> list[Descriptor]:
    """An iterable of descriptors (not a single one), as a list."""
    if isinstance(values, Descriptor | str | bytes) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be an iterable of ocicas.Descriptor, not {type_name(values)}")
    out = list(values)
    for value in out:
        check_descriptor(value, f"each of {name}")
    return out


async def resolve_reference(
    engine: Engine,
    name: str,
    *,
    platform: str | Platform | None = None,
    max_size: int = DEFAULT_JSON_LIMIT,
    ctx: Context | None = None,
) -> list[DescriptorPath]:
    """Follow reference ``name`` through nested indexes to the manifests it names.

    Returns one :class:`DescriptorPath` per manifest reached (umoci casext's
    ``ResolveReference``). With ``platform`` (``"linux/amd64"``, ``"linux/arm/v7"``
    or a :class:`Platform`), index entries for other platforms are not followed.
    A reference straight to a manifest resolves to itself.
    """
    check_engine(engine)
    check_reference_name(name, "name")
    wanted = None if platform is None else _to_platform(platform, "platform")
    check_int(max_size, "max_size", minimum=1)
    check_ctx(ctx)
    root = await engine.get_reference(name, ctx=ctx)
    found: list[DescriptorPath] = []
    pending: list[tuple[Descriptor, ...]] = [(root,)]
    seen: set[Digest] = set()
    while pending:
        path = pending.pop(0)
        node = path[-1]
        if node.media_type in MANIFEST_MEDIA_TYPES:
            found.append(DescriptorPath(path))
            continue
        if node.media_type not in INDEX_MEDIA_TYPES or node.digest in seen:
            continue
        seen.add(node.digest)
        data = await read_described(engine, node, max_size=max_size, ctx=ctx)
        for entry in Index.from_json(data, media_type=node.media_type).manifests:
            if (
                wanted is not None
                and entry.media_type in MANIFEST_MEDIA_TYPES
                and not platform_matches(entry.platform, wanted)
            ):
                continue
            pending.append((*path, entry))
    return found
