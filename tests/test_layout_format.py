"""index.json as a document: incremental rewrites give exactly what a full encoding gives."""

from __future__ import annotations

import json
from collections.abc import Mapping

import ocicas
from ocicas._json import dump_json
from ocicas._layout_format import IndexDocument
from ocicas.testing import sha256


def descriptor(n: int) -> ocicas.Descriptor:
    return ocicas.Descriptor(media_type=ocicas.MEDIA_TYPE_IMAGE_MANIFEST, digest=sha256(str(n).encode()), size=n)


def test_incremental_encoding_matches_a_full_encoding() -> None:
    original = {
        "com.example.first": [1, "é"],
        "manifests": [{"mediaType": ocicas.MEDIA_TYPE_IMAGE_MANIFEST, "digest": sha256(b"u"), "size": 1}],
        "schemaVersion": 2,
        "annotations": {"a": "b"},
    }
    document = IndexDocument.parse(dump_json(original))  # compact: entries are kept as written
    steps: list[tuple[Mapping[str, ocicas.Descriptor | None], bool]] = [
        ({f"t{n}": descriptor(n) for n in range(50)}, False),
        ({"t3": None, "t7": None}, False),
        ({"extra": descriptor(99)}, False),
        ({"t10": descriptor(1000)}, True),
        ({"t11": descriptor(11)}, False),  # unchanged: no new document
    ]
    for changes, replace in steps:
        document.serialize()  # encodings cached before the next change
        updated = document.apply(changes, replace=replace)
        if updated is None:
            assert changes == {"t11": descriptor(11)}
            continue
        document = updated
        assert document.serialize() == dump_json(document._doc)
    result = json.loads(document.serialize())
    assert list(result) == ["com.example.first", "manifests", "schemaVersion", "annotations"]
    assert result["manifests"][0] == original["manifests"][0]  # type: ignore[index]
    names = [m["annotations"][ocicas.ANNOTATION_REF_NAME] for m in result["manifests"][1:]]
    assert sorted(names) == sorted([f"t{n}" for n in range(50) if n not in (3, 7)] + ["extra"])
    assert document.names() == sorted(names)
    assert document.get("t10") == descriptor(1000)
    assert document.get("t3") is None
