"""The real OCI tools (umoci, skopeo) for interoperability tests.

:func:`require` finds a binary or skips the test with the reason; with
``OCICAS_REQUIRE_TOOLS=1`` in the environment (CI sets it) a missing binary fails
the test instead. :class:`Tool` runs it with :func:`anyio.run_process`, off the
event loop, and fails with the tool's own stderr when it exits non-zero.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import anyio
import pytest

#: Set to ``1`` to turn "tool missing: skipped" into a test failure.
REQUIRE_TOOLS_ENV = "OCICAS_REQUIRE_TOOLS"


class ToolError(AssertionError):
    """A tool exited non-zero; the message holds its command line, status and stderr."""

    def __init__(self, argv: list[str], returncode: int, stdout: bytes, stderr: bytes) -> None:
        super().__init__(
            f"{' '.join(argv)} exited {returncode}:\n{stderr.decode(errors='replace').strip()}"
            f"\n{stdout.decode(errors='replace').strip()}".rstrip()
        )
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


@dataclasses.dataclass(frozen=True)
class Tool:
    """An installed command-line tool."""

    name: str
    path: str

    async def run(self, *args: str | os.PathLike[str], check: bool = True) -> bytes:
        """Run the tool with ``args``; return its stdout (raise :class:`ToolError` on failure when ``check``)."""
        argv = [self.path, *(os.fspath(arg) for arg in args)]
        result = await anyio.run_process(argv, check=False)
        if check and result.returncode != 0:
            raise ToolError(argv, result.returncode, result.stdout, result.stderr)
        return result.stdout

    async def json(self, *args: str | os.PathLike[str]) -> Any:
        """Run the tool and parse its stdout as JSON."""
        return json.loads(await self.run(*args))

    async def lines(self, *args: str | os.PathLike[str]) -> list[str]:
        """Run the tool and return its non-empty stdout lines."""
        return [line for line in (await self.run(*args)).decode().splitlines() if line.strip()]

    async def version(self) -> str:
        """The first line of ``--version``, e.g. ``"umoci version 0.4.7+ds-3+b7"``."""
        return (await self.lines("--version"))[0]


def require(name: str) -> Tool:
    """The tool ``name`` from ``PATH``; skip the test if absent (fail it under ``OCICAS_REQUIRE_TOOLS=1``)."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (Debian package {name!r}; scripts/test.sh installs it as root)"
        if os.environ.get(REQUIRE_TOOLS_ENV) == "1":
            pytest.fail(f"{reason}, and {REQUIRE_TOOLS_ENV}=1 requires it")
        pytest.skip(reason)
    return Tool(name, path)
