"""The ``ocicas`` command group: global options and the list of subcommands."""

from __future__ import annotations

import click

from .. import __version__
from ._blob_commands import blobs, cat, init, put, rm
from ._copy_command import copy
from ._image_command import image
from ._maintenance_commands import fsck, gc
from ._reference_commands import refs, tag, tree, untag
from ._run import EXIT_CODES_HELP, StdoutClosed, settings

__all__ = ["cli"]


_GLOBAL_FLAGS = frozenset({"--debug", "--direct-writes"})
_GLOBAL_WITH_VALUE = frozenset({"--backend", "--progress"})


def hoist_global_options(args: list[str]) -> list[str]:
    """``args`` with the group's options written after the subcommand moved before it.

    Click reads a group's options only before the subcommand; users write
    ``ocicas copy a b --progress always`` too. Nothing after ``--`` moves.
    """
    position = 0
    while position < len(args):  # find the subcommand, stepping over the group's options and their values
        arg = args[position]
        if arg == "--":
            return args
        if not arg.startswith("-"):
            break
        position += 2 if arg in _GLOBAL_WITH_VALUE else 1
    else:
        return args
    moved: list[str] = []
    kept: list[str] = []
    rest = args[position + 1 :]
    index = 0
    while index < len(rest):
        arg = rest[index]
        if arg == "--":
            kept.extend(rest[index:])
            break
        if arg in _GLOBAL_WITH_VALUE:
            if index + 1 == len(rest):  # moved to the front, it would take the subcommand as its value
                raise click.BadOptionUsage(arg, f"Option '{arg}' requires an argument.")
            moved.extend(rest[index : index + 2])
            index += 2
            continue
        if arg in _GLOBAL_FLAGS or arg.partition("=")[0] in _GLOBAL_WITH_VALUE:
            moved.append(arg)
        else:
            kept.append(arg)
        index += 1
    return [*args[:position], *moved, args[position], *kept]


class _Group(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(args))

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # click would turn it into status 1
            raise StdoutClosed() from None


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EXIT_CODES_HELP,
)
@click.option(
    "--debug",
    is_flag=True,
    envvar="OCICAS_DEBUG",
    help="Show the traceback of an error. [env: OCICAS_DEBUG]",
)
@click.option(
    "--backend",
    type=click.Choice(["asyncio", "trio"]),
    default="asyncio",
    envvar="OCICAS_BACKEND",
    show_default=True,
    help="Event loop to run on (trio must be installed). [env: OCICAS_BACKEND]",
)
@click.option(
    "--progress",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    envvar="OCICAS_PROGRESS",
    show_default=True,
    help="Progress bars on stderr: on a terminal only (auto), always or never. [env: OCICAS_PROGRESS]",
)
@click.option(
    "--direct-writes",
    is_flag=True,
    envvar="OCICAS_DIRECT_WRITES",
    help="Write blobs of 4 MiB or more into layouts past the page cache (O_DIRECT). [env: OCICAS_DIRECT_WRITES]",
)
@click.version_option(__version__, "-V", "--version", prog_name="ocicas")
def cli(debug: bool, backend: str, progress: str, direct_writes: bool) -> None:
    """Store, copy, check and garbage-collect OCI images in image layouts.

    A layout is a directory in the OCI image-layout format (oci-layout,
    index.json, blobs/sha256/...), as umoci and skopeo read and write it.
    Run "ocicas COMMAND --help" for a command's options and examples. The
    options below may come before or after COMMAND.

    \b
    Examples:
      ocicas init ./images
      ocicas image ./images:v1 --layer a.tar --layer b.tar.gz
      ocicas put ./images layer.tar            # prints sha256:...
      ocicas tag ./images v2 sha256:...        # name a manifest or index
      ocicas tree ./images:v1
      ocicas copy ./images:v1 ./backup
      ocicas gc --dry-run ./images
      ocicas fsck ./images
    """
    settings.debug = debug
    settings.backend = backend
    settings.progress = progress
    settings.direct_writes = direct_writes


for _command in (init, put, cat, blobs, rm, image, tag, untag, refs, tree, gc, fsck, copy):
    cli.add_command(_command)
