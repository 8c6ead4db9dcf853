"""Stale temporary directories of a layout: what a killed ocicas process left behind.

A directory engine keeps its temporary files in a ``.ocicas-*`` directory of the
layout that it holds an ``flock`` on while it lives. One nobody holds is stale:
not damage (no blob or reference depends on it), only space that
:meth:`~ocicas.Engine.gc` gives back.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os

import anyio.to_thread

from .._dir import TEMP_PREFIX, DirEngine
from .._engine import Engine

__all__ = ["StaleDir", "stale_temp_dirs", "still_there"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclasses.dataclass(frozen=True)
class StaleDir:
    """A temporary directory no live engine holds, and the bytes of the files in it."""

    name: str
    size: int


def _tree_size(path: str) -> int:
    total = 0
    for top, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
            except OSError:
                pass  # removed meanwhile
    return total


def _held(path: str) -> bool | None:
    """Whether a live engine holds ``path`` (``None``: not a directory we can open)."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops the lock we may have taken
    return False


def _scan(root: str) -> list[StaleDir]:
    found = []
    with os.scandir(root) as entries:
        names = sorted(e.name for e in entries if e.name.startswith(TEMP_PREFIX) and e.is_dir(follow_symlinks=False))
    for name in names:
        path = os.path.join(root, name)
        if _held(path) is False:
            found.append(StaleDir(name, _tree_size(path)))
    return found


async def stale_temp_dirs(engine: Engine) -> list[StaleDir]:
    """The stale temporary directories of ``engine``'s layout, by name (none for other engines)."""
    if not isinstance(engine, DirEngine):
        return []
    return await anyio.to_thread.run_sync(_scan, str(engine.path))


async def still_there(engine: Engine, dirs: list[StaleDir]) -> set[str]:
    """The names among ``dirs`` that still exist in ``engine``'s layout."""
    if not isinstance(engine, DirEngine) or not dirs:
        return set()
    root = str(engine.path)

    def check() -> set[str]:
        return {d.name for d in dirs if os.path.lexists(os.path.join(root, d.name))}

    return await anyio.to_thread.run_sync(check)
