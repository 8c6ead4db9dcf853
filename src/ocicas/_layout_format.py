"""The OCI image-layout format: ``oci-layout``, ``index.json`` and reference names.

Pure functions and values, no I/O: the directory engine reads and writes files,
this module decides what their bytes mean.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any, Final

from ._descriptor import Descriptor
from ._digest import Digest
from ._errors import ClobberError, InvalidError
from ._json import dump_json, load_json
from ._media_types import MEDIA_TYPE_IMAGE_INDEX

__all__ = [
    "ANNOTATION_REF_NAME",
    "IMAGE_LAYOUT_VERSION",
    "BrokenRoot",
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


@dataclasses.dataclass(frozen=True)
class BrokenRoot:
    """An ``index.json`` entry that does not parse as a descriptor (see :meth:`Engine.list_broken_roots`).

    It is refused on its own: the other entries read as usual, and every rewrite
    of ``index.json`` keeps it as written.
    """

    #: Its place in ``manifests`` (0-based).
    position: int
    #: Its ``org.opencontainers.image.ref.name``, if it has one that is a string.
    name: str | None
    #: Its ``digest``, if that much is a valid digest (what the entry may protect), else ``None``.
    digest: Digest | None
    #: What is wrong with it.
    error: str

    def __str__(self) -> str:
        what = f"for reference {self.name!r}" if self.name is not None else f"#{self.position}"
        return f"index.json entry {what}: {self.error}"


_WS: Final = re.compile(r"[ \t\n\r]*")


def _entry_texts(text: str) -> list[str] | None:
    """The text of each ``manifests`` entry exactly as written, or ``None`` if it cannot be told.

    Only called on text :func:`load_json` accepted, so the structure is known to be sound.
    """
    decode = json.JSONDecoder().raw_decode

    def skip(at: int) -> int:
        match = _WS.match(text, at)
        assert match is not None  # matches the empty string
        return match.end()

    try:
        at = skip(0)
        if text[at] != "{":
            return None
        at = skip(at + 1)
        while text[at] == '"':
            key, at = decode(text, at)
            at = skip(at)
            at = skip(at + 1)  # the ':'
            if key == "manifests" and text[at] == "[":
                texts: list[str] = []
                at = skip(at + 1)
                while text[at] != "]":
                    _, end = decode(text, at)
                    texts.append(text[at:end])
                    at = skip(end)
                    if text[at] == ",":
                        at = skip(at + 1)
                return texts
            _, at = decode(text, at)
            at = skip(at)
            if text[at] == ",":
                at = skip(at + 1)
        return None
    except (ValueError, IndexError, RecursionError):
        return None


def _broken(position: int, entry: object, error: InvalidError) -> BrokenRoot:
    name = digest = None
    if isinstance(entry, dict):
        annotations = entry.get("annotations")
        value = annotations.get(ANNOTATION_REF_NAME) if isinstance(annotations, dict) else None
        name = value if isinstance(value, str) else None
        try:
            digest = Digest(entry["digest"])
        except (KeyError, InvalidError):
            digest = None
    return BrokenRoot(position, name, digest, str(error))


class IndexDocument:
    """A parsed ``index.json``, kept as raw JSON so a rewrite loses nothing.

    Entries are parsed as descriptors one by one, when used: an entry that does
    not parse (written by another tool) is refused on its own, as a
    :class:`BrokenRoot`, while the other entries read as usual. Every entry is
    written back as it was read (its text from the file, byte for byte) unless a
    change replaced it.
    """

    __slots__ = ("_doc", "_encoded", "_entries", "_names", "_parsed")

    def __init__(
        self,
        doc: dict[str, Any],
        encoded: list[bytes | None] | None = None,
        names: dict[str, list[int]] | None = None,
        scan_from: int = 0,
    ) -> None:
        self._doc = doc
        self._entries: list[Any] = doc["manifests"]
        # each entry's JSON, as read or once written: a rewrite re-encodes only the entries that changed
        self._encoded: list[bytes | None] = [None] * len(self._entries) if encoded is None else encoded
        self._parsed: list[Descriptor | BrokenRoot | None] = [None] * len(self._entries)
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
        """Parse ``index.json``; ``"manifests": null`` (umoci 0.4) reads as empty.

        Raises :class:`InvalidError` if the document as a whole is not an index;
        a bad entry is not checked here (see :meth:`broken`).
        """
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
        encoded: list[bytes | None] | None = None
        if manifests:
            texts = _entry_texts(bytes(data).decode("utf-8"))
            if texts is not None and len(texts) == len(manifests):
                encoded = [text.encode() for text in texts]
        return cls(doc, encoded)

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

    def _entry(self, position: int) -> Descriptor | BrokenRoot:
        """Entry ``position`` as a descriptor (with its name annotation), or what is wrong with it."""
        parsed = self._parsed[position]
        if parsed is None:
            entry = self._entries[position]
            try:
                parsed = Descriptor.from_dict(entry)
            except InvalidError as exc:
                parsed = _broken(position, entry, exc)
            self._parsed[position] = parsed
        return parsed

    def names(self) -> list[str]:
        """Every reference name, sorted (names of broken entries too)."""
        return sorted(self._names)

    def get(self, name: str) -> Descriptor | None:
        """The descriptor named ``name`` (without its name annotation), or ``None``.

        Raises :class:`InvalidError` naming the fault if that entry does not parse.
        """
        positions = self._names.get(name)
        if not positions:
            return None
        return self._strip(self._entry(positions[0]))

    def roots(self) -> list[Descriptor]:
        """Every entry that parses, as a descriptor, named or not."""
        return [entry for entry in map(self._entry, range(len(self._entries))) if isinstance(entry, Descriptor)]

    def broken(self) -> list[BrokenRoot]:
        """Every entry that does not parse as a descriptor, in order."""
        return [entry for entry in map(self._entry, range(len(self._entries))) if isinstance(entry, BrokenRoot)]

    @staticmethod
    def _strip(entry: Descriptor | BrokenRoot) -> Descriptor:
        if isinstance(entry, BrokenRoot):
            raise InvalidError(str(entry))
        annotations = dict(entry.annotations or {})
        annotations.pop(ANNOTATION_REF_NAME, None)
        return entry.replace(annotations=annotations or None)

    def apply(self, changes: Mapping[str, Descriptor | None], *, replace: bool) -> IndexDocument | None:
        """Return the index with ``changes`` applied, or ``None`` if nothing would change.

        Raises :class:`ClobberError` (without ``replace``) if a put would change what
        a name holds, a broken entry included. Unnamed entries, other names' entries
        (broken ones too) and unknown fields are carried over untouched.
        """
        drop: set[int] = set()
        added: list[dict[str, Any]] = []
        for name, descriptor in changes.items():
            positions = self._names.get(name, [])
            if descriptor is None:
                drop.update(positions)
                continue
            if positions:
                entries = [self._entry(p) for p in positions]
                wanted = _comparable(descriptor)
                broken = [e for e in entries if isinstance(e, BrokenRoot)]
                if not broken and all(_comparable(self._strip(e)) == wanted for e in entries):
                    continue
                if not replace:
                    holds = f"an invalid entry ({broken[0].error})" if broken else str(self._strip(entries[0]).digest)
                    raise ClobberError(f"reference {name!r} already holds {holds}, not {descriptor.digest}")
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
            updated = IndexDocument(
                doc, [*self._encoded, *([None] * len(added))], dict(self._names), len(self._entries)
            )
            updated._parsed[: len(self._parsed)] = self._parsed
            return updated
        kept = [p for p in range(len(self._entries)) if p not in drop]
        doc["manifests"] = [self._entries[p] for p in kept] + added
        updated = IndexDocument(doc, [self._encoded[p] for p in kept] + [None] * len(added))
        return updated
