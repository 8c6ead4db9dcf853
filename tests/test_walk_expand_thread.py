"""Where a walk calls its ``expand``: on the event loop's thread, for every engine, every node, any size.

The directory engine reads small nodes in batches in a worker thread (its fast path) and
larger ones the usual way; the memory engine reads each in turn. A user's ``expand`` must
run on the loop's thread in all of these (the contract in :func:`ocicas.walk`), on asyncio
and trio alike.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

import ocicas
from ocicas import Descriptor, Digest
from tests.images import put_artifact, put_image, put_index

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def opened(kind: str, tmp_path: Path) -> AsyncIterator[ocicas.Engine]:
    if kind == "memory":
        yield ocicas.MemoryEngine()
        return
    await ocicas.create_layout(tmp_path / "layout")
    async with await ocicas.open_layout(tmp_path / "layout") as engine:
        yield engine


async def nodes(engine: ocicas.Engine) -> tuple[Descriptor, dict[str, Descriptor], set[Digest]]:
    """A root index over 80 images (more than one batch of the fast path) and a large index (over 1 MiB) of
    them; its nodes the root alone points at (``"small"``, ``"large"``); every node."""
    images = [(await put_image(engine, [f"layer {n}".encode()], name=str(n)))[0] for n in range(80)]
    large = await put_index(engine, images[1:] * 100)
    assert large.size > 1 << 20
    root = await put_index(engine, [*images, large])
    return root, {"small": images[0], "large": large}, {root.digest, large.digest, *(i.digest for i in images)}


@pytest.mark.parametrize("kind", ["memory", "directory"])
async def test_a_users_expand_runs_on_the_event_loops_thread(kind: str, tmp_path: Path) -> None:
    async with opened(kind, tmp_path) as engine:
        root, _, expected = await nodes(engine)
        calls: dict[Digest, set[int]] = {}

        def expand(descriptor: Descriptor, data: bytes) -> list[Descriptor]:
            calls.setdefault(descriptor.digest, set()).add(threading.get_ident())
            return ocicas.children(descriptor, data)

        graph = await ocicas.walk(engine, [root], expand=expand)
        assert set(calls) == expected
        assert {thread for threads in calls.values() for thread in threads} == {threading.get_ident()}
        assert set(graph.edges) == expected
        assert graph == await ocicas.walk(engine, [root])  # the same graph as with the walk's own expand


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("kind", ["memory", "directory"])
async def test_a_users_expand_that_refuses_a_node_names_it_as_a_read_would(
    kind: str, size: str, tmp_path: Path
) -> None:
    async with opened(kind, tmp_path) as engine:
        root, alone, _ = await nodes(engine)
        refused = alone[size]

        def expand(descriptor: Descriptor, data: bytes) -> list[Descriptor]:
            if descriptor.digest == refused.digest:
                raise ocicas.InvalidError("not this one")
            return ocicas.children(descriptor, data)

        with pytest.raises(ocicas.InvalidError) as info:
            await ocicas.walk(engine, [root], expand=expand)
        assert str(info.value) == f"{refused.media_type} {refused.digest} (referenced by {root.digest}): not this one"
        graph = await ocicas.walk(engine, [root], expand=expand, broken_ok=True)
        assert set(graph.broken) == {refused.digest}


async def test_a_users_expand_made_with_functools_wraps_of_ours_runs_on_the_event_loops_thread(tmp_path: Path) -> None:
    """``functools.wraps(ocicas.children)`` copies ``children``'s attributes: the wrapper is still the user's."""
    async with opened("directory", tmp_path) as engine:
        images = [(await put_image(engine, [f"layer {n}".encode()], name=str(n)))[0] for n in range(4)]
        threads: set[int] = set()

        @functools.wraps(ocicas.children)
        def expand(descriptor: Descriptor, data: bytes) -> list[Descriptor]:
            threads.add(threading.get_ident())
            return ocicas.children(descriptor, data)

        await ocicas.walk(engine, images, expand=expand)
        assert threads == {threading.get_ident()}


def test_our_own_expands_are_known_by_identity_a_method_bound_to_any_instance() -> None:
    from ocicas._copy import _Plan
    from ocicas._graph import _is_thread_safe
    from ocicas._tagging import strong_children

    engine = ocicas.MemoryEngine()
    plans = [_Plan(engine, None, 1 << 20, None) for _ in range(2)]
    assert [_is_thread_safe(f) for f in (ocicas.children, strong_children, plans[0]._keep, plans[1]._keep)] == [
        True
    ] * 4

    @functools.wraps(ocicas.children)
    def wrapped(descriptor: Descriptor, data: bytes) -> list[Descriptor]:
        return []

    assert [_is_thread_safe(f) for f in (wrapped, functools.partial(ocicas.children), print)] == [False] * 3


@pytest.mark.parametrize("kind", ["memory", "directory"])
async def test_a_users_expand_raising_blob_not_found_makes_the_node_missing(kind: str, tmp_path: Path) -> None:
    """On the directory engine's batched reads as on a lone read: missing, named, or recorded as broken."""
    async with opened(kind, tmp_path) as engine:
        images = [(await put_image(engine, [f"layer {n}".encode()], name=str(n)))[0] for n in range(4)]
        root = await put_index(engine, images)
        gone = images[2]
        called: list[Digest] = []

        def expand(descriptor: Descriptor, data: bytes) -> list[Descriptor]:
            called.append(descriptor.digest)
            if descriptor.digest == gone.digest:
                raise ocicas.BlobNotFoundError("its layer went away")
            return ocicas.children(descriptor, data)

        with pytest.raises(ocicas.BlobNotFoundError) as info:
            await ocicas.walk(engine, [root], expand=expand)
        assert str(info.value) == f"{gone.media_type} {gone.digest} (referenced by {root.digest}) is missing"
        graph = await ocicas.walk(engine, [root], expand=expand, broken_ok=True)
        assert set(graph.broken) == {gone.digest}
        assert set(graph.edges) == {root.digest, *(i.digest for i in images if i != gone)}


@pytest.mark.parametrize("kind", ["memory", "directory"])
async def test_a_users_expand_returning_a_weak_subject_edge_is_followed_weakly(kind: str, tmp_path: Path) -> None:
    """A referrer of an absent subject and one of a present subject, expanded by a user's function that returns
    :class:`Children` with the subject: the same graph as the walk's own expand (in its threads) makes."""
    async with opened(kind, tmp_path) as engine:
        elsewhere = ocicas.MemoryEngine()
        absent, _ = await put_image(elsewhere, [b"not here"], name="absent")
        present, _ = await put_image(engine, [b"here"], name="present")
        on_absent, _ = await put_artifact(engine, absent, b"signature of absent")
        on_present, _ = await put_artifact(engine, present, b"signature of present")
        threads: set[int] = set()

        def expand(descriptor: Descriptor, data: bytes) -> list[Descriptor]:
            threads.add(threading.get_ident())
            return ocicas.children(descriptor, data)

        graph = await ocicas.walk(engine, [on_absent, on_present], expand=expand)
        assert threads == {threading.get_ident()}
        assert graph.absent_subjects == {absent.digest}
        assert graph.weak == {absent.digest, present.digest}
        assert graph.broken == {}
        assert present.digest in graph.edges
        assert graph == await ocicas.walk(engine, [on_absent, on_present])
