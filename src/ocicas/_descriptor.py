"""Content descriptors and platforms, parsed strictly and serialised losslessly."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

from ._checks import type_name
from ._digest import Digest, Verifier
from ._errors import InvalidError, UnsupportedAlgorithmError

__all__ = ["Descriptor", "Platform", "validate_media_type"]

_MEDIA_TYPE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
_INT64_MAX: Final = 2**63 - 1
_URL_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_PLATFORM_FIELDS: Final = frozenset({"architecture", "os", "os.version", "os.features", "variant", "features"})
_DESCRIPTOR_FIELDS: Final = frozenset(
    {"mediaType", "digest", "size", "urls", "annotations", "platform", "artifactType", "data"}
)


def validate_media_type(value: object, what: str = "mediaType") -> str:
    """Return ``value`` if it is an RFC 6838 media type as the image-spec restricts it."""
    if not isinstance(value, str) or not _MEDIA_TYPE.fullmatch(value):
        raise InvalidError(f"invalid {what} {value!r:.200}")
    return value


def _require(obj: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in obj:
        raise InvalidError(f"{what} has no {key!r}")
    return obj[key]


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidError(f"{what} must be a string, not {value!r:.100}")
    return value


def _strings(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise InvalidError(f"{what} must be an array of strings, not {value!r:.100}")
    return tuple(value)


def _string_map(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidError(f"{what} must be an object of strings, not {value!r:.100}")
    return dict(value)


def _size(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= _INT64_MAX:
        raise InvalidError(f"{what} must be an integer from 0 to 2^63-1, not {value!r:.100}")
    return value


def _typed(value: object, types: type | tuple[type, ...], field: str, what: str, optional: bool = True) -> None:
    """Constructor arguments of the wrong Python type: ``TypeError`` naming the field."""
    if (value is None and optional) or (isinstance(value, types) and not isinstance(value, bool)):
        return
    raise TypeError(f"{field} must be {what}{' or None' if optional else ''}, not {type_name(value)}")


def _typed_strings(value: object, field: str) -> None:
    if value is None:
        return
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(f"{field} must be a sequence of str or None, not {type_name(value)}")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"each of {field} must be a str, not {type_name(item)}")


def _url(value: str) -> str:
    parts = None
    try:
        parts = urlsplit(value)
    except ValueError:
        pass
    # JSON-schema "format: uri" is an absolute RFC 3986 URI: a scheme and no spaces or controls.
    if parts is None or not _URL_SCHEME.fullmatch(parts.scheme) or any(c <= " " or c == "\x7f" for c in value):
        raise InvalidError(f"invalid URL {value!r:.200} in descriptor urls")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class Platform:
    """The platform an image manifest runs on (``platform`` of a descriptor)."""

    architecture: str
    os: str
    os_version: str | None = None
    os_features: tuple[str, ...] | None = None
    variant: str | None = None
    features: tuple[str, ...] | None = None
    #: Fields this version of ocicas does not know, kept for a lossless round trip.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=True)

    def __post_init__(self) -> None:
        _typed(self.architecture, str, "architecture", "a str", optional=False)
        _typed(self.os, str, "os", "a str", optional=False)
        _typed(self.os_version, str, "os_version", "a str")
        _typed(self.variant, str, "variant", "a str")
        _typed_strings(self.os_features, "os_features")
        _typed_strings(self.features, "features")
        if self.os_features is not None:
            object.__setattr__(self, "os_features", tuple(self.os_features))
        if self.features is not None:
            object.__setattr__(self, "features", tuple(self.features))
        _typed(self.extra, Mapping, "extra", "a mapping", optional=False)

    @classmethod
    def from_dict(cls, obj: object) -> Platform:
        """Parse a JSON ``platform`` object."""
        if not isinstance(obj, Mapping):
            raise InvalidError(f"platform must be an object, not {obj!r:.100}")
        opt = obj.get
        return cls(
            architecture=_string(_require(obj, "architecture", "platform"), "platform architecture"),
            os=_string(_require(obj, "os", "platform"), "platform os"),
            os_version=None if opt("os.version") is None else _string(obj["os.version"], "platform os.version"),
            os_features=None if opt("os.features") is None else _strings(obj["os.features"], "platform os.features"),
            variant=None if opt("variant") is None else _string(obj["variant"], "platform variant"),
            features=None if opt("features") is None else _strings(obj["features"], "platform features"),
            extra={k: v for k, v in obj.items() if k not in _PLATFORM_FIELDS},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object for this platform."""
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version is not None:
            out["os.version"] = self.os_version
        if self.os_features is not None:
            out["os.features"] = list(self.os_features)
        if self.variant is not None:
            out["variant"] = self.variant
        if self.features is not None:
            out["features"] = list(self.features)
        out.update(self.extra)
        return out

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Descriptor:
    """An OCI content descriptor: what a blob is, where it is, and how big.

    Construction validates every field (media types by the image-spec pattern, the
    digest by its grammar, the size as a non-negative int64, ``urls`` as absolute
    URIs) and checks embedded ``data`` against ``size`` and ``digest``. Fields this
    version does not know are kept in :attr:`extra`, so
    ``Descriptor.from_dict(d).to_dict() == d`` for every valid ``d``.
    """

    media_type: str
    digest: Digest
    size: int
    urls: tuple[str, ...] | None = None
    annotations: Mapping[str, str] | None = None
    platform: Platform | None = None
    artifact_type: str | None = None
    data: bytes | None = None
    #: Fields this version of ocicas does not know, kept for a lossless round trip.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # wrong Python types are the caller's bug (TypeError); bad values are invalid content (InvalidError)
        _typed(self.media_type, str, "media_type", "a media type (str)", optional=False)
        _typed(self.digest, str, "digest", "a digest (str)", optional=False)
        _typed(self.size, int, "size", "an int", optional=False)
        _typed(self.urls, (list, tuple), "urls", "a list of str")
        _typed(self.annotations, Mapping, "annotations", "a mapping of str to str")
        _typed(self.platform, Platform, "platform", "an ocicas.Platform")
        _typed(self.artifact_type, str, "artifact_type", "a media type (str)")
        _typed(self.data, (bytes, bytearray, memoryview), "data", "bytes")
        _typed(self.extra, Mapping, "extra", "a mapping", optional=False)
        validate_media_type(self.media_type)
        object.__setattr__(self, "digest", Digest(self.digest))
        _size(self.size, "descriptor size")
        if self.urls is not None:
            object.__setattr__(self, "urls", tuple(_url(u) for u in _strings(self.urls, "descriptor urls")))
        if self.annotations is not None:
            object.__setattr__(self, "annotations", _string_map(self.annotations, "descriptor annotations"))
        if self.artifact_type is not None:
            validate_media_type(self.artifact_type, "artifactType")
        if self.data is not None:
            object.__setattr__(self, "data", bytes(self.data))
            self._check_data()
        object.__setattr__(self, "extra", dict(self.extra))

    def _check_data(self) -> None:
        assert self.data is not None
        try:
            verifier = Verifier(self.digest, self.size)
        except UnsupportedAlgorithmError:
            return  # the grammar admits the digest; we cannot hash with it, so cannot refute it
        verifier.update(self.data)
        verifier.verify()

    @classmethod
    def from_dict(cls, obj: object) -> Descriptor:
        """Parse a JSON descriptor object strictly; raise :class:`InvalidError` naming what is wrong."""
        if not isinstance(obj, Mapping):
            raise InvalidError(f"descriptor must be an object, not {obj!r:.100}")
        data = obj.get("data")
        if data is not None:
            text = _string(data, "descriptor data")
            try:
                data = base64.b64decode(text.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError):
                raise InvalidError(f"descriptor data is not padded base64: {text!r:.100}") from None
        urls = obj.get("urls")
        return cls(
            media_type=validate_media_type(_require(obj, "mediaType", "descriptor")),
            digest=Digest(_require(obj, "digest", "descriptor")),
            size=_size(_require(obj, "size", "descriptor"), "descriptor size"),
            urls=None if urls is None else _strings(urls, "descriptor urls"),
            annotations=None
            if obj.get("annotations") is None
            else _string_map(obj["annotations"], "descriptor annotations"),
            platform=None if obj.get("platform") is None else Platform.from_dict(obj["platform"]),
            artifact_type=None
            if obj.get("artifactType") is None
            else validate_media_type(obj["artifactType"], "artifactType"),
            data=data,
            extra={k: v for k, v in obj.items() if k not in _DESCRIPTOR_FIELDS},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object for this descriptor (the inverse of :meth:`from_dict`)."""
        out: dict[str, Any] = {"mediaType": self.media_type}
        if self.artifact_type is not None:
            out["artifactType"] = self.artifact_type
        out["digest"] = str(self.digest)
        out["size"] = self.size
        if self.urls is not None:
            out["urls"] = list(self.urls)
        if self.annotations is not None:
            out["annotations"] = dict(self.annotations)
        if self.data is not None:
            out["data"] = base64.b64encode(self.data).decode("ascii")
        if self.platform is not None:
            out["platform"] = self.platform.to_dict()
        out.update(self.extra)
        return out

    def replace(self, **changes: Any) -> Descriptor:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def __hash__(self) -> int:
        return hash((self.digest, self.size, self.media_type))


def descriptors_from_list(value: object, what: str) -> list[Descriptor]:
    """Parse a JSON array of descriptors."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise InvalidError(f"{what} must be an array of descriptors, not {value!r:.100}")
    return [Descriptor.from_dict(item) for item in value]
