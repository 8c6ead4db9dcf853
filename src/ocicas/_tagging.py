"""The one path every reference write takes: a reference never names content that is not there.

:meth:`Engine.update_references` (and so ``put_reference``, ``build_image``,
``build_index``, ``copy`` and the CLI) writes a reference only after
:func:`check_closure` found its target and everything the target reaches by the
graph's rules present: index entries, configs, layers, descriptor blobs.
Subjects are weak references (image-spec: referrers live apart from their
subject) and are not followed. The check and the write happen under the shared
side of the collector's lock, so no collection, in this process or another, can
remove content between them, whatever its grace period.

Each manifest or index is read (verified) and parsed once per call; leaves are
checked by their size only (``stat_blobs``), never read. The directory engine
takes that look in the same worker-thread hop as the group commit that writes
the tag (:func:`complete_at_hand` decides there), and walks with
:func:`check_closure` only when the look cannot tell, so every fault is named
as here. A descriptor with
embedded ``data`` (verified against its digest when parsed) stands for its blob. Callers that must tag
partial content on purpose (a platform-filtered copy, a partial layout) pass
``partial=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._descriptor import Descriptor
from ._digest import Digest
from ._engine import BlobInfo, Engine
from ._errors import BlobNotFoundError, SizeMismatchError
from ._graph import Graph, children, is_node, thread_safe_expand, walk
from ._threads import metadata_hops

__all__ = ["check_closure", "complete_at_hand", "strong_children"]


@thread_safe_expand
def strong_children(descriptor: Descriptor, data: bytes) -> list[Descriptor]:
    """What a node needs present: its children less its ``subject`` (a weak association)."""
    found = children(descriptor, data)
    return list(found[:-1]) if found.subject is not None else list(found)


async def check_closure(engine: Engine, targets: Sequence[tuple[str, Descriptor]]) -> None:
    """Raise :class:`~ocicas.BlobNotFoundError` unless every target ``(name, descriptor)`` is complete.

    Runs inside an engine operation that holds the collector's lock shared. Its reads and stats
    run on the metadata threads, never queued behind other tasks' blob I/O.
    """
    with metadata_hops():
        await _check_closure(engine, targets)


async def _check_closure(engine: Engine, targets: Sequence[tuple[str, Descriptor]]) -> None:
    roots = [d for _, d in targets]
    # the common tag in one thread hop: its nodes read, verified and parsed, and its leaves' stats
    heads, stats = await engine._closure_heads(roots)
    graph = _at_hand(roots, heads)
    if graph is None:
        graph = Graph()
        try:
            await walk(engine, roots, graph=graph, expand=strong_children)
        except BlobNotFoundError as exc:
            raise BlobNotFoundError(f"cannot tag {_names(targets)}: {exc}") from exc
    # nodes were read and verified by the walk, and embedded data stands for its blob; leaves are checked by size
    unread = {
        digest: descriptor
        for digest, descriptor in graph.descriptors.items()
        if not is_node(descriptor) and descriptor.data is None
    }
    found = {digest: stats[digest] for digest in unread if digest in stats}
    unseen = [digest for digest in unread if digest not in found]
    if unseen:
        found.update(await engine.stat_blobs(unseen))
    for digest in sorted(unread):
        descriptor = unread[digest]
        info = found.get(digest)
        if info is None:
            raise BlobNotFoundError(
                f"cannot tag {_names(targets)}: {descriptor.media_type} {digest}{graph.where(digest)} is missing"
            )
        if info.size != descriptor.size:
            raise SizeMismatchError(
                f"cannot tag {_names(targets)}: blob {digest}{graph.where(digest)} has {info.size} bytes, "
                f"but its descriptor says {descriptor.size}"
            )


def complete_at_hand(
    roots: list[Descriptor],
    heads: dict[Digest, tuple[Descriptor, list[Descriptor]]],
    stats: dict[Digest, BlobInfo],
) -> bool:
    """Whether one look (``Engine._closure_heads``'s result) shows ``roots`` complete: no read or walk needed.

    Every node at hand, parsed, and every leaf among ``stats`` with its size; a
    ``False`` decides nothing (:func:`check_closure` then finds and names the fault).
    Pure: runs in the worker thread that took the look.
    """
    graph = _at_hand(roots, heads)
    if graph is None:
        return False
    for digest, descriptor in graph.descriptors.items():
        if is_node(descriptor) or descriptor.data is not None:
            continue
        info = stats.get(digest)
        if info is None or info.size != descriptor.size:
            return False
    return True


def _at_hand(roots: list[Descriptor], heads: dict[Digest, tuple[Descriptor, list[Descriptor]]]) -> Graph | None:
    """The graph a walk would build, when every node it reaches is at hand, parsed; else ``None``.

    With every node at hand a walk reads nothing, and visits breadth first (each
    visit reaches its children in order, and their visits queue behind the
    others): as this does, without a task per node.
    """
    graph = Graph()
    queue: list[Descriptor] = []

    def reach(descriptor: Descriptor, parent: Digest | None) -> None:
        if parent is not None:
            graph.parents.setdefault(descriptor.digest, set()).add(parent)
        if descriptor.digest not in graph.descriptors:
            graph.descriptors[descriptor.digest] = descriptor
            if is_node(descriptor):
                queue.append(descriptor)

    for root in roots:
        reach(root, None)
    for node in queue:
        parsed, found = heads.get(node.digest, (None, []))
        if parsed != node:
            return None  # a walk would read it (as this descriptor says), and report what is wrong with it
        graph.edges[node.digest] = tuple(found)
        for child in found:
            reach(child, node.digest)
    return graph


def _names(targets: Sequence[tuple[str, Descriptor]]) -> str:
    names = sorted(name for name, _ in targets)
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")
