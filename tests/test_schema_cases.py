"""The image-spec's own schema test cases, and what we write against its JSON Schemas.

The cases and schemas are the image-spec v1.1.1 ``schema/`` files, verbatim, in
``tests/data/image-spec-v1.1.1`` (see its README): the cases are read from the Go test
tables (``*_test.go``) themselves. Debian's ``golang-github-opencontainers-image-spec-dev``
(1.1.0~rc2, installed by ``scripts/test.sh``) ships an older ``schema/``; its cases must be
a subset of ours with the same verdicts, which checks both the copy and the reader.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource
from referencing.jsonschema import DRAFT4

from ocicas import Descriptor, Digest, InvalidError, Platform
from ocicas._json import dump_json, load_json
from ocicas._layout_format import IndexDocument, layout_file, parse_layout_file
from ocicas._media_types import (
    EMPTY_DESCRIPTOR,
    MEDIA_TYPE_IMAGE_CONFIG,
    MEDIA_TYPE_IMAGE_LAYER_GZIP,
    MEDIA_TYPE_IMAGE_LAYER_ZSTD,
    MEDIA_TYPE_IMAGE_MANIFEST,
)
from ocicas._models import ContainerConfig, History, ImageConfig, Index, Manifest, RootFS

REFERENCE: Final = Path(__file__).parent / "data" / "image-spec-v1.1.1"
#: Debian's golang-github-opencontainers-image-spec-dev (scripts/test.sh installs it).
DEBIAN_SCHEMA: Final = Path("/usr/share/gocode/src/github.com/opencontainers/image-spec/schema")

SCHEMA_FILES: Final = {
    "descriptor": "content-descriptor.json",
    "manifest": "image-manifest-schema.json",
    "index": "image-index-schema.json",
    "config": "config-schema.json",
    "layout": "image-layout-schema.json",
}

#: Invalid cases the JSON Schemas alone accept (the spec's Go validator refuses them; so do we).
#: "uri" is only checked by jsonschema when the optional ``rfc3987`` package is installed.
SCHEMA_BLIND: Final = {
    "descriptor-14-invalid",  # uppercase sha256 hex (go-digest refuses it)
    "descriptor-16-invalid",  # urls entry "value" is not a URI (format not enforced)
    "descriptor-28-invalid",  # data is not padded base64 (the schema sets no pattern)
    "config-64-invalid",  # Env entry "foo" is not KEY=VALUE (validator.go's envRegexp)
}


# -- reading the spec's Go test tables -----------------------------------------------------------

#: The spec's test files and the kind of document each one's table holds, in the order cases are numbered.
TEST_FILES: Final = {
    "descriptor_test.go": "descriptor",
    "imageindex_test.go": "index",
    "imagelayout_test.go": "layout",
    "manifest_test.go": "manifest",
    "config_test.go": "config",
}

_GO_TOKEN: Final = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>//[^\n]*)
    | (?P<block>/\*.*?\*/)
    | (?P<raw>`[^`]*`)
    | (?P<string>"(?:[^"\\\n]|\\.)*")
    | (?P<rune>'(?:[^'\\\n]|\\.)*')
    | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclasses.dataclass(frozen=True)
class GoCase:
    """One row of a schema test table: ``{<kind>: `document`, fail: true|false}`` (no ``fail`` is false)."""

    kind: str
    valid: bool
    why: str  # the row's comments, joined ("" if it has none)
    document: str  # the raw string's text, sometimes deliberately malformed JSON


def _go_table_rows(path: Path) -> list[list[tuple[str, str]]]:
    """The tokens of each element of the file's one ``range []struct{...}{...}`` table.

    A small Go lexer (comments, raw and interpreted strings, runes) keeps braces and
    backquotes inside documents and comments from being mistaken for structure.
    """
    tokens = [(m.lastgroup or "", m[0]) for m in _GO_TOKEN.finditer(path.read_text()) if m.lastgroup != "space"]
    words = [text for _, text in tokens]
    starts = [i for i in range(len(words) - 3) if words[i : i + 4] == ["range", "[", "]", "struct"]]
    if len(starts) != 1:
        raise ValueError(f"{path}: expected one 'range []struct' table, found {len(starts)}")

    def after_braces(i: int) -> int:  # tokens[i] is "{": the index after its matching "}"
        depth = 0
        while True:
            depth += {("punct", "{"): 1, ("punct", "}"): -1}.get(tokens[i], 0)
            i += 1
            if depth == 0:
                return i

    i = after_braces(starts[0] + 4)  # past the struct type
    if tokens[i] != ("punct", "{"):
        raise ValueError(f"{path}: no composite literal after the table's struct type")
    end = after_braces(i) - 1
    rows: list[list[tuple[str, str]]] = []
    comments: list[tuple[str, str]] = []  # comments before an element belong to it
    i += 1
    while i < end:
        if tokens[i] == ("punct", "{"):
            after = after_braces(i)
            rows.append(comments + tokens[i + 1 : after - 1])
            comments, i = [], after
        elif tokens[i][0] == "comment":
            comments.append(tokens[i])
            i += 1
        elif tokens[i] == ("punct", ","):
            i += 1
        else:
            raise ValueError(f"{path}: unexpected {tokens[i][1]!r} between table elements")
    return rows


def _go_case(kind: str, row: list[tuple[str, str]], where: str) -> GoCase:
    values = [token for token in row if token[0] != "comment"]
    fields: dict[str, tuple[str, str]] = {}
    for n in range(0, len(values), 4):  # name ":" value [","]
        name, colon, value = (values[n : n + 3] + [("", "")] * 3)[:3]
        if name[0] != "word" or colon != ("punct", ":") or values[n + 3 : n + 4] not in ([], [("punct", ",")]):
            raise ValueError(f"{where}: cannot read the element {values!r}")
        fields[name[1]] = value
    fail = fields.pop("fail", ("word", "false"))
    if fail[1] not in ("true", "false") or len(fields) != 1 or next(iter(fields.values()))[0] != "raw":
        raise ValueError(f"{where}: expected one raw-string document and fail: true/false, got {values!r}")
    document = next(iter(fields.values()))[1][1:-1]
    why = " ".join(text[2:].strip() for kind_, text in row if kind_ == "comment")
    return GoCase(kind=kind, valid=fail[1] == "false", why=why, document=document)


def read_go_cases(schema_dir: Path) -> list[GoCase]:
    """Every case of the spec's test tables in ``schema_dir`` (its ``schema/``), in :data:`TEST_FILES` order."""
    return [
        _go_case(kind, row, f"{schema_dir / name}, element {number}")
        for name, kind in TEST_FILES.items()
        for number, row in enumerate(_go_table_rows(schema_dir / name))
    ]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:70] or "unnamed"


def _load_cases() -> list[dict[str, Any]]:
    cases = [dataclasses.asdict(case) for case in read_go_cases(REFERENCE)]
    for number, case in enumerate(cases):
        case["key"] = f"{case['kind']}-{number:02d}-{'valid' if case['valid'] else 'invalid'}"
        case["id"] = f"{case['key']}-{_slug(case['why'])}"
    return cases


CASES: Final = _load_cases()
VALID: Final = [c for c in CASES if c["valid"]]


def test_all_cases_are_present() -> None:
    counts = collections.Counter((c["kind"], c["valid"]) for c in CASES)
    assert counts == {
        ("descriptor", True): 12,
        ("descriptor", False): 17,
        ("index", True): 5,
        ("index", False): 7,
        ("layout", True): 1,
        ("layout", False): 1,
        ("manifest", True): 6,
        ("manifest", False): 6,
        ("config", True): 2,
        ("config", False): 8,
    }
    assert {p.name for p in REFERENCE.glob("*.json")} == {*SCHEMA_FILES.values(), "defs.json", "defs-descriptor.json"}


def test_go_table_reader_keeps_comments_and_defaults() -> None:
    """Rows with the comment inside the braces, and rows without ``fail``, read as the Go test runs them."""
    by_key = {c["key"]: c for c in CASES}
    assert by_key["descriptor-25-invalid"]["why"] == "fail: repeated separators in algorithm"
    assert by_key["descriptor-20-valid"]["why"] == ""
    assert (
        '"digest": "sha256+b64:c86f7763873b6c0aae22d963bab59b4f5debbed6685761b5951584f6efb0633b"'
        in (by_key["descriptor-20-valid"]["document"])
    )
    assert by_key["layout-41-invalid"]["document"] == '\n{\n  "imageLayoutVersion": 1.0.0\n}\n'


def test_go_table_reader_is_not_fooled_by_braces_and_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    table = """package schema_test
// a comment with range []struct { in it
func TestDescriptor(t *testing.T) {
\tfor i, tt := range []struct {
\t\tdescriptor string
\t\tfail       bool
\t}{
\t\t// first } with a brace
\t\t{
\t\t\tdescriptor: `{"a": "}{`, fail: true,
\t\t},
\t\t{descriptor: `{}`},
\t} {
\t\t_ = "}{`"
\t}
}
"""
    for name in TEST_FILES:
        (tmp_path / name).write_text(table)
    assert read_go_cases(tmp_path)[:2] == [
        GoCase(kind="descriptor", valid=False, why="first } with a brace", document='{"a": "}{'),
        GoCase(kind="descriptor", valid=True, why="", document="{}"),
    ]
    (tmp_path / "config_test.go").write_text(table.replace("fail: true", "fail: maybe"))
    with pytest.raises(ValueError, match="fail: true/false"):
        read_go_cases(tmp_path)
    (tmp_path / "config_test.go").write_text(table.replace("`{}`", '"{}"'))
    with pytest.raises(ValueError, match="raw-string document"):
        read_go_cases(tmp_path)


def _debian_schema_dir() -> Path:
    """Debian's image-spec ``schema/``; skip without it, fail under CI (``CI=true`` or ``OCICAS_REQUIRE_TOOLS=1``)."""
    if (DEBIAN_SCHEMA / "descriptor_test.go").is_file():
        return DEBIAN_SCHEMA
    reason = (
        f"{DEBIAN_SCHEMA} not found (Debian package golang-github-opencontainers-image-spec-dev; "
        "scripts/test.sh installs it as root)"
    )
    if os.environ.get("CI") == "true" or os.environ.get("OCICAS_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{reason}, and CI requires it")
    pytest.skip(reason)


def test_debian_packages_cases_are_ours_with_the_same_verdicts() -> None:
    """The older spec Debian ships (1.1.0~rc2) reads with the same reader; every case is one of ours."""
    theirs = read_go_cases(_debian_schema_dir())
    ours = {(c["kind"], c["document"].strip()): c["valid"] for c in CASES}
    assert len(theirs) == 54
    assert [c for c in theirs if ours.get((c.kind, c.document.strip())) != c.valid] == []


#: Invalid cases we deliberately accept, and why.
ACCEPTED_INVALID: Final = {
    "manifest-48-invalid": (
        "empty layers: the manifest schema's minItems 1 refuses it, but the spec's text says only that layers "
        "SHOULD have an entry (image-spec#1058) and docker build writes [] for an image FROM scratch "
        "(image-spec#1013); refusing it would make such images unreadable and uncollectable"
    ),
}


def _params(cases: list[dict[str, Any]], *, verdict: bool = False) -> list[Any]:
    marks = {
        key: pytest.mark.xfail(reason=reason, raises=pytest.fail.Exception) for key, reason in ACCEPTED_INVALID.items()
    }
    return [pytest.param(case, id=case["id"], marks=marks.get(case["key"], ()) if verdict else ()) for case in cases]


def _descriptor(data: bytes) -> Descriptor:
    return Descriptor.from_dict(load_json(data, "descriptor"))


PARSERS: Final[dict[str, Callable[[bytes], Any]]] = {
    "descriptor": _descriptor,
    "layout": parse_layout_file,
    "manifest": Manifest.from_json,
    "index": Index.from_json,
    "config": ImageConfig.from_json,
}


def _registry() -> Registry[Any]:
    """Every schema file, under its ``id`` and its file name; other URLs resolve by file name.

    The schemas' relative ``$ref``s (``defs-descriptor.json#/...``) resolve against
    nested ``id``s to URLs such as ``https://opencontainers.org/schema/image/defs-descriptor.json``,
    so any URL whose last component names a file is mapped to that file, as the
    spec's own Go loader does.
    """
    by_name: dict[str, Resource[Any]] = {}
    pairs: list[tuple[str, Resource[Any]]] = []
    for path in sorted(REFERENCE.glob("*.json")):
        contents = json.loads(path.read_text())
        resource = Resource.from_contents(contents, default_specification=DRAFT4)
        by_name[path.name] = resource
        pairs.append((path.name, resource))
        if "id" in contents:
            pairs.append((contents["id"], resource))

    def retrieve(uri: str) -> Resource[Any]:
        try:
            return by_name[uri.rsplit("/", 1)[-1]]
        except KeyError:
            raise NoSuchResource(ref=uri) from None  # type: ignore[call-arg]

    registry: Registry[Any] = Registry(retrieve=retrieve)  # type: ignore[call-arg]
    return registry.with_resources(pairs)


@pytest.fixture(scope="module")
def validators() -> dict[str, Any]:
    registry = _registry()
    out = {}
    for kind, name in SCHEMA_FILES.items():
        schema = json.loads((REFERENCE / name).read_text())
        jsonschema.Draft4Validator.check_schema(schema)
        out[kind] = jsonschema.Draft4Validator(
            schema, registry=registry, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER
        )
    return out


def _schema_errors(validators: dict[str, Any], kind: str, document: object) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[kind].iter_errors(document)]


@pytest.mark.parametrize("case", _params(CASES, verdict=True))
def test_case_verdict(case: dict[str, Any]) -> None:
    """Every valid case parses; every invalid one is refused with InvalidError."""
    parse = PARSERS[case["kind"]]
    data = case["document"].encode()
    if case["valid"]:
        parse(data)
    else:
        with pytest.raises(InvalidError):
            parse(data)


# Cases whose document is invalid twice over ("os": 123 besides the defect named by
# the case): repaired, the named defect alone must still be refused.
REPAIRABLE: Final = [
    c for c in CASES if not c["valid"] and '"os": 123' in c["document"] and "os" not in c["why"].split('"')
]


def test_repairable_cases_are_the_expected_ones() -> None:
    assert [c["key"] for c in REPAIRABLE] == ["config-58-invalid", "config-59-invalid", "config-60-invalid"]


@pytest.mark.parametrize("case", _params(REPAIRABLE))
def test_named_defect_alone_is_refused(case: dict[str, Any]) -> None:
    document = case["document"].replace('"os": 123', '"os": "linux"')
    json.loads(document)  # well-formed
    with pytest.raises(InvalidError) as caught:
        ImageConfig.from_json(document.encode())
    assert "image config os" not in str(caught.value)


@pytest.mark.parametrize("case", _params([c for c in VALID if c["kind"] != "layout"]))
def test_valid_case_round_trips_losslessly(case: dict[str, Any]) -> None:
    parsed = PARSERS[case["kind"]](case["document"].encode())
    assert parsed.to_dict() == json.loads(case["document"])
    assert PARSERS[case["kind"]](dump_json(parsed)) == parsed


def test_layout_case_matches_what_we_write() -> None:
    [case] = [c for c in VALID if c["kind"] == "layout"]
    assert json.loads(layout_file()) == json.loads(case["document"])


@pytest.mark.parametrize("case", _params(VALID))
def test_valid_case_output_matches_schema(case: dict[str, Any], validators: dict[str, Any]) -> None:
    if case["kind"] == "layout":
        written: object = json.loads(layout_file())
    else:
        written = PARSERS[case["kind"]](case["document"].encode()).to_dict()
    assert _schema_errors(validators, case["kind"], written) == []


def test_schema_verdicts_differ_only_where_documented(validators: dict[str, Any]) -> None:
    """A check of this harness: the schemas agree with the cases except the documented four."""
    accepted_invalid = set()
    for case in CASES:
        try:
            document = json.loads(case["document"])
        except ValueError:
            assert not case["valid"], case["id"]
            continue
        ok = not _schema_errors(validators, case["kind"], document)
        if case["valid"]:
            assert ok, case["id"]
        elif ok:
            accepted_invalid.add(case["key"])
    assert accepted_invalid <= SCHEMA_BLIND
    assert accepted_invalid >= SCHEMA_BLIND - {"descriptor-16-invalid"}


# -- what we write ----------------------------------------------------------------------

CONFIG_DIGEST: Final = Digest("sha256:c86f7763873b6c0aae22d963bab59b4f5debbed6685761b5951584f6efb0633b")
LAYER_DIGEST: Final = Digest("sha256:9d3dd9504c685a304985025df4ed0283e47ac9ffa9bd0326fddf4d59513f0827")
MANIFEST_DIGEST: Final = Digest("sha256:5b0bcabd1ed22e9fb1310cf6c2dec7cdef19f0ad69efa1f392e94a4333501270")


def _written_documents() -> list[Any]:
    config = ImageConfig(
        created="2015-10-31T22:22:56.015925234Z",
        author="Alyssa P. Hacker <alyspdev@example.com>",
        architecture="arm64",
        os="linux",
        os_version="6.1",
        os_features=("feature",),
        variant="v8",
        config=ContainerConfig(
            user="1:1",
            exposed_ports={"8080/tcp": {}},
            env=("PATH=/usr/bin:/bin", "EMPTY="),
            entrypoint=("/bin/sh",),
            cmd=("-c", "true"),
            volumes={"/data": {}},
            working_dir="/home/alice",
            labels={"org.example": "yes"},
            stop_signal="SIGTERM",
            args_escaped=False,
        ),
        rootfs=RootFS(diff_ids=(LAYER_DIGEST,)),
        history=(
            History(created="2015-10-31T22:22:54+01:00", created_by="ADD file", author="a", comment="c"),
            History(created_by="CMD", empty_layer=True),
        ),
    )
    config_descriptor = Descriptor(media_type=MEDIA_TYPE_IMAGE_CONFIG, digest=CONFIG_DIGEST, size=1470)
    layer = Descriptor(
        media_type=MEDIA_TYPE_IMAGE_LAYER_GZIP,
        digest=LAYER_DIGEST,
        size=675598,
        urls=("https://example.com/layer",),
        annotations={"org.example.layer": "1"},
    )
    subject = Descriptor(media_type=MEDIA_TYPE_IMAGE_MANIFEST, digest=MANIFEST_DIGEST, size=7682)
    manifest = Manifest(
        config=config_descriptor,
        layers=(layer, layer.replace(media_type=MEDIA_TYPE_IMAGE_LAYER_ZSTD, urls=None)),
        subject=subject,
        annotations={"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
    )
    artifact = Manifest(
        artifact_type="application/vnd.example+type", config=EMPTY_DESCRIPTOR, layers=(EMPTY_DESCRIPTOR,)
    )
    index = Index(
        manifests=(
            subject.replace(platform=Platform(architecture="amd64", os="linux")),
            subject.replace(
                platform=Platform(architecture="arm64", os="linux", variant="v8", os_features=("x",), os_version="1")
            ),
        ),
        artifact_type="application/vnd.example+type",
        subject=subject,
        annotations={"k": "v"},
    )
    layout_index = IndexDocument.empty().apply({"v1.0": subject}, replace=False)
    assert layout_index is not None
    documents = [
        ("config", "image-config", config.to_dict()),
        ("manifest", "image-manifest", manifest.to_dict()),
        ("manifest", "artifact-manifest-with-the-empty-descriptor", artifact.to_dict()),
        ("index", "image-index", index.to_dict()),
        ("index", "empty-image-index", Index().to_dict()),
        ("descriptor", "empty-descriptor", EMPTY_DESCRIPTOR.to_dict()),
        ("layout", "oci-layout", json.loads(layout_file())),
        ("index", "new-index.json", json.loads(IndexDocument.empty().serialize())),
        ("index", "index.json-with-a-reference", json.loads(layout_index.serialize())),
    ]
    return [pytest.param(kind, document, id=what) for kind, what, document in documents]


@pytest.mark.parametrize(("kind", "document"), _written_documents())
def test_what_we_write_matches_schema(kind: str, document: object, validators: dict[str, Any]) -> None:
    assert _schema_errors(validators, kind, document) == []


def test_schema_validation_is_live(validators: dict[str, Any]) -> None:
    """The registry really resolves the cross-file $refs: a bad nested media type is caught."""
    manifest = Manifest(
        config=Descriptor(media_type=MEDIA_TYPE_IMAGE_CONFIG, digest=CONFIG_DIGEST, size=1), layers=(EMPTY_DESCRIPTOR,)
    ).to_dict()
    manifest["config"]["mediaType"] = "no-slash"
    manifest["layers"][0]["size"] = "2"
    errors = _schema_errors(validators, "manifest", manifest)
    assert errors == [
        "config/mediaType: 'no-slash' does not match "
        + repr("^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$"),
        "layers/0/size: '2' is not of type 'integer'",
    ]
