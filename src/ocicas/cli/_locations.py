"""Where images live, as written on the command line, and opening them as engines.

A location is an OCI image layout directory with an optional reference,
``DIR[:REF]`` (skopeo's ``oci:DIR[:REF]`` spelling is accepted too), or a
repository on a registry, ``http[s]://HOST[:PORT]/REPO[:TAG][@DIGEST]`` or a
Docker reference ``docker://[HOST[:PORT]/]REPO[:TAG][@DIGEST]`` (HTTPS; Docker Hub
when the first component is not a host, as in ``docker pull``). :func:`parse_location` is the one
place that reads the syntax, and :func:`open_location` the one place that turns
a location into an :class:`~ocicas.Engine`. Registry credentials come from the
Docker ``config.json``; ``OCICAS_TLS_VERIFY=0`` skips certificate checks.
``--direct-writes`` (``OCICAS_DIRECT_WRITES=1``) opens layouts with ``direct_writes``.

A command that creates a destination layout and then fails removes it again
(``open_location(..., created=)`` records what it made, :func:`remove_created`
removes it): a layout the user already had is never touched.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import click

from .._dir import create_layout, open_layout
from .._engine import Engine
from .._errors import InvalidError, LayoutExistsError, LayoutNotFoundError
from .._layout_format import validate_reference_name
from .._threads import run_sync
from ..registry import open_registry, parse_registry_location
from ._run import settings

__all__ = ["LOCATION", "Location", "open_location", "parse_location", "remove_created"]

_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_REGISTRY_SCHEMES: Final = ("http://", "https://", "docker://")

if TYPE_CHECKING:  # generic since click 8.5; plain before
    _ParamType = click.ParamType[Any, Any]
else:
    _ParamType = click.ParamType


@dataclasses.dataclass(frozen=True)
class Location:
    """A place images are read from or written to."""

    kind: Literal["layout", "registry"]
    #: The layout directory, or the repository's URL (``http://host:5000/team/app``).
    path: str
    #: The reference name, if one was given.
    reference: str | None

    def __str__(self) -> str:
        return self.path if self.reference is None else f"{self.path}:{self.reference}"


def parse_location(text: str) -> Location:
    """Parse ``DIR[:REF]`` or ``oci:DIR[:REF]``; raise :class:`~ocicas.InvalidError` naming what is wrong.

    The path ends at the first ``:`` (as in skopeo), so a reference name may hold
    colons but a directory name written this way may not.
    """
    if text.startswith(_REGISTRY_SCHEMES):
        registry = parse_registry_location(text)  # with a tag and a digest, the digest is the reference
        repository = str(dataclasses.replace(registry, reference=None, tag=None))
        return Location("registry", repository, registry.reference)
    if _SCHEME.match(text):
        raise InvalidError(
            f"unsupported location {text!r}: use DIR[:REF], http[s]://HOST/REPO[:TAG] or docker://HOST/REPO[:TAG]"
        )
    if text.startswith("oci:"):
        text = text[len("oci:") :]
    path, colon, reference = text.partition(":")
    if not path:
        raise InvalidError(f"invalid location {text!r}: no directory")
    if colon and not reference:
        raise InvalidError(f"invalid location {text!r}: empty reference after ':'")
    if colon:
        validate_reference_name(reference)
    return Location("layout", path, reference if colon else None)


class _LocationType(_ParamType):
    name = "location"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Location:
        if isinstance(value, Location):
            return value
        try:
            return parse_location(str(value))
        except InvalidError as exc:
            self.fail(str(exc), param, ctx)


#: A click parameter type for locations.
LOCATION: Final = _LocationType()


def _missing_dirs(where: str) -> list[Path]:
    """``where`` and those of its parents that do not exist, deepest first."""
    path = Path(where).absolute()
    missing = []
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            break
        missing.append(candidate)
    return missing


def remove_created(created: list[Path]) -> None:
    """Remove a layout a command created (as ``open_location(created=)`` recorded it), and the parents
    it created if nothing else is in them."""
    if not created:
        return
    shutil.rmtree(created[0], ignore_errors=True)
    for parent in created[1:]:
        try:
            os.rmdir(parent)
        except OSError:
            return  # someone else put something there


@asynccontextmanager
async def open_location(
    location: Location | str, *, create: bool = False, created: list[Path] | None = None
) -> AsyncIterator[Engine]:
    """Open the engine of ``location``; a layout is created first if ``create`` (a registry needs nothing).

    With ``created``, the directories a creation made (the layout first, then the
    parents it made) are appended to it, for :func:`remove_created` should the
    command fail. A layout someone else created meanwhile is not recorded.
    """
    if isinstance(location, str):
        location = (
            parse_location(location) if location.startswith(_REGISTRY_SCHEMES) else Location("layout", location, None)
        )
    if location.kind == "registry":
        verify = os.environ.get("OCICAS_TLS_VERIFY", "1").lower() not in ("0", "false", "no")
        async with await open_registry(location.path, verify=verify) as registry:
            yield registry
        return
    path = location.path
    direct = settings.direct_writes
    try:
        engine = await open_layout(path, direct_writes=direct)
    except LayoutNotFoundError:
        if not create:
            raise
        missing = await run_sync(_missing_dirs, path)
        try:
            await create_layout(path)
            if created is not None:
                created.extend(missing)
        except LayoutExistsError:
            pass  # created by someone else meanwhile: theirs, not ours to remove
        engine = await open_layout(path, direct_writes=direct)
    async with engine:
        yield engine
