"""Corruption: a damaged blob is refused on every read path, never handed out as complete.

Each blob is damaged in place after it was stored: a bit flipped (first, middle
or last byte), truncated, emptied, extended, or replaced by other bytes of the same
or another size. Then every read path must raise the mismatch error
(:class:`~ocicas.DigestMismatchError` or :class:`~ocicas.SizeMismatchError`, both
:class:`~ocicas.InvalidError`):

- ``get_blob`` streaming: the chunk that would complete the blob is never handed out;
- ``read_blob``;
- ``ocicas.from_descriptor`` (with a descriptor the size is checked too, so a
  truncated or extended blob is a :class:`~ocicas.SizeMismatchError` there, while
  by digest alone the file's own size is all the engine knows);
- ``ocicas.walk`` and ``ocicas.resolve_reference`` (manifests and indexes: a walk
  never opens layers);
- ``ocicas.gc``'s mark phase, which aborts before deleting anything.

Both engines are damaged the same way (the memory engine's bytes are replaced).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import ocicas
from ocicas import Descriptor, Digest, Engine
from ocicas.testing import blob_bytes
from tests.images import put, put_image, put_index

pytestmark = pytest.mark.anyio

MISMATCH = (ocicas.DigestMismatchError, ocicas.SizeMismatchError)
#: A layer spanning several read chunks, so streaming reads hand out chunks before the end.
LAYER_SIZE = 2 * ocicas.CHUNK_SIZE + 10


def _flip(position: Callable[[int], int]) -> Callable[[bytes], bytes]:
    def damage(data: bytes) -> bytes:
        at = position(len(data))
        return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]

    return damage


#: How a stored blob is damaged, by name.
CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "bit-flip-first": _flip(lambda n: 0),
    "bit-flip-middle": _flip(lambda n: n // 2),
    "bit-flip-last": _flip(lambda n: n - 1),
    "truncated-by-one": lambda b: b[:-1],
    "truncated-to-half": lambda b: b[: len(b) // 2],
    "emptied": lambda b: b"",
    "extended-by-one": lambda b: b + b"\n",
    "extended-by-a-chunk": lambda b: b + bytes(ocicas.CHUNK_SIZE),
    "replaced-same-size": lambda b: bytes(len(b)),
    "replaced-other-size": lambda b: b"{}",
}
#: Of those, the ones that change the size (a descriptor's size then catches them).
RESIZING = {"truncated-by-one", "truncated-to-half", "emptied", "extended-by-one", "extended-by-a-chunk"}


def _path(engine: ocicas.DirEngine, digest: Digest) -> Path:
    return engine.path / "blobs" / digest.algorithm / digest.encoded


def overwrite(engine: Engine, digest: Digest, data: bytes) -> None:
    """Replace a stored blob's bytes in place (same inode, as a disk error would leave it)."""
    if isinstance(engine, ocicas.MemoryEngine):
        engine._blobs[digest] = data
        return
    assert isinstance(engine, ocicas.DirEngine)
    with open(_path(engine, digest), "r+b") as file:
        file.write(data)
        file.truncate(len(data))
        os.fsync(file.fileno())


def stored(engine: Engine, digest: Digest) -> bytes:
    if isinstance(engine, ocicas.MemoryEngine):
        return engine._blobs[digest]
    assert isinstance(engine, ocicas.DirEngine)
    return _path(engine, digest).read_bytes()


CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"


class Image:
    """An image tagged ``app``: index -> manifest -> config + a multi-chunk layer; and a garbage blob."""

    def __init__(self, engine: Engine, index: Descriptor, manifest: Descriptor, blobs: list[Digest]) -> None:
        self.engine = engine
        config_size = len(stored(engine, blobs[1]))
        self.descriptors = {
            "index": index,
            "manifest": manifest,
            "config": Descriptor(media_type=CONFIG, digest=blobs[1], size=config_size),
            "layer": Descriptor(media_type=LAYER, digest=blobs[2], size=LAYER_SIZE),
        }

    @classmethod
    async def put(cls, engine: Engine) -> tuple[Image, Digest]:
        manifest, blobs = await put_image(engine, [blob_bytes(LAYER_SIZE, seed=7)])
        index = await put_index(engine, [manifest])
        await engine.put_reference("app", index)
        garbage = await put(engine, b"garbage", "application/octet-stream")
        return cls(engine, index, manifest, blobs), garbage.digest


async def stream(engine: Engine, descriptor: Descriptor) -> None:
    """Iterate a reader; the chunk completing a damaged blob must never come out."""
    received = 0
    reader = await engine.get_blob(descriptor.digest)
    try:
        async for chunk in reader:
            received += len(chunk)
    finally:
        await reader.aclose()
        assert received < max(reader.size, 1), "a damaged blob was handed out whole"


async def read_whole(engine: Engine, descriptor: Descriptor) -> None:
    async with await engine.get_blob(descriptor.digest) as reader:
        await reader.read()


async def typed(engine: Engine, descriptor: Descriptor) -> None:
    async with await ocicas.from_descriptor(engine, descriptor) as blob:
        if isinstance(blob.data, ocicas.BlobReader):  # layers stream: the damage shows by the end
            await blob.data.read()


async def walk(engine: Engine, descriptor: Descriptor) -> None:
    await ocicas.walk(engine, await engine.list_roots())


async def resolve(engine: Engine, descriptor: Descriptor) -> None:
    await ocicas.resolve_reference(engine, "app")


async def collect(engine: Engine, descriptor: Descriptor) -> None:
    await ocicas.gc(engine, grace_period=0)


Reader = Callable[[Engine, Descriptor], Awaitable[object]]
#: Every read path, and the blobs it reads (a walk opens manifests and indexes only;
#: resolving a reference opens indexes only).
READ_PATHS: dict[str, tuple[Reader, tuple[str, ...]]] = {
    "get_blob streamed": (stream, ("layer", "config", "manifest", "index")),
    "get_blob read()": (read_whole, ("layer", "config", "manifest", "index")),
    "read_blob": (lambda e, d: e.read_blob(d.digest, max_size=None), ("layer", "config", "manifest", "index")),
    "from_descriptor": (typed, ("layer", "config", "manifest", "index")),
    "walk": (walk, ("manifest", "index")),
    "resolve_reference": (resolve, ("index",)),
    "gc mark": (collect, ("manifest", "index")),
}


@pytest.mark.parametrize("how", CORRUPTIONS)
async def test_every_read_path_refuses_a_damaged_blob(engine: Engine, how: str) -> None:
    image, garbage = await Image.put(engine)
    blobs = await engine.list_blobs()
    checked = 0
    for target, descriptor in image.descriptors.items():
        original = stored(engine, descriptor.digest)
        overwrite(engine, descriptor.digest, CORRUPTIONS[how](original))
        for path, (read, targets) in READ_PATHS.items():
            if target not in targets:
                continue
            with pytest.raises(MISMATCH) as info:
                await read(engine, descriptor)
            where = f"{path} of a {how} {target}"
            assert isinstance(info.value, ocicas.InvalidError), where
            if path in ("walk", "gc mark"):
                assert descriptor.digest in str(info.value), f"{where}: the error does not name the blob"
            if how in RESIZING and path.startswith(("read_blob", "get_blob")):
                # by digest alone the file's own size is all there is: its hash is what differs
                assert isinstance(info.value, ocicas.DigestMismatchError), where
            if how in RESIZING and path == "from_descriptor":
                assert isinstance(info.value, ocicas.SizeMismatchError), f"{where}: the descriptor's size is known"
            checked += 1
        assert await engine.list_blobs() == blobs, "a collection that could not trust its mark deleted something"
        assert garbage in blobs
        overwrite(engine, descriptor.digest, original)
    assert checked == sum(len(targets) for _, targets in READ_PATHS.values())
    await walk(engine, image.descriptors["index"])  # all repaired: everything reads again


async def test_a_damaged_layer_does_not_stop_a_walk_but_is_never_served(engine: Engine) -> None:
    """A walk reads manifests, not layers: a damaged layer is found when it is read, not before."""
    image, garbage = await Image.put(engine)
    layer = image.descriptors["layer"].digest
    overwrite(engine, layer, CORRUPTIONS["bit-flip-middle"](stored(engine, layer)))
    graph = await ocicas.walk(engine, await engine.list_roots())
    assert layer in graph
    result = await ocicas.gc(engine, grace_period=0)
    assert result.removed == (garbage,)
    with pytest.raises(ocicas.DigestMismatchError):
        await engine.read_blob(layer, max_size=None)


async def test_a_forged_descriptor_size_is_a_size_mismatch(engine: Engine) -> None:
    """The blob is intact but its descriptor lies about the size: refused by size, not read past it."""
    image, _ = await Image.put(engine)
    for target, descriptor in image.descriptors.items():
        for size in (descriptor.size - 1, descriptor.size + 1, 0, 2**63 - 1):
            forged = descriptor.replace(size=size)
            with pytest.raises((ocicas.SizeMismatchError, ocicas.BlobTooLargeError)):
                await typed(engine, forged)
            if target in ("manifest", "index"):
                with pytest.raises(ocicas.InvalidError):
                    await ocicas.walk(engine, [forged])
