"""Registry locations (``http://127.0.0.1:5000/team/app:v1``, ``ghcr.io/team/app``) and the name grammars.

Two spellings are read. A URL, ``http[s]://HOST[:PORT]/REPOSITORY[:TAG][@DIGEST]``,
names the registry exactly. Anything else (``docker://`` optional) is a Docker
image reference, read as distribution's ``reference`` package, containers/image's
``docker/reference`` and go-containerregistry's ``pkg/name`` read it: the first
path component is the registry host only if it holds a ``.`` or a ``:`` or is
``localhost``; otherwise the image is on Docker Hub, where a one-component name
is an official image under ``library/``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Final

from .._digest import SUPPORTED_ALGORITHMS, Digest
from .._errors import InvalidError
from .._layout_format import validate_reference_name

__all__ = ["RegistryLocation", "parse_registry_location", "validate_repository", "validate_tag"]

# distribution-spec: <name> components, and <reference> as a tag
_COMPONENT: Final = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_REPOSITORY: Final = re.compile(rf"{_COMPONENT.pattern}(?:/{_COMPONENT.pattern})*")
_TAG: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# Docker's host grammar: DNS-like labels (which covers IPv4) or a bracketed IPv6 address, then an optional port
_LABEL: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_HOST: Final = re.compile(r"(?P<name>\[[^\]]*\]|[^:]*)(?::(?P<port>[^:]*))?")
_IPV6_CHARS: Final = re.compile(r"[0-9A-Fa-f:]+")
_IMAGE_ID: Final = re.compile(r"[a-f0-9]{64}")
#: Longest repository name, and longest ``host/repository``, distribution accepts.
_MAX_NAME: Final = 255
#: Where Docker Hub's API is served, and the names Docker gives Docker Hub in references.
_DOCKER_HUB_URL: Final = "https://registry-1.docker.io"
_DOCKER_HUB_DOMAIN: Final = "docker.io"
_DOCKER_HUB_ALIASES: Final = frozenset({"docker.io", "index.docker.io"})


def validate_repository(name: object) -> str:
    """Return ``name`` if it is a distribution-spec repository name (``team/app``), else raise :class:`InvalidError`.

    The message names the first offending path component.
    """
    if isinstance(name, str) and len(name) <= _MAX_NAME and _REPOSITORY.fullmatch(name):
        return name
    rule = "lowercase components such as 'team/app' ([a-z0-9] separated by '.', '_', '__' or '-', joined by '/')"
    if not isinstance(name, str):
        raise InvalidError(f"invalid repository name {name!r:.200}: {rule}")
    if len(name) > _MAX_NAME:
        raise InvalidError(f"invalid repository name {name!r:.200}: {len(name)} characters, over {_MAX_NAME}")
    if not name:
        raise InvalidError(f"invalid repository name '': {rule}")
    bad = next(part for part in name.split("/") if not _COMPONENT.fullmatch(part))
    why = "must be lowercase" if _COMPONENT.fullmatch(bad.lower()) else "breaks the grammar"
    raise InvalidError(f"invalid repository name {name!r:.200}: component {bad!r:.100} {why}; {rule}")


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
    """A repository on a registry, and optionally a tag or digest in it.

    ``host/repo:tag@digest`` gives both: as in Docker, the digest is what the
    location resolves to (``reference``), and the tag is kept in ``tag`` only
    as information (it is not checked against the digest).
    """

    #: ``scheme://host[:port]``, the registry's base URL (the API lives at ``/v2/`` below it).
    base_url: str
    #: The repository name, e.g. ``team/app``.
    repository: str
    #: What the location resolves to: the digest (``sha256:…``) if one is given, else the tag, else ``None``.
    reference: str | None = None
    #: The tag written beside a digest (``repo:tag@digest``); ``None`` unless both are given.
    tag: str | None = None

    def __post_init__(self) -> None:
        if self.tag is not None and (self.reference is None or ":" not in self.reference):
            raise InvalidError(f"RegistryLocation: tag {self.tag!r} is kept only beside a digest reference")

    @property
    def host(self) -> str:
        """``host[:port]``, as Docker's ``config.json`` keys credentials."""
        return self.base_url.partition("://")[2]

    def __str__(self) -> str:
        text = f"{self.base_url}/{self.repository}"
        if self.tag is not None:
            text = f"{text}:{self.tag}"
        if self.reference is None:
            return text
        return f"{text}@{self.reference}" if ":" in self.reference else f"{text}:{self.reference}"


def parse_registry_location(text: str) -> RegistryLocation:
    """Parse ``http[s]://HOST[:PORT]/REPOSITORY[:TAG][@DIGEST]`` or a Docker reference such as ``ghcr.io/a/b:v1``.

    A URL names its host as written. A Docker reference (``docker://`` optional)
    is read as Docker reads it: the first component is the host only if it holds
    a ``.`` or ``:`` or is ``localhost``; else the host is Docker Hub
    (``https://registry-1.docker.io``), and ``ubuntu`` means ``library/ubuntu``.
    Both use ``https`` unless ``http://`` is written. A host is DNS labels (or
    IPv4), or a bracketed IPv6 address, with an optional port; ``host/repository``
    is at most 255 characters. With both a tag and a digest, the digest is the
    ``reference`` and the tag is kept in ``tag``.

    Raises :class:`~ocicas.InvalidError` naming the offending part: the scheme,
    the host or port, a missing repository, a repository component, the tag, the
    digest, the name's length, or a query, fragment or credentials in a URL (pass
    credentials as arguments instead).
    """
    if not isinstance(text, str):
        raise TypeError(f"registry location must be a str, not {type(text).__name__}")
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower() if sep else "docker"
    if not sep:
        rest = text
    try:
        if scheme in ("http", "https"):
            return _parse_url(scheme, rest)
        if scheme == "docker":
            return _parse_docker_reference(rest)
        raise InvalidError(f"scheme must be http, https or docker, not {scheme!r:.40}")
    except InvalidError as exc:
        raise InvalidError(f"invalid registry location {text!r:.300}: {exc}") from None


def _parse_url(scheme: str, rest: str) -> RegistryLocation:
    if "?" in rest or "#" in rest:
        raise InvalidError("no query or fragment allowed")
    host, _, path = rest.partition("/")
    if "@" in host:
        raise InvalidError("pass credentials as arguments, not in the URL")
    _check_host(host)
    path = path.strip("/")
    if not path:
        raise InvalidError(f"no repository after host {host!r} (expected host/repository)")
    repository, tag, digest = _split_reference(path)
    _check_name_length(host, repository)
    return _location(f"{scheme}://{host}", repository, tag, digest)


def _parse_docker_reference(rest: str) -> RegistryLocation:
    if not rest:
        raise InvalidError("empty (expected [host/]repository[:tag][@digest])")
    if _IMAGE_ID.fullmatch(rest):
        raise InvalidError("64 hex digits are an image ID, not a repository name")
    first, slash, remainder = rest.partition("/")
    if slash and (first == "localhost" or "." in first or ":" in first):
        _check_host(first)
        domain, path = first, remainder
    else:
        domain, path = _DOCKER_HUB_DOMAIN, rest
    if not path:
        raise InvalidError(f"no repository after host {domain!r} (expected host/repository)")
    repository, tag, digest = _split_reference(path)
    docker_hub = domain in _DOCKER_HUB_ALIASES
    if docker_hub:
        domain = _DOCKER_HUB_DOMAIN
        if "/" not in repository:
            repository = f"library/{repository}"
    _check_name_length(domain, repository)
    return _location(_DOCKER_HUB_URL if docker_hub else f"https://{domain}", repository, tag, digest)


def _split_reference(path: str) -> tuple[str, str | None, Digest | None]:
    """``repository[:tag][@digest]`` into its parts, each checked, left to right."""
    name, at, digest_text = path.partition("@")
    colon = name.find(":", name.rfind("/") + 1)
    tag = None
    if colon >= 0:
        name, tag = name[:colon], name[colon + 1 :]
    if not name:
        raise InvalidError("no repository before the tag or digest")
    validate_repository(name)
    if tag is not None:
        validate_tag(tag)
    return name, tag, _check_digest(digest_text) if at else None


def _check_digest(text: str) -> Digest:
    digest = Digest(text)
    algorithm = digest.partition(":")[0]
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise InvalidError(
            f"digest {text!r:.200}: algorithm {algorithm!r:.40} is not supported "
            f"(use {' or '.join(sorted(SUPPORTED_ALGORITHMS))})"
        )
    return digest


def _check_host(host: str) -> None:
    """Raise :class:`InvalidError` naming what is wrong unless ``host`` is ``name[:port]`` by Docker's grammar."""
    if not host:
        raise InvalidError("no host")
    match = _HOST.fullmatch(host)
    if match is None:
        raise InvalidError(f"host {host!r:.200}: expected name[:port], [IPv6][:port]")
    name, port = match["name"], match["port"]
    if name.startswith("["):
        try:
            if not _IPV6_CHARS.fullmatch(name[1:-1]):  # Docker's grammar: no zone, no embedded IPv4
                raise ValueError
            ipaddress.IPv6Address(name[1:-1])
        except ValueError:
            raise InvalidError(
                f"host {host!r:.200}: {name!r:.100} is not an IPv6 address (zones are not allowed)"
            ) from None
    else:
        for label in name.split("."):
            if not _LABEL.fullmatch(label):
                raise InvalidError(
                    f"host {host!r:.200}: label {label!r:.100} is not letters, digits and inner '-' "
                    "(nor part of an IPv4 address)"
                )
    if port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) <= 65535):
        raise InvalidError(f"host {host!r:.200}: port {port!r:.20} is not a number from 1 to 65535")


def _check_name_length(domain: str, repository: str) -> None:
    name = f"{domain}/{repository}"
    if len(name) > _MAX_NAME:
        raise InvalidError(f"name {name[:80] + '…'!r} is {len(name)} characters, over {_MAX_NAME} (host/repository)")


def _location(base_url: str, repository: str, tag: str | None, digest: Digest | None) -> RegistryLocation:
    if digest is not None:
        return RegistryLocation(base_url, repository, digest, tag)
    return RegistryLocation(base_url, repository, tag)
