"""Task groups that raise the error callers catch, and shields that end.

A walk or a sweep fails for one reason that callers want to catch by type
(``except BlobNotFoundError``), not wrapped in a ``BaseExceptionGroup``; the
other failures of the same group are chained to it, never dropped. Code that
must run even when cancelled (closing a foreign generator or a connection)
runs under :func:`bounded_shield`, so a stuck peer cannot hold a task forever.
Other threads hand work to the event loop, without waiting, through :func:`loop_caller`.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import anyio
import anyio.abc
import anyio.lowlevel

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["SHIELD_TIMEOUT", "bounded_shield", "loop_caller", "task_group"]

#: Sibling failures listed in the first one's notes, at most.
_MAX_NOTES: Final = 4
#: Seconds clean-up of foreign resources may take while shielded from cancellation.
SHIELD_TIMEOUT: Final = 5.0


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


@asynccontextmanager
async def task_group() -> AsyncIterator[anyio.abc.TaskGroup]:
    """``anyio.create_task_group()``, re-raising the first ``Exception`` a task raised.

    Any other failures of the group come along: as the first error's ``__cause__``
    (the whole group) when it has none of its own, else in its ``__notes__``. A lone
    failure keeps its own ``__cause__``.
    """
    try:
        async with anyio.create_task_group() as tg:
            yield tg
    except BaseExceptionGroup as group:
        leaves = [e for e in _leaves(group) if isinstance(e, Exception)]
        if not leaves:
            raise
        first = leaves[0]
        if len(leaves) == 1:
            raise first from first.__cause__  # its own cause kept; the group, a mere wrapper, dropped
        if first.__cause__ is None:
            raise first from group
        notes = first.__dict__.setdefault("__notes__", [])
        notes.extend(f"also failed: {type(e).__name__}: {e}" for e in leaves[1:_MAX_NOTES])
        if len(leaves) > _MAX_NOTES:
            notes.append(f"and {len(leaves) - _MAX_NOTES} more failures")
        raise first from first.__cause__


def bounded_shield(seconds: float = SHIELD_TIMEOUT) -> anyio.CancelScope:
    """A cancel scope shielded from outside cancellation, that gives up after ``seconds``."""
    return anyio.move_on_after(seconds, shield=True)


def loop_caller(token: anyio.lowlevel.EventLoopToken | None = None) -> Callable[[Callable[[], object]], None]:
    """A function that has a callable run on the event loop of ``token`` (default: the running one) soon, from
    any thread, without waiting for it; it raises :class:`RuntimeError` once that loop is closed (an asyncio
    loop that stopped but is not closed keeps the call for when it runs again)."""
    native: Any = (token or anyio.lowlevel.current_token()).native_token
    if hasattr(native, "call_soon_threadsafe"):  # asyncio
        return native.call_soon_threadsafe  # type: ignore[no-any-return]
    return native.run_sync_soon  # type: ignore[no-any-return]  # trio
