"""The ``ocicas`` command: OCI image layouts from the shell.

Each subcommand is a thin layer over the library's public API. :func:`main` is
the installed entry point; :func:`invoke` runs the command line in-process and
returns the exit status (for tests and embedding).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import click

from ._main import cli
from ._run import ExitCode, report_error

__all__ = ["ExitCode", "cli", "invoke", "main"]


def invoke(args: Sequence[str] | None = None) -> int:
    """Run ``ocicas`` with ``args`` (default: ``sys.argv[1:]``) and return its exit status."""
    try:
        status = cli.main(args=list(args) if args is not None else None, prog_name="ocicas", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:  # Ctrl-C while click itself was busy
        return ExitCode.INTERRUPTED
    except Exception as exc:
        return report_error(exc)
    return status if isinstance(status, int) else ExitCode.OK


def main() -> NoReturn:
    """The ``ocicas`` console script."""
    status = invoke()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        status = ExitCode.BROKEN_PIPE
    if status == ExitCode.BROKEN_PIPE:
        # Python would complain about the closed pipe again while exiting
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    sys.exit(status)
