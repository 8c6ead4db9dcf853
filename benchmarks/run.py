"""ocicas benchmarks: medians and ratios against references measured in the same run.

    python benchmarks/run.py [--dir DIR] [--repeat N] [--size-mib N] [--quick] [--json FILE] [CASE ...]

Every case builds its own inputs under a temporary directory inside ``--dir``
(default: the system temp dir, which is on disk here; pass ``--dir /dev/shm`` to
take the disk out of the picture). Absolute times drift on shared machines; the
ratios against the reference measured in the same run are what to compare.

Creating files is slow for minutes after many were deleted nearby on an ext4
without a journal (as on the CI-class VM): each new inode skips, one lookup at a
time, every inode of its block group freed in the last 60 s (360 s while the
inode table is dirty). Tag latency under load measured right after earlier runs
had removed their layouts was twice what it is on a fresh directory. So
``tagload`` runs first and leaves its layouts for the end of the run; run it
alone, or after a few quiet minutes.
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.lowlevel

import ocicas

MiB = 1 << 20
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"


@dataclass
class Row:
    case: str
    ours: float
    unit: str
    reference: float | None = None
    reference_name: str = ""
    goal: str = ""
    met: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return None if not self.reference else self.ours / self.reference


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def timed(func: Callable[[], object]) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def cpu_seconds(who: int) -> float:
    """User + system CPU seconds of this process (all its threads) or of its waited-for children."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_quiet(args: list[str], **kwargs: Any) -> float:
    return timed(lambda: subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs))


def backends() -> list[tuple[str, str, dict[str, Any]]]:
    out: list[tuple[str, str, dict[str, Any]]] = [("asyncio", "asyncio", {})]
    try:
        import uvloop  # noqa: F401

        out.append(("uvloop", "asyncio", {"use_uvloop": True}))
    except ImportError:
        pass
    out.append(("trio", "trio", {}))
    return out


# -- inputs written directly (fast, not durable: these are benchmark inputs) ---------------


def write_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def make_layout(path: Path) -> None:
    anyio.run(ocicas.create_layout, path)


def write_index(layout: Path, entries: list[dict[str, Any]]) -> None:
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
    (layout / "index.json").write_text(json.dumps(index))


def make_gc_layout(path: Path, images: int, garbage: int) -> None:
    """``images`` tagged images (3 layers each, one shared), plus ``garbage`` unreferenced 1 KiB blobs."""
    make_layout(path)
    shared = write_blob(path, b"shared base layer" * 64)
    entries = []
    for n in range(images):
        layers = [shared, write_blob(path, f"image {n} layer 1".encode() * 64), write_blob(path, os.urandom(1024))]
        config = write_blob(
            path,
            json.dumps(
                {
                    "architecture": "amd64",
                    "os": "linux",
                    "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layers]},
                }
            ).encode(),
        )
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": config[0], "size": config[1]},
            "layers": [{"mediaType": LAYER, "digest": d, "size": s} for d, s in layers],
        }
        digest, size = write_blob(path, json.dumps(manifest).encode())
        entries.append(
            {
                "mediaType": MANIFEST,
                "digest": digest,
                "size": size,
                "annotations": {ocicas.ANNOTATION_REF_NAME: f"img{n}"},
            }
        )
    write_index(path, entries)
    for n in range(garbage):
        write_blob(path, n.to_bytes(8, "big") + os.urandom(1016))
    old = time.time() - 86400  # garbage older than any grace period
    for entry in os.scandir(path / "blobs" / "sha256"):
        os.utime(entry.path, (old, old))


# -- cases -------------------------------------------------------------------------------


def openssl_time(path: Path) -> float:
    return run_quiet(["openssl", "dgst", "-sha256", str(path)])


#: What :func:`fresh_chunks` copies: made once, at import, so that no put's time includes making them (16 MiB of
#: ``os.urandom`` takes 50-70 ms here, which the stream case once counted as the put's: 4-6% of it).
_RANDOM_BLOCKS: Final = [os.urandom(MiB) for _ in range(16)]


async def fresh_chunks(size: int) -> AsyncIterator[bytes]:
    """``size`` bytes in fresh 1 MiB ``bytes`` objects, as a socket or a web framework hands them over.

    Each is a copy of one of 16 random blocks: never the same object twice (a source yielding one
    object over and over is cache-resident and flatters a put), and the copy is counted in the put's time.
    """
    blocks = _RANDOM_BLOCKS
    for n in range(size // MiB):
        yield bytes(memoryview(blocks[n % 16]))  # a copy: bytes(b) would be b itself


def durable_floor_time(source: Path, target: Path, block: str = "4M") -> float:
    """The durable floor: ``openssl dgst -sha256`` hashing the file while ``dd bs=BLOCK conv=fsync`` writes it."""
    start = time.perf_counter()
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    digest = subprocess.Popen(["openssl", "dgst", "-sha256", str(source)], **quiet)
    write = subprocess.Popen(["dd", f"if={source}", f"of={target}", f"bs={block}", "conv=fsync"], **quiet)
    if digest.wait() or write.wait():
        raise RuntimeError("openssl or dd failed")
    seconds = time.perf_counter() - start
    target.unlink()
    return seconds


#: dd block sizes the floor is measured with, in this order, the last right before the put it is compared with.
#: The issue's floor writes 4 MiB at a time; the goal is taken against the faster of the two. On this machine (a
#: Firecracker VM whose kernel reports freed memory to the host, ``page_reporting``) the first writer of 1 GiB
#: after a pause pays the host's faults on memory it took back: ``dd`` 2.5-3.4 s whichever block size goes first,
#: the second 0.64-0.68 s (512K) or 1.4-1.6 s (4M). So 512K, run second, is warm, as is the put that follows it
#: (a writer right after a 1 GiB file was deleted reuses its pages before they are reported).
FLOOR_BLOCKS: Final = ("4M", "512K")


#: The puts the stream case times, each after a floor of its own: (row name, open_layout's direct_writes, source).
STREAM_PUTS: Final = (
    ("put_blob stream", False, "stream"),
    ("put_blob async file", False, "file"),
    ("put_blob stream, direct_writes", True, "stream"),
    ("put_blob async file, direct_writes", True, "file"),
)


def case_stream(workdir: Path, repeat: int, size: int) -> list[Row]:
    """put_blob of a stream and of an async file (plain and with direct_writes), and a verified get_blob of what
    each kind of put wrote, against openssl and the durable floor.

    Each put runs right after a floor of its own (both block sizes), in the same memory state: before round 10
    the file put followed the stream put and its deletion, the floor a minute earlier, and it lost by whatever
    the machine's memory did in between (1.58-1.70x one run, 0.9-1.1x the next).
    """
    source = workdir / "source.bin"
    with open(source, "wb") as f:
        block = os.urandom(MiB)
        for _ in range(size // MiB):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())  # flushed now, so its writeback does not compete with the puts measured
    openssl = median([openssl_time(source) for _ in range(repeat)])
    kinds = [kind for kind, _, _ in STREAM_PUTS]
    # floors[kind][bs]: the floors measured right before each put of that kind
    floors: dict[str, dict[str, list[float]]] = {kind: {bs: [] for bs in FLOOR_BLOCKS} for kind in kinds}
    get_kinds = ("get_blob verified", "get_blob verified, of a direct put")

    def floor(kind: str) -> None:
        for bs in FLOOR_BLOCKS:
            floors[kind][bs].append(durable_floor_time(source, workdir / "floor.out", bs))

    rows = []
    for label, backend, options in backends():
        puts: dict[str, list[float]] = {kind: [] for kind in kinds}
        gets: dict[str, list[float]] = {kind: [] for kind in get_kinds}
        for i in range(repeat):
            layout = workdir / f"stream-{label}-{i}"
            make_layout(layout)

            async def one() -> None:
                for kind, direct, what in STREAM_PUTS:
                    async with await ocicas.open_layout(layout, direct_writes=direct) as engine:
                        floor(kind)  # blocking the loop here is fine: nothing else runs on it
                        start = time.perf_counter()
                        if what == "stream":
                            digest, _ = await engine.put_blob(fresh_chunks(size))
                        else:
                            async with await anyio.open_file(source, "rb") as f:
                                digest, _ = await engine.put_blob(f)
                        puts[kind].append(time.perf_counter() - start)
                        if what == "file":  # the get reads what the put before it wrote (cached, or not)
                            start = time.perf_counter()
                            async with await engine.get_blob(digest) as reader:
                                async for _ in reader:
                                    pass
                            gets[get_kinds[direct]].append(time.perf_counter() - start)
                        await engine.delete_blob(digest)

            anyio.run(one, backend=backend, backend_options=options)
            shutil.rmtree(layout)
        mib = size // MiB
        for kind in kinds:
            # the floors measured right before this backend's puts of this kind; the goal is against the faster
            beside = {bs: median(times[-repeat:]) for bs, times in floors[kind].items()}
            reference = min(beside.values())
            ours = median(puts[kind])
            rows.append(
                Row(
                    f"{kind}, {mib} MiB ({label})",
                    ours,
                    "s",
                    reference,
                    "durable floor right before each put: openssl dgst while dd conv=fsync writes "
                    "(the faster of bs=4M, bs=512K)",
                    "≤ 1.15×",
                    ours <= 1.15 * reference,
                    extra={
                        "MB/s": size / ours / 1e6,
                        "× openssl dgst alone": ours / openssl,
                        "floor s bs=4M/512K": "/".join(f"{beside[bs]:.2f}" for bs in FLOOR_BLOCKS),
                        "runs s": ", ".join(f"{t:.2f}" for t in puts[kind]),
                    },
                )
            )
        for kind in get_kinds:
            ours = median(gets[kind])
            rows.append(
                Row(
                    f"{kind}, {mib} MiB ({label})",
                    ours,
                    "s",
                    openssl,
                    "openssl dgst -sha256 (of a cached file)",
                    "≤ 1.25×",
                    ours <= 1.25 * openssl,
                    extra={"MB/s": size / ours / 1e6, "runs s": ", ".join(f"{t:.2f}" for t in gets[kind])},
                )
            )
    for bs in FLOOR_BLOCKS:
        times = [t for kind in kinds for t in floors[kind][bs]]
        rows.append(
            Row(
                f"durable floor bs={bs}, {size // MiB} MiB (all runs)",
                median(times),
                "s",
                openssl,
                "openssl dgst -sha256",
                note=f"openssl dgst and dd bs={bs} conv=fsync at once: the disk and a hash, not ocicas",
            )
        )
    source.unlink()
    return rows


def case_small_blobs(workdir: Path, repeat: int, count: int) -> list[Row]:
    """Many 1 KiB puts with bounded concurrency, against a plain write+fsync+rename loop."""
    payloads = [n.to_bytes(8, "big") + os.urandom(1016) for n in range(count)]

    def plain(target: Path, sync_directory: bool) -> float:
        target.mkdir()
        directory = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        start = time.perf_counter()
        for data in payloads:
            name = hashlib.sha256(data).hexdigest()
            temp = target / f".tmp-{name}"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            os.rename(temp, target / name)
            if sync_directory:  # what makes the rename itself durable, as ocicas does
                os.fsync(directory)
        seconds = time.perf_counter() - start
        os.close(directory)
        shutil.rmtree(target)
        return seconds

    reference = median([plain(workdir / f"plain-{i}", False) for i in range(repeat)])
    durable = median([plain(workdir / f"durable-{i}", True) for i in range(repeat)])
    rows = []
    for label, backend, options in backends():
        samples = []
        for i in range(repeat):
            layout = workdir / f"small-{label}-{i}"
            make_layout(layout)

            async def one() -> None:
                async with await ocicas.open_layout(layout) as engine:
                    limiter = anyio.CapacityLimiter(16)

                    async def put(data: bytes) -> None:
                        async with limiter:
                            await engine.put_blob(data)

                    start = time.perf_counter()
                    async with anyio.create_task_group() as tg:
                        for data in payloads:
                            tg.start_soon(put, data)
                    samples.append(time.perf_counter() - start)

            anyio.run(one, backend=backend, backend_options=options)
            shutil.rmtree(layout)
        ours = median(samples)
        rows.append(
            Row(
                f"put_blob {count} × 1 KiB, 16 at once ({label})",
                ours,
                "s",
                reference,
                "sync write+fsync+rename loop",
                "rate ≥ 1.0×",
                ours <= reference,
                extra={"blobs/s": count / ours, "loop with directory fsync too, s": durable},
            )
        )
    return rows


GC_SCRIPT = textwrap.dedent(
    """
    import sys, anyio, ocicas
    def peak_kib():  # this process's own high-water mark: ru_maxrss would include its parent's RSS at fork
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    async def main(path):
        async with await ocicas.open_layout(path) as engine:
            result = await ocicas.gc(engine)
        print(len(result.removed), peak_kib())  # removed, peak RSS in KiB
    anyio.run(main, sys.argv[1])
    """
)


def compile_ocicas() -> None:
    """Write the package's bytecode, as installing it does: every run of a case then imports, not compiles.

    A child importing it cannot write the .pyc files when PYTHONDONTWRITEBYTECODE is set (it is on the CI
    machine), and then compiles every module, every run: 0.1-0.3 s of a whole-process run.
    """
    compileall.compile_dir(Path(ocicas.__file__).parent, quiet=1)


def child_cpu(func: Callable[[], object], split: list[tuple[float, float]] | None = None) -> tuple[float, float]:
    """Wall seconds of ``func()`` and the CPU seconds (user + system) of the child processes it waited for.

    With ``split``, (user, system) seconds are appended to it.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = timed(func)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    if split is not None:
        split.append((user, system))
    return seconds, user + system


def case_gc(workdir: Path, repeat: int, images: int, garbage: int) -> list[Row]:
    """Whole-process GC against umoci gc, each on a fresh copy of the same layout.

    CPU seconds (user + system) are reported too: on a loaded machine they vary far less than wall time.
    """
    base = workdir / "gc-base"
    make_gc_layout(base, images, garbage)
    compile_ocicas()
    umoci = shutil.which("umoci")
    ours_samples, umoci_samples, ours_cpu, umoci_cpu, ours_rss, umoci_rss = [], [], [], [], [], []
    ours_split: list[tuple[float, float]] = []
    umoci_split: list[tuple[float, float]] = []
    for i in range(repeat):
        copy = workdir / f"gc-ours-{i}"
        shutil.copytree(base, copy)
        os.sync()  # the copy's writeback is not the collector's to pay (nor to race with)
        out: list[subprocess.CompletedProcess[str]] = []
        seconds, cpu = child_cpu(
            lambda: out.append(
                subprocess.run([sys.executable, "-c", GC_SCRIPT, str(copy)], check=True, capture_output=True, text=True)
            ),
            ours_split,
        )
        ours_samples.append(seconds)
        ours_cpu.append(cpu)
        removed, rss = map(int, out[0].stdout.split())
        assert removed == garbage, out[0].stdout
        ours_rss.append(rss / 1024)
        kept = set(os.listdir(copy / "blobs" / "sha256"))
        shutil.rmtree(copy)
        if umoci:
            copy = workdir / f"gc-umoci-{i}"
            shutil.copytree(base, copy)
            os.sync()
            done: list[subprocess.CompletedProcess[str]] = []
            seconds, cpu = child_cpu(
                # under /usr/bin/time (a small parent): its peak RSS, the high-water mark of umoci's own process
                lambda: done.append(
                    subprocess.run(
                        ["/usr/bin/time", "-f", "%M", umoci, "gc", "--layout", str(copy)],
                        check=True,
                        capture_output=True,
                        text=True,
                    )
                ),
                umoci_split,
            )
            umoci_rss.append(int(done[0].stderr.strip().splitlines()[-1]) / 1024)
            umoci_samples.append(seconds)
            umoci_cpu.append(cpu)
            assert set(os.listdir(copy / "blobs" / "sha256")) == kept
            shutil.rmtree(copy)
    shutil.rmtree(base)
    ours = median(ours_samples)
    reference = median(umoci_samples) if umoci_samples else None
    extra: dict[str, Any] = {
        "cpu ms": median(ours_cpu) * 1000,
        "user ms": median([u for u, _ in ours_split]) * 1000,
        "sys ms": median([s for _, s in ours_split]) * 1000,
        "peak RSS MiB": median(ours_rss),
    }
    if umoci_cpu:
        extra["umoci cpu ms"] = median(umoci_cpu) * 1000
        extra["umoci user ms"] = median([u for u, _ in umoci_split]) * 1000
        extra["umoci sys ms"] = median([s for _, s in umoci_split]) * 1000
        extra["umoci peak RSS MiB"] = median(umoci_rss)
        extra["cpu ratio ×100"] = median(ours_cpu) / median(umoci_cpu) * 100
    return [
        Row(
            f"gc: {images} images + {garbage} garbage blobs, whole process",
            ours,
            "s",
            reference,
            "umoci gc" if umoci else "(umoci not installed)",
            "≤ 1.0×",
            None if reference is None else ours <= reference,
            extra=extra,
        )
    ]


def make_big_image(path: Path, size: int, layers: int = 4) -> None:
    """One tagged image of ``layers`` layers adding up to ``size`` bytes."""
    make_layout(path)
    descriptors = []
    for _ in range(layers):
        block = os.urandom(MiB)
        digest = hashlib.sha256()
        target = path / "blobs" / "sha256" / "partial"
        with open(target, "wb") as f:
            for _ in range(size // layers // MiB):
                f.write(block)
                digest.update(block)
        target.rename(path / "blobs" / "sha256" / digest.hexdigest())
        descriptors.append({"mediaType": LAYER, "digest": f"sha256:{digest.hexdigest()}", "size": size // layers})
    config = write_blob(
        path,
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descriptors]},
            }
        ).encode(),
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config[0], "size": config[1]},
        "layers": descriptors,
    }
    manifest_digest, msize = write_blob(path, json.dumps(manifest).encode())
    write_index(
        path,
        [
            {
                "mediaType": MANIFEST,
                "digest": manifest_digest,
                "size": msize,
                "annotations": {ocicas.ANNOTATION_REF_NAME: "v1"},
            }
        ],
    )


def case_copy(workdir: Path, repeat: int, size: int) -> list[Row]:
    """ocicas.copy of a layout's image into a new layout, against skopeo copy oci: → oci:.

    The goal's reference is skopeo with ``--dest-oci-accept-uncompressed-layers``, the like-for-like
    case (bytes copied, not recompressed); skopeo without it (recompressing) is shown as well.
    """
    source = workdir / "copy-src"
    make_big_image(source, size)
    skopeo = shutil.which("skopeo")
    flagged: list[float] = []
    recompressing: list[float] = []
    flagged_cpu: list[float] = []  # user + system seconds: steadier than wall time on a loaded machine
    for i in range(repeat if skopeo else 0):  # interleaved, so drift on a shared machine hits both alike
        for flags, samples in ((["--dest-oci-accept-uncompressed-layers"], flagged), ([], recompressing)):
            target = workdir / f"copy-skopeo-{i}"
            before = cpu_seconds(resource.RUSAGE_CHILDREN)
            samples.append(
                run_quiet([skopeo, "--insecure-policy", "copy", *flags, f"oci:{source}:v1", f"oci:{target}:v1"])  # type: ignore[list-item]
            )
            if flags:
                flagged_cpu.append(cpu_seconds(resource.RUSAGE_CHILDREN) - before)
            shutil.rmtree(target)
    reference = median(flagged) if flagged else None
    old_reference = median(recompressing) if recompressing else None
    rows = []
    for label, backend, options in backends():
        samples = []
        cpu: list[float] = []
        for i in range(repeat):
            target = workdir / f"copy-{label}-{i}"
            make_layout(target)

            async def one(target: Path = target) -> None:
                async with await ocicas.open_layout(source) as src, await ocicas.open_layout(target) as dst:
                    before = cpu_seconds(resource.RUSAGE_SELF)
                    start = time.perf_counter()
                    await ocicas.copy(src, "v1", dst)
                    samples.append(time.perf_counter() - start)
                    cpu.append(cpu_seconds(resource.RUSAGE_SELF) - before)

            anyio.run(one, backend=backend, backend_options=options)
            shutil.rmtree(target)
        ours = median(samples)
        extra: dict[str, Any] = {"MB/s": size / ours / 1e6}
        if flagged_cpu:
            extra["CPU s ours/skopeo"] = f"{median(cpu):.2f}/{median(flagged_cpu):.2f}"
        if old_reference is not None:
            extra["skopeo copy oci: oci: (recompressing) s"] = old_reference
            extra["ratio to it"] = f"{ours / old_reference:.2f}×"
        rows.append(
            Row(
                f"copy a {size // MiB} MiB image, layout to layout ({label})",
                ours,
                "s",
                reference,
                "skopeo copy --dest-oci-accept-uncompressed-layers oci: oci:" if skopeo else "(skopeo not installed)",
                "≤ 0.5×",
                None if reference is None else ours <= 0.5 * reference,
                extra=extra,
            )
        )
    shutil.rmtree(source)
    return rows


def case_gc_scaling(workdir: Path, sizes: list[int]) -> list[Row]:
    """Whole-process GC at growing garbage counts: time per blob and the collector's peak RSS."""
    compile_ocicas()
    rows = []
    for garbage in sizes:
        layout = workdir / f"gc-scale-{garbage}"
        make_gc_layout(layout, 200, garbage)
        os.sync()  # 200,000 fresh files' writeback would otherwise land on the collector's clock
        out: list[subprocess.CompletedProcess[str]] = []
        seconds = timed(
            lambda: out.append(
                subprocess.run(
                    [sys.executable, "-c", GC_SCRIPT, str(layout)], check=True, capture_output=True, text=True
                )
            )
        )
        shutil.rmtree(layout)
        removed, rss = map(int, out[0].stdout.split())
        assert removed == garbage, out[0].stdout
        rows.append(
            Row(
                f"gc scaling: {garbage} garbage blobs",
                seconds,
                "s",
                extra={"µs/blob": seconds / garbage * 1e6, "peak RSS MiB": rss / 1024},
            )
        )
    return rows


def case_tagging(workdir: Path, repeat: int, count: int) -> list[Row]:
    batch_samples, one_samples = [], []
    for i in range(repeat):
        layout = workdir / f"tags-{i}"
        make_layout(layout)

        async def one() -> None:
            async with await ocicas.open_layout(layout) as engine:
                descriptors = {
                    f"tag{n}": ocicas.Descriptor(
                        media_type=MANIFEST,
                        digest=ocicas.Digest("sha256:" + hashlib.sha256(str(n).encode()).hexdigest()),
                        size=n,
                    )
                    for n in range(count + 1)
                }
                last = descriptors.pop(f"tag{count}")
                start = time.perf_counter()
                await engine.update_references(descriptors, partial=True)  # index.json cost only
                batch_samples.append(time.perf_counter() - start)
                start = time.perf_counter()
                await engine.put_reference(f"tag{count}", last, partial=True)
                one_samples.append(time.perf_counter() - start)

        anyio.run(one)
        shutil.rmtree(layout)
    checked_samples, unchecked_samples = [], []
    for i in range(repeat):
        layout = workdir / f"closure-{i}"
        make_layout(layout)

        async def closure() -> None:
            async with await ocicas.open_layout(layout) as engine:
                manifests = [
                    await ocicas.build_image(engine, [b"layer %d" % n], platform=f"linux/arch{n}") for n in range(1_000)
                ]
                index = await ocicas.build_index(engine, manifests)
                start = time.perf_counter()
                await engine.put_reference("unchecked", index, partial=True)
                unchecked_samples.append(time.perf_counter() - start)
                start = time.perf_counter()
                await engine.put_reference("checked", index)  # reads 1,000 manifests, stats 2,000 leaves
                checked_samples.append(time.perf_counter() - start)

        anyio.run(closure)
        shutil.rmtree(layout)
    batch, single = median(batch_samples), median(one_samples)
    checked, unchecked = median(checked_samples), median(unchecked_samples)
    return [
        Row(
            "tag an index of 1,000 manifests, content checked",
            checked,
            "s",
            unchecked,
            "the same tag with partial=True (no check)",
        ),
        Row(
            f"tag {count} references in one batch",
            batch,
            "s",
            0.195,
            "oras-go: 500 manifests in 195 ms",
            "< 0.5 s",
            batch < 0.5,
        ),
        Row(f"one more tag on a {count}-entry index", single, "s", goal="< 20 ms", met=single < 0.020),
    ]


def case_tag_load(workdir: Path, seconds: float, concurrencies: list[int]) -> list[Row]:
    """Builders each storing a small image then tagging it, for ``seconds``: put_reference latency and rate.

    The layouts are left for the end of the whole run (the work directory's removal): removed now, they would
    slow the file creations of the cases after (see the module doc).
    """
    rows = []
    for concurrency in concurrencies:
        layout = workdir / f"tagload-{concurrency}"
        make_layout(layout)
        latencies: list[float] = []
        built = 0

        async def one(concurrency: int = concurrency, layout: Path = layout) -> None:
            nonlocal built
            async with await ocicas.open_layout(layout) as engine:
                deadline = time.perf_counter() + seconds

                async def builder(worker: int) -> None:
                    nonlocal built
                    n = 0
                    while time.perf_counter() < deadline:
                        image = await ocicas.build_image(engine, [f"{worker}/{n}".encode() + os.urandom(512)])
                        built += 1
                        start = time.perf_counter()
                        await engine.put_reference(f"b{worker}-{n}", image)
                        latencies.append(time.perf_counter() - start)
                        n += 1

                async def probe() -> None:  # how long a ready task waits for its turn on the event loop
                    while time.perf_counter() < deadline:
                        start = time.perf_counter()
                        await anyio.lowlevel.cancel_shielded_checkpoint()
                        turns.append(time.perf_counter() - start)
                        await anyio.sleep(0.005)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(probe)
                    for worker in range(concurrency):
                        tg.start_soon(builder, worker)

        turns: list[float] = []
        anyio.run(one)
        latencies.sort()
        turns.sort()
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        with open("/proc/loadavg") as file:
            load = file.read().split()[0]
        rows.append(
            Row(
                f"tag under load: {concurrency} builders (build_image + tag), {seconds:g} s",
                p99 * 1000,
                "ms",
                goal="p99 < 50 ms" if concurrency >= 50 else "",
                met=p99 < 0.050 if concurrency >= 50 else None,
                extra={
                    "p50 ms": latencies[len(latencies) // 2] * 1000,
                    "tags/s": len(latencies) / seconds,
                    "images built": float(built),
                    "loop turn p50 ms": turns[len(turns) // 2] * 1000,
                    "loop turn p99 ms": turns[int(len(turns) * 0.99)] * 1000,
                },
                note=f"ours = put_reference p99; load average {load} after the run",
            )
        )
    return rows


MANY_PUTS_SCRIPT = textwrap.dedent(
    """
    import os, sys, json, time, anyio, ocicas
    def peak_kib():  # this process's own high-water mark: ru_maxrss would include its parent's RSS at fork
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    path, puts, mib, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    if limit:
        ocicas.set_put_budget(limit, limit)  # 1 << 62: no budget, as before it existed
    async def main():
        async with await ocicas.open_layout(path) as engine:
            await engine.put_blob(b"warm-up")
            block = os.urandom(1 << 20)
            baseline = peak_kib()
            async def source(n):
                for k in range(mib):
                    # a fresh object per chunk, as a network stream yields, and none kept between chunks
                    yield n.to_bytes(8, "big") + k.to_bytes(8, "big") + block[16:]
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for n in range(puts):
                    tg.start_soon(engine.put_blob, source(n))
            elapsed = time.perf_counter() - start
            peak = peak_kib()
        print(json.dumps({"over_mib": (peak - baseline) / 1024, "seconds": elapsed}))
    anyio.run(main)
    """
)


def case_many_puts(workdir: Path, puts: int, mib: int) -> list[Row]:
    """Concurrent streamed puts of fresh 1 MiB chunks: peak RSS over baseline and time, by budget."""
    out = {}
    # 0: the default budget (16 MiB); 48 MiB: the budget's first version; no budget: as before it existed
    for label, limit in (("no budget", 1 << 62), ("48 MiB", 48 * MiB), ("default", 0)):
        layout = workdir / f"many-{label.replace(' ', '-')}"
        make_layout(layout)
        run = subprocess.run(
            [sys.executable, "-c", MANY_PUTS_SCRIPT, str(layout), str(puts), str(mib), str(limit)],
            check=True,
            capture_output=True,
            text=True,
        )
        shutil.rmtree(layout)
        out[label] = json.loads(run.stdout)
    ours, before, wider = out["default"], out["no budget"], out["48 MiB"]
    return [
        Row(
            f"{puts} concurrent puts of {mib} × 1 MiB fresh chunks: peak RSS over baseline",
            ours["over_mib"],
            "MiB",
            before["over_mib"],
            "the same without the budget",
            "< 64 MiB",
            ours["over_mib"] < 64,
            extra={"with a 48 MiB budget": wider["over_mib"]},
        ),
        Row(
            f"{puts} concurrent puts of {mib} MiB: time with the default 16 MiB budget",
            ours["seconds"],
            "s",
            wider["seconds"],
            "the same with a 48 MiB budget",
            "≤ 1.1×",
            ours["seconds"] <= 1.1 * wider["seconds"],
            extra={"seconds without budget": before["seconds"]},
        ),
    ]


#: The lag case's same-run reference: a process that only sleeps 1 ms at a time, measuring how late it wakes.
#: It shares the machine (and the CPUs our worker threads keep busy) but has no event loop, GIL sharing or work:
#: what it sees is the scheduler's part of the lag. It ticks until SIGTERM, then prints p50/p99/max in seconds.
REFERENCE_TICKER = textwrap.dedent(
    """
    import json, signal, sys, time
    stop, lags = [], []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    print("ready", flush=True)
    while not stop:
        start = time.perf_counter()
        time.sleep(0.001)
        lags.append(time.perf_counter() - start - 0.001)
    lags.sort()
    pick = lambda q: lags[min(int(len(lags) * q), len(lags) - 1)]
    print(json.dumps({"p50": pick(0.5), "p99": pick(0.99), "max": lags[-1], "ticks": len(lags)}))
    """
)

LAG_SCRIPT = textwrap.dedent(
    """
    import os, sys, time, json, subprocess, threading, traceback, anyio, ocicas
    ocicas.gc, ocicas.Digest  # lazy names: imported here, as an application would at start, not under the ticker
    path, size, backend, get_digest = sys.argv[1], int(sys.argv[2]) << 20, sys.argv[3], sys.argv[4]
    parts = sys.argv[5].split(",")  # which of put, get, gc run (at once); "direct": the layout has direct_writes
    reference_ticker = sys.argv[6]
    # OCICAS_LAG_SAMPLE=MS: a watchdog thread records every thread's stack when the ticker is MS late
    sample_ms = float(os.environ.get("OCICAS_LAG_SAMPLE", "0"))
    last_tick = time.perf_counter()
    samples = []
    def watchdog(stop):
        main = threading.main_thread().ident
        while not stop.is_set():
            time.sleep(0.001)
            late = time.perf_counter() - last_tick
            if late * 1000 < sample_ms or not measuring[0]:  # not while starting up (imports)
                continue
            stacks = {}
            for ident, frame in sys._current_frames().items():
                if ident == threading.get_ident():
                    continue
                summary = traceback.extract_stack(frame)[-4:]
                name = "loop" if ident == main else f"thread-{ident % 10000}"
                stacks[name] = [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in summary]
            samples.append({"late_ms": round(late * 1000, 1), "stacks": stacks})
    # load-independent evidence (CPU time, not wall time): the event loop's longest steps, and the collector's
    # passes, which hold the GIL from start to end in whichever thread allocated
    steps, collections, started, measuring = [], [], {}, [False]
    def step_begin():
        started["step"] = time.thread_time()
    def step_end(name):
        cpu = time.thread_time() - started.pop("step", time.thread_time())
        if cpu > 0.002 and measuring[0]:
            steps.append((round(cpu * 1000, 2), name))
    if backend == "asyncio":
        import asyncio.events
        run_handle = asyncio.events.Handle._run
        def timed_handle(handle):
            step_begin()
            try:
                run_handle(handle)
            finally:
                task = getattr(handle._callback, "__self__", None)
                step_end(task.get_name() if isinstance(task, asyncio.Task) else repr(handle._callback)[:100])
        asyncio.events.Handle._run = timed_handle
        options = {}
    else:
        import trio
        class StepTimer(trio.abc.Instrument):
            def before_task_step(self, task):
                step_begin()
            def after_task_step(self, task):
                step_end(task.name[-100:])
        options = {"instruments": [StepTimer()]}
    def on_collection(phase, info):
        if phase == "start":
            started["gc"] = (time.thread_time(), time.perf_counter())
            return
        cpu, wall = time.thread_time() - started["gc"][0], time.perf_counter() - started["gc"][1]
        if (info["generation"] == 2 or cpu > 0.002) and measuring[0]:
            on_loop = threading.current_thread() is threading.main_thread()
            collections.append({"generation": info["generation"], "cpu_ms": round(cpu * 1000, 2),
                                "wall_ms": round(wall * 1000, 2), "thread": "loop" if on_loop else "worker"})
    import gc
    gc.callbacks.append(on_collection)
    async def main():
        lags = []
        done = False
        spans = {}
        # a thread of this process that only sleeps 1 ms at a time: late by the scheduler *and* the GIL, not by
        # loop steps (between the reference process and the event loop's ticker)
        thread_lags = []
        def thread_ticker():
            while not done:
                start = time.perf_counter()
                time.sleep(0.001)
                thread_lags.append(time.perf_counter() - start - 0.001)
        gil_ticker = threading.Thread(target=thread_ticker, daemon=True)
        async def ticker():
            global last_tick
            measuring[0] = True
            gil_ticker.start()
            while not done:
                start = time.perf_counter()
                await anyio.sleep(0.001)
                last_tick = time.perf_counter()
                lags.append(last_tick - start - 0.001)
            measuring[0] = False
        async def timed(name, func, *args):
            start = time.perf_counter()
            await func(*args)
            spans[name] = time.perf_counter() - start
        block = os.urandom(1 << 20)  # made before the ticker starts: 1 MiB of urandom is ≈ 3 ms of loop time
        async def source():
            for _ in range(size >> 20):
                yield block
        async def get():
            async with await engine.get_blob(ocicas.Digest(get_digest)) as reader:
                async for _ in reader:
                    pass
        async def collect():
            result = await ocicas.gc(engine)
            assert len(result.removed) >= 20_000, len(result.removed)
        async with await ocicas.open_layout(path, direct_writes="direct" in parts) as engine:
            # warm up as a running application would be: the put and read paths' modules are loaded
            warm, _ = await engine.put_blob(b"warm-up")
            async with await engine.get_blob(warm) as reader:
                await reader.read()
            # the same-run reference (see REFERENCE_TICKER), started before the ticker and stopped after it
            reference = subprocess.Popen([sys.executable, "-c", reference_ticker], stdout=subprocess.PIPE, text=True)
            reference.stdout.readline()
            async with anyio.create_task_group() as tg:
                tg.start_soon(ticker)
                async with anyio.create_task_group() as work:
                    if "put" in parts:
                        work.start_soon(timed, "put", engine.put_blob, source(), name="put")
                    if "get" in parts:
                        work.start_soon(timed, "get", get, name="get")
                    if "gc" in parts:
                        work.start_soon(timed, "gc", collect, name="gc")
                done = True
            reference.terminate()
            machine = json.loads(reference.communicate()[0])
        gil_ticker.join()
        pick = lambda lags, q: sorted(lags)[min(int(len(lags) * q), len(lags) - 1)]
        steps.sort(reverse=True)
        print(json.dumps({"p50": pick(lags, 0.5), "p99": pick(lags, 0.99), "max": max(lags), "ticks": len(lags),
                          "spans": spans, "reference": machine,
                          "thread": {"p99": pick(thread_lags, 0.99), "max": max(thread_lags)},
                          "loop_steps": steps[:5], "collections": collections}))
    stop = threading.Event()
    dog = threading.Thread(target=watchdog, args=(stop,), daemon=True)
    if sample_ms:
        dog.start()
    try:
        anyio.run(main, backend=backend, backend_options=options)
    finally:
        stop.set()
    if sample_ms:
        dog.join()
        json.dump(samples, sys.stderr, indent=1)
    """
)


def make_lag_layout(path: Path, size: int) -> str:
    """The gc layout (200 images, 20,000 garbage blobs) plus a tagged image with one ``size``-byte layer: its digest."""
    make_gc_layout(path, 200, 20_000)
    block = os.urandom(MiB)
    digest = hashlib.sha256()
    target = path / "blobs" / "sha256" / "partial"
    with open(target, "wb") as f:
        for n in range(size // MiB):
            chunk = n.to_bytes(8, "big") + block[8:]
            f.write(chunk)
            digest.update(chunk)
    layer = f"sha256:{digest.hexdigest()}"
    target.rename(path / "blobs" / "sha256" / digest.hexdigest())
    config = write_blob(
        path, json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"diff_ids": [layer]}}).encode()
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": LAYER, "digest": layer, "size": size}],
    }
    manifest_digest, msize = write_blob(path, json.dumps(manifest).encode())
    index = json.loads((path / "index.json").read_text())
    index["manifests"].append(
        {
            "mediaType": MANIFEST,
            "digest": manifest_digest,
            "size": msize,
            "annotations": {ocicas.ANNOTATION_REF_NAME: "big"},
        }
    )
    (path / "index.json").write_text(json.dumps(index))
    return layer


RSS_SCRIPT = textwrap.dedent(
    """
    import os, sys, json, anyio, ocicas
    def peak_kib():  # this process's own high-water mark: ru_maxrss would include its parent's RSS at fork
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    size = int(sys.argv[2]) * 1024 * 1024
    async def main(path):
        async with await ocicas.open_layout(path) as engine:
            await engine.put_blob(b"warm-up")
            baseline = peak_kib()
            block = os.urandom(1 << 20)
            async def source():
                for k in range(size >> 20):
                    yield k.to_bytes(8, "big") + block[8:]  # a fresh object per chunk, as a network stream yields
            digest, _ = await engine.put_blob(source())
            async with await engine.get_blob(digest) as reader:
                async for _ in reader:
                    pass
            peak = peak_kib()
        print(json.dumps({"baseline_kib": baseline, "peak_kib": peak}))
    anyio.run(main, sys.argv[1])
    """
)


#: What ``--lag-parts`` may name: each component of the lag case alone, or all three at once (the goal's case),
#: on a plain layout or on one opened with direct_writes.
LAG_PARTS: dict[str, str] = {
    "all": "put,get,gc",
    "direct": "put,get,gc,direct",
    "put": "put",
    "get": "get",
    "gc": "gc",
}


def case_lag_and_rss(workdir: Path, size: int, repeat: int, parts: list[str] | None = None) -> list[Row]:
    """Event-loop lag while a put, a verified get (both ``size`` bytes) and a gc of 20,000 garbage blobs run at once.

    ``parts`` (keys of :data:`LAG_PARTS`, default ``["all"]``) also runs each component alone, to see which one
    makes the lag; only "all" is the goal's case. Every run starts from the same layout, whatever runs in it.
    """
    rows = []
    for part in parts or ["all"]:
        rows += _lag_rows(workdir, size, repeat, part)
    if parts and "all" not in parts:
        return rows
    layout = workdir / "rss"
    make_layout(layout)
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(layout), str(size // MiB)], check=True, capture_output=True, text=True
    )
    shutil.rmtree(layout)
    rss = json.loads(out.stdout)
    over = (rss["peak_kib"] - rss["baseline_kib"]) / 1024
    rows.append(
        Row(f"peak RSS over baseline, {size // MiB} MiB put + read", over, "MiB", goal="< 64 MiB", met=over < 64)
    )
    return rows


def _lag_rows(workdir: Path, size: int, repeat: int, part: str) -> list[Row]:
    """The lag case's rows for one ``part`` (a key of :data:`LAG_PARTS`), per backend."""
    rows = []
    what = {
        "all": "put + get + gc",
        "direct": "put + get + gc, direct_writes",
        "put": "put alone",
        "get": "get alone",
        "gc": "gc alone",
    }[part]
    template = workdir / "lag-template"
    if not template.exists():  # made once: each run gets a hard-linked copy (gc unlinks, puts rename: no file changes)
        (workdir / "lag-digest").write_text(make_lag_layout(template, size))
        os.sync()  # its 1 GiB and 20,000 files are written back now, not during the first runs measured
    digest = (workdir / "lag-digest").read_text()
    for label, backend, _ in backends():
        if label == "uvloop":
            continue
        runs = []
        for _ in range(repeat):
            layout = workdir / f"lag-{label}"
            shutil.copytree(template, layout, copy_function=os.link)
            os.sync()  # the links, and the previous run's deletions and 1 GiB put, are not this run's to flush
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    LAG_SCRIPT,
                    *(str(layout), str(size // MiB), backend, digest, LAG_PARTS[part], REFERENCE_TICKER),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            shutil.rmtree(layout)
            runs.append(json.loads(out.stdout))
        p50, p99, worst = (median([run[key] * 1000 for run in runs]) for key in ("p50", "p99", "max"))
        ref_p99, ref_max = (median([run["reference"][key] * 1000 for run in runs]) for key in ("p99", "max"))
        thread_p99, thread_max = (median([run["thread"][key] * 1000 for run in runs]) for key in ("p99", "max"))
        step = max((tuple(step) for run in runs for step in run["loop_steps"][:1]), default=(0.0, ""))
        full = max(
            ((c["cpu_ms"], c["thread"]) for run in runs for c in run["collections"] if c["generation"] == 2),
            default=(0.0, ""),
        )
        rows.append(
            Row(
                f"event-loop lag p99 during {size // MiB} MiB {what} ({label})",
                p99,
                "ms",
                reference=ref_p99,
                reference_name="p99 of a process that only sleeps 1 ms at a time, run alongside (the scheduler's part)",
                goal="p99 < 5 ms, max < 20 ms" if part in ("all", "direct") else "",
                met=(p99 < 5 and worst < 20) if part in ("all", "direct") else None,
                extra={
                    "p50 ms": p50,
                    "max ms": worst,
                    "p99/max ms per run": " / ".join(f"{r['p99'] * 1000:.1f}/{r['max'] * 1000:.1f}" for r in runs),
                    "reference max ms": ref_max,
                    "plain thread's p99/max ms (scheduler + GIL)": f"{thread_p99:.1f}/{thread_max:.1f}",
                    "ticks": runs[0]["ticks"],
                    "seconds": " ".join(f"{k} {v:.2f}" for k, v in runs[0]["spans"].items()),
                    "longest loop step, CPU ms": f"{step[0]:.1f} ({step[1][:60]})",
                    "longest full collection, CPU ms": f"{full[0]:.1f} (on the {full[1] or '-'} thread)",
                },
            )
        )
    return rows


REGISTRY_COPY_SCRIPT = textwrap.dedent(
    """
    import json, sys, anyio, ocicas
    from ocicas.registry import open_registry
    async def main(mode, url, layout):
        if mode == "pull":
            await ocicas.create_layout(layout)
        async with await open_registry(url, docker_config=False) as registry, await ocicas.open_layout(layout) as lay:
            if mode == "pull":
                result = await ocicas.copy(registry, "v1", lay)
            else:
                result = await ocicas.copy(lay, "v1", registry)
        print(json.dumps({"retries": result.retries, "bytes": result.bytes_copied}))
    anyio.run(main, *sys.argv[1:4], backend=sys.argv[4])
    """
)


def timed_rss(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``args`` under ``/usr/bin/time``: wall seconds, peak RSS in MiB of the process, its stdout."""
    seconds, rss, _, stdout = timed_usage(args, env)
    return seconds, rss, stdout


def process_cpu(pid: int) -> float:
    """CPU seconds (user + sys) a running process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_usage(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float, str]:
    """Run ``args`` under ``/usr/bin/time``: wall seconds, peak RSS in MiB, CPU seconds (user + sys), stdout."""
    out = subprocess.run(["/usr/bin/time", "-f", "%e %M %U %S", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{args[:3]} failed:\n{out.stderr[-2000:]}")
    seconds, kib, user, system = out.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(kib) / 1024, float(user) + float(system), out.stdout


def case_registry(
    workdir: Path, repeat: int, size: int, cut_mib: int, modes: tuple[str, ...] = ("pull", "push")
) -> list[Row]:
    """Pull and push of an image (4 layers) with a real docker-registry, against skopeo; also through a proxy
    that cuts every response after ``cut_mib`` MiB. Time and peak RSS of the whole copying process.

    Every measured run gets a registry of its own, started empty on a new port: skopeo's blob-info cache
    (``/var/lib/containers/cache`` for root, keyed by registry host) would otherwise mount or skip layers
    it saw pushed before, and a push would move no bytes."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from tests.registry_fixtures import start_registry

    binary, skopeo = shutil.which("docker-registry"), shutil.which("skopeo")
    if binary is None:
        return [Row("registry pull/push", 0, "s", note="docker-registry not installed")]
    source = workdir / "registry-src"
    make_big_image(source, size)
    paths = [str(Path(ocicas.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, paths))}
    counter = iter(range(10**6))

    def measured(
        mode: str, cut: bool, run: Callable[[str, str], tuple[float, float, int]], who: str = ""
    ) -> tuple[float, float, int]:
        """``run(url, repository)`` against a fresh registry (the image pushed first for a pull), maybe proxied.

        The CPU seconds the registry and the proxy spent during the run go to ``side[(part, who)]``."""
        directory = workdir / f"registry-{next(counter)}"
        directory.mkdir()
        registry = start_registry(binary, directory)
        proxy = None
        try:
            repo = "bench/img"
            if mode == "pull":  # the image goes up first, directly
                host = registry.url.partition("://")[2]
                run_quiet(
                    [
                        skopeo or "skopeo",
                        "--insecure-policy",
                        "copy",
                        "--dest-tls-verify=false",
                        f"oci:{source}:v1",
                        f"docker://{host}/{repo}:v1",
                    ]
                )
            url = registry.url
            if cut:
                proxy = subprocess.Popen(
                    [sys.executable, str(root / "tests" / "fault_proxy.py"), url, "--cut-after", str(cut_mib * MiB)],
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                )
                assert proxy.stdout is not None
                url = proxy.stdout.readline().strip()
            parts = {"registry": registry.process.pid, **({"proxy": proxy.pid} if proxy is not None else {})}
            before = {part: process_cpu(pid) for part, pid in parts.items()}
            result = run(url, repo)
            for part, pid in parts.items():
                side.setdefault((part, who), []).append(process_cpu(pid) - before[part])
            return result
        finally:
            if proxy is not None:
                proxy.terminate()
                proxy.wait(5)
            registry.stop()
            shutil.rmtree(directory)

    def ours(mode: str, backend: str, url: str, repo: str) -> tuple[float, float, int]:
        layout = workdir / f"ours-{next(counter)}"
        script = [
            sys.executable,
            "-c",
            REGISTRY_COPY_SCRIPT,
            mode,
            f"{url}/{repo}",
            str(layout if mode == "pull" else source),
            backend,
        ]
        try:
            seconds, rss, used, out = timed_usage(script, env)
        finally:
            if mode == "pull":
                shutil.rmtree(layout, ignore_errors=True)
        cpu.setdefault(backend, []).append(used)
        return seconds, rss, json.loads(out)["retries"]

    def reference(mode: str, url: str, repo: str) -> tuple[float, float, int]:
        address = url.partition("://")[2]
        target = workdir / f"skopeo-{next(counter)}"
        if mode == "pull":
            args = ["--src-tls-verify=false", f"docker://{address}/{repo}:v1", f"oci:{target}:v1"]
        else:
            args = ["--dest-tls-verify=false", f"oci:{source}:v1", f"docker://{address}/{repo}:v1"]
        try:
            seconds, rss, used, _ = timed_usage([skopeo or "skopeo", "--insecure-policy", "copy", *args])
        except RuntimeError:
            seconds, rss, used = float("nan"), float("nan"), float("nan")
        cpu.setdefault("skopeo", []).append(used)
        shutil.rmtree(target, ignore_errors=True)
        return seconds, rss, 0

    rows = []
    cpu: dict[str, list[float]] = {}  # CPU seconds (user + sys) of each copying process, by who ran it
    side: dict[tuple[str, str], list[float]] = {}  # CPU seconds of the registry and the proxy, by part and who ran
    try:
        # this run's bytecode cache starts empty: unwarmed, the first measured process would compile every module
        # it imports (the stdlib too: about 2 s of CPU and a few MiB of peak RSS that no later process pays)
        for backend in ("asyncio", "trio"):
            measured("pull", False, lambda u, r, b=backend: ours("pull", b, u, r))  # type: ignore[misc]
        for mode in modes:
            for cut in (False, True):
                cpu.clear()
                side.clear()
                label = f"cut every {cut_mib} MiB" if cut else "direct"
                # skopeo's figure is always the direct one: the goal is to beat its copy without faults
                ref = (
                    [measured(mode, False, lambda u, r: reference(mode, u, r), "skopeo") for _ in range(repeat)]
                    if skopeo
                    else []
                )
                ref_time = median([t for t, _, _ in ref]) if ref else None
                ref_rss = median([r for _, r, _ in ref]) if ref else None
                for backend in ("asyncio", "trio"):
                    samples = [
                        measured(mode, cut, lambda u, r, b=backend: ours(mode, b, u, r), backend)  # type: ignore[misc]
                        for _ in range(repeat)
                    ]
                    seconds = median([t for t, _, _ in samples])
                    rss = max(r for _, r, _ in samples)
                    retries = median([n for _, _, n in samples])
                    ok_time = ref_time is not None and ref_time == ref_time and seconds <= 0.8 * ref_time
                    rows.append(
                        Row(
                            f"registry {mode} {size // MiB} MiB, {label} ({backend})",
                            seconds,
                            "s",
                            ref_time if ref_time == ref_time else None,
                            "skopeo copy, direct" + ("" if ref_time == ref_time else " (failed)"),
                            "≤ 0.8× skopeo, < 64 MiB",
                            ok_time and rss < 64,
                            extra={
                                "peak RSS MiB": rss,
                                "skopeo RSS MiB": ref_rss,
                                "retries": retries,
                                "CPU s ours/skopeo": f"{median(cpu[backend]):.2f}/{median(cpu.get('skopeo', [0])):.2f}",
                                "CPU s registry (ours/skopeo's runs)": "/".join(
                                    f"{median(side.get(('registry', w), [0])):.2f}" for w in (backend, "skopeo")
                                ),
                                "CPU s proxy": f"{median(side.get(('proxy', backend), [0])):.2f}",
                                "load": Path("/proc/loadavg").read_text().split()[0],
                            },
                        )
                    )
    finally:
        shutil.rmtree(source)
    return rows


# -- driver ------------------------------------------------------------------------------


IMPORT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    start = time.perf_counter()
    module = __import__(sys.argv[1])
    for name in sys.argv[2:]:
        getattr(module, name)
    elapsed = time.perf_counter() - start
    print(elapsed, len(sys.modules))
    """
)


def import_times(repeat: int, commands: dict[str, list[str]]) -> dict[str, tuple[float, float, int]]:
    """Per command (module, then attributes to touch): median in-process seconds, median process seconds, modules."""
    # the subprocesses import the ocicas this script imported, wherever it lives
    paths = [str(Path(ocicas.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, paths))}
    samples: dict[str, list[float]] = {key: [] for key in commands}
    process: dict[str, list[float]] = {key: [] for key in commands}
    modules: dict[str, int] = {}
    for _ in range(repeat):  # interleaved, so drift on a shared machine hits all alike
        for key, args in commands.items():
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", IMPORT_SCRIPT, *args], check=True, capture_output=True, text=True, env=env
            )
            process[key].append(time.perf_counter() - start)
            elapsed, count = out.stdout.split()
            samples[key].append(float(elapsed))
            modules[key] = int(count)
    return {key: (median(samples[key]), median(process[key]), modules[key]) for key in commands}


def case_import(repeat: int) -> list[Row]:
    """``import ocicas`` against ``import anyio``, each in a fresh interpreter; and the same with the core in use."""
    used = ["open_layout", "MemoryEngine", "gc", "copy", "walk", "build_image", "from_descriptor", "Descriptor"]
    times = import_times(
        repeat,
        {
            "ocicas": ["ocicas"],
            "anyio": ["anyio"],
            "ocicas used": ["ocicas", *used],
            "anyio used": ["anyio", "run", "to_thread", "Lock", "create_task_group"],
            "registry": ["ocicas", "open_registry"],
        },
    )

    anyio_core = "import anyio + anyio.run, to_thread, Lock, create_task_group (loads anyio's core)"

    def row(case: str, ours: str, reference: str, reference_name: str, goal: str = "", note: str = "") -> Row:
        return Row(
            case,
            times[ours][0],
            "s",
            times[reference][0],
            reference_name,
            goal,
            times[ours][0] <= 1.5 * times[reference][0] if goal else None,
            extra={
                "modules ours/reference": f"{times[ours][2]}/{times[reference][2]}",
                "whole process ours/reference s": f"{times[ours][1]:.3f}/{times[reference][1]:.3f}",
            },
            note=note,
        )

    return [
        row("import ocicas, in a fresh interpreter", "ocicas", "anyio", "import anyio", "≤ 1.5×"),
        row("import ocicas + first use of the core", "ocicas used", "anyio used", anyio_core, note=", ".join(used)),
        row("import ocicas + open_registry (loads httpx)", "registry", "anyio used", anyio_core),
    ]


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import version

    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), "
        f"Python {platform.python_version()}, anyio {version('anyio')}, trio {version('trio')}"
    )


def show(rows: list[Row]) -> None:
    print(f"{'case':<62} {'ours':>10} {'reference':>10} {'ratio':>7}  {'goal':<24} met")
    for row in rows:
        reference = "" if row.reference is None else f"{row.reference:.3f}"
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}×"
        met = "" if row.met is None else ("yes" if row.met else "NO")
        print(f"{row.case:<62} {row.ours:>8.3f}{row.unit:<2} {reference:>10} {ratio:>7}  {row.goal:<24} {met}")
        details = ", ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.extra.items())
        for text in filter(None, [row.reference_name and f"reference: {row.reference_name}", details, row.note]):
            print(f"    {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "cases",
        nargs="*",
        default=["stream", "small", "gc", "copy", "tagging", "tagload", "memory", "lag", "scaling", "import"],
    )
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="small inputs: a smoke run, not a measurement")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument(
        "--registry-modes", default="pull,push", help="the registry case's directions, comma-separated (pull, push)"
    )
    parser.add_argument(
        "--lag-parts",
        default="all",
        help="the lag case's runs, comma-separated: all (put + get + gc at once, the goal), direct (the same with "
        "direct_writes), put, get, gc (each alone)",
    )
    args = parser.parse_args()
    if unknown := set(args.lag_parts.split(",")) - LAG_PARTS.keys():
        parser.error(f"--lag-parts: unknown {sorted(unknown)}; choose from {sorted(LAG_PARTS)}")
    if unknown := set(args.registry_modes.split(",")) - {"pull", "push"}:
        parser.error(f"--registry-modes: unknown {sorted(unknown)}; choose from pull, push")
    size = (64 if args.quick else args.size_mib) * MiB
    print(machine())
    print(f"work dir: {args.dir}; repeats: {args.repeat}; medians shown\n")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="ocicas-bench-") as tmp:
        workdir = Path(tmp)
        # subprocesses run from compiled bytecode, kept out of the source tree
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
        if "tagload" in args.cases:  # first: before the other cases delete thousands of files (see the module doc)
            rows += case_tag_load(workdir, 2.0 if args.quick else 6.0, [1, 10, 50])
        if "stream" in args.cases:
            rows += case_stream(workdir, args.repeat, size)
        if "small" in args.cases:
            rows += case_small_blobs(workdir, args.repeat, 2_000 if args.quick else 20_000)
        if "gc" in args.cases:
            rows += case_gc(workdir, args.repeat, 20 if args.quick else 200, 2_000 if args.quick else 20_000)
        if "copy" in args.cases:
            rows += case_copy(workdir, args.repeat, size)
        if "tagging" in args.cases:
            rows += case_tagging(workdir, args.repeat, 1_000 if args.quick else 10_000)
        if "memory" in args.cases:
            rows += case_many_puts(workdir, 100, 8 if args.quick else 50)
        if "lag" in args.cases:
            rows += case_lag_and_rss(workdir, size, args.repeat, args.lag_parts.split(","))
        if "scaling" in args.cases:
            rows += case_gc_scaling(workdir, [200, 2_000] if args.quick else [2_000, 20_000, 200_000])
        if "registry" in args.cases:
            modes = tuple(mode for mode in ("pull", "push") if mode in args.registry_modes.split(","))  # in this order
            rows += case_registry(workdir, args.repeat, size, 4 if args.quick else 20, modes)
        if "import" in args.cases:
            rows += case_import(10 if args.quick else max(args.repeat, 30))
    show(rows)
    if args.json:
        Path(args.json).write_text(json.dumps([row.__dict__ | {"ratio": row.ratio} for row in rows], indent=2))


if __name__ == "__main__":
    main()
