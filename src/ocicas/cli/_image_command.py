"""``image``: an image made from layer files (umoci's ``new`` plus ``insert``, crane's ``append``)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
import click

from .._build import _diff_ids, _image_config, _put_layer, build_image
from .._descriptor import Descriptor, Platform
from .._engine import Engine
from .._errors import ClobberError, InvalidError, UnsupportedError
from .._media_types import (
    MEDIA_TYPE_IMAGE_CONFIG,
    MEDIA_TYPE_IMAGE_LAYER,
    MEDIA_TYPE_IMAGE_LAYER_GZIP,
    MEDIA_TYPE_IMAGE_LAYER_ZSTD,
    MEDIA_TYPE_IMAGE_MANIFEST,
)
from .._models import Manifest
from ._locations import LOCATION, Location, open_location, remove_created
from ._output import emit_json, json_option
from ._params import PLATFORM
from ._progress import Bar, Display
from ._run import CommandError, ExitCode, run
from ._stdin import stdin_chunks

__all__ = ["image"]

_CHUNK: Final = 4 << 20
_GZIP_MAGIC: Final = b"\x1f\x8b"
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"


def layer_media_type(head: bytes) -> str:
    """The layer media type the first bytes of a layer show: gzip, zstd, or else a plain tar."""
    if head.startswith(_GZIP_MAGIC):
        return MEDIA_TYPE_IMAGE_LAYER_GZIP
    if head.startswith(_ZSTD_MAGIC):
        return MEDIA_TYPE_IMAGE_LAYER_ZSTD
    return MEDIA_TYPE_IMAGE_LAYER


def _annotation(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise click.BadParameter(f"{text!r} is not KEY=VALUE", param_hint="'--annotation'")
    return key, value


def _load_config(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            document = json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidError(f"config {path!r} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidError(f"config {path!r} is not a JSON object")
    return document


def _given_diff_ids(config: dict[str, Any] | None) -> bool:
    rootfs = (config or {}).get("rootfs")
    return isinstance(rootfs, dict) and bool(rootfs.get("diff_ids"))


class _Layer:
    """One ``--layer``: a file or stdin, sniffed for its media type before it is stored."""

    def __init__(self, name: str, bar: Bar) -> None:
        self.name = name
        self.bar = bar
        self.media_type = MEDIA_TYPE_IMAGE_LAYER
        self._head = b""
        self._stdin: AsyncIterator[bytes] | None = None

    async def open(self) -> None:
        if self.name == "-":
            self._stdin = stdin_chunks(_CHUNK)
            self._head = await anext(self._stdin, b"")
        else:
            path = anyio.Path(self.name)
            self.bar.set_total((await path.stat()).st_size)
            async with await anyio.open_file(self.name, "rb") as file:
                self._head = await file.read(len(_ZSTD_MAGIC))
        self.media_type = layer_media_type(self._head)

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._stdin is not None:
            if self._head:
                yield self._head
                self.bar.advance(len(self._head))
            async for chunk in self._stdin:
                yield chunk
                self.bar.advance(len(chunk))
            return
        async with await anyio.open_file(self.name, "rb") as file:
            while chunk := await file.read(_CHUNK):
                yield chunk
                self.bar.advance(len(chunk))


async def _build_mixed(
    engine: Engine,
    layers: Sequence[_Layer],
    config: dict[str, Any] | None,
    annotations: dict[str, str] | None,
    platform: Platform | None,
) -> Descriptor:
    """:func:`~ocicas.build_image` for layers of more than one media type (it takes one for all)."""
    image_config = _image_config(config, platform)
    given = image_config.rootfs.diff_ids
    if given and len(given) != len(layers):
        raise InvalidError(f"config rootfs.diff_ids has {len(given)} entries for {len(layers)} layers")
    stored: list[Descriptor] = []
    computed = []
    for layer in layers:
        descriptor, diff_id = await _put_layer(engine, layer.chunks(), layer.media_type, None)
        stored.append(descriptor)
        computed.append(diff_id)
    rootfs = image_config.rootfs.replace(diff_ids=_diff_ids(given, computed, stored))
    config_digest, config_size = await engine.put_blob(image_config.replace(rootfs=rootfs).to_json())
    manifest = Manifest(
        config=Descriptor(media_type=MEDIA_TYPE_IMAGE_CONFIG, digest=config_digest, size=config_size),
        layers=tuple(stored),
        annotations=annotations,
    )
    digest, size = await engine.put_blob(manifest.to_json())
    return Descriptor(media_type=MEDIA_TYPE_IMAGE_MANIFEST, digest=digest, size=size, platform=platform)


@click.command()
@click.argument("location", metavar="LAYOUT[:REF]", type=LOCATION)
@click.option(
    "-l",
    "--layer",
    "layer_files",
    multiple=True,
    metavar="FILE",
    help="A layer tarball, plain, gzip or zstd (told apart by content), bottom first; - reads stdin (once).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="The image configuration, a JSON file (default: empty; architecture, os and rootfs are filled in).",
)
@click.option(
    "--platform", type=PLATFORM, help="OS/ARCH[/VARIANT] of the image (default: the config's, else the host's)."
)
@click.option(
    "-a", "--annotation", "annotations", multiple=True, metavar="KEY=VALUE", help="A manifest annotation (repeatable)."
)
@click.option("-f", "--force", is_flag=True, help="Move REF if it already names something else.")
@json_option
def image(
    location: Location,
    layer_files: tuple[str, ...],
    config_file: str | None,
    platform: Platform | None,
    annotations: tuple[str, ...],
    force: bool,
    as_json: bool,
) -> None:
    """Make an image of LAYOUT from layer files, name it REF, and print its manifest's digest.

    Each layer is stored as it streams, with its media type from its content
    (gzip, zstd, else tar) and its diff ID (the digest of the uncompressed tar)
    computed on the way; a zstd layer's diff ID must be given in the config's
    rootfs.diff_ids. LAYOUT is created if it does not exist, and removed again if
    the command fails. Without REF the image is stored unnamed (gc collects it
    after the grace period unless it is tagged).

    \b
    JSON output (--json): the manifest's descriptor,
      {"mediaType", "digest", "size", "platform"?: {"os", "architecture", ...}}

    \b
    Examples:
      ocicas image ./images:v1 --layer base.tar --layer app.tar.gz
      tar -cf - -C rootfs . | ocicas image ./images:v1 --layer - --platform linux/arm64
      ocicas image ./images:v2 -l app.tar --config config.json -a org.opencontainers.image.version=2
    """
    if layer_files.count("-") > 1:
        raise click.UsageError("stdin (-) can be only one --layer")
    pairs = [_annotation(a) for a in annotations]
    manifest_annotations = dict(pairs) or None
    reference = location.reference
    created: list[Path] = []

    async def work(display: Display) -> Descriptor:
        config = await anyio.to_thread.run_sync(_load_config, config_file) if config_file is not None else None
        async with open_location(location, create=True, created=created) as engine:
            layers = [
                _Layer(name, display.bar(f"layer {'stdin' if name == '-' else os.path.basename(name)}"))
                for name in layer_files
            ]
            for layer in layers:
                await layer.open()
            kinds = {layer.media_type for layer in layers}
            for layer in layers:
                if layer.media_type == MEDIA_TYPE_IMAGE_LAYER_ZSTD and not _given_diff_ids(config):
                    raise UnsupportedError(
                        f"layer {layer.name} is zstd-compressed and ocicas cannot inflate zstd to compute its "
                        "diff ID: give every layer's uncompressed digest in the config's rootfs.diff_ids"
                    )
            if len(kinds) <= 1:
                descriptor = await build_image(
                    engine,
                    [layer.chunks() for layer in layers],
                    config=config,
                    annotations=manifest_annotations,
                    platform=platform,
                    layer_media_type=kinds.pop() if kinds else MEDIA_TYPE_IMAGE_LAYER,
                )
            else:
                descriptor = await _build_mixed(engine, layers, config, manifest_annotations, platform)
            if reference is not None:
                try:
                    await engine.update_references({reference: descriptor}, replace=force)
                except ClobberError as exc:
                    raise CommandError(f"{exc} (--force moves it)", ExitCode.CONFLICT) from exc
            return descriptor

    try:
        with Display() as display:
            descriptor = run(lambda: work(display))
    except BaseException:
        remove_created(created)
        raise
    if as_json:
        emit_json(descriptor.to_dict())
    else:
        click.echo(descriptor.digest)
