"""Crash safety: writers SIGKILLed at random moments lose nothing they acknowledged and corrupt nothing.

A fork server (``tests/workers/crash_worker.py``) imports ocicas once and forks,
per trial, a writer that puts images and tags, batches and untags them in a loop
(occasionally running a full ``ocicas.gc``), journalling every reference change
before and after it. Once the writer says its engine is open, the server sleeps
a random few to tens of milliseconds and SIGKILLs it. One layout is reused across
trials so the damage, if any, accumulates. Meanwhile a *holder* process keeps a
``put_blob`` in flight forever, so a live engine's temporary files are always in
the layout too. After every kill the test checks that:

- the layout opens and ``index.json`` parses;
- every file under ``blobs/`` is a regular file named by a valid digest whose
  content hashes to that digest (so no partial file ever sits there);
- every root resolves: manifests are present and verified, configs and layers
  present with the size their descriptor says;
- every acknowledged reference change happened, an unacknowledged one happened
  entirely or not at all, and no reference appeared from nowhere;
- the engine's own ``gc()`` removes the dead writer's temporary directory and
  nothing else: not the holder's live temporary file, not another tool's files,
  not a blob.

``OCICAS_LONG=1`` runs ten times the trials; ``OCICAS_CRASH_SEED`` picks the seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

import ocicas

pytestmark = pytest.mark.anyio

LONG = os.environ.get("OCICAS_LONG") == "1"
#: Writers killed per backend (the test runs on asyncio and on trio: twice this in all).
TRIALS = 1000 if LONG else 100
SEED = int(os.environ.get("OCICAS_CRASH_SEED", "20261129"))
#: Range of the random delay between a writer's readiness and its SIGKILL, in microseconds.
KILL_DELAY_US = (2_000, 40_000)
#: Every this many trials the test runs ``ocicas.gc(grace_period=0)`` itself, to keep the layout small.
FULL_GC_EVERY = 20
REPLY_TIMEOUT = 60.0

WORKER = Path(__file__).parent / "workers" / "crash_worker.py"
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Journal:
    """What the writers said they did, replayed into what each reference must (or may) be."""

    path: Path
    offset: int = 0
    #: name -> ("present" | "maybe" | "absent", digest or None)
    state: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    acked: int = 0
    #: The trailing unacknowledged change of the last writer: [(kind, name, digest)].
    pending: list[tuple[str, str, str]] = field(default_factory=list)

    def replay(self) -> None:
        data = self.path.read_bytes()
        complete = data[self.offset :].rpartition(b"\n")[0]
        self.offset += len(complete) + 1 if complete else 0
        self.pending = []
        for line in complete.decode().splitlines():
            kind, name, digest = line.split(" ")
            before = self.state.get(name, ("absent", None))
            if kind == "add?":
                assert before[0] != "present", f"{name} added twice"
                self.state[name] = ("maybe", digest)
                self.pending.append((kind, name, digest))
            elif kind == "add":
                self.state[name] = ("present", digest)
                self.acked += 1
                self.pending = []
            elif kind == "del?":
                self.state[name] = ("maybe", before[1])
                self.pending.append((kind, name, digest))
            elif kind == "del":
                self.state[name] = ("absent", None)
                self.acked += 1
                self.pending = []
            else:
                raise AssertionError(f"journal line {line!r}")

    def check(self, references: dict[str, ocicas.Descriptor]) -> None:
        for name, (status, digest) in self.state.items():
            if status == "present":
                assert name in references, f"acknowledged reference {name} lost"
                assert references[name].digest == digest, name
            elif status == "absent":
                assert name not in references, f"acknowledged deletion of {name} undone"
            elif name in references:
                assert references[name].digest == digest, name
        phantoms = set(references) - set(self.state)
        assert not phantoms, f"references nobody put: {sorted(phantoms)[:5]}"
        # a batch the writer was killed in is all or nothing
        applied = {
            (name in references and references[name].digest == digest) if kind == "add?" else (name not in references)
            for kind, name, digest in self.pending
        }
        assert len(applied) <= 1, f"a batch was applied in part: {self.pending}"


@dataclass
class BlobChecker:
    """Checks every file under ``blobs/``, hashing each version of a file once."""

    layout: Path
    verified: set[tuple[str, int, int, int]] = field(default_factory=set)
    hashed_bytes: int = 0

    def check(self) -> set[str]:
        blobs = self.layout / "blobs"
        assert blobs.is_dir()
        assert not blobs.is_symlink()
        assert {p.name for p in blobs.iterdir()} <= {"sha256", "sha512"}
        present = set()
        with os.scandir(blobs / "sha256") as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                assert entry.is_file(follow_symlinks=False), f"{entry.name} is not a regular file"
                assert _HEX64.fullmatch(entry.name), f"{entry.name} is not a digest: a partial or stray file"
                key = (entry.name, st.st_ino, st.st_size, st.st_mtime_ns)
                if key not in self.verified:
                    digest = hashlib.sha256(Path(entry.path).read_bytes()).hexdigest()
                    assert digest == entry.name, f"blob {entry.name} holds content hashing to {digest}"
                    self.verified.add(key)
                    self.hashed_bytes += st.st_size
                present.add(f"sha256:{entry.name}")
        return present


def temp_dirs(layout: Path) -> dict[str, set[str]]:
    return {
        p.name: {q.name for q in p.iterdir()} for p in layout.iterdir() if p.name.startswith(".ocicas-") and p.is_dir()
    }


def snapshot(layout: Path) -> dict[str, tuple[int, int, int]]:
    """Everything in the layout except ocicas temporary directories, by identity."""
    out = {}
    for path in layout.rglob("*"):
        relative = path.relative_to(layout)
        if relative.parts[0].startswith(".ocicas-"):
            continue
        st = path.lstat()
        out[str(relative)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


class Server:
    """The fork server, spoken to line by line."""

    def __init__(self, process: Process) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self._process = process
        self._lines = BufferedByteReceiveStream(process.stdout)

    async def ask(self, command: str) -> list[str]:
        assert self._process.stdin is not None
        await self._process.stdin.send(command.encode() + b"\n")
        with anyio.fail_after(REPLY_TIMEOUT):
            return (await self._lines.receive_until(b"\n", 4096)).decode().split()


async def test_sigkilled_writers_lose_and_corrupt_nothing(tmp_path: Path, anyio_backend: str) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    foreign = layout / ".umoci-foreign"  # another tool's temporary directory: never ours to remove
    foreign.mkdir()
    (foreign / "partial").write_bytes(b"theirs")
    journal = Journal(tmp_path / "journal")
    journal.path.touch()
    blobs = BlobChecker(layout)
    rng = random.Random(f"{SEED}-{anyio_backend}")
    delays: list[float] = []
    leftover_dirs = leftover_files = 0
    leftover_kinds: dict[str, int] = {}
    started = time.monotonic()

    with open(tmp_path / "server.stderr", "wb") as stderr:
        process = await anyio.open_process(
            [sys.executable, str(WORKER), str(layout), str(journal.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        async with process:
            server = Server(process)
            _, _, holder_dir, holder_file, holder_size = await server.ask(f"live {anyio_backend}")
            holder_path = layout / holder_dir / holder_file
            for trial in range(TRIALS):
                delay = rng.randint(*KILL_DELAY_US)
                reply = await server.ask(f"trial {trial} {anyio_backend} {rng.randrange(2**32)} {delay}")
                assert reply[0] == "killed"
                assert reply[3] != "-1", f"writer never got ready: see {stderr.name}"
                assert reply[4] == "9", f"writer died before its SIGKILL: see {stderr.name}"
                delays.append(int(reply[3]) / 1000)

                # what the dead writer left behind
                before = await anyio.to_thread.run_sync(temp_dirs, layout)  # off the loop: blockbuster is slow
                assert before.pop(holder_dir) == {holder_file}
                leftover_dirs += len(before)
                for names in before.values():
                    leftover_files += len(names)
                    for name in names:
                        kind = name.partition("-")[0]
                        leftover_kinds[kind] = leftover_kinds.get(kind, 0) + 1
                kept = await anyio.to_thread.run_sync(snapshot, layout)

                async with await ocicas.open_layout(layout) as engine:
                    await engine.gc()
                    assert await anyio.to_thread.run_sync(temp_dirs, layout) == {holder_dir: {holder_file}}
                    assert holder_path.stat().st_size == int(holder_size)
                    assert await anyio.to_thread.run_sync(snapshot, layout) == kept  # only temporary dirs went
                    assert (foreign / "partial").read_bytes() == b"theirs"

                    json.loads((layout / "index.json").read_bytes())
                    present = await anyio.to_thread.run_sync(blobs.check)
                    assert set(await engine.list_blobs()) == present
                    roots = await engine.list_roots()
                    graph = await ocicas.walk(engine, roots)  # every manifest present and verified
                    infos = await engine.stat_blobs(graph.digests())
                    missing = graph.digests() - set(infos)
                    assert not missing, f"referenced blobs missing: {sorted(missing)[:3]}"
                    for digest, descriptor in graph.descriptors.items():
                        assert infos[digest].size == descriptor.size
                    references = {name: await engine.get_reference(name) for name in await engine.list_references()}
                    journal.replay()
                    journal.check(references)
                    if trial % FULL_GC_EVERY == FULL_GC_EVERY - 1:
                        await ocicas.gc(engine, grace_period=0)
            assert await server.ask("stop") == ["stopped"]

    # the holder is dead now: its temporary directory is a leftover like any other
    async with await ocicas.open_layout(layout) as engine:
        await engine.gc()
    assert temp_dirs(layout) == {}
    assert (foreign / "partial").read_bytes() == b"theirs"
    print(
        f"\ncrash[{anyio_backend}]: {TRIALS} writers SIGKILLed "
        f"{min(delays):.1f}/{statistics.median(delays):.1f}/{max(delays):.1f} ms (min/median/max) after readiness; "
        f"{journal.acked} acknowledged reference changes checked; "
        f"{leftover_dirs} dead temporary directories ({leftover_files} files: {leftover_kinds}) removed by gc(); "
        f"{len(references)} references and {len(present)} blobs at the end, "
        f"{blobs.hashed_bytes / 2**20:.0f} MiB hashed; {time.monotonic() - started:.1f} s"
    )
