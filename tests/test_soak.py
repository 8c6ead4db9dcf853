"""Soak: minutes of mixed load on one layout lose nothing acknowledged and leak nothing.

On one layout at once, for ``OCICAS_SOAK_SECONDS`` (default 8 s; 600 with
``OCICAS_LONG=1``):

- tasks of the test process build and tag images (``build_image`` with and
  without ``reference=``, ``put_reference``, ``update_references``), some layers
  larger than a pipeline batch, given as bytes, as streams of fresh chunks, or as
  one reused buffer;
- tasks read what acknowledged tags reach and compare the exact bytes; some
  readers are read in part, to the end, or not at all and then dropped unclosed.
  Each is collected at once (the test forces a collection if a cycle holds it;
  it must not stay referenced); one dropped before its end on an open engine
  gives exactly one ``ResourceWarning``, any other at most one;
- a task deletes acknowledged tags, keeping the layout's size bounded;
- a task puts unique garbage and ages it past the grace period;
- ``ocicas.gc(grace_period=GRACE)`` runs again and again;
- the engine every task uses is replaced now and then: a new one is opened and
  the old one closed while others still use it. They may get
  :class:`~ocicas.EngineClosedError`; any other error is a failure;
- a task keeps opening and closing other directories, so that a closed engine's
  descriptor numbers are soon reused: a closed engine must never touch them;
- worker processes (``tests/workers/soak_worker.py``) put and tag images and
  report each acknowledgement as its call returns; they are SIGKILLed at random
  moments and restarted.

Acknowledged means a ``put_blob``, tag or delete call returned, in any process.
The grace period (30 s) is far longer than any put-to-tag gap, so no collection
may remove anything a tag will reach (tags are protected by the grace period
only in this version). At the end, on a fresh engine: every acknowledged tag is
present with its exact descriptor, every acknowledged deletion holds, no
reference appeared from nowhere, everything the tags reach is present and
verifies (layers byte for byte), the aged garbage is gone, no temporary
directory is left, ``ocicas fsck --json`` finds no problem, the other
directories are untouched, and the test process is back to its open file
descriptors and threads (idle worker threads of anyio and trio excepted: they
exit after 10 s idle, and are told apart by name and by having no ocicas frame
on their stack).

Every ``OCICAS_SOAK_SAMPLE_SECONDS`` (2 s; 15 s in long mode) a line gives the
open descriptors, threads, RSS and operations so far (``pytest -s`` shows them);
a summary follows the run. ``OCICAS_SOAK_REPORT=path`` also writes the figures
there as JSON, one entry per backend. ``OCICAS_SOAK_SEED`` picks the seed.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import ocicas
from ocicas import BlobReader, Descriptor, DirEngine
from ocicas.testing import blob_bytes
from tests.leaks import fd_targets, is_idle_worker

pytestmark = pytest.mark.anyio

LONG = os.environ.get("OCICAS_LONG") == "1"
DURATION = float(os.environ.get("OCICAS_SOAK_SECONDS", "600" if LONG else "7"))
SAMPLE_EVERY = float(os.environ.get("OCICAS_SOAK_SAMPLE_SECONDS", "15" if LONG else "2"))
REPORT = os.environ.get("OCICAS_SOAK_REPORT")
SEED = int(os.environ.get("OCICAS_SOAK_SEED", "20261130"))
#: Every collection's grace period: far longer than any put-to-tag gap.
GRACE = 30.0
#: Chance that a layer is larger than a pipeline batch (4 to 9 MiB): in the test process, in the workers.
LARGE_CHANCE = 0.08 if LONG else 0.05
WORKER_LARGE_CHANCE = 0.06 if LONG else 0.03
BUILDERS = 2
GETTERS = 3
WORKER_PROCESSES = 2
#: A worker lives this long (seconds) after saying it is ready, then is SIGKILLed.
WORKER_LIFE = (0.3, 3.0)
#: The deleter keeps at least MIN_LIVE acknowledged tags, and deletes without pause above MAX_LIVE.
MIN_LIVE = 10
MAX_LIVE = 150 if LONG else 40
#: Seconds between engine replacements, and between collections.
CLOSE_EVERY = (0.5, 2.5)
GC_EVERY = (0.3, 1.5)
#: The load stops early after this many unexpected errors.
MAX_ERRORS = 25
READY_TIMEOUT = 60.0
#: A layer the test and every worker put (as ``blob_bytes(SHARED_SIZE, SHARED_SEED)``).
SHARED_SEED = 0
SHARED_SIZE = 300_000

WORKER = Path(__file__).parent / "workers" / "soak_worker.py"
#: Idle worker threads: anyio's on asyncio, trio's thread cache (named so only while idle).
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    seed: int


@dataclass
class Tag:
    name: str
    descriptor: Descriptor
    layers: tuple[Layer, ...]
    #: Getters reading what this tag reaches right now (the deleter leaves it alone meanwhile).
    borrowed: int = 0


@dataclass
class Model:
    """What the store must hold, from acknowledged calls only."""

    #: Acknowledged tags not being deleted.
    live: dict[str, Tag] = field(default_factory=dict)
    #: Tag changes whose call did not return (a killed worker, a closed engine): either outcome is fine.
    #: The descriptor the name may hold (``None``: unknown), or for a deletion the one it held.
    maybe: dict[str, Descriptor | None] = field(default_factory=dict)
    #: Acknowledged deletions.
    deleted: set[str] = field(default_factory=set)
    #: Unique garbage aged past the grace period: the final collection must remove it all.
    aged: set[str] = field(default_factory=set)

    def acknowledge(self, tag: Tag) -> None:
        self.maybe.pop(tag.name, None)
        self.live[tag.name] = tag


def layer_bytes(layer: Layer) -> bytes:
    return blob_bytes(layer.size, layer.seed)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def thread_top(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return "(no frame)"
    return "".join(traceback.format_stack(frame, limit=4))


async def streamed(data: bytes, rng: random.Random, mode: str) -> AsyncIterator[bytes | bytearray | memoryview]:
    """``data`` in chunks of random sizes: fresh ``bytes``, fresh ``bytearray``s, or one reused buffer."""
    buffer = bytearray(1 << 20)
    position = 0
    while position < len(data):
        piece = data[position : position + rng.randint(1, 1 << 20)]
        position += len(piece)
        await anyio.lowlevel.checkpoint()
        if mode == "bytes":
            yield piece
        elif mode == "bytearray":
            yield bytearray(piece)
        else:  # overwritten once the engine asks for the next chunk
            buffer[: len(piece)] = piece
            yield memoryview(buffer)[: len(piece)]


class Soak:
    def __init__(self, root: Path, backend: str) -> None:
        self.root = root
        self.backend = backend
        self.layout = root / "layout"
        self.decoys = [root / f"decoy-{i}" for i in range(3)]
        self.rng = random.Random(f"{SEED}-{backend}")
        self.model = Model()
        self.engine: DirEngine
        self.stop = anyio.Event()
        self.started = time.monotonic()
        self.ops: Counter[str] = Counter()
        self.closed_errors: Counter[str] = Counter()
        self.drops: Counter[str] = Counter()
        self.workers: Counter[str] = Counter()
        #: Unexpected errors by signature (operation, error, where in ocicas): the first one's traceback, and counts.
        self.failures: dict[str, str] = {}
        self.failure_kinds: Counter[str] = Counter()
        self.failure_count = 0
        self.error_count = 0
        self.samples: list[dict[str, Any]] = []
        #: Where warnings are recorded during the load; ResourceWarnings of dropped readers are counted and removed.
        self.caught: list[warnings.WarningMessage] = []
        self.resource_warnings = 0
        self.warning_examples: list[str] = []
        self.names = iter(range(sys.maxsize))

    # -- bookkeeping ---------------------------------------------------------------------

    def fail(self, signature: str, details: str = "", *, error: bool = False) -> None:
        """Count a failure; the first of each signature keeps its details. Too many errors stop the load."""
        self.failure_count += 1
        if signature not in self.failures:
            self.failures[signature] = f"first at {time.monotonic() - self.started:.1f} s\n{details}"
        self.failure_kinds[signature] += 1
        if error:
            self.error_count += 1
            if self.error_count >= MAX_ERRORS:
                self.stop.set()

    async def attempt(self, kind: str, operation: Callable[[], Awaitable[bool | None]]) -> None:
        """Run one operation (``False``: it found nothing to do); a closed engine's error is expected."""
        try:
            done = await operation()
        except ocicas.EngineClosedError:
            self.closed_errors[kind] += 1
        except Exception as exc:
            where = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}ocicas{os.sep}" in f.filename]
            at = f" at {Path(where[-1].filename).name}:{where[-1].lineno} {where[-1].name}" if where else ""
            message = re.sub(r"[0-9a-f]{16,64}", "<hex>", str(exc))
            self.fail(
                f"{kind} raised {type(exc).__name__}: {message}{at}",
                "".join(traceback.format_exception(exc)),
                error=True,
            )
        else:
            if done is not False:
                self.ops[kind] += 1

    def sample(self) -> dict[str, Any]:
        gc.collect()  # dropped readers in reference cycles go now
        figures: dict[str, Any] = {
            "elapsed": round(time.monotonic() - self.started, 1),
            "fds": len(os.listdir("/proc/self/fd")),
            "threads": threading.active_count(),
            "rss_kib": rss_kib(),
            "ops": dict(self.ops),
            "engine_closed_errors": sum(self.closed_errors.values()),
            "live_tags": len(self.model.live),
            "failures": self.failure_count,
        }
        self.samples.append(figures)
        ops = " ".join(f"{kind}={count}" for kind, count in sorted(self.ops.items()))
        print(
            f"soak[{self.backend}] {figures['elapsed']:7.1f}s fds={figures['fds']} threads={figures['threads']} "
            f"rss={figures['rss_kib'] / 1024:.1f}MiB closed-errors={figures['engine_closed_errors']} "
            f"live-tags={figures['live_tags']} failures={figures['failures']} {ops}",
            flush=True,
        )
        return figures

    async def pause(self, low: float, high: float) -> None:
        with anyio.move_on_after(self.rng.uniform(low, high)):
            await self.stop.wait()

    def loop(
        self, kind: str, operation: Callable[[], Awaitable[bool | None]]
    ) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            while not self.stop.is_set():
                await self.attempt(kind, operation)

        return run

    # -- writers ---------------------------------------------------------------------------

    def new_layer_spec(self) -> tuple[int, int]:
        roll = self.rng.random()
        if roll < 0.15:
            return SHARED_SEED, SHARED_SIZE
        seed = self.rng.randrange(1, 2**62)
        if roll < 0.15 + LARGE_CHANCE:
            return seed, self.rng.randint(4 << 20, 9 << 20)  # through put_blob's pipeline
        if roll < 0.30 + LARGE_CHANCE:
            return seed, self.rng.randint(64 << 10, 2 << 20)
        return seed, self.rng.randint(0, 64 << 10)

    async def build(self) -> None:
        """Build an image and tag it, one of three ways."""
        engine = self.engine
        rng = self.rng
        specs = [self.new_layer_spec() for _ in range(rng.randint(1, 3))]

        def generate() -> list[tuple[Layer, bytes]]:
            out = []
            for seed, size in specs:
                data = blob_bytes(size, seed)
                out.append((Layer("sha256:" + hashlib.sha256(data).hexdigest(), size, seed), data))
            return out

        generated = await anyio.to_thread.run_sync(generate)
        layers = tuple(layer for layer, _ in generated)
        sources: list[Any] = []
        for _, data in generated:
            roll = rng.random()
            if roll < 0.4:
                sources.append(data)
            else:
                sources.append(streamed(data, rng, "bytes" if roll < 0.75 else "bytearray" if roll < 0.9 else "reused"))
        name = f"t-{next(self.names)}"
        way = rng.random()
        if way < 0.6:
            self.model.maybe[name] = None
            descriptor = await ocicas.build_image(engine, sources, reference=name)
            self.model.acknowledge(Tag(name, descriptor, layers))
            return
        descriptor = await ocicas.build_image(engine, sources)
        names = [name] if way < 0.85 else [name, f"t-{next(self.names)}"]
        for each in names:
            self.model.maybe[each] = descriptor
        if len(names) == 1:
            await engine.put_reference(name, descriptor)
        else:
            await engine.update_references(dict.fromkeys(names, descriptor))
        for each in names:
            self.model.acknowledge(Tag(each, descriptor, layers))

    async def delete(self) -> bool:
        live = self.model.live
        if len(live) < MAX_LIVE:
            await self.pause(0.05, 0.3)
        candidates = [tag for tag in live.values() if not tag.borrowed]
        if len(live) <= MIN_LIVE or not candidates:
            await self.pause(0.05, 0.1)
            return False
        tag = self.rng.choice(candidates)
        del live[tag.name]
        self.model.maybe[tag.name] = tag.descriptor
        await self.engine.delete_reference(tag.name)
        del self.model.maybe[tag.name]
        self.model.deleted.add(tag.name)
        return True

    async def put_garbage(self) -> None:
        await self.pause(0.05, 0.3)
        data = self.rng.randbytes(self.rng.randint(1, 64 << 10))
        digest, _ = await self.engine.put_blob(data)
        old = time.time() - GRACE - 3600
        path = self.layout / "blobs" / "sha256" / digest.encoded
        await anyio.to_thread.run_sync(os.utime, path, (old, old))
        self.model.aged.add(digest)

    # -- readers ---------------------------------------------------------------------------

    async def get(self) -> bool:
        """Read something an acknowledged tag reaches; compare exact bytes, or drop the reader unclosed."""
        live = self.model.live
        if not live:
            await self.pause(0.05, 0.1)
            return False
        rng = self.rng
        tag = rng.choice(list(live.values()))
        tag.borrowed += 1
        try:
            engine = self.engine
            roll = rng.random()
            if roll < 0.1:
                manifest = json.loads(await engine.read_blob(tag.descriptor.digest))
                got = [(layer["digest"], layer["size"]) for layer in manifest["layers"]]
                assert got == [(layer.digest, layer.size) for layer in tag.layers], (tag.name, got)
                return True
            layer = rng.choice(tag.layers)
            if roll < 0.25:
                data = await engine.read_blob(layer.digest, max_size=None)
                assert data == await anyio.to_thread.run_sync(layer_bytes, layer), (tag.name, layer)
                return True
            reader = await engine.get_blob(layer.digest)
            if roll < 0.65:
                async with reader:
                    parts = [chunk async for chunk in reader]
                assert b"".join(parts) == await anyio.to_thread.run_sync(layer_bytes, layer), (tag.name, layer)
                assert reader.size == layer.size
                return True
            # dropped unclosed: at the start, in the middle, or at the end of its data
            self.drops["dropped"] += 1
            try:
                if roll < 0.75:
                    kind = "unread"
                else:
                    expected = await anyio.to_thread.run_sync(layer_bytes, layer)
                    if roll < 0.9:
                        data = await reader.read(rng.randint(1, max(1, layer.size - 1)))
                    else:
                        data = b"".join([chunk async for chunk in reader])
                    assert data == expected[: len(data)], (tag.name, layer)
                    kind = "partial" if reader.bytes_read < layer.size else "eof"
            except BaseException:  # only readers dropped on purpose are left to the collector
                with anyio.CancelScope(shield=True):
                    await reader.aclose()
                raise
            self.drops[kind] += 1
            unfinished_on_open = kind != "eof" and not engine.closed
            if unfinished_on_open:
                self.drops["unfinished on an open engine"] += 1
            # no checkpoint from here on: no other task runs, and the engine stays as it was
            ref = weakref.ref(reader)
            before = len(self.caught)
            del reader
            if ref() is not None:  # in a reference cycle
                gc.collect()
            self.check_drop(ref, before, kind, unfinished_on_open)
            return True
        finally:
            tag.borrowed -= 1

    def check_drop(self, ref: weakref.ref[BlobReader], before: int, kind: str, unfinished_on_open: bool) -> None:
        """A reader just dropped unclosed was collected, with a ResourceWarning if it had not reached its end."""
        emitted = [w for w in self.caught[before:] if issubclass(w.category, ResourceWarning)]
        self.resource_warnings += len(emitted)
        alive = ref()
        if alive is not None and not any(w.source is alive for w in emitted):
            self.fail("a dropped reader is still referenced after gc.collect(): it can never release its file")
        del alive
        if unfinished_on_open and len(emitted) != 1:
            self.fail(f"{len(emitted)} ResourceWarnings (not 1) for a reader dropped {kind} on an open engine")
        elif len(emitted) > 1:
            self.fail(f"{len(emitted)} ResourceWarnings for one reader dropped {kind}")
        if emitted and len(self.warning_examples) < 3:
            self.warning_examples.append(str(emitted[0].message))
        del self.caught[before:]  # counted; the records may hold the readers

    # -- collector, closer, fd churn ----------------------------------------------------------

    async def collect(self) -> None:
        await self.pause(*GC_EVERY)
        live = self.model.live
        before = set(live)
        result = await ocicas.gc(self.engine, grace_period=GRACE)
        self.ops["gc removed"] += len(result.removed)
        kept = [live[name] for name in before if name in live]  # acknowledged before, not deleted since
        protected: dict[str, str] = {tag.descriptor.digest: tag.name for tag in kept}
        protected.update((layer.digest, tag.name) for tag in kept for layer in tag.layers)
        lost = {digest: protected[digest] for digest in result.removed if digest in protected}
        assert not lost, f"gc removed content of acknowledged tags (digest: tag): {lost}"

    async def replace_engine(self) -> bool:
        await self.pause(*CLOSE_EVERY)
        if self.stop.is_set():
            return False
        fresh = await ocicas.open_layout(self.layout)
        old, self.engine = self.engine, fresh
        await old.close()
        return True

    def churn_decoys(self) -> None:
        fds = [os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) for path in self.decoys * 2]
        time.sleep(0.005)  # holding whatever numbers a closed engine just freed
        for fd in fds:
            os.close(fd)

    async def churn(self) -> None:
        await anyio.to_thread.run_sync(self.churn_decoys)
        await anyio.sleep(0.002)

    async def sampler(self) -> None:
        while not self.stop.is_set():
            with anyio.move_on_after(SAMPLE_EVERY):
                await self.stop.wait()
            self.sample()

    async def timer(self) -> None:
        with anyio.move_on_after(DURATION):
            await self.stop.wait()
        self.stop.set()

    # -- worker processes -------------------------------------------------------------------

    def worker_line(self, line: str, pending: dict[str, Tag]) -> None:
        words = line.split()
        if words[0] == "blob":
            self.workers["blobs acknowledged"] += 1
        elif words[0] == "want":
            name, media_type, digest, size, described = words[1:]
            layers = []
            for item in described.split(","):
                layer_digest, layer_size, seed = item.rsplit(":", 2)
                layers.append(Layer(layer_digest, int(layer_size), int(seed)))
            descriptor = Descriptor(media_type=media_type, digest=ocicas.Digest(digest), size=int(size))
            pending[name] = Tag(name, descriptor, tuple(layers))
            self.model.maybe[name] = descriptor
        elif words[0] == "tag":
            self.model.acknowledge(pending.pop(words[1]))
            self.workers["tags acknowledged"] += 1
        elif words[0] == "gc":
            self.workers["collections"] += 1
        else:
            self.fail(f"worker said {line!r}", error=True)

    async def read_lines(self, lines: BufferedByteReceiveStream, pending: dict[str, Tag]) -> None:
        while True:
            try:
                line = await lines.receive_until(b"\n", 1 << 16)
            except (anyio.EndOfStream, anyio.IncompleteRead):
                return
            self.worker_line(line.decode(), pending)

    async def cancel_at_stop(self, scope: anyio.CancelScope) -> None:
        await self.stop.wait()
        scope.cancel()

    async def supervise(self, slot: int) -> None:
        """Start a worker, SIGKILL it at a random moment, take in what it acknowledged; again until the end."""
        stderr_path = self.root / f"worker-{slot}.stderr"
        for generation in range(sys.maxsize):
            if self.stop.is_set():
                return
            backend = ("asyncio", "trio")[generation % 2]
            prefix = f"w{slot}g{generation}"
            pending: dict[str, Tag] = {}
            command = [sys.executable, str(WORKER), str(self.layout), prefix]
            command += [str(self.rng.randrange(2**62)), str(GRACE), backend, str(WORKER_LARGE_CHANCE)]
            with open(stderr_path, "ab") as stderr:
                process = await anyio.open_process(
                    command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr
                )
            async with process:
                assert process.stdout is not None
                lines = BufferedByteReceiveStream(process.stdout)
                ready = b""
                with anyio.move_on_after(READY_TIMEOUT):
                    try:
                        ready = await lines.receive_until(b"\n", 1 << 16)
                    except (anyio.EndOfStream, anyio.IncompleteRead):
                        pass
                if ready == b"ready":
                    with anyio.move_on_after(self.rng.uniform(*WORKER_LIFE)):
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(self.cancel_at_stop, tg.cancel_scope)
                            await self.read_lines(lines, pending)  # returns early only if the worker died
                            tg.cancel_scope.cancel()
                try:
                    process.send_signal(signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await self.read_lines(lines, pending)  # what it wrote before it died
                code = await process.wait()
            for name, tag in pending.items():  # killed between its want and its tag
                self.model.maybe[name] = tag.descriptor
            if ready != b"ready" or code != -signal.SIGKILL:
                tail = stderr_path.read_text()[-3000:] if stderr_path.exists() else ""
                self.fail(f"worker {prefix} ({backend}) ended with {code} (ready: {ready!r})", tail, error=True)
                return
            self.workers["killed"] += 1

    # -- the run ------------------------------------------------------------------------------

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.timer)
            tg.start_soon(self.sampler)
            for _ in range(BUILDERS):
                tg.start_soon(self.loop("build", self.build))
            for _ in range(GETTERS):
                tg.start_soon(self.loop("get", self.get))
            tg.start_soon(self.loop("delete", self.delete))
            tg.start_soon(self.loop("garbage", self.put_garbage))
            tg.start_soon(self.loop("gc", self.collect))
            tg.start_soon(self.loop("close", self.replace_engine))
            tg.start_soon(self.loop("decoy churn", self.churn))
            for slot in range(WORKER_PROCESSES):
                tg.start_soon(self.supervise, slot)

    async def verify(self, problems: list[str]) -> dict[str, Any]:
        """Check the store against the model on a fresh engine; return figures."""
        model = self.model
        async with await ocicas.open_layout(self.layout) as engine:
            references = {name: await engine.get_reference(name) for name in await engine.list_references()}
            for name, tag in model.live.items():
                if name not in references:
                    problems.append(f"acknowledged tag {name} lost (was {tag.descriptor.digest})")
                elif references[name] != tag.descriptor:
                    problems.append(f"acknowledged tag {name} holds {references[name]}, not {tag.descriptor}")
            for name in model.deleted & references.keys():
                problems.append(f"acknowledged deletion of {name} undone")
            for name, maybe in model.maybe.items():
                if name in references and maybe is not None and references[name] != maybe:
                    problems.append(f"tag {name} holds {references[name]}, neither absent nor {maybe}")
            phantoms = references.keys() - model.live.keys() - model.maybe.keys() - model.deleted
            if phantoms:
                problems.append(f"references nobody put: {sorted(phantoms)[:5]}")

            graph = await ocicas.walk(engine, await engine.list_roots())  # manifests present and verified
            infos = await engine.stat_blobs(graph.digests())
            missing = graph.digests() - infos.keys()
            if missing:
                problems.append(f"content the references reach is missing: {sorted(missing)[:5]}")
            verified: set[str] = set()
            verified_bytes = 0
            for tag in model.live.values():
                if tag.name not in references:
                    continue
                try:
                    manifest = json.loads(await engine.read_blob(tag.descriptor.digest))
                    got = [(layer["digest"], layer["size"]) for layer in manifest["layers"]]
                    if got != [(layer.digest, layer.size) for layer in tag.layers]:
                        problems.append(f"tag {tag.name}: manifest layers {got} are not the acknowledged ones")
                    config = manifest["config"]["digest"]
                    if config not in verified:
                        verified_bytes += len(await engine.read_blob(config))
                        verified.add(config)
                    for layer in tag.layers:
                        if layer.digest in verified:
                            continue
                        async with await engine.get_blob(layer.digest) as reader:
                            data = b"".join([chunk async for chunk in reader])
                        if data != await anyio.to_thread.run_sync(layer_bytes, layer):
                            problems.append(f"tag {tag.name}: layer {layer.digest} has other bytes")
                        verified.add(layer.digest)
                        verified_bytes += len(data)
                except ocicas.OCICASError as exc:
                    problems.append(f"tag {tag.name}: {exc!r}")

            result = await ocicas.gc(engine, grace_period=GRACE)
            reached = {tag.descriptor.digest for tag in model.live.values()} | verified
            if reached & set(result.removed):
                problems.append(f"the final gc removed reachable content: {sorted(reached & set(result.removed))[:5]}")
            blobs = set(await engine.list_blobs())
            if model.aged & blobs:
                problems.append(f"{len(model.aged & blobs)} aged garbage blobs survived the final gc")
            figures: dict[str, Any] = {
                "references": len(references),
                "blobs": len(blobs),
                "verified_blobs": len(verified),
                "verified_bytes": verified_bytes,
                "final_gc_removed": len(result.removed),
                "aged_garbage": len(model.aged),
            }

        def scan() -> None:
            top = sorted(os.listdir(self.layout))
            if top != ["blobs", "index.json", "oci-layout"]:
                problems.append(f"layout holds {top} after the final gc")
            if os.listdir(self.layout / "blobs") != ["sha256"]:
                problems.append(f"blobs/ holds {os.listdir(self.layout / 'blobs')}")
            for entry in os.scandir(self.layout / "blobs" / "sha256"):
                if not _HEX64.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
                    problems.append(f"blobs/sha256/{entry.name} is not a blob")
            for decoy in self.decoys:
                if os.listdir(decoy):
                    problems.append(f"{decoy.name}, another directory, now holds {os.listdir(decoy)}")

        await anyio.to_thread.run_sync(scan)
        done = await anyio.run_process(
            [sys.executable, "-m", "ocicas", "fsck", "--json", str(self.layout)],
            check=False,
            env={**os.environ, "OCICAS_PROGRESS": "never"},
        )
        report = json.loads(done.stdout) if done.stdout else {}
        if done.returncode != 0 or not report.get("ok") or report.get("problems"):
            problems.append(f"fsck: status {done.returncode}, {report or done.stderr.decode()}")
        figures["fsck"] = {key: report.get(key) for key in ("ok", "blobs_count", "bytes", "roots_count")}
        return figures


async def test_soak(tmp_path: Path, anyio_backend: str) -> None:
    soak = Soak(tmp_path, anyio_backend)
    await ocicas.create_layout(soak.layout)
    for decoy in soak.decoys:
        decoy.mkdir()
    gc.collect()
    baseline_fds = fd_targets()
    baseline_threads = set(threading.enumerate())
    soak.sample()
    problems: list[str] = []

    with anyio.fail_after(DURATION + 600):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            soak.caught = caught
            soak.engine = await ocicas.open_layout(soak.layout)
            await soak.run()
            await soak.engine.close()
            gc.collect()
            gc.collect()
        problems += [f"{soak.failure_kinds[signature]}x during the load: {signature}" for signature in soak.failures]
        others = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, ResourceWarning)]
        if others:
            problems.append(f"warnings: {others[:5]}")
        resource_warnings = soak.resource_warnings + len(caught) - len(others)
        if len(caught) > len(others):
            soak.warning_examples += [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)][:3]
        dropped = soak.drops["dropped"]
        if resource_warnings > dropped:
            problems.append(f"{resource_warnings} ResourceWarnings for {dropped} readers dropped unclosed")
        final = await soak.verify(problems)

    gc.collect()
    last = soak.sample()
    leaked = {fd: target for fd, target in fd_targets().items() if baseline_fds.get(fd) != target}
    if leaked:
        targets = Counter(re.sub(r"[0-9a-f]{64}", "<digest>", target) for target in leaked.values())
        problems.append(f"{len(leaked)} file descriptors left open: {dict(targets.most_common(8))}")
    extra = [t for t in threading.enumerate() if t not in baseline_threads]
    idle = [t for t in extra if is_idle_worker(t)]
    for thread in extra:
        if thread not in idle:
            problems.append(f"thread {thread.name!r} left running:\n{thread_top(thread)}")

    summary = {
        "backend": anyio_backend,
        "duration_s": DURATION,
        "seconds": round(time.monotonic() - soak.started, 1),
        "samples": soak.samples,
        "ops": dict(soak.ops),
        "engine_closed_errors": dict(soak.closed_errors),
        "readers_dropped": dict(soak.drops),
        "resource_warnings": resource_warnings,
        "resource_warning_examples": soak.warning_examples[:3],
        "workers": dict(soak.workers),
        "tags": {"live": len(soak.model.live), "deleted": len(soak.model.deleted), "maybe": len(soak.model.maybe)},
        "final": final,
        "fds": {"baseline": len(baseline_fds), "end": len(fd_targets()), "max": max(s["fds"] for s in soak.samples)},
        "threads": {"baseline": len(baseline_threads), "end": last["threads"], "idle_workers_at_end": len(idle)},
        "rss_mib": {
            "start": round(soak.samples[0]["rss_kib"] / 1024, 1),
            "max": round(max(s["rss_kib"] for s in soak.samples) / 1024, 1),
            "end": round(last["rss_kib"] / 1024, 1),
        },
        "problems": problems,
        "first_failures": soak.failures,
    }
    print_summary(summary)
    if REPORT:
        write_report(Path(REPORT), anyio_backend, summary)
    details = "".join(f"\n--- {signature}: {first}" for signature, first in soak.failures.items())
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems) + details


def print_summary(summary: dict[str, Any]) -> None:
    rows = [
        f"\nsoak[{summary['backend']}] summary after {summary['seconds']} s of which {summary['duration_s']} s load"
    ]
    rows.append(f"  {'elapsed':>8} {'fds':>5} {'threads':>7} {'rss MiB':>8} {'ops':>7}")
    for s in summary["samples"]:
        rows.append(
            f"  {s['elapsed']:>8.1f} {s['fds']:>5} {s['threads']:>7} {s['rss_kib'] / 1024:>8.1f} "
            f"{sum(v for k, v in s['ops'].items() if k != 'gc removed'):>7}"
        )
    for key in (
        "ops",
        "engine_closed_errors",
        "readers_dropped",
        "workers",
        "tags",
        "final",
        "fds",
        "threads",
        "rss_mib",
    ):
        rows.append(f"  {key}: {summary[key]}")
    rows.append(f"  resource warnings: {summary['resource_warnings']} {summary['resource_warning_examples']}")
    rows.append(f"  problems: {len(summary['problems'])}")
    print("\n".join(rows), flush=True)


def write_report(path: Path, backend: str, summary: dict[str, Any]) -> None:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        report = {}
    if not isinstance(report, dict):
        report = {}
    report[backend] = summary
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
