"""Interoperability with the real OCI tools: umoci and skopeo read our layouts, we read theirs.

The tests drive the installed binaries (``tests/tools.py``: skipped when they
are missing, failed instead under ``OCICAS_REQUIRE_TOOLS=1``) and check exact
digests, bytes and sets; the first two pin down the build helpers on their own.
Expectations are computed independently of ocicas (``hashlib``, ``gzip``, plain
``json``) wherever ocicas is the thing under test.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import ocicas
from ocicas import (
    MEDIA_TYPE_DOCKER_LAYER,
    MEDIA_TYPE_IMAGE_LAYER,
    MEDIA_TYPE_IMAGE_LAYER_GZIP,
    BlobReader,
    Descriptor,
    Digest,
    Engine,
    ImageConfig,
    Manifest,
    RootFS,
    build_image,
    build_index,
    from_descriptor,
)
from tests.tools import Tool, ToolError, require

pytestmark = pytest.mark.anyio

TAR = MEDIA_TYPE_IMAGE_LAYER
GZIP = MEDIA_TYPE_IMAGE_LAYER_GZIP
REF = ocicas.ANNOTATION_REF_NAME
GZIP_TYPES = frozenset({GZIP, MEDIA_TYPE_DOCKER_LAYER})


@pytest.fixture
def umoci() -> Tool:
    return require("umoci")


@pytest.fixture
def skopeo() -> Tool:
    return require("skopeo")


async def skopeo_copy(skopeo: Tool, source: str, destination: str, *options: str) -> None:
    """``skopeo copy``, independent of the host's signature policy file."""
    await skopeo.run("--insecure-policy", "copy", "--quiet", *options, source, destination)


# -- file trees, as tar layers and as unpacked directories -----------------------------

#: (kind, permission bits, payload): a file's bytes or a symlink's target.
Node = tuple[str, int, bytes]
MTIME = 1_700_000_000


def directory(mode: int = 0o755) -> Node:
    return ("dir", mode, b"")


def file(data: bytes, mode: int = 0o644) -> Node:
    return ("file", mode, data)


def symlink(target: str) -> Node:
    return ("symlink", 0o777, target.encode())


def make_tar(tree: Mapping[str, Node]) -> bytes:
    """A deterministic tar of ``tree`` (entries in the order given)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, (kind, mode, payload) in tree.items():
            info = tarfile.TarInfo(name)
            info.mode, info.mtime, info.uname, info.gname = mode, MTIME, "root", "root"
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, payload.decode()
            else:
                info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload) if kind == "file" else None)
    return buffer.getvalue()


def snapshot(root: Path) -> dict[str, Node]:
    """Every path under ``root`` with its kind, permission bits and content."""
    out: dict[str, Node] = {}
    for parent, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(parent, name)
            info = path.lstat()
            relative = path.relative_to(root).as_posix()
            if stat.S_ISLNK(info.st_mode):
                out[relative] = symlink(os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                out[relative] = directory(stat.S_IMODE(info.st_mode))
            else:
                out[relative] = file(path.read_bytes(), stat.S_IMODE(info.st_mode))
    return out


def blob_files(layout: Path) -> set[Digest]:
    """The digest of every regular file under ``blobs/<alg>/``, read from the directory itself."""
    return {
        Digest(f"{alg.name}:{path.name}")
        for alg in (layout / "blobs").iterdir()
        for path in alg.iterdir()
        if path.is_file() and not path.is_symlink()
    }


def read_index(layout: Path) -> Any:
    return json.loads((layout / "index.json").read_bytes())


def live_blobs(layout: Path) -> set[Digest]:
    """What a correct GC keeps, worked out with plain ``json`` (no ocicas): everything the roots reach."""
    live: set[Digest] = set()
    pending = [entry for entry in read_index(layout)["manifests"] or []]
    while pending:
        descriptor = pending.pop()
        digest = Digest(descriptor["digest"])
        if digest in live:
            continue
        live.add(digest)
        if descriptor["mediaType"].endswith(("manifest.v1+json", "manifest.v2+json", "index.v1+json", "list.v2+json")):
            document = json.loads((layout / "blobs" / digest.algorithm / digest.encoded).read_bytes())
            pending += [document["config"], *document["layers"]] if "layers" in document else document["manifests"]
    return live


def diff_id(blob: bytes, media_type: str) -> Digest:
    """The digest of the uncompressed layer, computed with the standard library."""
    return Digest.from_bytes(gzip.decompress(blob) if media_type in GZIP_TYPES else blob)


# -- the sample image: two layers, a whiteout, a symlink, a config that says how to run ---

DATA = b"".join(hashlib.sha256(bytes([i])).digest() for i in range(256)) * 40  # 320 KiB, not very compressible
LAYER_ONE: dict[str, Node] = {
    "etc": directory(),
    "etc/greeting": file(b"hello from ocicas\n"),
    "etc/motd": symlink("greeting"),
    "etc/remove-me": file(b"gone in layer two\n"),
    "usr": directory(),
    "usr/share": directory(),
    "usr/share/data.bin": file(DATA),
}
LAYER_TWO: dict[str, Node] = {
    "etc/.wh.remove-me": file(b""),
    "opt": directory(),
    "opt/app": directory(0o750),
    "opt/app/run.sh": file(b"#!/bin/sh\necho hi\n", 0o755),
}
#: The root filesystem the two layers make: layer two's whiteout removed etc/remove-me.
ROOTFS: dict[str, Node] = {name: node for name, node in {**LAYER_ONE, **LAYER_TWO}.items() if "remove-me" not in name}
CONFIG: dict[str, Any] = {
    "config": {"Env": ["PATH=/usr/bin:/bin", "GREETING=hello"], "Cmd": ["/opt/app/run.sh"], "WorkingDir": "/opt"},
    "history": [{"created_by": "ocicas test: layer one"}, {"created_by": "ocicas test: layer two"}],
}


async def chunked(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class Readable:
    """A source with ``async read(n)``, as anyio streams' wrappers and aiofiles files have."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    async def read(self, size: int = -1) -> bytes:
        await anyio.lowlevel.checkpoint()
        return self._data.read(size)


@dataclasses.dataclass(frozen=True)
class Sample:
    manifest: Descriptor
    media_type: str
    #: The layer blobs as stored (gzip-compressed for the gzip variant).
    blobs: tuple[bytes, ...]
    diff_ids: tuple[Digest, ...]

    @property
    def layer_digests(self) -> list[Digest]:
        return [Digest.from_bytes(blob) for blob in self.blobs]


async def build_sample(engine: Engine, media_type: str, reference: str) -> Sample:
    """The sample image, built with :func:`build_image` from bytes, an async iterable and an async reader."""
    tars = (make_tar(LAYER_ONE), make_tar(LAYER_TWO))
    blobs = tuple(gzip.compress(t, mtime=0) if media_type == GZIP else t for t in tars)
    manifest = await build_image(
        engine,
        [chunked(blobs[0]), Readable(blobs[1])] if media_type == GZIP else [blobs[0], chunked(blobs[1])],
        config=CONFIG,
        annotations={"org.opencontainers.image.title": "ocicas sample"},
        reference=reference,
        layer_media_type=media_type,
    )
    return Sample(manifest, media_type, blobs, tuple(Digest.from_bytes(t) for t in tars))


async def test_build_image_writes_what_the_spec_says(tmp_path: Path) -> None:
    """Before any tool: the manifest and config we write, checked against hashlib and gzip."""
    await ocicas.create_layout(tmp_path / "layout")
    async with await ocicas.open_layout(tmp_path / "layout") as engine:
        for media_type, name in ((TAR, "tar"), (GZIP, "gzip")):
            sample = await build_sample(engine, media_type, name)
            assert [diff_id(blob, media_type) for blob in sample.blobs] == list(sample.diff_ids)
            manifest = Manifest.from_json(
                await engine.read_blob(sample.manifest.digest), media_type=sample.manifest.media_type
            )
            assert [(d.media_type, d.digest, d.size) for d in manifest.layers] == [
                (media_type, Digest.from_bytes(blob), len(blob)) for blob in sample.blobs
            ]
            assert [await engine.read_blob(d.digest) for d in manifest.layers] == list(sample.blobs)
            config = json.loads(await engine.read_blob(manifest.config.digest))
            assert config == {
                **CONFIG,
                "architecture": config["architecture"],
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": list(sample.diff_ids)},
            }
            assert manifest.annotations == {"org.opencontainers.image.title": "ocicas sample"}


async def test_build_helpers_refuse_images_the_tools_would_reject() -> None:
    """Wrong diff IDs (umoci unpack checks them), broken gzip, a platform the config denies, a dangling index."""
    tar = make_tar({"f": file(b"f\n")})
    compressed = gzip.compress(tar, mtime=0)
    async with ocicas.MemoryEngine() as engine:
        with pytest.raises(ocicas.InvalidError, match=r"diff_ids\[0\]"):
            await build_image(
                engine,
                [compressed],
                layer_media_type=GZIP,
                config={"rootfs": RootFS(diff_ids=(Digest.from_bytes(compressed),)).to_dict()},
            )
        with pytest.raises(ocicas.InvalidError, match="2 entries for 1 layers"):
            await build_image(
                engine, [tar], config={"rootfs": {"type": "layers", "diff_ids": [Digest.from_bytes(tar)] * 2}}
            )
        with pytest.raises(ocicas.InvalidError, match="linux/amd64"):
            await build_image(engine, [tar], config={"architecture": "amd64", "os": "linux"}, platform="linux/arm64")
        stored = await engine.list_blobs()
        with pytest.raises(ocicas.InvalidError, match="truncated"):
            await build_image(engine, [chunked(compressed[:-4])], layer_media_type=GZIP)
        with pytest.raises(ocicas.InvalidError, match="corrupt"):
            await build_image(engine, [compressed + b"trailing garbage"], layer_media_type=GZIP)
        assert await engine.list_blobs() == stored  # the broken layers were never stored

        zstd = "application/vnd.oci.image.layer.v1.tar+zstd"
        with pytest.raises(ocicas.UnsupportedError, match=r"rootfs\.diff_ids"):
            await build_image(engine, [b"zstd frames"], layer_media_type=zstd)
        given = {"rootfs": {"type": "layers", "diff_ids": [Digest.from_bytes(tar)]}}
        image = await build_image(engine, [b"zstd frames"], layer_media_type=zstd, config=given, platform="linux/arm64")
        config = Manifest.from_json(await engine.read_blob(image.digest)).config
        assert ImageConfig.from_json(await engine.read_blob(config.digest)).rootfs.diff_ids == (Digest.from_bytes(tar),)

        missing = image.replace(digest=Digest.from_bytes(b"not stored"))
        with pytest.raises(ocicas.BlobNotFoundError):
            await build_index(engine, [image, missing])
        with pytest.raises(ocicas.SizeMismatchError):
            await build_index(engine, [image.replace(size=image.size + 1)])
        assert await engine.list_references() == []


# -- umoci and skopeo read what we write ---------------------------------------------------


@pytest.mark.parametrize("media_type", [TAR, GZIP], ids=["tar", "gzip"])
async def test_umoci_lists_stats_and_unpacks_our_image(tmp_path: Path, umoci: Tool, media_type: str) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        sample = await build_sample(engine, media_type, "v1")
        await engine.put_reference("latest", sample.manifest)

    assert sorted(await umoci.lines("ls", "--layout", layout)) == ["latest", "v1"]
    stat_json = await umoci.json("stat", "--json", "--image", f"{layout}:v1")
    assert [(h["layer"], h["diff_id"], h["created_by"]) for h in stat_json["history"]] == [
        ({"mediaType": media_type, "digest": digest, "size": len(blob)}, diff, entry["created_by"])
        for digest, blob, diff, entry in zip(
            sample.layer_digests, sample.blobs, sample.diff_ids, CONFIG["history"], strict=True
        )
    ]

    bundle = tmp_path / "bundle"
    await umoci.run("unpack", "--rootless", "--image", f"{layout}:v1", bundle)
    assert snapshot(bundle / "rootfs") == ROOTFS
    runtime = json.loads((bundle / "config.json").read_bytes())
    assert runtime["process"]["args"] == ["/opt/app/run.sh"]
    assert runtime["process"]["cwd"] == "/opt"
    assert set(CONFIG["config"]["Env"]) <= set(runtime["process"]["env"])
    walked = json.loads((bundle / "umoci.json").read_bytes())["from_descriptor_path"]["descriptor_walk"]
    assert [(d["digest"], d["size"]) for d in walked] == [(sample.manifest.digest, sample.manifest.size)]


@pytest.mark.parametrize("media_type", [TAR, GZIP], ids=["tar", "gzip"])
async def test_skopeo_inspects_and_copies_our_image_byte_for_byte(
    tmp_path: Path, skopeo: Tool, media_type: str
) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        sample = await build_sample(engine, media_type, "v1")
        manifest_bytes = await engine.read_blob(sample.manifest.digest)
        config_descriptor = Manifest.from_json(manifest_bytes).config
        config_bytes = await engine.read_blob(config_descriptor.digest)
    source = f"oci:{layout}:v1"

    inspect = await skopeo.json("inspect", source)
    assert (inspect["Digest"], inspect["Layers"]) == (sample.manifest.digest, sample.layer_digests)
    assert (inspect["Os"], inspect["Architecture"]) == ("linux", json.loads(config_bytes)["architecture"])
    assert inspect["Env"] == CONFIG["config"]["Env"]
    assert await skopeo.run("inspect", "--raw", source) == manifest_bytes
    assert await skopeo.run("inspect", "--config", "--raw", source) == config_bytes

    out = tmp_path / "out"
    await skopeo_copy(skopeo, source, f"dir:{out}")
    copied = {path.name: path.read_bytes() for path in out.iterdir()}
    assert copied.pop("version").startswith(b"Directory Transport Version: ")
    assert copied == {
        "manifest.json": manifest_bytes,
        config_descriptor.digest.encoded: config_bytes,
        **{digest.encoded: blob for digest, blob in zip(sample.layer_digests, sample.blobs, strict=True)},
    }


async def test_skopeo_recompresses_our_tar_layers_and_our_diff_ids_still_hold(tmp_path: Path, skopeo: Tool) -> None:
    """skopeo gzips uncompressed layers into ``oci:``; the config (and so our diff IDs) is carried over verbatim."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    await ocicas.create_layout(ours)
    async with await ocicas.open_layout(ours) as engine:
        sample = await build_sample(engine, TAR, "v1")
        original = Manifest.from_json(await engine.read_blob(sample.manifest.digest))
    await skopeo_copy(skopeo, f"oci:{ours}:v1", f"oci:{theirs}:v1")

    async with await ocicas.open_layout(theirs) as engine:
        (path,) = await ocicas.resolve_reference(engine, "v1")
        async with await from_descriptor(engine, path.descriptor) as blob:
            assert isinstance(blob.data, Manifest)
            copy = blob.data
        assert copy.config == original.config
        assert [layer.media_type for layer in copy.layers] == [GZIP, GZIP]
        layers = [await engine.read_blob(layer.digest) for layer in copy.layers]
        assert [diff_id(layer, GZIP) for layer in layers] == list(sample.diff_ids)
        # and build_image, fed skopeo's gzip streams, computes the very same diff IDs
        async with ocicas.MemoryEngine() as scratch:
            rebuilt = await build_image(scratch, [chunked(layer, 1000) for layer in layers], layer_media_type=GZIP)
            config = Manifest.from_json(await scratch.read_blob(rebuilt.digest)).config
            assert ImageConfig.from_json(await scratch.read_blob(config.digest)).rootfs.diff_ids == sample.diff_ids


async def test_multi_platform_index_resolves_in_skopeo_and_a_single_entry_index_unpacks_in_umoci(
    tmp_path: Path, umoci: Tool, skopeo: Tool
) -> None:
    layout = tmp_path / "layout"
    await ocicas.create_layout(layout)
    trees = {
        "amd64": {"arch": file(b"amd64\n")},
        "arm64": {"arch": file(b"arm64\n"), "lib": directory(), "lib/ld.so": file(b"\x7fELF", 0o755)},
    }
    async with await ocicas.open_layout(layout) as engine:
        amd64 = await build_image(engine, [make_tar(trees["amd64"])], platform="linux/amd64")
        arm64 = await build_image(
            engine, [gzip.compress(make_tar(trees["arm64"]), mtime=0)], platform="linux/arm64/v8", layer_media_type=GZIP
        )
        multi = await build_index(engine, [amd64, arm64], reference="multi")
        single = await build_index(engine, [arm64], reference="single", annotations={"note": "one platform"})
        assert [p.descriptor for p in await ocicas.resolve_reference(engine, "multi")] == [amd64, arm64]
        assert [p.descriptor for p in await ocicas.resolve_reference(engine, "multi", platform="linux/arm64")] == [
            arm64
        ]
        layers = {
            arch: Manifest.from_json(await engine.read_blob(image.digest)).layers[0].digest
            for arch, image in (("amd64", amd64), ("arm64", arm64))
        }

    for arch, variant in (("amd64", None), ("arm64", "v8")):
        options = [
            "--override-os",
            "linux",
            "--override-arch",
            arch,
            *(["--override-variant", variant] if variant else []),
        ]
        inspect = await skopeo.json(*options, "inspect", f"oci:{layout}:multi")
        assert (inspect["Digest"], inspect["Architecture"], inspect["Layers"]) == (multi.digest, arch, [layers[arch]])

    await umoci.run("unpack", "--rootless", "--image", f"{layout}:single", tmp_path / "single")
    assert snapshot(tmp_path / "single" / "rootfs") == trees["arm64"]
    walked = json.loads((tmp_path / "single" / "umoci.json").read_bytes())["from_descriptor_path"]["descriptor_walk"]
    assert [d["digest"] for d in walked] == [single.digest, arm64.digest]
    # umoci 0.4 resolves a tag to every manifest below it and refuses to choose
    with pytest.raises(ToolError, match="ambiguous"):
        await umoci.run("unpack", "--rootless", "--image", f"{layout}:multi", tmp_path / "multi")


# -- we read what umoci and skopeo write ---------------------------------------------------

UMOCI_TAGS = ["base", "v1", "v2", "v3"]
SKOPEO_TAGS = ["docker", "fromdir", "fromoci"]


async def make_umoci_layout(umoci: Tool, tmp_path: Path) -> Path:
    """A layout made only by umoci: new, insert, tag, unpack + repack, config."""
    layout = tmp_path / "umoci-layout"
    source = tmp_path / "umoci-source"
    source.mkdir()
    (source / "hello.txt").write_bytes(b"hello from umoci\n")
    (source / "bin").mkdir()
    (source / "bin" / "tool").write_bytes(DATA[:5000])
    await umoci.run("init", "--layout", layout)
    await umoci.run("new", "--image", f"{layout}:base")
    await umoci.run("insert", "--rootless", "--image", f"{layout}:base", source, "/srv")
    await umoci.run("tag", "--image", f"{layout}:base", "v1")
    bundle = tmp_path / "umoci-bundle"
    await umoci.run("unpack", "--rootless", "--image", f"{layout}:v1", bundle)
    (bundle / "rootfs" / "srv" / "added.txt").write_bytes(b"added by repack\n")
    await umoci.run("repack", "--image", f"{layout}:v2", bundle)
    await umoci.run(
        "config", "--image", f"{layout}:v2", "--tag", "v3", "--config.env", "FOO=bar", "--config.cmd", "/bin/true"
    )
    return layout


async def make_skopeo_layout(skopeo: Tool, umoci_layout: Path, tmp_path: Path) -> Path:
    """A layout made only by skopeo from ``umoci_layout``: through ``dir:``, directly, and as Docker schema 2."""
    layout = tmp_path / "skopeo-layout"
    await skopeo_copy(skopeo, f"oci:{umoci_layout}:v2", f"dir:{tmp_path / 'skopeo-dir'}")
    await skopeo_copy(skopeo, f"dir:{tmp_path / 'skopeo-dir'}", f"oci:{layout}:fromdir")
    await skopeo_copy(skopeo, f"oci:{umoci_layout}:v1", f"oci:{layout}:fromoci")
    await skopeo_copy(skopeo, f"oci:{umoci_layout}:v3", f"oci:{layout}:docker", "--format", "v2s2")
    return layout


async def read_everything(engine: Engine) -> dict[str, tuple[Manifest, ImageConfig]]:
    """Resolve every reference, parse every manifest and config, stream every layer; check what can be checked."""
    images: dict[str, tuple[Manifest, ImageConfig]] = {}
    for name in await engine.list_references():
        (path,) = await ocicas.resolve_reference(engine, name)
        async with await from_descriptor(engine, path.descriptor) as manifest_blob:
            manifest = manifest_blob.data
        assert isinstance(manifest, Manifest)
        async with await from_descriptor(engine, manifest.config) as config_blob:
            config = config_blob.data
        assert isinstance(config, ImageConfig)
        diff_ids = []
        for layer in manifest.layers:
            async with await from_descriptor(engine, layer) as layer_blob:
                assert isinstance(layer_blob.data, BlobReader)
                data = await layer_blob.data.read()  # verified against the digest as it streams
            assert len(data) == layer.size
            diff_ids.append(diff_id(data, layer.media_type))
        assert tuple(diff_ids) == config.rootfs.diff_ids
        images[name] = (manifest, config)
    for digest in await engine.list_blobs():  # every blob, referenced or not, hashes to its name
        assert Digest.from_bytes(await engine.read_blob(digest, max_size=None)) == digest
    return images


async def test_we_read_every_blob_of_layouts_umoci_and_skopeo_wrote(tmp_path: Path, umoci: Tool, skopeo: Tool) -> None:
    umoci_layout = await make_umoci_layout(umoci, tmp_path)
    skopeo_layout = await make_skopeo_layout(skopeo, umoci_layout, tmp_path)

    async with await ocicas.open_layout(umoci_layout) as engine:
        assert await engine.list_references() == UMOCI_TAGS
        assert set(await engine.list_blobs()) == blob_files(umoci_layout)
        images = await read_everything(engine)
    assert [len(images[tag][0].layers) for tag in UMOCI_TAGS] == [1, 1, 2, 2]
    assert images["base"] == images["v1"]
    v3_config = images["v3"][1].config
    assert v3_config is not None
    assert v3_config.env is not None
    assert "FOO=bar" in v3_config.env
    for tag in UMOCI_TAGS:  # umoci's own account of its layers agrees with ours
        history = (await umoci.json("stat", "--json", "--image", f"{umoci_layout}:{tag}"))["history"]
        layers = [h for h in history if not h.get("empty_layer")]
        manifest, config = images[tag]
        assert [(h["layer"]["digest"], h["diff_id"]) for h in layers] == [
            (layer.digest, diff) for layer, diff in zip(manifest.layers, config.rootfs.diff_ids, strict=True)
        ]

    async with await ocicas.open_layout(skopeo_layout) as engine:
        assert await engine.list_references() == SKOPEO_TAGS
        assert set(await engine.list_blobs()) == blob_files(skopeo_layout)
        copies = await read_everything(engine)
        docker = await engine.get_reference("docker")
    assert docker.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert copies["fromdir"] == images["v2"]
    assert copies["fromoci"] == images["v1"]
    assert copies["docker"][0].media_type == docker.media_type
    assert copies["docker"][1].rootfs == images["v3"][1].rootfs


# -- garbage collection agrees with umoci gc -------------------------------------------------


NOTES = b"not part of the layout format; every tool must leave it alone\n"


async def test_gc_keeps_exactly_what_umoci_gc_keeps_and_umoci_still_unpacks_every_tag(
    tmp_path: Path, umoci: Tool, skopeo: Tool
) -> None:
    layout, twin = tmp_path / "layout", tmp_path / "twin"
    await ocicas.create_layout(layout)
    (layout / "NOTES.txt").write_bytes(NOTES)
    async with await ocicas.open_layout(layout) as engine:
        plain = await build_sample(engine, TAR, "plain")
        zipped = await build_sample(engine, GZIP, "gzip")
        arm64 = await build_image(engine, [make_tar({"arm": file(b"arm\n")})], platform="linux/arm64")
        await build_index(
            engine,
            [plain.manifest.replace(platform=ocicas.Platform(os="linux", architecture="amd64")), arm64],
            reference="multi",
        )
        await build_index(engine, [zipped.manifest], reference="single")
        doomed = await build_image(engine, [make_tar({"doomed": file(b"doomed\n")})], reference="doomed")
        # umoci and skopeo add to the same layout; umoci leaves intermediate manifests and configs behind
        await umoci.run("new", "--image", f"{layout}:empty")  # a manifest with "layers": []
        await umoci.run("new", "--image", f"{layout}:scratch")
        scratch_before = await engine.get_reference("scratch")
        await umoci.run("insert", "--rootless", "--image", f"{layout}:scratch", layout / "NOTES.txt", "/NOTES.txt")
        await skopeo_copy(skopeo, f"oci:{layout}:plain", f"dir:{tmp_path / 'plain-dir'}")
        await skopeo_copy(skopeo, f"dir:{tmp_path / 'plain-dir'}", f"oci:{layout}:recompressed")
        await skopeo_copy(skopeo, f"dir:{tmp_path / 'plain-dir'}", f"oci:{layout}:untagged-by-umoci")
        await umoci.run("rm", "--image", f"{layout}:untagged-by-umoci")
        # garbage of our own: an untagged image and stray blobs
        await engine.delete_reference("doomed")
        stray, _ = await engine.put_blob(b"stray blob nobody points at")
        stray_sha512, _ = await engine.put_blob(
            b"a sha512 stray", expected_digest=Digest.from_bytes(b"a sha512 stray", "sha512")
        )
        tags = await engine.list_references()
        assert tags == ["empty", "gzip", "multi", "plain", "recompressed", "scratch", "single"]
        before = blob_files(layout)
        live = live_blobs(layout)
        assert {stray, stray_sha512, doomed.digest, scratch_before.digest} <= before - live
        await anyio.run_process(["cp", "-a", layout, twin])

        await umoci.run("gc", "--layout", twin)
        result = await ocicas.gc(engine, grace_period=0)

        assert blob_files(layout) == set(await engine.list_blobs()) == live
        assert set(result.removed) == before - live
        assert result.live == live
        # umoci's gc only ever looks at blobs/sha256: the sha512 stray survives it
        assert blob_files(twin) == live | {stray_sha512}
        assert (twin / "NOTES.txt").read_bytes() == (layout / "NOTES.txt").read_bytes()
        assert sorted(await umoci.lines("ls", "--layout", layout)) == tags

        unpackable = [tag for tag in tags if len(await ocicas.resolve_reference(engine, tag)) == 1]
    assert unpackable == ["empty", "gzip", "plain", "recompressed", "scratch", "single"]
    for tag in unpackable:
        bundle = tmp_path / f"bundle-{tag}"
        await umoci.run("unpack", "--rootless", "--image", f"{layout}:{tag}", bundle)
        expected = {"empty": {}, "scratch": {"NOTES.txt": file(NOTES)}}.get(tag, ROOTFS)
        assert snapshot(bundle / "rootfs") == expected


async def test_umoci_gc_drops_the_content_of_docker_images_ocicas_keeps(
    tmp_path: Path, umoci: Tool, skopeo: Tool
) -> None:
    """umoci 0.4's walk knows only OCI media types: a Docker schema-2 image loses its config and layers."""
    umoci_layout = await make_umoci_layout(umoci, tmp_path)
    layout, twin = tmp_path / "docker", tmp_path / "twin"
    await skopeo_copy(skopeo, f"oci:{umoci_layout}:v1", f"oci:{layout}:docker", "--format", "v2s2")
    await anyio.run_process(["cp", "-a", layout, twin])
    everything = blob_files(layout)
    (entry,) = read_index(layout)["manifests"]
    assert len(everything) == 3
    assert live_blobs(layout) == everything

    await umoci.run("gc", "--layout", twin)
    async with await ocicas.open_layout(layout) as engine:
        result = await ocicas.gc(engine, grace_period=0)
    assert (result.removed, blob_files(layout)) == ((), everything)
    assert blob_files(twin) == {Digest(entry["digest"])}


# -- tagging keeps what other tools wrote -------------------------------------------------------


def entry_of(descriptor: Descriptor, name: str) -> dict[str, Any]:
    """The ``index.json`` entry a reference should be: the descriptor with its name annotation."""
    return {**descriptor.to_dict(), "annotations": {**(descriptor.annotations or {}), REF: name}}


async def test_empty_umoci_layout_with_null_manifests_opens_and_tags(tmp_path: Path, umoci: Tool) -> None:
    layout = tmp_path / "layout"
    await umoci.run("init", "--layout", layout)
    # umoci 0.4 writes a null array for an empty layout (Go's nil slice)
    assert read_index(layout) == {"schemaVersion": 2, "manifests": None}
    async with await ocicas.open_layout(layout) as engine:
        assert (await engine.list_references(), await engine.list_roots()) == ([], [])
        sample = await build_sample(engine, GZIP, "ours")
    assert read_index(layout) == {"schemaVersion": 2, "manifests": [entry_of(sample.manifest, "ours")]}
    assert await umoci.lines("ls", "--layout", layout) == ["ours"]
    await umoci.run("unpack", "--rootless", "--image", f"{layout}:ours", tmp_path / "bundle")
    assert snapshot(tmp_path / "bundle" / "rootfs") == ROOTFS


async def test_tagging_umoci_and_skopeo_layouts_keeps_every_entry_they_wrote(
    tmp_path: Path, umoci: Tool, skopeo: Tool
) -> None:
    umoci_layout = await make_umoci_layout(umoci, tmp_path)
    skopeo_layout = await make_skopeo_layout(skopeo, umoci_layout, tmp_path)
    for layout, theirs in ((umoci_layout, UMOCI_TAGS), (skopeo_layout, SKOPEO_TAGS)):
        before = read_index(layout)
        async with await ocicas.open_layout(layout) as engine:
            sample = await build_sample(engine, TAR, "ours")
            await engine.update_references({"ours-too": sample.manifest, "ours-three": sample.manifest})
            after = read_index(layout)
            assert after == {
                **before,
                "manifests": [
                    *before["manifests"],
                    entry_of(sample.manifest, "ours"),
                    entry_of(sample.manifest, "ours-too"),
                    entry_of(sample.manifest, "ours-three"),
                ],
            }
            await engine.delete_reference("ours")
            assert read_index(layout) == {**after, "manifests": [*after["manifests"][:-3], *after["manifests"][-2:]]}
        assert sorted(await umoci.lines("ls", "--layout", layout)) == sorted([*theirs, "ours-three", "ours-too"])
        # their images still inspect, to the same digest (skopeo 1.9's oci: transport finds only OCI
        # media types by name, so the Docker schema-2 image it wrote itself is left out)
        for tag in (t for t in theirs if t != "docker"):
            digest = next(e["digest"] for e in before["manifests"] if e["annotations"][REF] == tag)
            assert (await skopeo.json("inspect", f"oci:{layout}:{tag}"))["Digest"] == digest
        await umoci.run("unpack", "--rootless", "--image", f"{layout}:ours-too", tmp_path / f"bundle-{layout.name}")


# -- tags written by two processes at once ----------------------------------------------------

TAGGER = """
import sys, anyio, anyio.to_thread, ocicas

async def main(layout: str, prefix: str, count: int) -> None:
    async with await ocicas.open_layout(layout) as engine:
        target = await engine.get_reference("base")
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)  # the start signal: both processes tag at once
        for i in range(count):
            await engine.put_reference(f"{prefix}-{i}", target)

anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
"""


async def test_tags_from_two_processes_at_once_all_reach_umoci(tmp_path: Path, umoci: Tool) -> None:
    layout, count = tmp_path / "layout", 100
    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        base = await build_image(engine, [make_tar({"f": file(b"base\n")})], reference="base")

    async with (
        await anyio.open_process([sys.executable, "-c", TAGGER, str(layout), "a", str(count)]) as a,
        await anyio.open_process([sys.executable, "-c", TAGGER, str(layout), "b", str(count)]) as b,
    ):
        for process in (a, b):
            assert process.stdout is not None
            assert await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 100) == b"ready"
        for process in (a, b):
            assert process.stdin is not None
            await process.stdin.send(b"go\n")
        for process in (a, b):
            assert process.stderr is not None
            if await process.wait() != 0:
                errors = [chunk async for chunk in process.stderr]
                pytest.fail(b"".join(errors).decode(errors="replace"))

    expected = {"base", *(f"{prefix}-{i}" for prefix in "ab" for i in range(count))}
    assert set(await umoci.lines("ls", "--layout", layout)) == expected
    entries = read_index(layout)["manifests"]
    assert len(entries) == len(expected)
    assert {e["digest"] for e in entries} == {base.digest}
    async with await ocicas.open_layout(layout) as engine:
        assert set(await engine.list_references()) == expected
