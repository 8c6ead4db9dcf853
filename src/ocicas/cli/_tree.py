"""The descriptor graph of a root as a tree: built concurrently, rendered as text or JSON."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import anyio

from .._descriptor import Descriptor
from .._digest import Digest
from .._engine import Engine
from .._errors import BlobNotFoundError, InvalidError
from .._graph import DEFAULT_CONCURRENCY
from .._json import DEFAULT_JSON_LIMIT, load_json
from .._media_types import INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES, MEDIA_TYPE_DESCRIPTOR
from .._models import Index, Manifest
from .._tasks import task_group
from ._params import human_size

__all__ = ["TreeNode", "build_tree", "damaged", "render_tree", "tree_json"]

NodeState = Literal["ok", "missing", "invalid", "repeated", "absent"]


@dataclasses.dataclass
class TreeNode:
    """One descriptor in the tree, with how it is reached and whether its blob is there."""

    descriptor: Descriptor
    #: ``"subject"`` for a referrer's subject edge, else ``None``.
    edge: str | None = None
    #: ``"absent"``: a subject that is not in the store (weak: not damage, unlike ``"missing"``).
    state: NodeState = "ok"
    error: str | None = None
    children: list[TreeNode] = dataclasses.field(default_factory=list)


def _edges(descriptor: Descriptor, data: bytes) -> list[tuple[str | None, Descriptor]]:
    media_type = descriptor.media_type
    if media_type in MANIFEST_MEDIA_TYPES:
        manifest = Manifest.from_json(data, media_type=media_type)
        out: list[tuple[str | None, Descriptor]] = [(None, manifest.config), *((None, x) for x in manifest.layers)]
        return out + ([("subject", manifest.subject)] if manifest.subject else [])
    if media_type in INDEX_MEDIA_TYPES:
        index = Index.from_json(data, media_type=media_type)
        return [(None, x) for x in index.manifests] + ([("subject", index.subject)] if index.subject else [])
    if media_type == MEDIA_TYPE_DESCRIPTOR:
        return [(None, Descriptor.from_dict(load_json(data, "descriptor blob")))]
    return []


async def build_tree(engine: Engine, root: Descriptor) -> TreeNode:
    """Read every node under ``root`` once (concurrently) and mark what is missing or unreadable."""
    loaded: dict[Digest, list[tuple[str | None, Descriptor]] | BaseException] = {}
    limiter = anyio.CapacityLimiter(DEFAULT_CONCURRENCY)
    nodes = {MEDIA_TYPE_DESCRIPTOR, *MANIFEST_MEDIA_TYPES, *INDEX_MEDIA_TYPES}

    async def load(descriptor: Descriptor) -> None:
        try:
            async with limiter:
                data = descriptor.data
                if data is None:
                    data = await engine.read_blob(descriptor.digest, max_size=DEFAULT_JSON_LIMIT)
            edges = _edges(descriptor, data)
        except (BlobNotFoundError, InvalidError) as exc:
            loaded[descriptor.digest] = exc
            return
        loaded[descriptor.digest] = edges
        for _, child in edges:
            reach(child)

    def reach(descriptor: Descriptor) -> None:
        if descriptor.media_type in nodes and descriptor.digest not in loaded:
            loaded[descriptor.digest] = []  # claimed
            tg.start_soon(load, descriptor)
        seen.add(descriptor.digest)

    seen: set[Digest] = set()
    async with task_group() as tg:
        reach(root)
    present = await engine.stat_blobs(sorted(seen))

    expanded: set[Digest] = set()

    def build(descriptor: Descriptor, edge: str | None) -> TreeNode:
        node = TreeNode(descriptor, edge)
        digest = descriptor.digest
        outcome = loaded.get(digest)
        if (digest not in present and descriptor.data is None) or isinstance(outcome, BlobNotFoundError):
            node.state = "absent" if edge == "subject" else "missing"
        elif isinstance(outcome, BaseException):
            node.state, node.error = "invalid", str(outcome)
        elif outcome:
            if digest in expanded:
                node.state = "repeated"
            else:
                expanded.add(digest)
                node.children = [build(child, label) for label, child in outcome]
        return node

    return build(root, None)


def damaged(node: TreeNode) -> bool:
    """Whether the tree marks content missing or invalid (an absent subject is not damage)."""
    return node.state in ("missing", "invalid") or any(damaged(child) for child in node.children)


def _line(node: TreeNode) -> str:
    descriptor = node.descriptor
    parts = [f"{node.edge}:"] if node.edge else []
    parts += [descriptor.media_type, str(descriptor.digest), human_size(descriptor.size)]
    if descriptor.platform is not None:
        parts.append(str(descriptor.platform))
    if node.state == "missing":
        parts.append("(missing)")
    elif node.state == "absent":
        parts.append("(subject absent (weak))")
    elif node.state == "invalid":
        parts.append(f"(invalid: {node.error})")
    elif node.state == "repeated":
        parts.append("(shown above)")
    return " ".join(parts)


def render_tree(title: str, root: TreeNode) -> list[str]:
    """Text lines: ``title: root``, then the children indented with box-drawing guides."""
    lines = [f"{title}: {_line(root)}"]

    def add(node: TreeNode, prefix: str) -> None:
        for position, child in enumerate(node.children):
            last = position == len(node.children) - 1
            lines.append(f"{prefix}{'└── ' if last else '├── '}{_line(child)}")
            add(child, prefix + ("    " if last else "│   "))

    add(root, "")
    return lines


def tree_json(node: TreeNode) -> dict[str, Any]:
    """The tree as JSON: each descriptor's fields, plus ``edge``, ``state``, ``error`` and ``children`` (always)."""
    out = node.descriptor.to_dict()
    out.pop("data", None)
    out["edge"] = node.edge
    out["state"] = node.state
    out["error"] = node.error
    out["children"] = [tree_json(child) for child in node.children]
    return out
