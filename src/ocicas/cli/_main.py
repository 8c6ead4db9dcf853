"""The ``ocicas`` command group: global options and the list of subcommands."""

from __future__ import annotations

import click

from .. import __version__
from ._blob_commands import blobs, cat, init, put, rm
from ._copy_command import copy
from ._maintenance_commands import fsck, gc
from ._reference_commands import refs, tag, tree, untag
from ._run import EXIT_CODES_HELP, StdoutClosed, settings

__all__ = ["cli"]


class _Group(click.Group):
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
@click.version_option(__version__, "-V", "--version", prog_name="ocicas")
def cli(debug: bool, backend: str, progress: str) -> None:
    """Store, copy, check and garbage-collect OCI images in image layouts.

    A layout is a directory in the OCI image-layout format (oci-layout,
    index.json, blobs/sha256/...), as umoci and skopeo read and write it.
    Run "ocicas COMMAND --help" for a command's options and examples.

    \b
    Examples:
      ocicas init ./images
      ocicas put ./images layer.tar            # prints sha256:...
      ocicas tag ./images v1 sha256:...        # name a manifest or index
      ocicas tree ./images:v1
      ocicas copy ./images:v1 ./backup
      ocicas gc --dry-run ./images
      ocicas fsck ./images
    """
    settings.debug = debug
    settings.backend = backend
    settings.progress = progress


for _command in (init, put, cat, blobs, rm, tag, untag, refs, tree, gc, fsck, copy):
    cli.add_command(_command)
