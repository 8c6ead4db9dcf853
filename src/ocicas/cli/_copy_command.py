"""``copy``: images from one location to another."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .._copy import DEFAULT_COPY_CONCURRENCY, CopyResult
from .._copy import copy as copy_image
from .._descriptor import Descriptor, Platform
from .._engine import Engine
from .._errors import ClobberError, NotFoundError
from .._graph import resolve_reference
from ._locations import LOCATION, Location, open_location, remove_created
from ._output import emit_json, json_option
from ._params import PLATFORM, human_size
from ._progress import CopyBars, Display
from ._run import CommandError, ExitCode, Interrupted, run

__all__ = ["copy"]


async def _single_manifest(engine: Engine, name: str, platform: Platform) -> Descriptor:
    """The one manifest reference ``name`` holds for ``platform`` (skopeo's and oras's choice)."""
    paths = await resolve_reference(engine, name, platform=platform)
    digests = sorted({path.descriptor.digest for path in paths})
    if not digests:
        raise NotFoundError(f"reference {name!r} has no manifest for platform {platform}")
    if len(digests) > 1:
        found = ", ".join(sorted({str(p.descriptor.platform) for p in paths}))
        raise CommandError(
            f"{len(digests)} manifests of reference {name!r} match platform {platform} ({found}): be more specific",
            ExitCode.USAGE,
        )
    return next(path.descriptor for path in paths)


def _summary(destination: Location, result: CopyResult) -> str:
    where = f"{destination.path}:{result.reference}" if result.reference else destination.path
    line = (
        f"{where} {result.root.digest}: copied {len(result.copied)} "
        f"blob{'' if len(result.copied) == 1 else 's'} ({human_size(result.bytes_copied)}), "
        f"{len(result.skipped)} already present"
    )
    if result.referrers:
        line += f", {len(result.referrers)} referrer{'' if len(result.referrers) == 1 else 's'}"
    if result.excluded:
        line += f", {len(result.excluded)} other-platform manifest{'' if len(result.excluded) == 1 else 's'} left out"
    return line


def _as_json(result: CopyResult) -> dict[str, Any]:
    return {
        "reference": result.reference,
        "root": result.root.to_dict(),
        "copied": list(result.copied),
        "copied_count": len(result.copied),
        "bytes_copied": result.bytes_copied,
        "skipped": list(result.skipped),
        "skipped_count": len(result.skipped),
        "bytes_skipped": result.bytes_skipped,
        "referrers": list(result.referrers),
        "referrers_count": len(result.referrers),
        "excluded": list(result.excluded),
        "excluded_count": len(result.excluded),
    }


@click.command()
@click.argument("source", metavar="SRC[:REF]", type=LOCATION)
@click.argument("destination", metavar="DST[:REF]", type=LOCATION)
@click.option("--referrers", is_flag=True, help="Copy the referrers (signatures, SBOMs…) of what is copied too.")
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    type=PLATFORM,
    help="Copy only this platform's manifests out of indexes (repeatable); the index is kept as is.",
)
@click.option(
    "--single",
    is_flag=True,
    help="With one --platform: copy only that platform's manifest and name it at DST (skopeo's and oras's way).",
)
@click.option("--no-clobber", is_flag=True, help="Fail (status 5) rather than move a reference DST has already.")
@click.option(
    "-j",
    "--concurrency",
    type=click.IntRange(1, 64),
    default=DEFAULT_COPY_CONCURRENCY,
    show_default=True,
    help="Blobs moved at once.",
)
@json_option
def copy(
    source: Location,
    destination: Location,
    referrers: bool,
    platforms: tuple[Platform, ...],
    single: bool,
    no_clobber: bool,
    concurrency: int,
    as_json: bool,
) -> None:
    """Copy reference REF of SRC, with everything it reaches, to DST.

    SRC and DST are layout directories (DIR or oci:DIR) or repositories on a
    registry (http://HOST:PORT/REPO, https://… or docker://HOST/REPO, which is
    HTTPS; credentials from the Docker config.json, OCICAS_TLS_VERIFY=0 to skip
    certificate checks). Without REF, every reference of SRC is copied. DST's reference defaults to
    the same name; DST is created if it does not exist, and removed again if the
    copy fails (a DST that existed is left as it was; an interrupted copy keeps
    what landed, for a rerun to finish). Blobs DST has already are
    not read again; every byte copied is verified; the reference is written
    last, so an interrupted copy leaves no reference to missing content, and a
    rerun moves only what is missing. Digests never change.

    With --platform, an index is copied whole but only the manifests of the
    given platforms (and what they reach) come with it: DST holds a partial
    index, which is legal in a layout (gc of DST then needs --broken-ok). With
    --single, only the one matching manifest is copied and named instead.

    \b
    JSON output (--json): a list, one object per reference copied:
      reference, root          the name at DST and the root's descriptor
      copied, copied_count     blobs copied, and bytes_copied
      skipped, skipped_count   blobs DST had already, and bytes_skipped
      referrers, referrers_count  referrers copied (--referrers)
      excluded, excluded_count    other-platform manifests left out (--platform)

    \b
    Examples:
      ocicas copy ./images:v1.0 ./backup
      ocicas copy ./images:v1.0 http://127.0.0.1:5000/team/app:v1.0
      ocicas copy oci:./images:v1.0 ./release:latest --referrers
      ocicas copy ./images:v1.0 ./amd64:v1.0 --platform linux/amd64 --single
      ocicas copy ./images ./mirror
    """
    if destination.reference is not None and source.reference is None:
        raise click.UsageError("DST:REF needs SRC:REF (without REF, every reference keeps its name)")
    if single and len(platforms) != 1:
        raise click.UsageError("--single needs exactly one --platform")

    created: list[Path] = []

    async def work(display: Display) -> list[CopyResult]:
        async with (
            open_location(source) as src,
            open_location(destination, create=True, created=created) as dst,
        ):
            names = [source.reference] if source.reference is not None else await src.list_references()
            results = []
            for name in names:
                root: str | Descriptor = name
                if single:
                    root = await _single_manifest(src, name, platforms[0])
                target = destination.reference or name
                try:
                    result = await copy_image(
                        src,
                        root,
                        dst,
                        target,
                        referrers=referrers,
                        platforms=platforms if platforms and not single else None,
                        replace=not no_clobber,
                        concurrency=concurrency,
                        progress=CopyBars(display, f"{name} → {destination.path}:{target}"),
                    )
                except ClobberError as exc:
                    raise CommandError(
                        f"{exc} (in {destination.path}; --no-clobber is set)", ExitCode.CONFLICT
                    ) from exc
                results.append(result)
            return results

    try:
        with Display() as display:
            results = run(lambda: work(display))
    except Interrupted:
        raise  # Ctrl-C: what landed stays, so a rerun moves only the rest
    except BaseException:
        remove_created(created)  # a failure: only a layout this command made goes, with what landed in it
        raise
    if as_json:
        emit_json([_as_json(result) for result in results])
    elif not results:
        click.echo(f"{source.path} has no references: nothing copied")
    else:
        for result in results:
            click.echo(_summary(destination, result))
