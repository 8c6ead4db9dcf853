"""A task group that raises the first real error rather than an exception group.

A walk or a sweep fails for one reason that callers want to catch by type
(``except BlobNotFoundError``), not wrapped in a ``BaseExceptionGroup``.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["task_group"]


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


@asynccontextmanager
async def task_group() -> AsyncIterator[anyio.abc.TaskGroup]:
    """``anyio.create_task_group()``, re-raising the first ``Exception`` a task raised."""
    try:
        async with anyio.create_task_group() as tg:
            yield tg
    except BaseExceptionGroup as group:
        first = next((e for e in _leaves(group) if isinstance(e, Exception)), None)
        if first is None:
            raise
        raise first from None
