"""The ``ocicas`` console script: runs :func:`ocicas.cli.main`, or says in one line how to install the command.

The command's dependencies are the ``cli`` extra (as httpx's own command is ``httpx[cli]``).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Final, NoReturn

__all__ = ["CLI_REQUIREMENTS", "main"]

#: The modules the command needs beyond the core: the ``cli`` extra (httpx for registry locations).
CLI_REQUIREMENTS: Final = ("click", "rich", "httpx")

_USAGE_STATUS: Final = 2  # ExitCode.USAGE, which lives in ocicas.cli


def main() -> NoReturn:
    """The ``ocicas`` console script."""
    missing = [name for name in CLI_REQUIREMENTS if importlib.util.find_spec(name) is None]
    if missing:
        names = " and ".join(filter(None, [", ".join(missing[:-1]), missing[-1]]))
        print(
            f"ocicas: the command needs {names} (not installed): pip install 'ocicas[cli]'",
            file=sys.stderr,
        )
        sys.exit(_USAGE_STATUS)
    from .cli import main as cli_main

    cli_main()
