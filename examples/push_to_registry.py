"""Push a tag of an image layout to a registry: ``ocicas.copy`` from a directory engine to a registry engine.

    python examples/push_to_registry.py LAYOUT TAG http://127.0.0.1:5000/team/app[:TAG] [--trio]

The destination tag defaults to ``TAG``. Credentials come from Docker's
``config.json`` (``$DOCKER_CONFIG`` or ``~/.docker/config.json``), as ``docker push``
finds them; locations without a scheme are ``https://``. Blobs the repository
already holds are not sent again, so a second push of the same tag moves nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import anyio

import ocicas
from ocicas.registry import parse_registry_location


async def push(layout: Path, tag: str, destination: str) -> ocicas.CopyResult:
    """Copy everything ``tag`` reaches in ``layout`` to ``destination``, then tag it there."""
    location = parse_registry_location(destination)
    dst_tag = location.reference or tag
    if ":" in dst_tag:
        raise ValueError(f"{destination}: push to a tag, not a digest")
    async with (
        await ocicas.open_layout(layout) as src,
        await ocicas.open_registry(dataclasses.replace(location, reference=None)) as dst,
    ):
        started: list[str] = []

        def progress(event: ocicas.CopyEvent) -> None:
            if event.kind == "started" and event.descriptor is not None:
                started.append(event.descriptor.digest)
                print(f"  {event.descriptor.media_type} {event.descriptor.digest} ({event.descriptor.size} bytes)")

        result = await ocicas.copy(src, tag, dst, dst_tag, progress=progress)
        pushed = await dst.get_reference(dst_tag)  # what the registry now says the tag is
    assert pushed.digest == result.root.digest
    print(
        f"pushed {len(result.copied)} blobs ({result.bytes_copied} bytes), {len(result.skipped)} already there; "
        f"{location.repository}:{dst_tag} is {pushed.digest}"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Push a tag of an OCI image layout to a registry.")
    parser.add_argument("layout", type=Path)
    parser.add_argument("tag")
    parser.add_argument("destination", help="[http[s]://]host[:port]/repository[:tag]")
    parser.add_argument("--trio", action="store_true", help="run on trio instead of asyncio")
    args = parser.parse_args()
    anyio.run(push, args.layout, args.tag, args.destination, backend="trio" if args.trio else "asyncio")


if __name__ == "__main__":
    main()
