"""Helpers that put small images, indexes and artifacts into any engine (test data)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ocicas
from ocicas import Descriptor, Digest, Engine

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"
EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


async def put(engine: Engine, data: bytes, media_type: str, **fields: Any) -> Descriptor:
    digest, size = await engine.put_blob(data)
    return Descriptor(media_type=media_type, digest=digest, size=size, **fields)


async def put_json(engine: Engine, obj: Any, media_type: str, **fields: Any) -> Descriptor:
    digest, size = await engine.put_blob_json(obj)
    return Descriptor(media_type=media_type, digest=digest, size=size, **fields)


async def put_image(
    engine: Engine,
    layers: Sequence[bytes],
    *,
    name: str = "",
    docker: bool = False,
    subject: Descriptor | None = None,
    platform: ocicas.Platform | None = None,
) -> tuple[Descriptor, list[Digest]]:
    """Put layers, a config and a manifest; return the manifest's descriptor and every digest."""
    layer_type, config_type, manifest_type = (
        (DOCKER_LAYER, DOCKER_CONFIG, DOCKER_MANIFEST) if docker else (LAYER, CONFIG, MANIFEST)
    )
    layer_descriptors = [await put(engine, layer, layer_type) for layer in layers]
    config = await put_json(
        engine,
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [d.digest for d in layer_descriptors]},
            "config": {"Labels": {"name": name}},
        },
        config_type,
    )
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config.to_dict(),
        "layers": [d.to_dict() for d in layer_descriptors],
    }
    if subject is not None:
        manifest["subject"] = subject.to_dict()
    descriptor = await put_json(engine, manifest, manifest_type, platform=platform)
    return descriptor, [descriptor.digest, config.digest, *(d.digest for d in layer_descriptors)]


async def put_index(
    engine: Engine,
    manifests: Sequence[Descriptor],
    *,
    docker: bool = False,
    subject: Descriptor | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Descriptor:
    media_type = DOCKER_LIST if docker else INDEX
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type, "manifests": [m.to_dict() for m in manifests]}
    if subject is not None:
        index["subject"] = subject.to_dict()
    if annotations:
        index["annotations"] = dict(annotations)
    return await put_json(engine, index, media_type)


async def put_artifact(
    engine: Engine, subject: Descriptor, payload: bytes, artifact_type: str = "application/vnd.example.sig"
) -> tuple[Descriptor, list[Digest]]:
    """A referrer (signature-like artifact manifest) whose subject is ``subject``."""
    empty = await put(engine, b"{}", EMPTY)
    blob = await put(engine, payload, "application/octet-stream")
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "artifactType": artifact_type,
        "config": empty.to_dict(),
        "layers": [blob.to_dict()],
        "subject": subject.to_dict(),
    }
    descriptor = await put_json(engine, manifest, MANIFEST, artifact_type=artifact_type)
    return descriptor, [descriptor.digest, empty.digest, blob.digest]


def age(engine: Engine, digests: Iterable[Digest], seconds: float = 7200) -> None:
    """Make blobs of a memory or directory engine look ``seconds`` old (past a collector's grace period)."""
    when = time.time() - seconds
    for digest in digests:
        if isinstance(engine, ocicas.MemoryEngine):
            engine._modified[digest] = when
        else:
            assert isinstance(engine, ocicas.DirEngine)
            os.utime(engine.path / "blobs" / digest.algorithm / digest.encoded, (when, when))
