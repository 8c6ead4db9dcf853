"""Leases: content a writer has put but not yet tagged, kept from every collector until the lease ends.

As containerd's leases: ``async with engine.lease():`` records every blob this
task (and the tasks it starts) puts into the engine, under the shared side of
the collector's lock, and :func:`ocicas.gc` keeps every blob a live lease holds,
whatever its grace period. A lease ends with its ``async with`` block; the
directory engine keeps each lease in a ``flock``-held file inside its temporary
directory, so collectors in other processes see it and a dead process's leases
expire with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING

from ._checks import check_ctx, check_digests_yielding
from ._context import Context
from ._digest import Digest

if TYPE_CHECKING:
    from ._engine import BlobInfo, Engine

__all__ = ["Lease", "active_lease"]

#: The leases the current task runs inside, innermost last.
_active: ContextVar[tuple[Lease, ...]] = ContextVar("ocicas_leases", default=())


class Lease:
    """A live lease of one engine (see :meth:`Engine.lease`)."""

    def __init__(self, engine: Engine, lease_id: str) -> None:
        self.engine = engine
        self.id = lease_id
        self._digests: set[Digest] = set()

    @property
    def digests(self) -> frozenset[Digest]:
        """The blobs this lease protects."""
        return frozenset(self._digests)

    async def add(self, digests: Iterable[Digest | str], *, ctx: Context | None = None) -> dict[Digest, BlobInfo]:
        """Protect the present blobs among ``digests`` too; return them (absent ones are left out).

        For content a writer reuses rather than puts (``copy`` skipping what the
        destination has): from this call on no collector removes it.
        """
        ctx = check_ctx(ctx)
        wanted = await check_digests_yielding(digests)
        engine = self.engine
        async with engine._operation(ctx), engine._gc_shared():
            found = await engine._stat_blobs(wanted, 0)
            await self._record(list(found))
        return found

    async def _record(self, digests: list[Digest]) -> None:
        fresh = [d for d in digests if d not in self._digests]
        if fresh:
            await self.engine._lease_record(self.id, fresh)
            self._digests.update(fresh)

    def __repr__(self) -> str:
        return f"<Lease {self.id} of {self.engine!r}: {len(self._digests)} blobs>"


def active_lease(engine: Engine) -> Lease | None:
    """The innermost lease of ``engine`` the current task runs inside, if any."""
    for lease in reversed(_active.get()):
        if lease.engine is engine:
            return lease
    return None


def enter(lease: Lease) -> object:
    """Make ``lease`` active in the current context; returns the token for :func:`leave`."""
    return _active.set((*_active.get(), lease))


def leave(token: object) -> None:
    _active.reset(token)  # type: ignore[arg-type]
