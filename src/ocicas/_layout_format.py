"""The OCI image-layout format: ``oci-layout``, ``index.json`` and reference names.

Pure functions and values, no I/O: the directory engine reads and writes files,
this module decides what their bytes mean.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from ._descriptor import Descriptor
from ._errors import ClobberError, InvalidError
from ._json import dump_json, load_json
from ._media_types import MEDIA_TYPE_IMAGE_INDEX

__all__ = [
    "ANNOTATION_REF_NAME",
    "IMAGE_LAYOUT_VERSION",
    "IndexDocument",
    "layout_file",
    "parse_layout_file",
    "validate_reference_name",
]

#: The image-layout version ocicas writes and reads (``oci-layout``'s ``imageLayoutVersion``).
IMAGE_LAYOUT_VERSION: Final = "1.0.0"
#: The annotation that names a reference in ``index.json``.
ANNOTATION_REF_NAME: Final = "org.opencontainers.image.ref.name"
#: Longest reference name accepted (the grammar itself sets no bound).
MAX_REFERENCE_NAME: Final = 1024

# image-spec annotations.md: ref ::= component ("/" component)*;
# component ::= alphanum (separator alphanum)*; separator ::= [-._:@+] | "--"
_COMPONENT: Final = r"[A-Za-z0-9]+(?:(?:--|[-._:@+])[A-Za-z0-9]+)*"
_REF_NAME: Final = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")


def validate_reference_name(name: object) -> str:
    """Return ``name`` if it is a valid image-spec reference name, else raise :class:`InvalidError`.

    A ``name`` that is not a ``str`` at all raises ``TypeError``.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a reference name (str), not {'None' if name is None else type(name).__name__}")
    if len(name) > MAX_REFERENCE_NAME or not _REF_NAME.fullmatch(name):
        raise InvalidError(f"invalid reference name {name!r:.200}")
    return name


def layout_file() -> bytes:
    """The bytes of a new ``oci-layout`` file."""
    return dump_json({"imageLayoutVersion": IMAGE_LAYOUT_VERSION})


def parse_layout_file(data: bytes) -> None:
    """Check an ``oci-layout`` file; raise :class:`InvalidError` unless it is version 1.0.0."""
    obj = load_json(data, "oci-layout")
    version = obj.get("imageLayoutVersion") if isinstance(obj, dict) else None
    if version != IMAGE_LAYOUT_VERSION:
        raise InvalidError(
            f"unsupported oci-layout imageLayoutVersion {version!r:.100} (expected {IMAGE_LAYOUT_VERSION!r})"
        )


def _comparable(descriptor: Descriptor) -> Descriptor:
    # "annotations": {} and no annotations say the same thing
    return descriptor if descriptor.annotations else descriptor.replace(annotations=None)


class IndexDocument:
    """A parsed ``index.json``, kept as raw JSON so a rewrite loses nothing.

    Entries are parsed as descriptors only when used, so one odd entry written by
    another tool does not make the rest of the layout unreadable.
    """

    __slots__ = ("_doc", "_encoded", "_entries", "_names")

    def __init__(
        self,
        doc: dict[str, Any],
        encoded: list[bytes | None] | None = None,
        names: dict[str, list[int]] | None = None,
        scan_from: int = 0,
    ) -> None:
        self._doc = doc
        self._entries: list[Any] = doc["manifests"]
        # each entry's JSON, once written: a rewrite re-encodes only the entries that changed
        self._encoded: list[bytes | None] = [None] * len(self._entries) if encoded is None else encoded
        self._names: dict[str, list[int]] = {} if names is None else names
        for position in range(scan_from, len(self._entries)):  # names before scan_from are known
            entry = self._entries[position]
            annotations = entry.get("annotations") if isinstance(entry, dict) else None
            name = annotations.get(ANNOTATION_REF_NAME) if isinstance(annotations, dict) else None
            if isinstance(name, str):
                self._names.setdefault(name, []).append(position)

    @classmethod
    def empty(cls) -> IndexDocument:
        """A new index with no entries."""
        return cls({"schemaVersion": 2, "mediaType": MEDIA_TYPE_IMAGE_INDEX, "manifests": []})

    @classmethod
    def parse(cls, data: bytes) -> IndexDocument:
        """Parse ``index.json``; ``"manifests": null`` (umoci 0.4) reads as empty."""
        doc = load_json(data, "index.json")
        if not isinstance(doc, dict):
            raise InvalidError("index.json is not a JSON object")
        if doc.get("schemaVersion", 2) != 2 or type(doc.get("schemaVersion", 2)) is not int:
            raise InvalidError(f"index.json has schemaVersion {doc.get('schemaVersion')!r:.50}, expected 2")
        if doc.get("mediaType", MEDIA_TYPE_IMAGE_INDEX) != MEDIA_TYPE_IMAGE_INDEX:
            raise InvalidError(
                f"index.json has mediaType {doc.get('mediaType')!r:.100}, expected {MEDIA_TYPE_IMAGE_INDEX}"
            )
        for key in ("config", "layers"):
            if key in doc:  # CVE-2021-41190: a manifest posing as an index
                raise InvalidError(f"index.json has a {key!r} member, as a manifest would: refusing an ambiguous index")
        manifests = doc.get("manifests")
        if manifests is None:
            manifests = doc["manifests"] = []
        if not isinstance(manifests, list):
            raise InvalidError("index.json manifests is not an array")
        for entry in manifests:
            if not isinstance(entry, dict):
                raise InvalidError(f"index.json has a manifests entry that is not an object: {entry!r:.100}")
        return cls(doc)

    def serialize(self) -> bytes:
        """The bytes to write (``manifests`` is always an array), members in their original order."""
        encoded = self._encoded
        for position, known in enumerate(encoded):
            if known is None:
                encoded[position] = dump_json(self._entries[position])
        members = []
        for key, value in self._doc.items():
            data = b"[" + b",".join(encoded) + b"]" if key == "manifests" else dump_json(value)  # type: ignore[arg-type]
            members.append(dump_json(key) + b":" + data)
        return b"{" + b",".join(members) + b"}"

    def names(self) -> list[str]:
        """Every reference name, sorted."""
        return sorted(self._names)

    def get(self, name: str) -> Descriptor | None:
        """The descriptor named ``name`` (without its name annotation), or ``None``."""
        positions = self._names.get(name)
        if not positions:
            return None
        return self._strip(self._entries[positions[0]], name)

    def roots(self) -> list[Descriptor]:
        """Every entry as a descriptor, named or not."""
        out = []
        for entry in self._entries:
            try:
                out.append(Descriptor.from_dict(entry))
            except InvalidError as exc:
                raise InvalidError(f"index.json entry {entry.get('digest')!r:.100}: {exc}") from None
        return out

    @staticmethod
    def _strip(entry: dict[str, Any], name: str) -> Descriptor:
        try:
            descriptor = Descriptor.from_dict(entry)
        except InvalidError as exc:
            raise InvalidError(f"index.json entry for reference {name!r}: {exc}") from None
        annotations = dict(descriptor.annotations or {})
        annotations.pop(ANNOTATION_REF_NAME, None)
        return descriptor.replace(annotations=annotations or None)

    def apply(self, changes: Mapping[str, Descriptor | None], *, replace: bool) -> IndexDocument | None:
        """Return the index with ``changes`` applied, or ``None`` if nothing would change.

        Raises :class:`ClobberError` (without ``replace``) if a put would change what
        a name holds. Unnamed entries and unknown fields are carried over untouched.
        """
        drop: set[int] = set()
        added: list[dict[str, Any]] = []
        for name, descriptor in changes.items():
            positions = self._names.get(name, [])
            if descriptor is None:
                drop.update(positions)
                continue
            if positions:
                current = [self._strip(self._entries[p], name) for p in positions]
                wanted = _comparable(descriptor)
                if all(_comparable(c) == wanted for c in current):
                    continue
                if not replace:
                    raise ClobberError(f"reference {name!r} already holds {current[0].digest}, not {descriptor.digest}")
                drop.update(positions)
            entry = descriptor.to_dict()
            entry["annotations"] = {**entry.get("annotations", {}), ANNOTATION_REF_NAME: name}
            added.append(entry)
        if not drop and not added:
            return None
        doc = dict(self._doc)
        if not drop:  # only additions (the common tag): nothing to re-scan or re-encode
            doc["manifests"] = [*self._entries, *added]
            # added names are new (a changed name is dropped first), so the old lists are never touched
            return IndexDocument(doc, [*self._encoded, *([None] * len(added))], dict(self._names), len(self._entries))
        kept = [p for p in range(len(self._entries)) if p not in drop]
        doc["manifests"] = [self._entries[p] for p in kept] + added
        return IndexDocument(doc, [self._encoded[p] for p in kept] + [None] * len(added))
