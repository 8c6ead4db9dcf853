"""Writing results: JSON for machines, aligned columns for people.

Everything here runs outside the event loop, after a command's work is done;
:func:`stdout_writer` is the one way to stream bytes to stdout from inside it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio.to_thread
import click

__all__ = ["emit_json", "emit_lines", "json_option", "stdout_writer"]

#: ``--json`` for every command that prints a result.
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")


def emit_json(value: Any) -> None:
    """Print ``value`` as indented JSON (digests and names as strings)."""
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def emit_lines(rows: Sequence[Sequence[str]]) -> None:
    """Print rows with every column but the last padded to a common width, two spaces apart."""
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)] + [row[-1]]
        click.echo("  ".join(cells).rstrip())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def stdout_writer() -> Callable[[bytes], Awaitable[None]]:
    """An async ``write(data)`` to stdout that runs in a worker thread (never blocking the event loop)."""
    sys.stdout.flush()
    fd = sys.stdout.fileno()

    async def write(data: bytes) -> None:
        await anyio.to_thread.run_sync(_write_all, fd, data)

    return write
