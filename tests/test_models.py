"""Typed OCI models, the media-type table, and from_descriptor over both engines."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final

import anyio
import pytest

from ocicas import (
    BlobNotFoundError,
    BlobReader,
    BlobTooLargeError,
    ClobberError,
    Descriptor,
    Digest,
    DigestMismatchError,
    Engine,
    EngineClosedError,
    InvalidError,
    MemoryEngine,
    Platform,
    SizeMismatchError,
    UnsupportedAlgorithmError,
    create_layout,
    open_layout,
)
from ocicas._blob import Blob, from_descriptor, register_media_type, unregister_media_type
from ocicas._json import DEFAULT_JSON_LIMIT, dump_json
from ocicas._media_types import (
    CONFIG_MEDIA_TYPES,
    EMPTY_DESCRIPTOR,
    EMPTY_JSON,
    INDEX_MEDIA_TYPES,
    LAYER_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    MEDIA_TYPE_DESCRIPTOR,
    MEDIA_TYPE_DOCKER_CONFIG,
    MEDIA_TYPE_DOCKER_FOREIGN_LAYER,
    MEDIA_TYPE_DOCKER_LAYER,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_EMPTY_JSON,
    MEDIA_TYPE_IMAGE_CONFIG,
    MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_LAYER,
    MEDIA_TYPE_IMAGE_LAYER_GZIP,
    MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE,
    MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_GZIP,
    MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_ZSTD,
    MEDIA_TYPE_IMAGE_LAYER_ZSTD,
    MEDIA_TYPE_IMAGE_MANIFEST,
    MEDIA_TYPE_LAYOUT_HEADER,
)
from ocicas._models import ContainerConfig, History, ImageConfig, Index, Manifest, RootFS

# -- documents used throughout ------------------------------------------------------------

LAYER_BYTES: Final = b"layer bytes \x00\x01\x02" * 1000
LAYER_DIGEST: Final = Digest.from_bytes(LAYER_BYTES)
DIFF_ID: Final = Digest("sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef")
OTHER: Final = Digest("sha256:" + "ab" * 32)

CONFIG_DOC: Final[dict[str, Any]] = {
    "created": "2015-10-31T22:22:56.015925234Z",
    "architecture": "amd64",
    "os": "linux",
    "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
    "rootfs": {"type": "layers", "diff_ids": [DIFF_ID]},
}

# What `docker build` writes: Docker-only members and explicit nulls.
DOCKER_CONFIG_DOC: Final[dict[str, Any]] = {
    "architecture": "amd64",
    "config": {
        "Hostname": "",
        "User": "",
        "AttachStdin": False,
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["/bin/sh"],
        "Image": "sha256:" + "cd" * 32,
        "Volumes": None,
        "WorkingDir": "",
        "Entrypoint": None,
        "OnBuild": None,
        "Labels": None,
    },
    "container": "0123abcd",
    "container_config": {"Cmd": ["/bin/sh", "-c", "#(nop) ", 'CMD ["/bin/sh"]'], "Labels": {}},
    "created": "2023-08-07T19:20:20.894140623Z",
    "docker_version": "20.10.23",
    "history": [
        {"created": "2023-08-07T19:20:20.71894984Z", "created_by": "/bin/sh -c #(nop) ADD file:abc in / "},
        {
            "created": "2023-08-07T19:20:20.894140623Z",
            "created_by": '/bin/sh -c #(nop)  CMD ["/bin/sh"]',
            "empty_layer": True,
        },
    ],
    "os": "linux",
    "rootfs": {"type": "layers", "diff_ids": [DIFF_ID]},
}


def _descriptor(media_type: str, data: bytes) -> Descriptor:
    return Descriptor(media_type=media_type, digest=Digest.from_bytes(data), size=len(data))


def _manifest_doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_IMAGE_MANIFEST,
        "config": {"mediaType": MEDIA_TYPE_IMAGE_CONFIG, "digest": OTHER, "size": 10},
        "layers": [{"mediaType": MEDIA_TYPE_IMAGE_LAYER_GZIP, "digest": LAYER_DIGEST, "size": len(LAYER_BYTES)}],
    }
    doc.update(overrides)
    return doc


def _index_doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_IMAGE_INDEX,
        "manifests": [{"mediaType": MEDIA_TYPE_IMAGE_MANIFEST, "digest": OTHER, "size": 7}],
    }
    doc.update(overrides)
    return doc


# -- media types ------------------------------------------------------------------------


def test_media_type_values() -> None:
    assert MEDIA_TYPE_DESCRIPTOR == "application/vnd.oci.descriptor.v1+json"
    assert MEDIA_TYPE_LAYOUT_HEADER == "application/vnd.oci.layout.header.v1+json"
    assert MEDIA_TYPE_IMAGE_INDEX == "application/vnd.oci.image.index.v1+json"
    assert MEDIA_TYPE_IMAGE_MANIFEST == "application/vnd.oci.image.manifest.v1+json"
    assert MEDIA_TYPE_IMAGE_CONFIG == "application/vnd.oci.image.config.v1+json"
    assert MEDIA_TYPE_EMPTY_JSON == "application/vnd.oci.empty.v1+json"
    assert MEDIA_TYPE_IMAGE_LAYER == "application/vnd.oci.image.layer.v1.tar"
    assert MEDIA_TYPE_IMAGE_LAYER_GZIP == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert MEDIA_TYPE_IMAGE_LAYER_ZSTD == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE == "application/vnd.oci.image.layer.nondistributable.v1.tar"
    assert (
        MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_GZIP == "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    )
    assert (
        MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_ZSTD == "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
    )
    assert MEDIA_TYPE_DOCKER_MANIFEST == "application/vnd.docker.distribution.manifest.v2+json"
    assert MEDIA_TYPE_DOCKER_MANIFEST_LIST == "application/vnd.docker.distribution.manifest.list.v2+json"
    assert MEDIA_TYPE_DOCKER_CONFIG == "application/vnd.docker.container.image.v1+json"
    assert MEDIA_TYPE_DOCKER_LAYER == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert MEDIA_TYPE_DOCKER_FOREIGN_LAYER == "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    assert {MEDIA_TYPE_IMAGE_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST} == MANIFEST_MEDIA_TYPES
    assert {MEDIA_TYPE_IMAGE_INDEX, MEDIA_TYPE_DOCKER_MANIFEST_LIST} == INDEX_MEDIA_TYPES
    assert {MEDIA_TYPE_IMAGE_CONFIG, MEDIA_TYPE_DOCKER_CONFIG} == CONFIG_MEDIA_TYPES
    assert len(LAYER_MEDIA_TYPES) == 8
    assert MEDIA_TYPE_DOCKER_FOREIGN_LAYER in LAYER_MEDIA_TYPES


def test_empty_descriptor_is_the_specs() -> None:
    assert EMPTY_JSON == b"{}"
    assert EMPTY_DESCRIPTOR.to_dict() == {
        "mediaType": "application/vnd.oci.empty.v1+json",
        "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        "size": 2,
        "data": "e30=",
    }
    assert Digest.from_bytes(EMPTY_JSON) == EMPTY_DESCRIPTOR.digest


# -- media-type confusion (CVE-2021-41190) ----------------------------------------------


def test_manifest_with_manifests_is_refused() -> None:
    with pytest.raises(InvalidError, match=r"image manifest has a 'manifests' member.*CVE-2021-41190"):
        Manifest.from_dict(_manifest_doc(manifests=[]))
    with pytest.raises(InvalidError, match="CVE-2021-41190"):
        Manifest.from_dict(_manifest_doc(manifests=_index_doc()["manifests"], mediaType=None))


@pytest.mark.parametrize("member", ["config", "layers"])
def test_index_with_config_or_layers_is_refused(member: str) -> None:
    with pytest.raises(InvalidError, match=rf"image index has a '{member}' member.*CVE-2021-41190"):
        Index.from_dict(_index_doc(**{member: _manifest_doc()[member]}))


def test_confusion_is_refused_on_construction_too() -> None:
    config = Descriptor.from_dict(_manifest_doc()["config"])
    with pytest.raises(InvalidError, match="CVE-2021-41190"):
        Manifest(config=config, layers=(EMPTY_DESCRIPTOR,), extra={"manifests": []})
    with pytest.raises(InvalidError, match="CVE-2021-41190"):
        Index(extra={"layers": []})


def test_media_type_member_of_the_other_kind_is_refused() -> None:
    with pytest.raises(InvalidError, match="which is an image index media type"):
        Manifest.from_dict(_manifest_doc(mediaType=MEDIA_TYPE_IMAGE_INDEX))
    with pytest.raises(InvalidError, match="which is an image index media type"):
        Manifest.from_dict(_manifest_doc(mediaType=MEDIA_TYPE_DOCKER_MANIFEST_LIST))
    with pytest.raises(InvalidError, match="which is an image manifest media type"):
        Index.from_dict(_index_doc(mediaType=MEDIA_TYPE_IMAGE_MANIFEST))
    with pytest.raises(InvalidError, match="which is not an image manifest media type"):
        Manifest.from_dict(_manifest_doc(mediaType=MEDIA_TYPE_IMAGE_CONFIG))


def test_media_type_disagreeing_with_descriptor_is_refused() -> None:
    oci = dump_json(_manifest_doc())
    with pytest.raises(
        InvalidError,
        match=re.escape(
            f"image manifest has mediaType '{MEDIA_TYPE_IMAGE_MANIFEST}', but its descriptor says "
            f"'{MEDIA_TYPE_DOCKER_MANIFEST}'"
        ),
    ):
        Manifest.from_json(oci, media_type=MEDIA_TYPE_DOCKER_MANIFEST)
    with pytest.raises(InvalidError, match=r"cannot parse a blob of media type .* as an image manifest"):
        Manifest.from_json(oci, media_type=MEDIA_TYPE_IMAGE_INDEX)
    with pytest.raises(InvalidError, match="but its descriptor says"):
        Index.from_json(dump_json(_index_doc()), media_type=MEDIA_TYPE_DOCKER_MANIFEST_LIST)
    with pytest.raises(InvalidError, match=r"cannot parse a blob of media type .* as an image config"):
        ImageConfig.from_json(dump_json(CONFIG_DOC), media_type=MEDIA_TYPE_IMAGE_LAYER)
    # agreeing, or silent on its own media type: accepted
    assert Manifest.from_json(oci, media_type=MEDIA_TYPE_IMAGE_MANIFEST).media_type == MEDIA_TYPE_IMAGE_MANIFEST
    silent = Manifest.from_json(dump_json(_manifest_doc(mediaType=None)), media_type=MEDIA_TYPE_DOCKER_MANIFEST)
    assert silent.media_type is None
    assert "mediaType" in silent.extra  # the explicit null, kept for the round trip


# -- strictness ---------------------------------------------------------------------------


def test_negative_size_is_refused() -> None:
    layer = {"mediaType": MEDIA_TYPE_IMAGE_LAYER, "digest": LAYER_DIGEST, "size": -1}
    with pytest.raises(InvalidError, match=r"image manifest layers\[0\]: descriptor size must be .* not -1"):
        Manifest.from_dict(_manifest_doc(layers=[layer]))
    with pytest.raises(InvalidError, match="not -1"):
        Descriptor(media_type=MEDIA_TYPE_IMAGE_LAYER, digest=LAYER_DIGEST, size=-1)


def test_embedded_data_mismatching_digest_is_refused() -> None:
    config = {"mediaType": MEDIA_TYPE_EMPTY_JSON, "digest": EMPTY_DESCRIPTOR.digest, "size": 2, "data": "W10="}
    with pytest.raises(DigestMismatchError, match="image manifest config: blob sha256:44136f"):
        Manifest.from_dict(_manifest_doc(config=config))
    config["data"] = "e30="
    assert Manifest.from_dict(_manifest_doc(config=config)).config.data == b"{}"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (_manifest_doc(schemaVersion=1), "image manifest schemaVersion must be 2, not 1"),
        (_manifest_doc(schemaVersion=True), "image manifest schemaVersion must be 2, not True"),
        (_manifest_doc(schemaVersion=2.0), "image manifest schemaVersion must be 2, not 2.0"),
        (_manifest_doc(config=None), "image manifest config must not be null"),
        (_manifest_doc(layers={}), "image manifest layers must be an array of descriptors, not {}"),
        (_manifest_doc(annotations={"k": 1}), "image manifest annotations must be an object of strings"),
        (_manifest_doc(artifactType="nope"), "invalid image manifest artifactType 'nope'"),
        (
            {"mediaType": MEDIA_TYPE_IMAGE_MANIFEST, "config": {}, "layers": []},
            "image manifest schemaVersion is missing",
        ),
    ],
)
def test_malformed_manifest_is_refused(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidError) as caught:
        Manifest.from_dict(doc)
    assert str(caught.value).startswith(message)


def test_empty_layers_are_accepted_but_not_a_missing_array() -> None:
    """The schema says minItems 1, the spec's text only SHOULD, and FROM-scratch images have none."""
    doc = _manifest_doc(layers=[])
    manifest = Manifest.from_dict(doc)
    assert manifest.layers == ()
    assert manifest.to_dict() == doc
    assert Manifest(config=manifest.config, layers=()).to_dict()["layers"] == []
    del doc["layers"]
    with pytest.raises(InvalidError, match="image manifest layers is missing"):
        Manifest.from_dict(doc)


def test_index_requires_manifests_but_reads_null_as_empty() -> None:
    with pytest.raises(InvalidError, match="image index manifests is missing"):
        Index.from_dict({"schemaVersion": 2})
    doc = {"schemaVersion": 2, "manifests": None}  # as umoci 0.4 writes it
    index = Index.from_dict(doc)
    assert index.manifests == ()
    assert index.media_type is None
    assert index.to_dict() == doc


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"created": "2015-10-31 22:22:56"}, "image config created must be an RFC 3339 date-time"),
        ({"created": "2015-02-29T00:00:00Z"}, "image config created must be an RFC 3339 date-time"),
        ({"created": "2015-10-31T24:00:00Z"}, "image config created must be an RFC 3339 date-time"),
        ({"created": "2015-10-31T22:22:56+25:00"}, "image config created must be an RFC 3339 date-time"),
        ({"created": "\uff12\uff10\uff11\uff15-10-31T22:22:56Z"}, "image config created must be an RFC 3339 date-time"),
        ({"rootfs": {"type": "zfs", "diff_ids": []}}, "image config.rootfs type must be 'layers', not 'zfs'"),
        ({"rootfs": {"type": "layers"}}, "image config.rootfs diff_ids is missing"),
        ({"rootfs": {"type": "layers", "diff_ids": ["sha256:AB"]}}, "image config.rootfs diff_ids: invalid sha256"),
        ({"config": {"Env": ["=value"]}}, "image config.config Env entry '=value' is not of the form KEY=VALUE"),
        ({"config": {"Env": ["KEY"]}}, "image config.config Env entry 'KEY' is not of the form KEY=VALUE"),
        ({"config": {"ExposedPorts": {"80/tcp": True}}}, "image config.config ExposedPorts must be an object of obj"),
        ({"config": {"ArgsEscaped": "yes"}}, "image config.config ArgsEscaped must be a boolean, not 'yes'"),
        ({"history": [{"empty_layer": 1}]}, "image config.history entry empty_layer must be a boolean, not 1"),
        ({"history": "should be an array"}, "image config history must be an array"),
        ({"os.features": "x"}, "image config os.features must be an array of strings"),
        ({"architecture": None}, "image config architecture must not be null"),
    ],
)
def test_malformed_config_is_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidError) as caught:
        ImageConfig.from_dict({**CONFIG_DOC, **change})
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    "created", ["2015-10-31T22:22:56Z", "2016-02-29t00:00:00.5z", "0001-01-01T00:00:00Z", "2015-10-31T22:22:56-07:30"]
)
def test_rfc3339_timestamps_are_accepted(created: str) -> None:
    assert ImageConfig.from_dict({**CONFIG_DOC, "created": created}).created == created


def test_env_values_may_hold_anything() -> None:
    env = ["EMPTY=", "A=b=c", "MULTI=line\nline", "SPACE KEY=1"]
    parsed = ImageConfig.from_dict({**CONFIG_DOC, "config": {"Env": env}})
    assert parsed.config is not None
    assert parsed.config.env == tuple(env)


# -- lossless round trips -----------------------------------------------------------------


def test_unknown_members_and_annotations_survive_a_round_trip() -> None:
    doc = _manifest_doc(
        artifactType="application/vnd.example+type",
        subject={"mediaType": MEDIA_TYPE_IMAGE_MANIFEST, "digest": OTHER, "size": 3, "x-extra": [1, {"a": None}]},
        annotations={"org.opencontainers.image.title": "t", "com.example": ""},
        **{"com.example.future": {"nested": [1, 2.5, None, True]}},
    )
    doc["layers"].append(
        {
            "mediaType": MEDIA_TYPE_DOCKER_FOREIGN_LAYER,
            "digest": OTHER,
            "size": 5,
            "urls": ["https://example.com/l"],
            "annotations": {"a": "b"},
            "platform": {"architecture": "amd64", "os": "windows", "os.version": "10.0", "x": 1},
            "futureField": "kept",
        }
    )
    manifest = Manifest.from_dict(doc)
    assert manifest.extra == {"com.example.future": {"nested": [1, 2.5, None, True]}}
    assert manifest.annotations == {"org.opencontainers.image.title": "t", "com.example": ""}
    assert manifest.layers[1].extra == {"futureField": "kept"}
    assert manifest.to_dict() == doc
    assert json.loads(manifest.to_json()) == doc
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.to_json() == dump_json(manifest.to_dict())


def test_docker_config_with_nulls_round_trips_exactly() -> None:
    config = ImageConfig.from_dict(DOCKER_CONFIG_DOC)
    assert config.to_dict() == DOCKER_CONFIG_DOC
    assert config.config is not None
    assert config.config.entrypoint is None
    assert config.config.volumes is None
    assert config.config.user == ""
    assert config.config.cmd == ("/bin/sh",)
    assert config.config.extra == {
        "Hostname": "",
        "AttachStdin": False,
        "Image": "sha256:" + "cd" * 32,
        "Volumes": None,
        "Entrypoint": None,
        "OnBuild": None,
        "Labels": None,
    }
    assert config.extra["docker_version"] == "20.10.23"
    assert config.history is not None
    assert config.history[1] == History(
        created="2023-08-07T19:20:20.894140623Z", created_by='/bin/sh -c #(nop)  CMD ["/bin/sh"]', empty_layer=True
    )
    assert config.rootfs == RootFS(diff_ids=(DIFF_ID,))
    assert config.platform == Platform(architecture="amd64", os="linux")


def test_extra_may_not_shadow_a_field() -> None:
    with pytest.raises(InvalidError, match="extra member 'User' collides with field user"):
        ContainerConfig(extra={"User": "root"})
    # an explicit null of an unset member is what parsing produces; constructing it is fine
    assert ContainerConfig(extra={"Cmd": None}).to_dict() == {"Cmd": None}
    # and giving the member a value replaces the null
    parsed = ContainerConfig.from_dict({"Cmd": None, "Entrypoint": None})
    assert parsed.replace(cmd=("sh",)).to_dict() == {"Cmd": ["sh"], "Entrypoint": None}
    assert ContainerConfig(cmd=("a",), extra={"Cmd": None}).extra == {}
    index = Index.from_dict({"schemaVersion": 2, "manifests": None})
    assert index.replace(manifests=(EMPTY_DESCRIPTOR,)).to_dict() == {
        "schemaVersion": 2,
        "manifests": [EMPTY_DESCRIPTOR.to_dict()],
    }


def test_docker_schema2_manifest_list_and_config_parse() -> None:
    config_bytes = dump_json({**DOCKER_CONFIG_DOC})
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_DOCKER_MANIFEST,
        "config": {
            "mediaType": MEDIA_TYPE_DOCKER_CONFIG,
            "size": len(config_bytes),
            "digest": Digest.from_bytes(config_bytes),
        },
        "layers": [
            {"mediaType": MEDIA_TYPE_DOCKER_LAYER, "size": len(LAYER_BYTES), "digest": LAYER_DIGEST},
            {
                "mediaType": MEDIA_TYPE_DOCKER_FOREIGN_LAYER,
                "size": 1,
                "digest": OTHER,
                "urls": ["https://mcr.microsoft.com/v2/windows/blobs/" + OTHER],
            },
        ],
    }
    manifest = Manifest.from_json(dump_json(manifest_doc), media_type=MEDIA_TYPE_DOCKER_MANIFEST)
    assert manifest.media_type == MEDIA_TYPE_DOCKER_MANIFEST
    assert [layer.media_type for layer in manifest.layers] == [MEDIA_TYPE_DOCKER_LAYER, MEDIA_TYPE_DOCKER_FOREIGN_LAYER]
    assert manifest.to_dict() == manifest_doc
    # `docker build` of an image FROM scratch writes no layers
    assert Manifest.from_dict({**manifest_doc, "layers": []}).layers == ()

    list_doc = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_DOCKER_MANIFEST_LIST,
        "manifests": [
            {
                "mediaType": MEDIA_TYPE_DOCKER_MANIFEST,
                "size": 528,
                "digest": OTHER,
                "platform": {"architecture": "arm", "os": "linux", "variant": "v7", "features": ["sse4"]},
            }
        ],
    }
    index = Index.from_json(dump_json(list_doc), media_type=MEDIA_TYPE_DOCKER_MANIFEST_LIST)
    assert index.manifests[0].platform == Platform(architecture="arm", os="linux", variant="v7", features=("sse4",))
    assert index.to_dict() == list_doc

    config = ImageConfig.from_json(config_bytes, media_type=MEDIA_TYPE_DOCKER_CONFIG)
    assert config.to_dict() == DOCKER_CONFIG_DOC


def test_constructed_models_normalise_and_serialise() -> None:
    config = Descriptor(media_type=MEDIA_TYPE_IMAGE_CONFIG, digest=OTHER, size=10)
    layer = Descriptor(media_type=MEDIA_TYPE_IMAGE_LAYER_GZIP, digest=LAYER_DIGEST, size=len(LAYER_BYTES))
    manifest = Manifest(config=config, layers=[layer], annotations={"a": "b"})  # type: ignore[arg-type]
    assert manifest.layers == (layer,)
    assert manifest.to_dict() == {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_IMAGE_MANIFEST,
        "config": {"mediaType": MEDIA_TYPE_IMAGE_CONFIG, "digest": OTHER, "size": 10},
        "layers": [{"mediaType": MEDIA_TYPE_IMAGE_LAYER_GZIP, "digest": LAYER_DIGEST, "size": len(LAYER_BYTES)}],
        "annotations": {"a": "b"},
    }
    assert manifest.to_json() == (
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        b'"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"'
        + OTHER.encode()
        + b'","size":10},'
        b'"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"'
        + LAYER_DIGEST.encode()
        + b'","size":15000}],"annotations":{"a":"b"}}'
    )
    assert Index().to_dict() == {"schemaVersion": 2, "mediaType": MEDIA_TYPE_IMAGE_INDEX, "manifests": []}
    image = ImageConfig(architecture="amd64", os="linux")
    assert image.to_dict() == {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    assert {manifest, manifest.replace(annotations={"a": "b"})} == {manifest}
    assert manifest.replace(annotations=None) != manifest
    assert hash(image) == hash(ImageConfig.from_dict(image.to_dict()))
    with pytest.raises(InvalidError, match="image manifest config must be a Descriptor"):
        Manifest(config=config.to_dict(), layers=(layer,))  # type: ignore[arg-type]
    with pytest.raises(InvalidError, match=r"image manifest layers\[1\] must be a Descriptor"):
        Manifest(config=config, layers=(layer, "x"))  # type: ignore[arg-type]
    with pytest.raises(InvalidError, match=r"image config\.config Env entry 'X' is not"):
        ContainerConfig(env=("X",))
    with pytest.raises(InvalidError, match="image config config must be a ContainerConfig"):
        ImageConfig(architecture="amd64", os="linux", config={"Env": []})  # type: ignore[arg-type]


# -- from_descriptor ------------------------------------------------------------------------


@pytest.fixture(params=["memory", "dir"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Engine]:
    if request.param == "memory":
        async with MemoryEngine() as memory:
            yield memory
    else:
        await create_layout(tmp_path / "l")
        async with await open_layout(tmp_path / "l") as directory:
            yield directory


async def _put(engine: Engine, media_type: str, obj: Any) -> Descriptor:
    data = obj if isinstance(obj, bytes) else dump_json(obj)
    digest, size = await engine.put_blob(data)
    assert (digest, size) == (Digest.from_bytes(data), len(data))
    return Descriptor(media_type=media_type, digest=digest, size=size)


async def _image(engine: Engine) -> tuple[Descriptor, Index, Manifest, ImageConfig]:
    config = ImageConfig.from_dict(CONFIG_DOC)
    layer = await _put(engine, MEDIA_TYPE_IMAGE_LAYER_GZIP, LAYER_BYTES)
    manifest = Manifest(config=await _put(engine, MEDIA_TYPE_IMAGE_CONFIG, config), layers=(layer,))
    index = Index(manifests=(await _put(engine, MEDIA_TYPE_IMAGE_MANIFEST, manifest),))
    digest, size = await engine.put_blob_json(index)
    return Descriptor(media_type=MEDIA_TYPE_IMAGE_INDEX, digest=digest, size=size), index, manifest, config


@pytest.mark.anyio
async def test_from_descriptor_returns_typed_data(engine: Engine) -> None:
    root, index, manifest, config = await _image(engine)

    async with await from_descriptor(engine, root) as blob:
        assert blob.descriptor == root
        assert (blob.media_type, blob.digest) == (MEDIA_TYPE_IMAGE_INDEX, root.digest)
        assert type(blob.data) is Index
        assert blob.data == index
    [manifest_descriptor] = index.manifests
    async with await from_descriptor(engine, manifest_descriptor) as blob:
        assert type(blob.data) is Manifest
        assert blob.data == manifest
    async with await from_descriptor(engine, manifest.config) as blob:
        assert type(blob.data) is ImageConfig
        assert blob.data == config
        assert blob.data.to_dict() == CONFIG_DOC

    async with await from_descriptor(engine, manifest.layers[0]) as blob:
        reader = blob.data
        assert isinstance(reader, BlobReader)
        assert (reader.digest, reader.size) == (LAYER_DIGEST, len(LAYER_BYTES))
        assert await reader.read() == LAYER_BYTES
    with pytest.raises(EngineClosedError):
        await reader.read(1)  # closed by `async with blob`


@pytest.mark.anyio
async def test_from_descriptor_of_docker_types(engine: Engine) -> None:
    config = await _put(engine, MEDIA_TYPE_DOCKER_CONFIG, DOCKER_CONFIG_DOC)
    layer = await _put(engine, MEDIA_TYPE_DOCKER_LAYER, LAYER_BYTES)
    manifest = await _put(
        engine,
        MEDIA_TYPE_DOCKER_MANIFEST,
        {"schemaVersion": 2, "mediaType": MEDIA_TYPE_DOCKER_MANIFEST, "config": config, "layers": [layer]},
    )
    manifest_list = await _put(
        engine,
        MEDIA_TYPE_DOCKER_MANIFEST_LIST,
        {"schemaVersion": 2, "mediaType": MEDIA_TYPE_DOCKER_MANIFEST_LIST, "manifests": [manifest]},
    )
    assert (await from_descriptor(engine, manifest_list)).data == Index(
        media_type=MEDIA_TYPE_DOCKER_MANIFEST_LIST, manifests=(manifest,)
    )
    assert (await from_descriptor(engine, manifest)).data == Manifest(
        media_type=MEDIA_TYPE_DOCKER_MANIFEST, config=config, layers=(layer,)
    )
    assert (await from_descriptor(engine, config)).data == ImageConfig.from_dict(DOCKER_CONFIG_DOC)
    async with await from_descriptor(engine, layer) as blob:
        assert isinstance(blob.data, BlobReader)
        assert b"".join([chunk async for chunk in blob.data]) == LAYER_BYTES


@pytest.mark.anyio
async def test_from_descriptor_of_a_descriptor_and_unknown_types(engine: Engine) -> None:
    target = Descriptor(media_type=MEDIA_TYPE_IMAGE_MANIFEST, digest=OTHER, size=1, annotations={"a": "b"})
    stored = await _put(engine, MEDIA_TYPE_DESCRIPTOR, target)
    blob = await from_descriptor(engine, stored)
    assert type(blob.data) is Descriptor
    assert blob.data == target
    await blob.aclose()  # a no-op for parsed data

    # unknown media types, even JSON ones, stream: their content is not ours to judge
    unknown = await _put(engine, "application/vnd.example.thing+json", b'{"not": "parsed"}')
    async with await from_descriptor(engine, unknown) as blob:
        assert isinstance(blob.data, BlobReader)
        assert await blob.data.read() == b'{"not": "parsed"}'


@pytest.mark.anyio
async def test_embedded_data_is_used_without_the_engine(engine: Engine) -> None:
    assert await engine.list_blobs() == []
    blob = await from_descriptor(engine, EMPTY_DESCRIPTOR)
    assert blob.data == {}
    manifest_bytes = dump_json(_manifest_doc())
    embedded = _descriptor(MEDIA_TYPE_IMAGE_MANIFEST, manifest_bytes).replace(data=manifest_bytes)
    assert (await from_descriptor(engine, embedded)).data == Manifest.from_dict(_manifest_doc())
    layer = _descriptor(MEDIA_TYPE_IMAGE_LAYER, b"tiny layer").replace(data=b"tiny layer")
    async with await from_descriptor(engine, layer) as blob:
        assert isinstance(blob.data, BlobReader)
        assert await blob.data.read() == b"tiny layer"
    assert await engine.list_blobs() == []


@pytest.mark.anyio
async def test_blob_over_the_cap_is_refused_before_reading(engine: Engine) -> None:
    # nothing is stored: any attempt to read would raise BlobNotFoundError instead
    huge = Descriptor(media_type=MEDIA_TYPE_IMAGE_MANIFEST, digest=OTHER, size=DEFAULT_JSON_LIMIT + 1)
    with pytest.raises(BlobTooLargeError, match=rf"blob {OTHER} has {DEFAULT_JSON_LIMIT + 1} bytes, over the cap of"):
        await from_descriptor(engine, huge)
    with pytest.raises(BlobNotFoundError):
        await from_descriptor(engine, huge.replace(size=10))
    stored = await _put(engine, MEDIA_TYPE_IMAGE_CONFIG, CONFIG_DOC)
    with pytest.raises(BlobTooLargeError, match=f"has {stored.size} bytes, over the cap of {stored.size - 1}"):
        await from_descriptor(engine, stored, max_size=stored.size - 1)
    assert (await from_descriptor(engine, stored, max_size=stored.size)).data == ImageConfig.from_dict(CONFIG_DOC)
    assert (await from_descriptor(engine, stored, max_size=None)).data == ImageConfig.from_dict(CONFIG_DOC)


@pytest.mark.anyio
async def test_big_document_is_parsed(engine: Engine) -> None:
    labels = {f"org.example.label.{i}": "x" * 100 for i in range(12000)}  # over 1 MiB: parsed in a thread
    doc = {**CONFIG_DOC, "config": {"Labels": labels}}
    stored = await _put(engine, MEDIA_TYPE_IMAGE_CONFIG, doc)
    assert stored.size > 1 << 20
    assert (await from_descriptor(engine, stored)).data == ImageConfig.from_dict(doc)


@pytest.mark.anyio
async def test_descriptor_size_must_match_the_blob(engine: Engine) -> None:
    stored = await _put(engine, MEDIA_TYPE_IMAGE_CONFIG, CONFIG_DOC)
    with pytest.raises(SizeMismatchError, match=f"blob {stored.digest} is larger than its descriptor's size"):
        await from_descriptor(engine, stored.replace(size=stored.size - 1))
    with pytest.raises(SizeMismatchError, match=f"blob {stored.digest} has {stored.size} bytes, but its descriptor"):
        await from_descriptor(engine, stored.replace(size=stored.size + 1))
    layer = await _put(engine, MEDIA_TYPE_IMAGE_LAYER, LAYER_BYTES)
    with pytest.raises(SizeMismatchError, match=f"has {len(LAYER_BYTES)} bytes, but its descriptor says 5"):
        await from_descriptor(engine, layer.replace(size=5))


@pytest.mark.anyio
async def test_stored_media_type_disagreeing_with_descriptor_is_refused(engine: Engine) -> None:
    stored = await _put(engine, MEDIA_TYPE_DOCKER_MANIFEST, _manifest_doc())  # says OCI inside
    with pytest.raises(
        InvalidError,
        match=re.escape(
            f"{MEDIA_TYPE_DOCKER_MANIFEST} blob {stored.digest}: image manifest has mediaType "
            f"'{MEDIA_TYPE_IMAGE_MANIFEST}', but its descriptor says"
        ),
    ):
        await from_descriptor(engine, stored)
    confused = await _put(engine, MEDIA_TYPE_IMAGE_INDEX, _manifest_doc(mediaType=None))
    with pytest.raises(InvalidError, match="image index has a 'config' member"):
        await from_descriptor(engine, confused)
    garbage = await _put(engine, MEDIA_TYPE_IMAGE_CONFIG, b"{not json")
    with pytest.raises(InvalidError, match=f"blob {garbage.digest}: image config is not valid JSON"):
        await from_descriptor(engine, garbage)


@pytest.mark.anyio
async def test_unregistered_algorithm_cannot_be_read(engine: Engine) -> None:
    odd = Descriptor(media_type=MEDIA_TYPE_IMAGE_MANIFEST, digest=Digest("sha256+b64:abc"), size=2)
    with pytest.raises(UnsupportedAlgorithmError):
        await from_descriptor(engine, odd)


@pytest.fixture
def thing_parser() -> Iterator[str]:
    media_type = "application/vnd.example.thing.v1+json"
    register_media_type(media_type, lambda data: ("thing", json.loads(data)))
    yield media_type
    unregister_media_type(media_type)


@pytest.mark.anyio
async def test_user_registered_parser_is_used(engine: Engine, thing_parser: str) -> None:
    stored = await _put(engine, thing_parser, {"n": 1})
    blob = await from_descriptor(engine, stored)
    assert blob.data == ("thing", {"n": 1})
    with pytest.raises(ClobberError, match="already has a parser"):
        register_media_type(thing_parser, lambda data: data)
    register_media_type(thing_parser, lambda data: ("replaced", data), replace=True)
    assert (await from_descriptor(engine, stored)).data == ("replaced", b'{"n":1}')


def test_registering_checks_its_arguments() -> None:
    with pytest.raises(InvalidError, match="invalid mediaType 'nope'"):
        register_media_type("nope", lambda data: data)
    with pytest.raises(TypeError, match="parser must be callable"):
        register_media_type("application/x-y", "not callable")  # type: ignore[arg-type]
    with pytest.raises(ClobberError):
        register_media_type(MEDIA_TYPE_IMAGE_MANIFEST, lambda data: data)
    assert unregister_media_type("application/x-never-registered") is None


async def _corrupt(path: Path, data: bytes) -> None:
    await anyio.Path(path).write_bytes(data)


@pytest.mark.anyio
@pytest.mark.parametrize("length", ["same", "shorter", "longer"])
async def test_corrupted_blob_on_disk_is_detected(tmp_path: Path, length: str) -> None:
    await create_layout(tmp_path / "l")
    async with await open_layout(tmp_path / "l") as engine:
        manifest = await _put(engine, MEDIA_TYPE_IMAGE_MANIFEST, _manifest_doc())
        layer = await _put(engine, MEDIA_TYPE_IMAGE_LAYER, LAYER_BYTES)
        for descriptor in (manifest, layer):
            original = await anyio.Path(tmp_path / "l/blobs/sha256" / descriptor.digest.encoded).read_bytes()
            damaged = {"same": original[:-1] + b"!", "shorter": original[:-1], "longer": original + b" "}[length]
            await _corrupt(tmp_path / "l/blobs/sha256" / descriptor.digest.encoded, damaged)

        error = DigestMismatchError if length == "same" else (DigestMismatchError, SizeMismatchError)
        with pytest.raises(error):
            await from_descriptor(engine, manifest)
        if length != "same":  # the size is checked before a byte is streamed
            with pytest.raises(SizeMismatchError):
                await from_descriptor(engine, layer)
            return
        async with await from_descriptor(engine, layer) as blob:
            assert isinstance(blob.data, BlobReader)
            with pytest.raises(DigestMismatchError, match=f"blob {LAYER_DIGEST} hashes to"):
                await blob.data.read()


@pytest.mark.anyio
async def test_blob_without_reader_is_a_plain_value() -> None:
    blob = Blob(descriptor=EMPTY_DESCRIPTOR, data={})
    async with blob:
        pass
    assert blob.media_type == MEDIA_TYPE_EMPTY_JSON
    assert base64.b64decode(EMPTY_DESCRIPTOR.to_dict()["data"]) == EMPTY_JSON
