"""Checking a store: every blob against its digest, every root's graph for what it lacks.

Built on the public Engine API only, so any engine can be checked (and the
function can move into the library as is).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import anyio

from .._descriptor import Descriptor
from .._digest import Digest
from .._engine import Engine
from .._errors import BlobNotFoundError, InvalidError
from .._graph import Graph, walk
from .._layout_format import ANNOTATION_REF_NAME
from .._tasks import task_group

__all__ = ["CheckReport", "Problem", "check_store"]

_READ_CHUNK = 4 << 20
_CONCURRENCY = 4

ProblemKind = Literal["corrupt", "missing", "dangling", "invalid", "absent-subject"]


@dataclasses.dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with a store.

    ``corrupt``: a blob's bytes do not match its digest, or its size does not match a
    descriptor of it. ``missing``: content a root reaches is absent. ``dangling``: a
    root (a reference) points at an absent blob. ``invalid``: a manifest, an index,
    ``index.json`` or one of its entries does not parse.

    As a note (:attr:`CheckReport.notes`), not a problem: ``absent-subject``, a
    referrer's ``subject`` is not in the store (a weak association, legal).
    """

    kind: ProblemKind
    #: The blob concerned, the reference name for ``dangling``, ``index.json``, or
    #: ``index.json manifests[N]`` for a bad entry.
    subject: str
    message: str


@dataclasses.dataclass(frozen=True)
class CheckReport:
    """What :func:`check_store` looked at and found."""

    blobs: int
    bytes: int
    roots: int
    problems: tuple[Problem, ...]
    #: Information, not damage: subjects that are absent (``absent-subject``).
    notes: tuple[Problem, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether nothing is wrong."""
        return not self.problems


def _root_name(descriptor: Descriptor) -> str:
    name = (descriptor.annotations or {}).get(ANNOTATION_REF_NAME)
    return f"reference {name!r}" if name is not None else f"unnamed root {descriptor.digest}"


async def check_store(
    engine: Engine,
    *,
    on_total: Callable[[int], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> CheckReport:
    """Verify every blob of ``engine`` and the graph of every root; report what is wrong.

    ``on_total(n)`` is told how many bytes will be verified, then ``on_bytes(n)``
    as they are.
    """
    problems: dict[tuple[str, str], Problem] = {}
    notes: dict[str, Problem] = {}

    def found(kind: ProblemKind, subject: str, message: str) -> None:
        problems.setdefault((kind, subject), Problem(kind, subject, message))

    def absent_subject(graph: Graph, digest: Digest, descriptor: Descriptor, where: str) -> None:
        referrers = ", ".join(sorted(graph.parents.get(digest, ())))
        notes.setdefault(
            digest,
            Problem(
                "absent-subject",
                digest,
                f"{descriptor.media_type} {digest}, subject of {referrers} in {where}, is absent (weak: not damage)",
            ),
        )

    digests = await engine.list_blobs()
    infos = await engine.stat_blobs(digests)
    if on_total is not None:
        on_total(sum(info.size for info in infos.values()))
    limiter = anyio.CapacityLimiter(_CONCURRENCY)

    async def verify(digest: Digest) -> None:
        async with limiter:
            try:
                reader = await engine.get_blob(digest)
            except BlobNotFoundError:
                return  # removed meanwhile
            async with reader:
                try:
                    while chunk := await reader.read(_READ_CHUNK):
                        if on_bytes is not None:
                            on_bytes(len(chunk))
                except InvalidError as exc:
                    found("corrupt", digest, str(exc))

    async with task_group() as tg:
        for digest in digests:
            tg.start_soon(verify, digest)

    try:
        roots = await engine.list_roots()
    except InvalidError as exc:
        found("invalid", "index.json", str(exc))
        roots = []
    else:
        for bad in await engine.list_broken_roots():
            found("invalid", f"index.json manifests[{bad.position}]", str(bad))
    for root in roots:
        where = _root_name(root)
        graph = await walk(engine, [root], broken_ok=True)
        for digest in graph.absent_subjects:
            absent_subject(graph, digest, graph.descriptors[digest], where)
        for digest, error in graph.broken.items():
            descriptor = graph.descriptors[digest]
            if isinstance(error, BlobNotFoundError):
                if digest == root.digest:
                    found("dangling", where, f"{where} points at {descriptor.media_type} {digest}, which is missing")
                else:
                    found("missing", digest, f"{descriptor.media_type} {digest} of {where} is missing")
            elif ("corrupt", digest) in problems:
                continue  # its bytes are wrong: that it does not parse says nothing more
            elif digest in infos and infos[digest].size != descriptor.size:
                found(
                    "corrupt",
                    digest,
                    f"blob {digest} has {infos[digest].size} bytes, but a descriptor in {where} says {descriptor.size}",
                )
            else:
                found("invalid", digest, f"{descriptor.media_type} {digest} of {where}: {error}")
        for digest, descriptor in graph.descriptors.items():
            if digest in graph.broken or descriptor.data is not None:
                continue
            info = infos.get(digest)
            if info is None and digest in graph.weak:
                absent_subject(graph, digest, descriptor, where)
            elif info is None:
                if digest == root.digest:
                    found("dangling", where, f"{where} points at {descriptor.media_type} {digest}, which is missing")
                else:
                    found("missing", digest, f"{descriptor.media_type} {digest} of {where} is missing")
            elif info.size != descriptor.size:
                found(
                    "corrupt",
                    digest,
                    f"blob {digest} has {info.size} bytes, but a descriptor in {where} says {descriptor.size}",
                )
    return CheckReport(
        blobs=len(infos),
        bytes=sum(info.size for info in infos.values()),
        roots=len(roots),
        problems=tuple(sorted(problems.values())),
        notes=tuple(sorted(notes.values())),
    )
