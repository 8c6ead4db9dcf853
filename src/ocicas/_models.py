"""Typed OCI documents: image manifests, image indexes and image configurations.

Every model is a frozen, keyword-only dataclass in the style of
:class:`~ocicas.Descriptor`: construction validates every field, ``from_dict``
parses JSON strictly and raises :class:`~ocicas.InvalidError` naming the offending
value, and ``to_dict`` is lossless: members this version does not model, and
members given an explicit ``null``, are kept in ``extra``, so
``Model.from_dict(d).to_dict() == d`` for every valid ``d``.

Strictness follows the image-spec and its own validator: what its JSON Schemas
refuse is refused (wrong types, a missing required member, ``schemaVersion`` other
than 2), and so is what its Go validator refuses beyond them (an ``Env`` entry that
is not ``KEY=VALUE``, a timestamp that is not RFC 3339). One exception: an empty
``layers`` array, which the manifest schema refuses but the spec's text only
advises against ("SHOULD have at least one entry") and ``docker build`` writes for
an image ``FROM scratch``, is read and written. An explicit ``null`` for an
optional member reads as absent, as Go's ``encoding/json`` reads it.
Media-type confusion (CVE-2021-41190) is refused: a manifest carrying
``manifests``, an index carrying ``config`` or ``layers``, or a ``mediaType``
member naming the other kind of document.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Final, TypeVar, cast

from ._descriptor import Descriptor, Platform, _string, _string_map, _strings, validate_media_type
from ._digest import Digest
from ._errors import InvalidError
from ._json import dump_json, load_json
from ._media_types import (
    CONFIG_MEDIA_TYPES,
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_MANIFEST,
)

__all__ = ["ContainerConfig", "History", "ImageConfig", "Index", "Manifest", "RootFS"]

_M = TypeVar("_M", bound="_Model")
_D = TypeVar("_D", bound="_Document")

# -- member kinds: how one JSON member is parsed, checked and written -------------------


def _same(value: Any) -> Any:
    return value


@dataclasses.dataclass(frozen=True)
class _Kind:
    #: JSON value (never null) -> Python value, raising InvalidError naming ``what``.
    parse: Callable[[Any, str], Any]
    #: Python value given to the constructor -> normalised value, raising InvalidError.
    check: Callable[[Any, str], Any]
    #: Python value -> JSON value.
    dump: Callable[[Any], Any] = _same


@dataclasses.dataclass(frozen=True)
class _Member:
    attr: str
    key: str
    kind: _Kind
    required: bool = False
    #: ``null`` reads as an empty array (``"manifests": null``, as umoci 0.4 writes it).
    null_is_empty: bool = False


def _rewrap(exc: InvalidError, what: str) -> InvalidError:
    """The same error type, its message prefixed with where it happened."""
    return type(exc)(f"{what}: {exc}")


def _bool(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise InvalidError(f"{what} must be a boolean, not {value!r:.100}")
    return value


def _media_type(value: object, what: str) -> str:
    return validate_media_type(value, what)


def _schema_version(value: object, what: str) -> int:
    if type(value) is not int or value != 2:
        raise InvalidError(f"{what} must be 2, not {value!r:.100}")
    return value


def _object_map(value: object, what: str) -> dict[str, dict[str, Any]]:
    """A JSON object whose values are objects (``ExposedPorts``, ``Volumes``: sets in Go's clothing)."""
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Mapping) for k, v in value.items()
    ):
        raise InvalidError(f"{what} must be an object of objects, not {value!r:.100}")
    return {k: dict(v) for k, v in value.items()}


# RFC 3339 date-time, as Go's time.Time reads it (JSON Schema "format": "date-time").
_TIMESTAMP: Final = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.\d+)?(?:[Zz]|[+-](\d\d):(\d\d))", re.ASCII
)
_DAYS: Final = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _timestamp(value: object, what: str) -> str:
    match = _TIMESTAMP.fullmatch(value) if isinstance(value, str) else None
    if match is not None:
        year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        days = _DAYS[month - 1] + (month == 2 and leap) if 1 <= month <= 12 else 0
        offset_ok = match[7] is None or (int(match[7]) < 24 and int(match[8]) < 60)
        if 1 <= day <= days and hour < 24 and minute < 60 and second < 60 and offset_ok:
            return str(value)
    raise InvalidError(f"{what} must be an RFC 3339 date-time, not {value!r:.100}")


# image-spec schema/validator.go: `^[^=]+=.*$` (values may hold any character here)
_ENV_ENTRY: Final = re.compile(r"[^=]+=.*", re.DOTALL)


def _env(value: object, what: str) -> tuple[str, ...]:
    entries = _strings(value, what)
    for entry in entries:
        if not _ENV_ENTRY.fullmatch(entry):
            raise InvalidError(f"{what} entry {entry!r:.100} is not of the form KEY=VALUE")
    return entries


def _digests(value: object, what: str) -> tuple[Digest, ...]:
    entries = _strings(value, what)
    try:
        return tuple(Digest(d) for d in entries)
    except InvalidError as exc:
        raise _rewrap(exc, what) from None


def _parse_descriptor(value: object, what: str) -> Descriptor:
    try:
        return Descriptor.from_dict(value)
    except InvalidError as exc:
        raise _rewrap(exc, what) from None


def _parse_descriptors(value: object, what: str) -> tuple[Descriptor, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise InvalidError(f"{what} must be an array of descriptors, not {value!r:.100}")
    return tuple(_parse_descriptor(item, f"{what}[{i}]") for i, item in enumerate(value))


def _instance(cls: type[Any]) -> Callable[[Any, str], Any]:
    def check(value: Any, what: str) -> Any:
        if not isinstance(value, cls):
            raise InvalidError(f"{what} must be a {cls.__name__}, not {value!r:.100}")
        return value

    return check


def _instances(cls: type[Any]) -> Callable[[Any, str], tuple[Any, ...]]:
    def check(value: Any, what: str) -> tuple[Any, ...]:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise InvalidError(f"{what} must be a sequence of {cls.__name__}, not {value!r:.100}")
        return tuple(_instance(cls)(item, f"{what}[{i}]") for i, item in enumerate(value))

    return check


def _model(cls: type[_Model]) -> _Kind:
    return _Kind(lambda v, what: cls.from_dict(v), _instance(cls), lambda v: v.to_dict())


def _models(cls: type[_Model]) -> _Kind:
    def parse(value: object, what: str) -> tuple[Any, ...]:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise InvalidError(f"{what} must be an array, not {value!r:.100}")
        return tuple(cls.from_dict(item) for item in value)

    return _Kind(parse, _instances(cls), lambda v: [item.to_dict() for item in v])


_STR: Final = _Kind(_string, _string)
_STRS: Final = _Kind(_strings, _strings, list)
_STR_MAP: Final = _Kind(_string_map, _string_map, dict)
_OBJ_MAP: Final = _Kind(_object_map, _object_map, lambda v: {k: dict(o) for k, o in v.items()})
_BOOL: Final = _Kind(_bool, _bool)
_MEDIA: Final = _Kind(_media_type, _media_type)
_VERSION: Final = _Kind(_schema_version, _schema_version)
_TIME: Final = _Kind(_timestamp, _timestamp)
_ENV: Final = _Kind(_env, _env, list)
_DIGESTS: Final = _Kind(_digests, _digests, lambda v: [str(d) for d in v])
_DESCRIPTOR: Final = _Kind(_parse_descriptor, _instance(Descriptor), lambda v: v.to_dict())
_DESCRIPTORS: Final = _Kind(_parse_descriptors, _instances(Descriptor), lambda v: [d.to_dict() for d in v])


# -- the shared machinery -------------------------------------------------------------


class _Model:
    """Parsing, validation and serialisation driven by a class's ``_MEMBERS`` table."""

    _WHAT: ClassVar[str]
    _MEMBERS: ClassVar[tuple[_Member, ...]]
    extra: Mapping[str, Any]

    def __post_init__(self) -> None:
        for member in self._MEMBERS:
            value = getattr(self, member.attr)
            if value is None:
                if member.required:
                    raise InvalidError(f"{self._WHAT} needs {member.key}")
                continue
            object.__setattr__(self, member.attr, member.kind.check(value, f"{self._WHAT} {member.key}"))
        if not isinstance(self.extra, Mapping) or not all(isinstance(k, str) for k in self.extra):
            raise InvalidError(f"{self._WHAT} extra must be a mapping with string keys, not {self.extra!r:.100}")
        extra = dict(self.extra)
        for member in self._MEMBERS:
            if member.key in extra:
                if extra[member.key] is not None:
                    raise InvalidError(f"{self._WHAT} extra member {member.key!r} collides with field {member.attr}")
                value = getattr(self, member.attr)
                if value is not None and value != ():
                    del extra[member.key]  # an explicit null only says how an unset member was written
        object.__setattr__(self, "extra", extra)
        self._validate()

    def _validate(self) -> None:
        """Checks across fields, after each field is checked."""

    @classmethod
    def _precheck(cls, obj: Mapping[str, Any]) -> None:
        """Checks on the raw JSON object before parsing (clearer errors for confusion)."""

    @classmethod
    def from_dict(cls: type[_M], obj: object) -> _M:
        """Parse a JSON object strictly; raise :class:`~ocicas.InvalidError` naming what is wrong."""
        if not isinstance(obj, Mapping):
            raise InvalidError(f"{cls._WHAT} must be a JSON object, not {obj!r:.100}")
        cls._precheck(obj)
        kwargs: dict[str, Any] = {}
        for member in cls._MEMBERS:
            value = obj.get(member.key)
            if value is None and member.null_is_empty and member.key in obj:
                value = []
            if value is None:
                if member.required:
                    problem = "must not be null" if member.key in obj else "is missing"
                    raise InvalidError(f"{cls._WHAT} {member.key} {problem}")
                kwargs[member.attr] = None
            else:
                kwargs[member.attr] = member.kind.parse(value, f"{cls._WHAT} {member.key}")
        known = {member.key for member in cls._MEMBERS}
        kwargs["extra"] = {k: v for k, v in obj.items() if k not in known or v is None}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (the inverse of :meth:`from_dict`)."""
        out: dict[str, Any] = {}
        for member in self._MEMBERS:
            value = getattr(self, member.attr)
            if value is not None:
                out[member.key] = member.kind.dump(value)
        out.update(self.extra)  # unknown members, and explicit nulls of unset ones
        return out

    def to_json(self) -> bytes:
        """The compact UTF-8 JSON encoding of :meth:`to_dict`."""
        return dump_json(self.to_dict())

    def replace(self: _M, **changes: Any) -> _M:
        """A copy with some fields changed (validated again)."""
        result: _M = dataclasses.replace(cast(Any, self), **changes)
        return result


class _Document(_Model):
    """A top-level document stored as a blob under one of ``_MEDIA_TYPES``."""

    _MEDIA_TYPES: ClassVar[frozenset[str]]

    @classmethod
    def from_json(cls: type[_D], data: bytes | bytearray | memoryview | str, *, media_type: str | None = None) -> _D:
        """Parse a JSON document; with ``media_type`` (its descriptor's), also check they agree.

        Raises :class:`~ocicas.InvalidError` if ``media_type`` is not one this class
        parses, or if the document's own ``mediaType`` member names another one.
        """
        if media_type is not None and media_type not in cls._MEDIA_TYPES:
            raise InvalidError(f"cannot parse a blob of media type {media_type!r:.200} as an {cls._WHAT}")
        document = cls.from_dict(load_json(data, cls._WHAT))
        own = getattr(document, "media_type", None)
        if media_type is not None and own is not None and own != media_type:
            raise InvalidError(f"{cls._WHAT} has mediaType {own!r}, but its descriptor says {media_type!r}")
        return document


def _refuse_confusion(cls: type[_Model], keys: Sequence[str] | Mapping[str, Any], members: tuple[str, ...]) -> None:
    """CVE-2021-41190: a document must not carry the other kind's members."""
    for key in members:
        if key in keys:
            raise InvalidError(
                f"{cls._WHAT} has a {key!r} member, as the other kind of document would: "
                "refusing an ambiguous document (CVE-2021-41190)"
            )


def _check_media_type(cls: type[_Document], media_type: str | None, other: frozenset[str], other_what: str) -> None:
    if media_type is None or media_type in cls._MEDIA_TYPES:
        return
    kind = f"an {other_what}" if media_type in other else f"not an {cls._WHAT}"
    raise InvalidError(f"{cls._WHAT} has mediaType {media_type!r:.200}, which is {kind} media type")


# -- image configuration --------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContainerConfig(_Model):
    """The ``config`` member of an image configuration: how to run a container.

    ``Env`` entries must be ``KEY=VALUE``. Docker's additional members
    (``Healthcheck``, ``OnBuild``, ``Shell``, …) are kept in :attr:`extra`.
    """

    user: str | None = None
    exposed_ports: Mapping[str, Mapping[str, Any]] | None = None
    env: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    volumes: Mapping[str, Mapping[str, Any]] | None = None
    working_dir: str | None = None
    labels: Mapping[str, str] | None = None
    stop_signal: str | None = None
    args_escaped: bool | None = None
    #: Members this version does not model, and explicit nulls, kept for a lossless round trip.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    _WHAT: ClassVar[str] = "image config.config"
    _MEMBERS: ClassVar[tuple[_Member, ...]] = (
        _Member("user", "User", _STR),
        _Member("exposed_ports", "ExposedPorts", _OBJ_MAP),
        _Member("env", "Env", _ENV),
        _Member("entrypoint", "Entrypoint", _STRS),
        _Member("cmd", "Cmd", _STRS),
        _Member("volumes", "Volumes", _OBJ_MAP),
        _Member("working_dir", "WorkingDir", _STR),
        _Member("labels", "Labels", _STR_MAP),
        _Member("stop_signal", "StopSignal", _STR),
        _Member("args_escaped", "ArgsEscaped", _BOOL),
    )

    def __hash__(self) -> int:
        return hash((self.user, self.env, self.entrypoint, self.cmd))


def _rootfs_type(value: object, what: str) -> str:
    if value != "layers":
        raise InvalidError(f"{what} must be 'layers', not {value!r:.100}")
    return "layers"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RootFS(_Model):
    """The ``rootfs`` member of an image configuration: the uncompressed layers' digests."""

    type: str = "layers"
    diff_ids: tuple[Digest, ...] = ()
    #: Members this version does not model, and explicit nulls, kept for a lossless round trip.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    _WHAT: ClassVar[str] = "image config.rootfs"
    _MEMBERS: ClassVar[tuple[_Member, ...]] = (
        _Member("type", "type", _Kind(_rootfs_type, _rootfs_type), required=True),
        _Member("diff_ids", "diff_ids", _DIGESTS, required=True),
    )

    def __hash__(self) -> int:
        return hash(self.diff_ids)


@dataclasses.dataclass(frozen=True, kw_only=True)
class History(_Model):
    """One entry of an image configuration's ``history``: how a layer was made."""

    created: str | None = None
    created_by: str | None = None
    author: str | None = None
    comment: str | None = None
    empty_layer: bool | None = None
    #: Members this version does not model, and explicit nulls, kept for a lossless round trip.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    _WHAT: ClassVar[str] = "image config.history entry"
    _MEMBERS: ClassVar[tuple[_Member, ...]] = (
        _Member("created", "created", _TIME),
        _Member("created_by", "created_by", _STR),
        _Member("author", "author", _STR),
        _Member("comment", "comment", _STR),
        _Member("empty_layer", "empty_layer", _BOOL),
    )

    def __hash__(self) -> int:
        return hash((self.created, self.created_by, self.empty_layer))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageConfig(_Document):
    """An image configuration (OCI, or Docker's ``container.image.v1``).

    ``created`` is kept as the RFC 3339 text it was written as. Docker's
    additional members (``container_config``, ``docker_version``, …) are kept in
    :attr:`extra`.
    """

    created: str | None = None
    author: str | None = None
    architecture: str
    os: str
    os_version: str | None = None
    os_features: tuple[str, ...] | None = None
    variant: str | None = None
    config: ContainerConfig | None = None
    rootfs: RootFS = dataclasses.field(default_factory=RootFS)
    history: tuple[History, ...] | None = None
    #: Members this version does not model, and explicit nulls, kept for a lossless round trip.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    _WHAT: ClassVar[str] = "image config"
    _MEDIA_TYPES: ClassVar[frozenset[str]] = CONFIG_MEDIA_TYPES
    _MEMBERS: ClassVar[tuple[_Member, ...]] = (
        _Member("created", "created", _TIME),
        _Member("author", "author", _STR),
        _Member("architecture", "architecture", _STR, required=True),
        _Member("os", "os", _STR, required=True),
        _Member("os_version", "os.version", _STR),
        _Member("os_features", "os.features", _STRS),
        _Member("variant", "variant", _STR),
        _Member("config", "config", _model(ContainerConfig)),
        _Member("rootfs", "rootfs", _model(RootFS), required=True),
        _Member("history", "history", _models(History)),
    )

    @property
    def platform(self) -> Platform:
        """The platform this image runs on, as an index entry would describe it."""
        return Platform(
            architecture=self.architecture,
            os=self.os,
            os_version=self.os_version,
            os_features=self.os_features,
            variant=self.variant,
        )

    def __hash__(self) -> int:
        return hash((self.architecture, self.os, self.variant, self.rootfs, self.created))


# -- manifests and indexes ------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Manifest(_Document):
    """An image manifest (OCI, or Docker schema 2): a config and its layers.

    ``media_type`` defaults to the OCI manifest type for manifests you build and is
    ``None`` for parsed ones that do not say. ``layers`` SHOULD have at least one
    entry (the spec's schema insists; an artifact without content uses
    :data:`~ocicas.EMPTY_DESCRIPTOR`), but an empty array is accepted: ``docker
    build`` writes one for an image ``FROM scratch``.
    """

    schema_version: int = 2
    media_type: str | None = MEDIA_TYPE_IMAGE_MANIFEST
    artifact_type: str | None = None
    config: Descriptor
    layers: tuple[Descriptor, ...]
    subject: Descriptor | None = None
    annotations: Mapping[str, str] | None = None
    #: Members this version does not model, and explicit nulls, kept for a lossless round trip.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    _WHAT: ClassVar[str] = "image manifest"
    _MEDIA_TYPES: ClassVar[frozenset[str]] = MANIFEST_MEDIA_TYPES
    _MEMBERS: ClassVar[tuple[_Member, ...]] = (
        _Member("schema_version", "schemaVersion", _VERSION, required=True),
        _Member("media_type", "mediaType", _MEDIA),
        _Member("artifact_type", "artifactType", _MEDIA),
        _Member("config", "config", _DESCRIPTOR, required=True),
        _Member("layers", "layers", _DESCRIPTORS, required=True),
        _Member("subject", "subject", _DESCRIPTOR),
        _Member("annotations", "annotations", _STR_MAP),
    )

    @classmethod
    def _precheck(cls, obj: Mapping[str, Any]) -> None:
        _refuse_confusion(cls, obj, ("manifests",))

    def _validate(self) -> None:
        _refuse_confusion(type(self), self.extra, ("manifests",))
        _check_media_type(type(self), self.media_type, INDEX_MEDIA_TYPES, "image index")

    def __hash__(self) -> int:
        return hash((self.media_type, self.config, self.layers, self.subject))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Index(_Document):
    """An image index (OCI, or a Docker schema-2 manifest list): a list of manifests.

    ``media_type`` defaults to the OCI index type for indexes you build and is
    ``None`` for parsed ones that do not say. ``"manifests": null`` reads as empty.
    """

    schema_version: int = 2
    media_type: str | None = MEDIA_TYPE_IMAGE_INDEX
    artifact_type: str | None = None
    manifests: tuple[Descriptor, ...] = ()
    subject: Descriptor | None = None
    annotations: Mapping[str, str] | None = None
    #: Members this version does not model, and explicit nulls, kept for a lossless round trip.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    _WHAT: ClassVar[str] = "image index"
    _MEDIA_TYPES: ClassVar[frozenset[str]] = INDEX_MEDIA_TYPES
    _MEMBERS: ClassVar[tuple[_Member, ...]] = (
        _Member("schema_version", "schemaVersion", _VERSION, required=True),
        _Member("media_type", "mediaType", _MEDIA),
        _Member("artifact_type", "artifactType", _MEDIA),
        _Member("manifests", "manifests", _DESCRIPTORS, required=True, null_is_empty=True),
        _Member("subject", "subject", _DESCRIPTOR),
        _Member("annotations", "annotations", _STR_MAP),
    )

    @classmethod
    def _precheck(cls, obj: Mapping[str, Any]) -> None:
        _refuse_confusion(cls, obj, ("config", "layers"))

    def _validate(self) -> None:
        _refuse_confusion(type(self), self.extra, ("config", "layers"))
        _check_media_type(type(self), self.media_type, MANIFEST_MEDIA_TYPES, "image manifest")

    def __hash__(self) -> int:
        return hash((self.media_type, self.manifests, self.subject))
