"""The ``ocicas`` command, driven as users drive it: a subprocess on real layouts.

A few tests also run it in-process (``ocicas.cli.invoke``), where the blockbuster
fixture fails any blocking call the command makes on the event loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import ocicas
import ocicas.cli
from ocicas import Descriptor, Digest, Engine, Platform
from ocicas.cli._params import human_size
from tests.images import CONFIG, LAYER, MANIFEST, put, put_artifact, put_image, put_index, put_json
from tests.registry_fixtures import Registry, start_registry
from tests.tools import require

OCICAS = [sys.executable, "-m", "ocicas"]
AMD64 = Platform(os="linux", architecture="amd64")
ARM64 = Platform(os="linux", architecture="arm64")


def ocicas_run(
    *args: str | Path,
    code: int = 0,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    report: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    """Run the command; check its exit status, and that an error is one line without a traceback.

    ``report``: the command reports its findings on stdout, not as an error.
    """
    full_env = {**os.environ, "OCICAS_PROGRESS": "never", **(env or {})}
    full_env.pop("OCICAS_DEBUG", None)
    done = subprocess.run([*OCICAS, *map(str, args)], input=input, capture_output=True, env=full_env, timeout=60)
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    if code not in (0, 2) and "--debug" not in args and not report:
        assert done.stderr.decode().count("\n") == 1, done.stderr
        assert done.stderr.startswith(b"ocicas: error: "), done.stderr
    return done


def out(*args: str | Path, **kwargs: Any) -> str:
    return ocicas_run(*args, **kwargs).stdout.decode()


def with_layout(path: Path, build: Callable[[Engine], Coroutine[Any, Any, Any]]) -> Any:
    """Create a layout at ``path`` and fill it with ``build(engine)`` (library calls)."""

    async def main() -> Any:
        await ocicas.create_layout(path)
        async with await ocicas.open_layout(path) as engine:
            return await build(engine)

    return anyio.run(main)


class Images:
    """An index of two platforms (v1), a manifest (solo), a signature of amd64, and garbage."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def build(self) -> Images:
        engine = self.engine
        self.amd64, self.amd64_blobs = await put_image(engine, [b"base", b"amd64 app"], platform=AMD64)
        self.arm64, self.arm64_blobs = await put_image(engine, [b"base", b"arm64 app"], platform=ARM64)
        self.index = await put_index(engine, [self.amd64, self.arm64])
        self.solo, self.solo_blobs = await put_image(engine, [b"solo layer"])
        await engine.update_references({"v1": self.index, "solo": self.solo})
        self.signature, self.signature_blobs = await put_artifact(engine, self.amd64, b"signature")
        self.garbage = await put(engine, b"garbage", "application/octet-stream")
        self.live = {self.index.digest, *self.amd64_blobs, *self.arm64_blobs, *self.solo_blobs}
        return self


def build_images(path: Path) -> Images:
    return with_layout(path, lambda engine: Images(engine).build())  # type: ignore[no-any-return]


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def blob_files(layout: Path) -> set[str]:
    return {f"sha256:{p.name}" for p in (layout / "blobs" / "sha256").iterdir()}


def temp_dirs(layout: Path) -> list[Path]:
    return [p for p in layout.iterdir() if p.name.startswith(".ocicas-")] if layout.exists() else []


def age(layout: Path, seconds: float = 7200) -> None:
    when = time.time() - seconds
    for path in (layout / "blobs" / "sha256").iterdir():
        os.utime(path, (when, when))


def all_verify(layout: Path) -> None:
    for path in (layout / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name


# -- help and conventions ------------------------------------------------------------------

COMMANDS = ["init", "put", "cat", "blobs", "rm", "image", "tag", "untag", "refs", "tree", "gc", "fsck", "copy"]


def test_help_documents_every_command_and_the_exit_statuses() -> None:
    text = out("--help")
    for command in COMMANDS:
        assert f"  {command} " in text
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "5 ", "130"):
        assert f"  {code}" in text
    for command in COMMANDS:
        assert "Example" in out(command, "--help"), command


def test_the_installed_script_and_the_version() -> None:
    script = Path(sys.executable).parent / "ocicas"
    assert script.exists()
    done = subprocess.run([script, "--version"], capture_output=True, check=True)
    assert done.stdout.decode() == f"ocicas, version {ocicas.__version__}\n"


def test_usage_errors_name_the_value(tmp_path: Path) -> None:
    for args, value in [
        (("cat", tmp_path, "sha256:1234"), "sha256:1234"),
        (("tag", tmp_path, "not a name", "0" * 64), "not a name"),
        (("copy", "s3://bucket/x:1", tmp_path), "s3://bucket/x:1"),
        (("copy", f"{tmp_path}:bad name", tmp_path), "bad name"),
        (("gc", "--grace", "soon", tmp_path), "soon"),
        (("copy", "--platform", "linux", f"{tmp_path}:a", tmp_path), "linux"),
    ]:
        done = ocicas_run(*args, code=2)
        assert value in done.stderr.decode(), done.stderr
    assert b"--single needs" in ocicas_run("copy", "--single", f"{tmp_path}:a", tmp_path, code=2).stderr
    assert b"no such option" in ocicas_run("blobs", "--frobnicate", tmp_path, code=2).stderr.lower()


def test_a_traceback_only_with_debug(tmp_path: Path) -> None:
    assert b"Traceback" not in ocicas_run("blobs", tmp_path / "none", code=3).stderr
    debug = ocicas_run("--debug", "blobs", tmp_path / "none", code=3).stderr.decode()
    assert "Traceback" in debug
    assert debug.rstrip().endswith(f"ocicas: error: no layout at {str(tmp_path / 'none')!r}: path does not exist")


# -- blobs ----------------------------------------------------------------------------------


def test_init_put_blobs_cat(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    assert out("init", layout) == ""
    file = tmp_path / "file"
    file.write_bytes(b"hello\n")
    hello = Digest.from_bytes(b"hello\n")
    other = Digest.from_bytes(b"from stdin")
    assert out("put", layout, file) == f"{hello}\n"
    assert out("put", layout, input=b"from stdin") == f"{other}\n"
    assert out("put", layout, "-", input=b"from stdin") == f"{other}\n"
    assert json.loads(out("put", "--json", layout, file)) == {"digest": hello, "size": 6}
    assert out("blobs", layout) == "".join(f"{d}\n" for d in sorted([hello, other]))
    assert out("blobs", "-l", layout) == "".join(f"{d}  {n}\n" for d, n in sorted([(hello, 6), (other, 10)]))
    assert json.loads(out("blobs", "--json", layout)) == [
        {"digest": d, "size": n} for d, n in sorted([(hello, 6), (other, 10)])
    ]
    assert ocicas_run("cat", layout, hello).stdout == b"hello\n"
    assert ocicas_run("cat", layout, hello.removeprefix("sha256:")).stdout == b"hello\n"  # bare hex
    assert temp_dirs(layout) == []


def test_put_with_an_expected_digest_refuses_other_content(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    ocicas_run("init", layout)
    wrong = "sha256:" + "0" * 64
    done = ocicas_run("put", layout, "--digest", wrong, input=b"content", code=4)
    assert wrong in done.stderr.decode()
    assert blob_files(layout) == set()
    assert temp_dirs(layout) == []


def test_errors_and_their_exit_statuses(tmp_path: Path) -> None:
    images = build_images(tmp_path / "layout")
    layout = tmp_path / "layout"
    absent = "sha256:" + "1" * 64
    ocicas_run("init", layout, code=5)
    ocicas_run("blobs", tmp_path / "nowhere", code=3)
    ocicas_run("cat", layout, absent, code=3)
    ocicas_run("put", layout, tmp_path / "no-such-file", code=3)
    ocicas_run("tree", f"{layout}:nope", code=3)
    (tmp_path / "not-a-layout").mkdir()
    ocicas_run("refs", tmp_path / "not-a-layout", code=4)
    # a flipped bit: the verified stream stops before the end, and the status says so
    path = blob_path(layout, images.solo_blobs[2])
    path.write_bytes(b"solo layeR")
    done = ocicas_run("cat", layout, images.solo_blobs[2], code=4)
    assert done.stdout == b""
    assert images.solo_blobs[2] in done.stderr.decode()


def test_rm_refuses_blobs_in_use_and_absent_ones_unless_forced(tmp_path: Path) -> None:
    images = build_images(tmp_path / "layout")
    layout = tmp_path / "layout"
    layer = images.solo_blobs[2]
    done = ocicas_run("rm", layout, layer, code=5)
    assert "reference 'solo'" in done.stderr.decode()
    assert layer in blob_files(layout)
    assert json.loads(out("rm", "--json", layout, images.garbage.digest)) == {
        "removed": [images.garbage.digest],
        "removed_count": 1,
    }
    ocicas_run("rm", layout, images.garbage.digest, code=3)
    ocicas_run("rm", "-f", layout, images.garbage.digest, layer)
    assert layer not in blob_files(layout)


# -- references ------------------------------------------------------------------------------


def test_tag_refs_untag(tmp_path: Path) -> None:
    images = build_images(tmp_path / "layout")
    layout = tmp_path / "layout"
    index, solo = images.index, images.solo
    assert out("refs", layout) == (
        f"solo  application/vnd.oci.image.manifest.v1+json  {solo.digest}  {solo.size}\n"
        f"v1    application/vnd.oci.image.index.v1+json     {index.digest}  {index.size}\n"
    )
    assert out("tag", layout, "v1.0", index.digest) == ""  # media type read from the index itself
    assert json.loads(out("tag", "--json", layout, "sig", images.signature.digest)) == {
        "name": "sig",
        "mediaType": MANIFEST,
        "digest": images.signature.digest,
        "size": images.signature.size,
    }
    listed = json.loads(out("refs", "--json", layout))
    assert [(r["name"], r["digest"], r["size"]) for r in listed] == [
        ("sig", images.signature.digest, images.signature.size),
        ("solo", solo.digest, solo.size),
        ("v1", index.digest, index.size),
        ("v1.0", index.digest, index.size),
    ]
    # a layer says nothing about its media type: it must be given
    layer = images.solo_blobs[2]
    assert "--media-type" in ocicas_run("tag", layout, "layer", layer, code=2).stderr.decode()
    ocicas_run("tag", layout, "layer", layer, "--media-type", LAYER)
    # a blob that is not what the media type says is refused
    ocicas_run("tag", layout, "bogus", layer, "--media-type", MANIFEST, code=4)
    # moving a name needs --force
    assert "--force" in ocicas_run("tag", layout, "v1", solo.digest, code=5).stderr.decode()
    ocicas_run("tag", "--force", layout, "v1", solo.digest)
    assert json.loads(out("refs", "--json", layout))[-2]["digest"] == solo.digest
    ocicas_run("untag", layout, "v1.0")
    ocicas_run("untag", layout, "v1.0", code=3)
    ocicas_run("untag", "-f", layout, "v1.0")
    assert [r["name"] for r in json.loads(out("refs", "--json", layout))] == ["layer", "sig", "solo", "v1"]


def _line(indent: str, descriptor: Descriptor, extra: str = "") -> str:
    size = human_size(descriptor.size)
    platform = f" {descriptor.platform}" if descriptor.platform else ""
    return f"{indent}{descriptor.media_type} {descriptor.digest} {size}{platform}{extra}"


def test_tree_shows_every_node_with_media_types_sizes_and_platforms(tmp_path: Path) -> None:
    images = build_images(tmp_path / "layout")
    layout = tmp_path / "layout"

    async def manifest(digest: str) -> ocicas.Manifest:
        async with await ocicas.open_layout(layout) as engine:
            return ocicas.Manifest.from_json(await engine.read_blob(digest))

    amd64 = anyio.run(manifest, images.amd64.digest)
    arm64 = anyio.run(manifest, images.arm64.digest)
    expected = [
        f"v1: {_line('', images.index)}",
        _line("├── ", images.amd64),
        _line("│   ├── ", amd64.config),
        _line("│   ├── ", amd64.layers[0]),
        _line("│   └── ", amd64.layers[1]),
        _line("└── ", images.arm64),
        _line("    ├── ", arm64.config),
        _line("    ├── ", arm64.layers[0]),
        _line("    └── ", arm64.layers[1], " (missing)"),
    ]
    blob_path(layout, arm64.layers[1].digest).unlink()
    # what it marks missing or invalid makes the status 4, the tree still shown in full
    assert out("tree", f"{layout}:v1", code=4, report=True).splitlines() == expected
    everything = out("tree", layout, code=4, report=True).split("\n\n")
    assert [block.split(":")[0] for block in everything] == ["solo", "v1"]
    assert out("tree", f"{layout}:solo").startswith("solo: ")  # whole: status 0
    tree = json.loads(out("tree", "--json", f"{layout}:v1", code=4, report=True))
    [(reference, root)] = [(t["reference"], t["root"]) for t in tree]
    assert (reference, root["digest"]) == ("v1", images.index.digest)
    assert [c["platform"] for c in root["children"]] == [AMD64.to_dict(), ARM64.to_dict()]
    assert root["children"][1]["children"][2]["state"] == "missing"


# -- gc and fsck ----------------------------------------------------------------------------------


def test_gc_dry_run_then_gc(tmp_path: Path) -> None:
    images = build_images(tmp_path / "layout")
    layout = tmp_path / "layout"
    ocicas_run("untag", layout, "solo")
    garbage = sorted({images.garbage.digest, *images.solo_blobs})
    garbage_bytes = sum(blob_path(layout, d).stat().st_size for d in garbage)
    before = blob_files(layout)
    # everything is young: the default grace period keeps it (the signature's blobs too)
    young = out("gc", "--dry-run", layout)
    unreachable = len(garbage) + len(images.signature_blobs)
    assert young == f"would remove 0 blobs, 0 B; kept {unreachable} unreachable blobs younger than 1h\n"
    age(layout)
    dry = out("gc", "--dry-run", layout)
    assert dry.splitlines() == [*garbage, f"would remove {len(garbage)} blobs, {human_size(garbage_bytes)}"]
    assert blob_files(layout) == before
    report = json.loads(out("gc", "--json", layout))
    assert (report["removed"], report["bytes_freed"], report["dry_run"]) == (garbage, garbage_bytes, False)
    assert report["referrers"] == [images.signature.digest]  # a signature of live content is kept
    assert blob_files(layout) == before - set(garbage)
    assert out("gc", "--grace", "0", "--no-referrers", layout).splitlines()[-1].startswith("removed 3 blobs")
    assert blob_files(layout) == images.live - set(images.solo_blobs)


def test_gc_stops_at_a_missing_manifest_unless_told(tmp_path: Path) -> None:
    images = build_images(tmp_path / "layout")
    layout = tmp_path / "layout"
    blob_path(layout, images.arm64.digest).unlink()
    age(layout)
    done = ocicas_run("gc", layout, code=3)
    assert images.arm64.digest in done.stderr.decode()
    assert "--broken-ok" in done.stderr.decode()
    assert images.garbage.digest in out("gc", "--broken-ok", layout)


def test_fsck_finds_a_flipped_bit_a_missing_blob_and_a_dangling_reference(tmp_path: Path) -> None:
    images = build_images(tmp_path / "layout")
    layout = tmp_path / "layout"
    files = list((layout / "blobs" / "sha256").iterdir())
    total = human_size(sum(p.stat().st_size for p in files))
    assert out("fsck", layout) == f"checked {len(files)} blobs ({total}) and 2 roots: no problems\n"

    flipped = images.amd64_blobs[3]  # the amd64 app layer
    data = bytearray(blob_path(layout, flipped).read_bytes())
    data[0] ^= 0x01
    blob_path(layout, flipped).write_bytes(bytes(data))
    missing = images.solo_blobs[1]  # the solo image's config
    blob_path(layout, missing).unlink()
    dangling = Descriptor(media_type=MANIFEST, digest=Digest.from_bytes(b"never stored"), size=12)

    async def tag_dangling(engine: Engine) -> None:
        await engine.put_reference("dangling", dangling, partial=True)  # as a careless tool would

    async def main() -> None:
        async with await ocicas.open_layout(layout) as engine:
            await tag_dangling(engine)

    anyio.run(main)
    done = ocicas_run("fsck", layout, code=4, report=True)
    lines = done.stdout.decode().splitlines()
    assert lines[-1].endswith(": 3 problems")
    assert sorted(line.split(":")[0] for line in lines[:-1]) == ["corrupt", "dangling", "missing"]
    assert any(flipped in line for line in lines if line.startswith("corrupt"))
    assert any(missing in line and "'solo'" in line for line in lines if line.startswith("missing"))
    assert any("'dangling'" in line for line in lines if line.startswith("dangling"))
    report = json.loads(ocicas_run("fsck", "--json", layout, code=4, report=True).stdout)
    assert not report["ok"]
    assert {(p["kind"], p["subject"]) for p in report["problems"]} == {
        ("corrupt", flipped),
        ("missing", missing),
        ("dangling", "reference 'dangling'"),
    }


# -- copy ----------------------------------------------------------------------------------------


def test_copy_between_layouts_preserves_every_digest(tmp_path: Path) -> None:
    images = build_images(tmp_path / "src")
    src, dst = tmp_path / "src", tmp_path / "dst"
    summary = out("copy", src, dst)  # every reference; the destination is created
    assert blob_files(dst) == images.live
    assert out("refs", dst) == out("refs", src)
    assert [line.split(" (")[0] for line in summary.splitlines()] == [
        f"{dst}:solo {images.solo.digest}: copied 3 blobs",
        f"{dst}:v1 {images.index.digest}: copied 8 blobs",
    ]
    all_verify(dst)
    assert temp_dirs(dst) == []

    again = json.loads(out("copy", "--json", f"{src}:v1", f"oci:{dst}:v1-again"))
    assert [(r["reference"], r["copied"], len(r["skipped"])) for r in again] == [("v1-again", [], 8)]

    signed = json.loads(out("copy", "--json", "--referrers", f"{src}:v1", dst))
    assert signed[0]["referrers"] == [images.signature.digest]
    assert set(signed[0]["copied"]) == set(images.signature_blobs)
    assert out("fsck", dst).endswith("no problems\n")


def test_copy_one_platform(tmp_path: Path) -> None:
    images = build_images(tmp_path / "src")
    src = tmp_path / "src"
    partial = json.loads(out("copy", "--json", "--platform", "linux/arm64", f"{src}:v1", tmp_path / "partial"))
    assert partial[0]["excluded"] == [images.amd64.digest]
    assert blob_files(tmp_path / "partial") == {images.index.digest, *images.arm64_blobs}
    assert json.loads(out("refs", "--json", tmp_path / "partial"))[0]["digest"] == images.index.digest

    out("copy", "--platform", "linux/arm64", "--single", f"{src}:v1", f"{tmp_path / 'single'}:arm64")
    assert blob_files(tmp_path / "single") == set(images.arm64_blobs)
    assert json.loads(out("refs", "--json", tmp_path / "single"))[0]["digest"] == images.arm64.digest
    ocicas_run("copy", "--platform", "linux/s390x", "--single", f"{src}:v1", tmp_path / "none", code=3)


def test_copy_refuses_to_move_a_reference_with_no_clobber(tmp_path: Path) -> None:
    build_images(tmp_path / "src")
    src, dst = tmp_path / "src", tmp_path / "dst"
    out("copy", f"{src}:solo", f"{dst}:v1")
    ocicas_run("copy", "--no-clobber", f"{src}:v1", dst, code=5)
    out("copy", f"{src}:v1", dst)
    assert json.loads(out("refs", "--json", dst))[0]["digest"] == json.loads(out("refs", "--json", src))[1]["digest"]
    ocicas_run("copy", f"{src}", f"{dst}:x", code=2)


def test_copy_on_trio(tmp_path: Path) -> None:
    images = build_images(tmp_path / "src")
    out("copy", f"{tmp_path / 'src'}:v1", tmp_path / "dst", env={"OCICAS_BACKEND": "trio"})
    assert blob_files(tmp_path / "dst") == {images.index.digest, *images.amd64_blobs, *images.arm64_blobs}
    assert out("--backend", "trio", "fsck", tmp_path / "dst").endswith("no problems\n")


def test_progress_goes_to_stderr_and_stdout_stays_exact(tmp_path: Path) -> None:
    build_images(tmp_path / "src")
    file = tmp_path / "big"
    file.write_bytes(bytes(3 << 20))
    digest = f"sha256:{hashlib.sha256(bytes(3 << 20)).hexdigest()}"
    done = ocicas_run("--progress", "always", "put", tmp_path / "src", file)
    assert done.stdout == f"{digest}\n".encode()
    assert done.stderr  # drawn (and erased) on stderr
    copied = ocicas_run("--progress", "always", "copy", "--json", f"{tmp_path / 'src'}:v1", tmp_path / "dst")
    assert json.loads(copied.stdout)[0]["reference"] == "v1"
    assert copied.stderr
    assert ocicas_run("--progress", "always", "fsck", tmp_path / "dst").stdout.endswith(b"no problems\n")


# -- interruption ----------------------------------------------------------------------------------


def _wait_for_temp_blob(layout: Path, process: subprocess.Popen[bytes], minimum: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        for directory in temp_dirs(layout):
            try:
                if any(p.name.startswith("blob-") and p.stat().st_size >= minimum for p in directory.iterdir()):
                    return
            except FileNotFoundError:
                pass
        time.sleep(0.001)
    raise AssertionError("the blob never started landing")


@pytest.mark.parametrize(
    ("backend", "signals", "status"),
    [
        ("asyncio", [signal.SIGINT], 130),
        ("asyncio", [signal.SIGTERM], 143),
        ("trio", [signal.SIGINT, signal.SIGINT], 130),  # Ctrl-C twice
        ("trio", [signal.SIGTERM], 143),
    ],
)
def test_an_interrupted_put_from_stdin_leaves_nothing(
    tmp_path: Path, backend: str, signals: list[int], status: int
) -> None:
    layout = tmp_path / "layout"
    ocicas_run("init", layout)
    env = {**os.environ, "OCICAS_PROGRESS": "never", "OCICAS_BACKEND": backend}
    with subprocess.Popen(
        [*OCICAS, "put", str(layout)], stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    ) as process:
        assert process.stdin is not None
        assert process.stderr is not None
        try:
            for _ in range(3):
                process.stdin.write(bytes(4 << 20))
                process.stdin.flush()
            _wait_for_temp_blob(layout, process, 1)
            for signum in signals:
                process.send_signal(signum)
            # stdin stays open and silent: the command must not wait for it
            assert process.wait(timeout=30) == status
            stderr = process.stderr.read()
        finally:
            process.kill()
    assert stderr.decode() == f"ocicas: error: {'interrupted' if status == 130 else 'terminated'}\n"
    assert blob_files(layout) == set()
    assert temp_dirs(layout) == []


def _big_image(engine: Engine, layout: Path, size: int) -> Coroutine[Any, Any, set[str]]:
    async def build() -> set[str]:
        zeros = hashlib.sha256()
        chunk = bytes(1 << 20)
        for _ in range(size >> 20):
            zeros.update(chunk)
        layer = Descriptor(media_type=LAYER, digest=Digest(f"sha256:{zeros.hexdigest()}"), size=size)
        with open(blob_path(layout, layer.digest), "wb") as file:  # sparse: instant, and no disk space
            file.truncate(size)
        config = await put_json(engine, {"architecture": "amd64", "os": "linux"}, CONFIG)
        manifest = await put_json(
            engine,
            {"schemaVersion": 2, "mediaType": MANIFEST, "config": config.to_dict(), "layers": [layer.to_dict()]},
            MANIFEST,
        )
        await engine.put_reference("big", manifest)
        return {manifest.digest, config.digest, layer.digest}

    return build()


def test_an_interrupted_copy_leaves_no_reference_and_a_rerun_finishes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    blobs = with_layout(src, lambda engine: _big_image(engine, src, 64 << 20))
    env = {**os.environ, "OCICAS_PROGRESS": "never"}
    with subprocess.Popen(
        [*OCICAS, "copy", "-j", "1", f"{src}:big", str(dst)], stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    ) as process:
        try:
            _wait_for_temp_blob(dst, process, 8 << 20)  # well into the layer
            process.send_signal(signal.SIGINT)
            stdout, stderr = process.communicate(timeout=30)
        finally:
            process.kill()
    assert process.returncode == 130, stderr
    assert (stdout, stderr) == (b"", b"ocicas: error: interrupted\n")
    assert temp_dirs(dst) == []
    assert json.loads((dst / "index.json").read_bytes())["manifests"] == []
    landed = blob_files(dst)
    assert landed < blobs
    all_verify(dst)
    rerun = json.loads(out("copy", "--json", f"{src}:big", dst))
    assert set(rerun[0]["copied"]) == blobs - landed
    assert blob_files(dst) == blobs


# -- in-process: no blocking call on the event loop ---------------------------------------------------


def test_in_process_commands_never_block_the_event_loop(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    images = build_images(tmp_path / "src")
    src, dst = tmp_path / "src", tmp_path / "dst"
    file = tmp_path / "file"
    file.write_bytes(b"x" * (5 << 20))

    def invoke(*args: str | Path) -> str:
        assert ocicas.cli.invoke([str(a) for a in args]) == 0
        return capfd.readouterr().out

    assert invoke("put", src, file) == f"sha256:{hashlib.sha256(file.read_bytes()).hexdigest()}\n"
    assert invoke("cat", src, images.solo_blobs[2]) == "solo layer"
    assert invoke("copy", "--referrers", f"{src}:v1", dst).startswith(f"{dst}:v1 ")
    assert invoke("fsck", dst).endswith("no problems\n")
    assert invoke("tree", f"{dst}:v1").startswith("v1: ")
    assert invoke("refs", dst).startswith("v1 ")
    assert "would remove" in invoke("gc", "--dry-run", src)
    assert invoke("blobs", dst).count("\n") == len(blob_files(dst))
    assert ocicas.cli.invoke(["cat", str(src), "sha256:" + "2" * 64]) == 3
    assert capfd.readouterr().err.startswith("ocicas: error: blob sha256:2222")


def test_a_reader_that_goes_away_stops_cat_quietly(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    ocicas_run("init", layout)
    digest = out("put", layout, input=bytes(8 << 20)).strip()
    env = {**os.environ, "OCICAS_PROGRESS": "never"}
    with subprocess.Popen(
        [*OCICAS, "cat", str(layout), digest], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        assert len(process.stdout.read(10)) == 10
        process.stdout.close()  # as `| head -c 10` does
        assert process.wait(timeout=30) == 141
        assert process.stderr.read() == b""


# -- registry locations ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    started = start_registry(require("docker-registry").path, tmp_path_factory.mktemp("cli-registry"))
    yield started
    started.stop()


def test_copy_to_a_registry_and_back_keeps_every_digest(tmp_path: Path, cli_registry: Registry) -> None:
    images = build_images(tmp_path / "src")
    remote = cli_registry.location(cli_registry.repository("cli"))
    ocicas_run("copy", f"{tmp_path / 'src'}:solo", f"{remote}:solo")
    refs = out("refs", "--json", remote)
    assert [(r["name"], r["digest"]) for r in json.loads(refs)] == [("solo", images.solo.digest)]
    ocicas_run("copy", f"{remote}:solo", f"{tmp_path / 'back'}:again")
    assert blob_files(tmp_path / "back") == set(images.solo_blobs)
    all_verify(tmp_path / "back")
    docker_style = "docker://" + remote.partition("://")[2]
    done = ocicas_run("copy", f"{docker_style}:solo", tmp_path / "never", code=1)  # docker:// means HTTPS
    assert done.stderr.startswith(
        f"ocicas: error: cannot connect to the registry at https://{cli_registry.host}".encode()
    )
    assert not (tmp_path / "never").exists()


def test_registry_locations_are_parsed_strictly(tmp_path: Path) -> None:
    done = ocicas_run("copy", "ftp://example/x", tmp_path / "dst", code=2)
    assert b"ftp://example/x" in done.stderr
    done = ocicas_run("copy", "http://127.0.0.1:1/UPPER/case:v1", tmp_path / "dst", code=2)
    assert b"UPPER/case" in done.stderr
