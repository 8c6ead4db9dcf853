"""``init``, ``put``, ``cat``, ``blobs`` and ``rm``: a layout and its blobs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import click

from .._digest import Digest
from .._dir import create_layout
from .._engine import Engine
from .._errors import BlobNotFoundError
from .._graph import walk
from .._layout_format import ANNOTATION_REF_NAME
from ._locations import open_location
from ._output import emit_json, emit_lines, json_option, stdout_writer
from ._params import DIGEST
from ._progress import Bar, Display
from ._run import CommandError, ExitCode, run
from ._stdin import stdin_chunks

__all__ = ["blobs", "cat", "init", "put", "rm"]

_CHUNK = 4 << 20
_LAYOUT = click.Path(file_okay=False)


@click.command()
@click.argument("layout", type=_LAYOUT)
def init(layout: str) -> None:
    """Create an empty OCI image layout at LAYOUT.

    Parent directories are created as needed; LAYOUT must not exist yet.

    \b
    Example:
      ocicas init ./images
    """
    run(lambda: create_layout(layout))


async def _file_chunks(path: str, bar: Bar) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as file:
        while chunk := await file.read(_CHUNK):
            yield chunk
            bar.advance(len(chunk))


async def _counted(chunks: AsyncIterator[bytes], bar: Bar) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk
        bar.advance(len(chunk))


@click.command()
@click.argument("layout", type=_LAYOUT)
@click.argument("file", default="-")
@click.option("--digest", "expected", type=DIGEST, help="Refuse the content unless it hashes to this digest.")
@json_option
def put(layout: str, file: str, expected: Digest | None, as_json: bool) -> None:
    """Store FILE (or stdin, with - or no FILE) as a blob of LAYOUT and print its digest.

    The blob is hashed as it streams and lands atomically: an interrupted put
    leaves nothing behind. Storing content that is already there only freshens it.

    \b
    JSON output (--json): {"digest", "size"}

    \b
    Examples:
      ocicas put ./images layer.tar.gz
      curl -sL https://example.com/layer.tar | ocicas put ./images - --digest sha256:…
    """

    async def work(display: Display) -> tuple[Digest, int]:
        async with open_location(layout) as engine:
            if file == "-":
                bar = display.bar("put stdin")
                source = _counted(stdin_chunks(_CHUNK), bar)
            else:
                size = (await anyio.Path(file).stat()).st_size
                bar = display.bar(f"put {file}", size)
                source = _file_chunks(file, bar)
            return await engine.put_blob(source, expected_digest=expected)

    with Display() as display:
        digest, size = run(lambda: work(display))
    if as_json:
        emit_json({"digest": digest, "size": size})
    else:
        click.echo(digest)


@click.command()
@click.argument("layout", type=_LAYOUT)
@click.argument("digest", type=DIGEST)
def cat(layout: str, digest: Digest) -> None:
    """Write blob DIGEST of LAYOUT to stdout, verified as it streams.

    If the blob is corrupt, the output stops before its last chunk and the exit
    status is 4: the bytes written never complete a blob that does not match.

    \b
    Example:
      ocicas cat ./images sha256:… | jq .
    """
    write = stdout_writer()

    async def work() -> None:
        async with open_location(layout) as engine, await engine.get_blob(digest) as reader:
            while chunk := await reader.read(_CHUNK):
                await write(chunk)

    run(work)


@click.command()
@click.argument("layout", type=_LAYOUT)
@click.option("-l", "--long", is_flag=True, help="Show each blob's size too.")
@json_option
def blobs(layout: str, long: bool, as_json: bool) -> None:
    """List the digests of every blob in LAYOUT, sorted.

    \b
    JSON output (--json): [{"digest", "size"}, ...], sorted by digest

    \b
    Examples:
      ocicas blobs ./images
      ocicas blobs --json ./images | jq '[.[].size] | add'
    """

    async def work() -> list[tuple[Digest, int]]:
        async with open_location(layout) as engine:
            digests = await engine.list_blobs()
            if not (long or as_json):
                return [(d, -1) for d in digests]
            infos = await engine.stat_blobs(digests)
            return [(d, infos[d].size) for d in digests if d in infos]

    found = run(work)
    if as_json:
        emit_json([{"digest": d, "size": size} for d, size in found])
    elif long:
        emit_lines([(d, str(size)) for d, size in found])
    else:
        for digest, _ in found:
            click.echo(digest)


async def _users(engine: Engine, digests: list[Digest]) -> dict[Digest, str]:
    """Which root (named, if it has a name) reaches each of ``digests``."""
    users: dict[Digest, str] = {}
    for root in await engine.list_roots():
        graph = await walk(engine, [root], broken_ok=True)
        name = (root.annotations or {}).get(ANNOTATION_REF_NAME)
        for digest in digests:
            if digest in graph and digest not in users:
                users[digest] = f"reference {name!r}" if name else f"unnamed root {root.digest}"
    return users


@click.command()
@click.argument("layout", type=_LAYOUT)
@click.argument("digests", metavar="DIGEST...", nargs=-1, required=True, type=DIGEST)
@click.option("-f", "--force", is_flag=True, help="Remove blobs in use too, and ignore absent ones.")
@json_option
def rm(layout: str, digests: tuple[Digest, ...], force: bool, as_json: bool) -> None:
    """Remove blobs from LAYOUT.

    A blob that a reference reaches is not removed (exit status 5), nor is an
    absent one reported as removed (exit status 3), unless --force is given.
    To remove everything no reference reaches, use gc.

    \b
    JSON output (--json): {"removed": [digest, ...], "removed_count"}

    \b
    Example:
      ocicas rm ./images sha256:…
    """

    async def work() -> list[Digest]:
        wanted = list(dict.fromkeys(digests))
        async with open_location(layout) as engine:
            present = await engine.stat_blobs(wanted)
            if not force:
                for digest in wanted:
                    if digest not in present:
                        raise BlobNotFoundError(f"blob {digest} not found")
                users = await _users(engine, wanted)
                if users:
                    digest, user = next(iter(users.items()))
                    raise CommandError(
                        f"blob {digest} is in use by {user}: not removing it (--force removes it anyway)",
                        ExitCode.CONFLICT,
                    )
            for digest in wanted:
                await engine.delete_blob(digest)
            return [d for d in wanted if d in present]

    removed = run(work)
    if as_json:
        emit_json({"removed": removed, "removed_count": len(removed)})
