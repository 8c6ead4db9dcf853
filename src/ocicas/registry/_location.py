"""Registry locations (``http://127.0.0.1:5000/team/app:v1``) and the distribution-spec name grammars."""

from __future__ import annotations

import dataclasses
import re
from typing import Final
from urllib.parse import urlsplit

from .._digest import Digest
from .._errors import InvalidError
from .._layout_format import validate_reference_name

__all__ = ["RegistryLocation", "parse_registry_location", "validate_repository", "validate_tag"]

# distribution-spec: <name> components, and <reference> as a tag
_COMPONENT: Final = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY: Final = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_HOST: Final = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?")
#: Longest repository name we accept (distribution's own limit).
_MAX_REPOSITORY: Final = 255


def validate_repository(name: object) -> str:
    """Return ``name`` if it is a distribution-spec repository name (``team/app``), else raise :class:`InvalidError`."""
    if not isinstance(name, str) or len(name) > _MAX_REPOSITORY or not _REPOSITORY.fullmatch(name):
        raise InvalidError(
            f"invalid repository name {name!r:.200}: lowercase components such as 'team/app' "
            "([a-z0-9] separated by '.', '_', '__' or '-', joined by '/')"
        )
    return name


def validate_tag(name: object) -> str:
    """Return ``name`` if it is an image-spec reference name and a registry tag; else :class:`InvalidError`."""
    validate_reference_name(name)
    assert isinstance(name, str)
    if not _TAG.fullmatch(name):
        raise InvalidError(
            f"invalid reference name {name!r:.200} for a registry: tags match [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}"
        )
    return name


@dataclasses.dataclass(frozen=True)
class RegistryLocation:
    """A repository on a registry, and optionally a tag or digest in it."""

    #: ``scheme://host[:port]``, the registry's base URL (the API lives at ``/v2/`` below it).
    base_url: str
    #: The repository name, e.g. ``team/app``.
    repository: str
    #: A tag, a digest (``sha256:…``), or ``None``.
    reference: str | None = None

    @property
    def host(self) -> str:
        """``host[:port]``, as Docker's ``config.json`` keys credentials."""
        return self.base_url.partition("://")[2]

    def __str__(self) -> str:
        text = f"{self.base_url}/{self.repository}"
        if self.reference is None:
            return text
        return f"{text}@{self.reference}" if ":" in self.reference else f"{text}:{self.reference}"


def parse_registry_location(text: str) -> RegistryLocation:
    """Parse ``[http[s]://]host[:port]/repository[:tag|@digest]``; ``https`` when no scheme is given.

    Raises :class:`~ocicas.InvalidError` naming what is wrong: an unknown scheme,
    no repository, a repository, tag or digest that breaks the grammar, or a URL
    with a query, fragment or credentials (pass those as arguments instead).
    """
    if not isinstance(text, str):
        raise TypeError(f"registry location must be a str, not {type(text).__name__}")
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "https", text
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidError(f"invalid registry location {text!r}: scheme must be http or https, not {scheme!r}")
    parts = urlsplit(f"{scheme}://{rest}")
    if parts.query or parts.fragment or "?" in rest or "#" in rest:
        raise InvalidError(f"invalid registry location {text!r}: no query or fragment allowed")
    if "@" in parts.netloc:
        raise InvalidError(f"invalid registry location {text!r}: pass credentials as arguments, not in the URL")
    host = parts.netloc
    if not host or not _HOST.fullmatch(host):
        raise InvalidError(f"invalid registry location {text!r}: no valid host")
    path = parts.path.strip("/")
    reference: str | None = None
    if "@" in path:
        path, _, digest = path.partition("@")
        reference = Digest(digest)
    else:
        last_slash = path.rfind("/")
        colon = path.find(":", last_slash + 1)
        if colon >= 0:
            path, reference = path[:colon], validate_tag(path[colon + 1 :])
    if not path:
        raise InvalidError(f"invalid registry location {text!r}: no repository (expected host/repository)")
    return RegistryLocation(f"{scheme}://{host}", validate_repository(path), reference)
