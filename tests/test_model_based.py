"""A stateful model test: the directory engine behaves exactly like the memory engine.

Hypothesis' ``RuleBasedStateMachine`` drives a :class:`~ocicas.DirEngine` and a
:class:`~ocicas.MemoryEngine` side by side with puts and deletes of blobs, puts,
deletes and batches (``update_references``, with and without ``replace``) of
references, reads, and collections (``ocicas.gc(engine, grace_period=0)``, with and
without referrers). Blobs come from a small pool that forms a real graph (layers,
configs, manifests, an index, a referrer, a descriptor blob) plus broken documents
and descriptors that lie about their media type or point at nothing, so rules
often hit errors: both engines must then raise the same one. After every step
both hold the same blobs (byte for byte), the same references and the same roots.

Rules are sync (hypothesis' state machines are), so each engine call goes through
``anyio.from_thread.start_blocking_portal``, whose event loop runs on asyncio or
trio; the directory engine's own worker threads hang off that loop.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import ocicas
from ocicas import Descriptor, Engine
from ocicas.testing import sha256

#: State machines run per backend, and rules per run.
STATEFUL_EXAMPLES = 40
STEPS_PER_EXAMPLE = 30

ALLOWED = (ocicas.OCICASError, TypeError)
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"
DESCRIPTOR = "application/vnd.oci.descriptor.v1+json"
_T = TypeVar("_T")
#: Outcomes seen, per operation, for the report.
OUTCOMES: Counter[tuple[str, str]] = Counter()


def _pool() -> tuple[dict[str, bytes], dict[str, Descriptor]]:
    blobs: dict[str, bytes] = {}
    described: dict[str, Descriptor] = {}

    def add(name: str, data: bytes | dict[str, Any], media_type: str) -> Descriptor:
        raw = data if isinstance(data, bytes) else json.dumps(data, separators=(",", ":")).encode()
        blobs[name] = raw
        described[name] = Descriptor(media_type=media_type, digest=sha256(raw), size=len(raw))
        return described[name]

    layers = [add(f"layer{n}", f"layer {n}".encode() * (n + 1), LAYER) for n in range(3)]
    config = add(
        "config", {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}, CONFIG
    )

    def manifest(name: str, parts: list[Descriptor], subject: Descriptor | None = None) -> Descriptor:
        document: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": config.to_dict(),
            "layers": [p.to_dict() for p in parts],
        }
        if subject is not None:
            document["subject"] = subject.to_dict()
        return add(name, document, MANIFEST)

    one = manifest("manifest1", layers[:1])
    two = manifest("manifest2", layers[1:])
    manifest("referrer", [layers[2]], subject=one)
    index = add("index", {"schemaVersion": 2, "mediaType": INDEX, "manifests": [one.to_dict(), two.to_dict()]}, INDEX)
    add("outer", {"schemaVersion": 2, "mediaType": INDEX, "manifests": [index.to_dict()]}, INDEX)
    add("descriptor", two.to_dict(), DESCRIPTOR)
    add("broken", b'{"schemaVersion": 2, "config": ', MANIFEST)
    add(
        "confused",
        {"schemaVersion": 2, "mediaType": MANIFEST, "config": config.to_dict(), "layers": [], "manifests": []},
        MANIFEST,
    )
    # descriptors that lie: layer bytes called a manifest, and a manifest never stored
    described["layer-as-manifest"] = layers[0].replace(media_type=MANIFEST)
    absent = b'{"absent": true}'
    described["absent"] = Descriptor(media_type=MANIFEST, digest=sha256(absent), size=len(absent))
    return blobs, described


BLOBS, DESCRIBED = _pool()
BLOB_NAMES = st.sampled_from(sorted(BLOBS))
TARGETS = st.sampled_from(sorted(DESCRIBED)).map(DESCRIBED.__getitem__)
_VALID_NAMES = st.sampled_from(["latest", "v1", "v2", "a/b", "sig", "x.y-z"])
#: Valid names nine times in ten (``one_of`` has no weights).
REFERENCE_NAMES = st.integers(0, 9).flatmap(
    lambda roll: st.sampled_from(["", "../x", "A B"]) if roll == 0 else _VALID_NAMES
)
#: Calls that walk the graph concurrently (a collection; a tag's check of its content): each can fail
#: on whichever broken node its walk reaches first.
GRAPH_WALKS = {"gc", "put_reference", "update_references"}
#: The errors such a walk may end with.
BROKEN_GRAPH = {"BlobNotFoundError", "InvalidError", "DigestMismatchError", "SizeMismatchError", "BlobTooLargeError"}


def _normal(value: object) -> object:
    """Results comparable across engines."""
    if isinstance(value, ocicas.GCResult):
        return (value.removed, value.bytes_freed, value.live, value.referrers, value.broken)
    return value


class EngineModel(RuleBasedStateMachine):
    """One store on disk and one in memory, kept in lockstep."""

    backend: ClassVar[str] = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self._exit = ExitStack()
        self.portal: BlockingPortal = self._exit.enter_context(start_blocking_portal(self.backend))
        scratch = Path(tempfile.mkdtemp(prefix="ocicas-model-"))
        self._exit.callback(shutil.rmtree, scratch, True)
        self.portal.call(ocicas.create_layout, scratch / "layout")
        self.disk: Engine = self.portal.call(ocicas.open_layout, scratch / "layout")
        self.memory: Engine = ocicas.MemoryEngine()

    def teardown(self) -> None:
        try:
            for engine in (self.disk, self.memory):
                self.portal.call(engine.close)
        finally:
            self._exit.close()

    def both(self, what: str, call: Callable[[Engine], Awaitable[_T]]) -> tuple[str, object]:
        """Run ``call`` on both engines; assert they agree on the outcome; return it."""
        outcomes: list[tuple[str, object]] = []
        for engine in (self.disk, self.memory):
            try:
                outcomes.append(("ok", _normal(self.portal.call(call, engine))))
            except ALLOWED as exc:
                outcomes.append((type(exc).__name__, None))
        on_disk, in_memory = outcomes
        OUTCOMES[what, on_disk[0]] += 1
        if {on_disk[0], in_memory[0]} <= BROKEN_GRAPH and what in GRAPH_WALKS:
            return on_disk
        assert on_disk == in_memory, f"{what}: directory {on_disk!r:.300}, memory {in_memory!r:.300}"
        return on_disk

    # -- blobs -------------------------------------------------------------------------

    @rule(names=st.lists(BLOB_NAMES, min_size=1, max_size=len(BLOBS), unique=True))
    def put_blobs(self, names: list[str]) -> None:
        async def put(engine: Engine) -> list[tuple[ocicas.Digest, int]]:
            return [await engine.put_blob(BLOBS[name]) for name in names]

        self.both("put_blob", put)

    @rule(name=BLOB_NAMES, lie=st.booleans())
    def put_blob_expecting(self, name: str, lie: bool) -> None:
        expected = DESCRIBED["absent"].digest if lie else DESCRIBED[name].digest
        self.both("put_blob(expected_digest=)", lambda e: e.put_blob(BLOBS[name], expected_digest=expected))

    @rule(name=BLOB_NAMES)
    def delete_blob(self, name: str) -> None:
        self.both("delete_blob", lambda e: e.delete_blob(DESCRIBED[name].digest))

    @rule(described=TARGETS)
    def read(self, described: Descriptor) -> None:
        self.both("read_blob", lambda e: e.read_blob(described.digest))
        self.both("stat_blob", lambda e: e.stat_blob(described.digest))

    @rule(described=TARGETS)
    def read_typed(self, described: Descriptor) -> None:
        async def typed(engine: Engine) -> object:
            async with await ocicas.from_descriptor(engine, described) as blob:
                if isinstance(blob.data, ocicas.BlobReader):
                    return await blob.data.read()
                return blob.data

        self.both("from_descriptor", typed)

    # -- references ----------------------------------------------------------------------

    @rule(name=REFERENCE_NAMES, described=TARGETS)
    def put_reference(self, name: str, described: Descriptor) -> None:
        self.both("put_reference", lambda e: e.put_reference(name, described))

    @rule(name=REFERENCE_NAMES)
    def delete_reference(self, name: str) -> None:
        self.both("delete_reference", lambda e: e.delete_reference(name))

    @rule(
        changes=st.dictionaries(REFERENCE_NAMES, st.none() | TARGETS, max_size=4),
        replace=st.booleans(),
    )
    def update_references(self, changes: dict[str, Descriptor | None], replace: bool) -> None:
        self.both("update_references", lambda e: e.update_references(changes, replace=replace))

    @rule(name=REFERENCE_NAMES)
    def resolve(self, name: str) -> None:
        self.both("resolve_reference", lambda e: ocicas.resolve_reference(e, name))

    # -- collection ---------------------------------------------------------------------

    @rule(referrers=st.booleans(), dry_run=st.booleans())
    def gc(self, referrers: bool, dry_run: bool) -> None:
        self.both("gc", lambda e: ocicas.gc(e, grace_period=0, referrers=referrers, dry_run=dry_run))

    # -- what must always hold -------------------------------------------------------------

    @invariant()
    def same_contents(self) -> None:
        async def contents(
            engine: Engine,
        ) -> tuple[dict[ocicas.Digest, bytes], dict[str, Descriptor], list[Descriptor]]:
            blobs = {d: await engine.read_blob(d) for d in await engine.list_blobs()}
            references = {n: await engine.get_reference(n) for n in await engine.list_references()}
            return blobs, references, await engine.list_roots()

        on_disk = self.portal.call(contents, self.disk)
        in_memory = self.portal.call(contents, self.memory)
        assert on_disk[0].keys() == in_memory[0].keys(), "different blobs"
        assert on_disk == in_memory


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_directory_engine_behaves_like_the_memory_engine(backend: str) -> None:
    OUTCOMES.clear()
    machine = type(f"EngineModel_{backend}", (EngineModel,), {"backend": backend})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=STATEFUL_EXAMPLES,
            stateful_step_count=STEPS_PER_EXAMPLE,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    calls = sum(OUTCOMES.values())
    errors = sum(n for (_, outcome), n in OUTCOMES.items() if outcome != "ok")
    print(f"\nmodel[{backend}]: {calls} calls on each engine, {errors} ended in the same error on both:")
    for (what, outcome), n in sorted(OUTCOMES.items()):
        print(f"  {what}: {outcome} x{n}")
