"""``ocicas image``, global options anywhere, stale temporary directories, the guide's CLI session."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import anyio
import click
import pytest

import ocicas
import ocicas.cli
from ocicas.cli._main import hoist_global_options
from tests.test_cli import blob_files, blob_path, build_images, ocicas_run, out
from tests.tools import require

REPOSITORY = Path(__file__).resolve().parents[1]
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TAR = "application/vnd.oci.image.layer.v1.tar"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def tar_of(files: dict[str, bytes]) -> bytes:
    """A tar archive with fixed metadata: the same bytes on every machine."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def read_json(layout: Path, digest: str) -> Any:
    return json.loads(blob_path(layout, digest).read_bytes())


HELLO = tar_of({"hello.txt": b"hello\n"})
WORLD = tar_of({"world.txt": b"world\n"})
CONFIG = {"architecture": "arm64", "os": "linux", "config": {"Cmd": ["/bin/cat", "/hello.txt"]}}


def files(tmp_path: Path) -> dict[str, Path]:
    paths = {
        "hello.tar": tmp_path / "hello.tar",
        "world.tar.gz": tmp_path / "world.tar.gz",
        "config.json": tmp_path / "config.json",
    }
    paths["hello.tar"].write_bytes(HELLO)
    paths["world.tar.gz"].write_bytes(gzip.compress(WORLD, mtime=0))
    paths["config.json"].write_text(json.dumps(CONFIG))
    return paths


# -- building --------------------------------------------------------------------------------------


def test_an_image_from_a_tar_with_config_platform_and_annotations(tmp_path: Path) -> None:
    given = files(tmp_path)
    layout = tmp_path / "images"
    args: list[str | Path] = [
        "--layer",
        given["hello.tar"],
        "--config",
        given["config.json"],
        "--platform",
        "linux/arm64",
    ]
    printed = json.loads(out("image", f"{layout}:v1", *args, "--annotation", "k=v", "-a", "e=", "--json"))
    # the layout was created; the manifest's digest depends only on the bytes given
    assert printed == {
        "mediaType": MANIFEST,
        "digest": "sha256:45b112c0b157269b892bfcf8f36463ce88c5b31ad6a8ebbe9c8d0042699af9e0",
        "size": 429,
        "platform": {"architecture": "arm64", "os": "linux"},
    }
    manifest = read_json(layout, printed["digest"])
    assert manifest["layers"] == [{"mediaType": TAR, "digest": sha256(HELLO), "size": len(HELLO)}]
    assert manifest["annotations"] == {"k": "v", "e": ""}
    config = read_json(layout, manifest["config"]["digest"])
    assert config == {**CONFIG, "rootfs": {"type": "layers", "diff_ids": [sha256(HELLO)]}}
    assert blob_files(layout) == {printed["digest"], manifest["config"]["digest"], sha256(HELLO)}
    [ref] = json.loads(out("refs", "--json", layout))
    assert ref == {"name": "v1", **printed}
    assert out("fsck", layout).endswith(": no problems\n")
    # without --json: the digest alone, for scripts; the same inputs make the same image
    assert out("image", f"{layout}:v1", *args, "-a", "k=v", "-a", "e=") == f"{printed['digest']}\n"


def test_gzip_and_plain_layers_mixed_get_their_media_types_and_diff_ids(tmp_path: Path) -> None:
    given = files(tmp_path)
    layout = tmp_path / "images"
    gz = given["world.tar.gz"].read_bytes()
    digest = out("image", f"{layout}:v1", "-l", given["hello.tar"], "-l", given["world.tar.gz"]).strip()
    manifest = read_json(layout, digest)
    assert manifest["layers"] == [
        {"mediaType": TAR, "digest": sha256(HELLO), "size": len(HELLO)},
        {"mediaType": TAR_GZIP, "digest": sha256(gz), "size": len(gz)},
    ]
    config = read_json(layout, manifest["config"]["digest"])
    assert config["rootfs"]["diff_ids"] == [sha256(HELLO), sha256(WORLD)]  # the gzip layer's: of what it inflates to
    # gzip alone goes through build_image in one call: the same layer entry and diff ID
    only = out("image", f"{layout}:v2", "-l", given["world.tar.gz"]).strip()
    manifest = read_json(layout, only)
    assert manifest["layers"] == [{"mediaType": TAR_GZIP, "digest": sha256(gz), "size": len(gz)}]
    assert read_json(layout, manifest["config"]["digest"])["rootfs"]["diff_ids"] == [sha256(WORLD)]
    # no layers at all: an empty image
    empty = out("image", f"{layout}:empty").strip()
    assert read_json(layout, empty)["layers"] == []
    assert out("fsck", layout).endswith(": no problems\n")


def test_a_layer_from_stdin_makes_the_same_image_as_from_a_file(tmp_path: Path) -> None:
    given = files(tmp_path)
    layout = tmp_path / "images"
    args: list[str | Path] = ["--config", given["config.json"]]
    from_file = out("image", f"{layout}:file", "-l", given["hello.tar"], "-l", given["world.tar.gz"], *args)
    gz = given["world.tar.gz"].read_bytes()
    from_stdin = out("image", f"{layout}:stdin", "-l", given["hello.tar"], "-l", "-", *args, input=gz)
    assert from_stdin == from_file
    empty_stdin = out("image", f"{layout}:e", "--layer", "-", input=b"").strip()
    assert read_json(layout, empty_stdin)["layers"] == [{"mediaType": TAR, "digest": sha256(b""), "size": 0}]
    done = ocicas_run("image", f"{layout}:x", "-l", "-", "-l", "-", code=2, input=b"")
    assert b"stdin (-) can be only one --layer" in done.stderr


def test_a_zstd_layer_needs_its_diff_id_in_the_config(tmp_path: Path) -> None:
    zstd = tmp_path / "layer.tar.zst"
    zstd.write_bytes(ZSTD_MAGIC + b"not inflated by ocicas")
    layout = tmp_path / "images"
    done = ocicas_run("image", f"{layout}:v1", "-l", zstd, code=1)
    assert b"zstd-compressed" in done.stderr
    assert b"rootfs.diff_ids" in done.stderr
    assert not layout.exists()  # created for the command, removed with its failure
    config = tmp_path / "config.json"
    diff_id = sha256(HELLO)
    config.write_text(json.dumps({"rootfs": {"type": "layers", "diff_ids": [diff_id]}}))
    digest = out("image", f"{layout}:v1", "-l", zstd, "--config", config).strip()
    manifest = read_json(layout, digest)
    assert [layer["mediaType"] for layer in manifest["layers"]] == [TAR_ZSTD]
    assert read_json(layout, manifest["config"]["digest"])["rootfs"]["diff_ids"] == [diff_id]


def test_tagging_refuses_to_move_a_name_unless_forced(tmp_path: Path) -> None:
    given = files(tmp_path)
    layout = tmp_path / "images"
    first = out("image", f"{layout}:v1", "-l", given["hello.tar"]).strip()
    done = ocicas_run("image", f"{layout}:v1", "-l", given["world.tar.gz"], code=5)
    assert done.stderr.decode().endswith("(--force moves it)\n")
    assert json.loads(out("refs", "--json", layout))[0]["digest"] == first
    second = out("image", f"{layout}:v1", "-l", given["world.tar.gz"], "--force").strip()
    assert json.loads(out("refs", "--json", layout))[0]["digest"] == second
    untagged = out("image", layout, "-l", given["hello.tar"], "--platform", "linux/s390x").strip()
    assert [r["name"] for r in json.loads(out("refs", "--json", layout))] == ["v1"]
    assert blob_path(layout, untagged).exists()
    assert ocicas_run("image", f"{layout}:bad name", "-l", given["hello.tar"], code=2).stderr


def test_bad_values_are_usage_errors(tmp_path: Path) -> None:
    given = files(tmp_path)
    layout = tmp_path / "images"
    for args, message in [
        (["-a", "novalue"], b"'novalue' is not KEY=VALUE"),
        (["--platform", "linux"], b"--platform"),
    ]:
        done = ocicas_run("image", f"{layout}:v1", "-l", given["hello.tar"], *args, code=2)
        assert message in done.stderr, done.stderr
    assert not layout.exists()


# -- a failure removes the layout it created, and only that --------------------------------------


def test_a_failure_removes_a_layout_the_command_created(tmp_path: Path) -> None:
    given = files(tmp_path)
    (tmp_path / "kept").mkdir()
    layout = tmp_path / "kept" / "new" / "deeper" / "images"
    # the first layer is stored, then the second is missing
    done = ocicas_run("image", f"{layout}:v1", "-l", given["hello.tar"], "-l", tmp_path / "absent.tar", code=3)
    assert b"absent.tar" in done.stderr
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == []  # parents made for it went too
    config = tmp_path / "platform.json"
    config.write_text(json.dumps({"architecture": "amd64", "os": "linux"}))
    ocicas_run(
        "image", f"{layout}:v1", "-l", given["hello.tar"], "--config", config, "--platform", "linux/arm64", code=4
    )
    assert not (tmp_path / "kept" / "new").exists()


def test_a_failure_leaves_a_layout_that_was_there_untouched(tmp_path: Path) -> None:
    given = files(tmp_path)
    images = build_images(tmp_path / "images")
    layout = tmp_path / "images"
    index = (layout / "index.json").read_bytes()
    ocicas_run("image", f"{layout}:new", "-l", given["hello.tar"], "-l", tmp_path / "absent.tar", code=3)
    ocicas_run("image", f"{layout}:v1", "-l", given["hello.tar"], code=5)  # v1 names something else
    assert (layout / "index.json").read_bytes() == index
    assert images.live <= blob_files(layout)
    assert out("fsck", layout).endswith(": no problems\n")


# -- global options before or after the subcommand ------------------------------------------------


def test_global_options_move_before_the_subcommand() -> None:
    assert hoist_global_options(["put", "L", "f", "--progress", "always", "--debug"]) == [
        "--progress",
        "always",
        "--debug",
        "put",
        "L",
        "f",
    ]
    assert hoist_global_options(["--backend", "trio", "gc", "--backend=asyncio", "L"]) == [
        "--backend",
        "trio",
        "--backend=asyncio",
        "gc",
        "L",
    ]
    assert hoist_global_options(["cat", "L", "--", "--debug"]) == ["cat", "L", "--", "--debug"]
    assert hoist_global_options(["--debug"]) == ["--debug"]
    with pytest.raises(click.BadOptionUsage, match="'--progress' requires an argument"):
        hoist_global_options(["fsck", "L", "--progress"])


def test_global_options_work_after_the_subcommand(tmp_path: Path) -> None:
    given = files(tmp_path)
    layout = tmp_path / "images"
    big = tmp_path / "big.tar"
    big.write_bytes(bytes(3 << 20))
    wide = {"COLUMNS": "200"}
    done = ocicas_run("image", f"{layout}:v1", "-l", big, "--progress", "always", "--backend", "trio", env=wide)
    assert re.fullmatch(rb"sha256:[0-9a-f]{64}\n", done.stdout)
    assert b"MiB" in done.stderr
    assert b"MB" not in done.stderr
    assert out("fsck", layout, "--backend=trio").endswith(": no problems\n")
    failed = ocicas_run("image", f"{layout}:v2", "-l", tmp_path / "absent", "--debug", code=3)
    assert b"Traceback" in failed.stderr
    assert ocicas_run("fsck", layout, "--progress", code=2).stderr.endswith(b"requires an argument.\n")
    assert ocicas_run("image", f"{layout}:v2", "-l", given["hello.tar"], "--backend", "curio", code=2).stderr


# -- stale temporary directories: fsck reports them, gc frees them ------------------------------------


def _stale(layout: Path, name: str = ".ocicas-deadbeef", size: int = 1 << 20) -> Path:
    """A temporary directory as a killed engine leaves it: files of blobs and index.json in the making."""
    path = layout / name
    path.mkdir()
    (path / "blob").write_bytes(bytes(size - 100))
    (path / "index.json").write_bytes(bytes(100))
    return path


def test_fsck_reports_stale_temporary_directories_with_their_size(tmp_path: Path) -> None:
    layout = tmp_path / "images"
    ocicas_run("init", layout)
    stale = _stale(layout)
    live = _stale(layout, ".ocicas-0123456789abcdef", 4096)
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a live engine holds its own
        assert out("fsck", layout).splitlines() == [
            "stale temporary directory .ocicas-deadbeef: 1.0 MiB (not damage; gc removes it)",
            "checked 0 blobs (0 B) and 0 roots: no problems; 1 stale temporary directory (1.0 MiB) for gc to remove",
        ]
        assert json.loads(out("fsck", "--json", layout)) == {
            "ok": True,
            "blobs_count": 0,
            "bytes": 0,
            "roots_count": 0,
            "problems": [],
            "problems_count": 0,
            "notes": [],
            "stale_temp_dirs": [{"name": ".ocicas-deadbeef", "size": 1 << 20}],
            "stale_temp_dirs_count": 1,
            "stale_temp_dirs_bytes": 1 << 20,
        }
        assert stale.exists()
        # gc: a dry run says what it would free; the real run frees it and says so; the live one stays
        assert (
            out("gc", "--dry-run", layout) == "would remove 0 blobs, 0 B, and 1 stale temporary directory (1.0 MiB)\n"
        )
        assert stale.exists()
        assert out("gc", layout) == "removed 0 blobs, 0 B, and 1 stale temporary directory (1.0 MiB)\n"
        assert not stale.exists()
        assert live.exists()
        assert out("fsck", layout) == "checked 0 blobs (0 B) and 0 roots: no problems\n"
    finally:
        os.close(fd)


def test_gc_json_has_lists_with_counts_and_the_bytes_freed(tmp_path: Path) -> None:
    images = build_images(tmp_path / "images")
    layout = tmp_path / "images"
    ocicas_run("untag", layout, "solo")
    _stale(layout, size=1 << 20)
    garbage = sorted({images.garbage.digest, *images.solo_blobs})
    garbage_bytes = sum(blob_path(layout, d).stat().st_size for d in garbage)
    report = json.loads(out("gc", "--grace", "0", "--json", layout))
    live = sorted(blob_files(layout))  # nothing is fresh with --grace 0: every blob left is live
    assert report == {
        "dry_run": False,
        "removed": garbage,
        "removed_count": len(garbage),
        "removed_bytes": garbage_bytes,
        "stale_temp_dirs": [{"name": ".ocicas-deadbeef", "size": 1 << 20}],
        "stale_temp_dirs_count": 1,
        "stale_temp_dirs_bytes": 1 << 20,
        "bytes_freed": garbage_bytes + (1 << 20),
        "live": live,
        "live_count": len(live),
        "referrers": [images.signature.digest],
        "referrers_count": 1,
        "fresh": [],
        "fresh_count": 0,
        "broken": [],
        "broken_count": 0,
    }


def test_every_json_output_is_documented_in_help() -> None:
    for command in ["put", "blobs", "rm", "image", "tag", "refs", "tree", "gc", "fsck", "copy"]:
        assert "JSON output (--json):" in out(command, "--help"), command


# -- the guide's CLI session, run as written ----------------------------------------------------------


def guide_session() -> list[str]:
    """The command lines of the guide's ``ocicas`` session (its ```sh block), in order."""
    text = (REPOSITORY / "docs" / "guide" / "index.md").read_text()
    section = text[text.index("## The `ocicas` command") :]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_guide_session_runs_with_the_cli_alone(tmp_path: Path) -> None:
    for tool in ("bash", "tar", "gzip"):
        require(tool)
    lines = guide_session()
    assert any(line.startswith("ocicas image ") for line in lines)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    source = Path(ocicas.__file__).resolve().parents[1]
    wrapper = bin_dir / "ocicas"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={source} exec {sys.executable} -m ocicas "$@"\n')
    wrapper.chmod(0o755)
    work = tmp_path / "session"
    work.mkdir()
    statuses = tmp_path / "statuses"
    # one shell for the whole session (its variables carry over); each line's status is recorded
    script = "set -o pipefail\n" + "".join(f'{line}\necho "$?" >> {statuses}\n' for line in lines)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OCICAS_PROGRESS": "never"}
    env.pop("OCICAS_DEBUG", None)
    done = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, timeout=300)
    codes = statuses.read_text().split()
    assert list(zip(lines, codes, strict=True)) == [(line, "0") for line in lines], done.stderr.decode()
    assert done.stderr == b""
    # what it leaves: the images named as the guide says, every blob intact
    refs = json.loads(out("refs", "--json", work / "images"))
    assert [r["name"] for r in refs] == ["latest", "v1", "v2"]
    assert out("fsck", work / "backup").endswith(" and 1 root: no problems\n")

    async def check() -> None:
        async with await ocicas.open_layout(work / "images") as engine:
            assert (await ocicas.gc(engine, grace_period=0, dry_run=True)).removed == ()

    anyio.run(check)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_in_process_image_fsck_gc_never_block_the_event_loop(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], backend: str
) -> None:
    given = files(tmp_path)
    layout = tmp_path / "images"

    def invoke(*args: str | Path, code: int = 0) -> str:
        assert ocicas.cli.invoke([str(a) for a in args]) == code
        return capfd.readouterr().out

    digest = invoke(
        "image", f"{layout}:v1", "-l", given["hello.tar"], "-l", given["world.tar.gz"], "--backend", backend
    )
    assert blob_path(layout, digest.strip()).exists()
    invoke("image", f"{tmp_path / 'gone'}:v1", "-l", tmp_path / "absent", "--backend", backend, code=3)
    assert not (tmp_path / "gone").exists()
    _stale(layout)
    assert "1 stale temporary directory (1.0 MiB)" in invoke("fsck", layout, "--backend", backend)
    assert invoke("gc", layout, "--backend", backend).endswith("and 1 stale temporary directory (1.0 MiB)\n")
