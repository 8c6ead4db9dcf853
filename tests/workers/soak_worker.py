"""A writer process for ``tests/test_soak.py``, SIGKILLed at random moments by the test.

``python soak_worker.py LAYOUT PREFIX SEED GRACE BACKEND LARGE``: opens the layout
and puts images (one to three layers, some streamed, a share ``LARGE`` of them 4
to 9 MiB so that put_blob's pipeline runs; then a config and a manifest) and tags
each as ``PREFIX-N``, in a loop until it is killed; now and then it runs
``ocicas.gc(grace_period=GRACE)``. It reports on stdout, one line per ``write``
(atomic on a pipe), each as soon as the call has returned:

``ready``
    the engine is open.
``blob DIGEST SIZE SEED``
    a layer's ``put_blob`` returned (its content is ``blob_bytes(SIZE, SEED)``).
``want NAME MEDIA_TYPE DIGEST SIZE LAYERS``
    about to tag ``NAME``; ``LAYERS`` is ``DIGEST:SIZE:SEED,...``, the manifest's layers.
``tag NAME``
    that ``put_reference`` returned: the tag is acknowledged.
``gc REMOVED``
    a collection returned, having removed ``REMOVED`` blobs.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel

import ocicas
from ocicas import Descriptor, Engine
from ocicas.testing import blob_bytes

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"
#: A layer the test and every worker put, so puts of present content (freshening) happen too.
SHARED_SEED = 0
SHARED_SIZE = 300_000
GC_CHANCE = 0.05
large_chance = 0.0


def report(line: str) -> None:
    os.write(1, (line + "\n").encode())


async def streamed(data: bytes, rng: random.Random) -> AsyncIterator[bytes]:
    """``data`` in fresh chunks of random sizes."""
    position = 0
    while position < len(data):
        step = rng.randint(1, 2 << 20)
        await anyio.lowlevel.checkpoint()
        yield data[position : position + step]
        position += step


async def put_layer(engine: Engine, rng: random.Random) -> tuple[Descriptor, int]:
    roll = rng.random()
    if roll < 0.2:
        seed, size = SHARED_SEED, SHARED_SIZE
    else:
        seed = rng.randrange(1, 2**62)
        size = rng.randint(4 << 20, 9 << 20) if roll < 0.2 + large_chance else rng.randint(0, 64 << 10)
    data = blob_bytes(size, seed)
    digest, stored = await engine.put_blob(streamed(data, rng) if rng.random() < 0.5 else data)
    report(f"blob {digest} {stored} {seed}")
    return Descriptor(media_type=LAYER, digest=digest, size=stored), seed


async def main(layout: str, prefix: str, seed: int, grace: float) -> None:
    rng = random.Random(seed)
    async with await ocicas.open_layout(layout) as engine:
        report("ready")
        for number in range(sys.maxsize):
            layers = [await put_layer(engine, rng) for _ in range(rng.randint(1, 3))]
            config = {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer, _ in layers]},
                "config": {"Labels": {"worker": prefix, "image": str(number)}},
            }
            config_digest, config_size = await engine.put_blob_json(config)
            manifest = {
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": {"mediaType": CONFIG, "digest": config_digest, "size": config_size},
                "layers": [layer.to_dict() for layer, _ in layers],
            }
            digest, size = await engine.put_blob_json(manifest)
            descriptor = Descriptor(media_type=MANIFEST, digest=digest, size=size)
            name = f"{prefix}-{number}"
            described = ",".join(f"{layer.digest}:{layer.size}:{seed}" for layer, seed in layers)
            report(f"want {name} {MANIFEST} {digest} {size} {described}")
            await engine.put_reference(name, descriptor)
            report(f"tag {name}")
            if rng.random() < GC_CHANCE:
                result = await ocicas.gc(engine, grace_period=grace)
                report(f"gc {len(result.removed)}")


if __name__ == "__main__":
    large_chance = float(sys.argv[6])
    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), backend=sys.argv[5])
