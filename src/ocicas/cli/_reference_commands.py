"""``tag``, ``untag``, ``refs`` and ``tree``: the references of a layout and what they reach."""

from __future__ import annotations

import click

from .._blob import from_descriptor
from .._descriptor import Descriptor
from .._digest import Digest
from .._engine import Engine
from .._errors import ClobberError, InvalidError
from .._json import DEFAULT_JSON_LIMIT, load_json
from .._layout_format import ANNOTATION_REF_NAME
from .._media_types import INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES, MEDIA_TYPE_DESCRIPTOR
from ._locations import LOCATION, Location, open_location
from ._output import emit_json, emit_lines, json_option
from ._params import DIGEST, MEDIA_TYPE, REFERENCE
from ._run import CommandError, ExitCode, run
from ._tree import TreeNode, build_tree, damaged, render_tree, tree_json

__all__ = ["refs", "tag", "tree", "untag"]

_LAYOUT = click.Path(file_okay=False)
_DOCUMENT_TYPES = MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES


async def _sniff(engine: Engine, digest: Digest, size: int) -> str:
    """The ``mediaType`` a manifest or index declares, or a usage error asking for --media-type."""
    declared = None
    if size <= DEFAULT_JSON_LIMIT:
        try:
            document = load_json(await engine.read_blob(digest), f"blob {digest}")
            declared = document.get("mediaType") if isinstance(document, dict) else None
        except InvalidError:
            declared = None  # not JSON: a layer or some other blob
    if declared not in _DOCUMENT_TYPES:
        raise CommandError(
            f"cannot tell the media type of {digest}: it is not a manifest or index declaring its mediaType; "
            "pass --media-type",
            ExitCode.USAGE,
        )
    assert isinstance(declared, str)
    return declared


@click.command()
@click.argument("layout", type=_LAYOUT)
@click.argument("name", type=REFERENCE)
@click.argument("digest", type=DIGEST)
@click.option(
    "--media-type",
    type=MEDIA_TYPE,
    help="The blob's media type (default: the mediaType a manifest or index declares).",
)
@click.option("-f", "--force", is_flag=True, help="Move NAME if it already names something else.")
@click.option(
    "--partial",
    is_flag=True,
    help="Name it even if content it reaches is missing (a partial layout, on purpose).",
)
@json_option
def tag(
    layout: str, name: str, digest: Digest, media_type: str | None, force: bool, partial: bool, as_json: bool
) -> None:
    """Name blob DIGEST of LAYOUT as reference NAME.

    The size is read from the blob. Manifests and indexes are checked to parse
    as their media type, and everything they reach (index entries, configs,
    layers; not a subject) to be present, before they are named (exit 3 names
    what is missing; --partial skips that check).

    \b
    JSON output (--json): {"name", "mediaType", "digest", "size"}

    \b
    Examples:
      ocicas tag ./images v1.0 sha256:…
      ocicas tag ./images sbom sha256:… --media-type application/spdx+json
    """

    async def work() -> Descriptor:
        async with open_location(layout) as engine:
            size = await engine.stat_blob(digest)
            kind = media_type if media_type is not None else await _sniff(engine, digest, size)
            descriptor = Descriptor(media_type=kind, digest=digest, size=size)
            if kind in _DOCUMENT_TYPES or kind == MEDIA_TYPE_DESCRIPTOR:
                await from_descriptor(engine, descriptor)  # InvalidError unless it parses as `kind`
            try:
                await engine.update_references({name: descriptor}, replace=force, partial=partial)
            except ClobberError as exc:
                raise CommandError(f"{exc} (--force moves it)", ExitCode.CONFLICT) from exc
            return descriptor

    descriptor = run(work)
    if as_json:
        emit_json({"name": name, **descriptor.to_dict()})


@click.command()
@click.argument("layout", type=_LAYOUT)
@click.argument("name", type=REFERENCE)
@click.option("-f", "--force", is_flag=True, help="Do not fail if NAME does not exist.")
def untag(layout: str, name: str, force: bool) -> None:
    """Remove reference NAME from LAYOUT (what it named stays until gc).

    \b
    Example:
      ocicas untag ./images v1.0 && ocicas gc ./images
    """

    async def work() -> None:
        async with open_location(layout) as engine:
            if not force:
                await engine.get_reference(name)  # ReferenceNotFoundError
            await engine.delete_reference(name)

    run(work)


@click.command()
@click.argument("layout", type=_LAYOUT)
@json_option
def refs(layout: str, as_json: bool) -> int:
    """List the references of LAYOUT: name, media type, digest and size in bytes.

    A reference whose index.json entry does not parse is left out and named on
    stderr, and the exit status is then 4.

    \b
    JSON output (--json): [{"name", "mediaType", "digest", "size", ...}, ...]

    \b
    Examples:
      ocicas refs ./images
      ocicas refs --json ./images | jq -r '.[].name'
    """

    async def work() -> tuple[list[tuple[str, Descriptor]], list[str]]:
        async with open_location(layout) as engine:
            good, bad = [], []
            for name in await engine.list_references():
                try:
                    good.append((name, await engine.get_reference(name)))
                except InvalidError as exc:  # a bad index.json entry: refused on its own
                    bad.append(str(exc))
            return good, bad

    found, bad = run(work)
    if as_json:
        emit_json([{"name": name, **descriptor.to_dict()} for name, descriptor in found])
    else:
        emit_lines([(name, d.media_type, d.digest, str(d.size)) for name, d in found])
    for message in bad:
        click.echo(f"ocicas: error: {message}", err=True)
    return ExitCode.INVALID if bad else ExitCode.OK


@click.command()
@click.argument("location", metavar="LAYOUT[:REF]", type=LOCATION)
@json_option
def tree(location: Location, as_json: bool) -> int:
    """Show what reference REF of LAYOUT reaches (every root without REF) as a tree.

    Each line gives a descriptor's media type, digest, size and platform, and
    marks content that is missing, invalid, or shown above already, and a
    referrer's subject that is absent (a weak link: not damage). The exit status
    is 4 if anything is missing or invalid, an index.json entry that does not
    parse included (named on stderr).

    \b
    JSON output (--json): [{"reference", "root": node}, ...], each node the
    descriptor's fields (mediaType, digest, size, platform, annotations...) and
      edge       "subject" for a referrer's edge to its subject, else null
      state      ok, missing, invalid, repeated (shown above already) or
                 absent (a subject not in the layout)
      error      why it is invalid, else null
      children   [node, ...]

    \b
    Examples:
      ocicas tree ./images:v1.0
      ocicas tree ./images
      ocicas tree --json ./images:v1.0 | jq '.[0].root.children[].platform'
    """

    async def work() -> tuple[list[tuple[str | None, TreeNode]], list[str]]:
        async with open_location(location) as engine:
            roots: list[tuple[str | None, Descriptor]]
            bad: list[str] = []
            if location.reference is not None:
                roots = [(location.reference, await engine.get_reference(location.reference))]
            else:
                named: list[tuple[str | None, Descriptor]] = []
                unnamed: list[tuple[str | None, Descriptor]] = []
                for root in await engine.list_roots():
                    name = (root.annotations or {}).get(ANNOTATION_REF_NAME)
                    (named if name is not None else unnamed).append((name, root))
                roots = sorted(named, key=lambda pair: pair[0] or "") + unnamed
                bad = [str(entry) for entry in await engine.list_broken_roots()]
            return [(name, await build_tree(engine, root)) for name, root in roots], bad

    trees, bad = run(work)
    if as_json:
        emit_json([{"reference": name, "root": tree_json(node)} for name, node in trees])
    else:
        for number, (name, node) in enumerate(trees):
            if number:
                click.echo()
            for line in render_tree(name if name is not None else "(unnamed)", node):
                click.echo(line)
    for message in bad:
        click.echo(f"ocicas: error: {message}", err=True)
    return ExitCode.INVALID if bad or any(damaged(node) for _, node in trees) else ExitCode.OK
