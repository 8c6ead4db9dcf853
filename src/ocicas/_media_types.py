"""Media types of OCI image-spec 1.1 and Docker image manifest v2 schema 2.

Names mirror the Go ``ispec`` constants (``MediaTypeImageManifest`` is
:data:`MEDIA_TYPE_IMAGE_MANIFEST`). Unknown media types are not errors anywhere
in ocicas: these constants only say which documents ocicas knows how to parse.
"""

from __future__ import annotations

from typing import Final

from ._descriptor import Descriptor
from ._digest import Digest

__all__ = [
    "CONFIG_MEDIA_TYPES",
    "EMPTY_DESCRIPTOR",
    "EMPTY_JSON",
    "INDEX_MEDIA_TYPES",
    "LAYER_MEDIA_TYPES",
    "MANIFEST_MEDIA_TYPES",
    "MEDIA_TYPE_DESCRIPTOR",
    "MEDIA_TYPE_DOCKER_CONFIG",
    "MEDIA_TYPE_DOCKER_FOREIGN_LAYER",
    "MEDIA_TYPE_DOCKER_LAYER",
    "MEDIA_TYPE_DOCKER_MANIFEST",
    "MEDIA_TYPE_DOCKER_MANIFEST_LIST",
    "MEDIA_TYPE_EMPTY_JSON",
    "MEDIA_TYPE_IMAGE_CONFIG",
    "MEDIA_TYPE_IMAGE_INDEX",
    "MEDIA_TYPE_IMAGE_LAYER",
    "MEDIA_TYPE_IMAGE_LAYER_GZIP",
    "MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE",
    "MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_GZIP",
    "MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_ZSTD",
    "MEDIA_TYPE_IMAGE_LAYER_ZSTD",
    "MEDIA_TYPE_IMAGE_MANIFEST",
    "MEDIA_TYPE_LAYOUT_HEADER",
]

# -- OCI image-spec 1.1 (specs-go/v1/mediatype.go) ------------------------------------

#: A content descriptor stored as a blob.
MEDIA_TYPE_DESCRIPTOR: Final = "application/vnd.oci.descriptor.v1+json"
#: The ``oci-layout`` file.
MEDIA_TYPE_LAYOUT_HEADER: Final = "application/vnd.oci.layout.header.v1+json"
#: An image index (a list of manifests).
MEDIA_TYPE_IMAGE_INDEX: Final = "application/vnd.oci.image.index.v1+json"
#: An image manifest.
MEDIA_TYPE_IMAGE_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
#: An image configuration.
MEDIA_TYPE_IMAGE_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
#: The empty JSON document ``{}``, for a manifest's config or layer that carries nothing.
MEDIA_TYPE_EMPTY_JSON: Final = "application/vnd.oci.empty.v1+json"
#: An uncompressed tar layer.
MEDIA_TYPE_IMAGE_LAYER: Final = "application/vnd.oci.image.layer.v1.tar"
#: A gzip-compressed tar layer.
MEDIA_TYPE_IMAGE_LAYER_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
#: A zstd-compressed tar layer.
MEDIA_TYPE_IMAGE_LAYER_ZSTD: Final = "application/vnd.oci.image.layer.v1.tar+zstd"
#: An uncompressed tar layer that must not be uploaded (deprecated by image-spec 1.1).
MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar"
#: A gzip-compressed non-distributable layer (deprecated by image-spec 1.1).
MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_GZIP: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
#: A zstd-compressed non-distributable layer (deprecated by image-spec 1.1).
MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_ZSTD: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

#: The content of the empty descriptor.
EMPTY_JSON: Final = b"{}"
#: The empty descriptor (Go's ``DescriptorEmptyJSON``), with its two bytes embedded.
EMPTY_DESCRIPTOR: Final = Descriptor(
    media_type=MEDIA_TYPE_EMPTY_JSON,
    digest=Digest("sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"),
    size=len(EMPTY_JSON),
    data=EMPTY_JSON,
)

# -- Docker image manifest v2, schema 2 -----------------------------------------------

#: A Docker schema-2 image manifest.
MEDIA_TYPE_DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
#: A Docker schema-2 manifest list (the Docker peer of an image index).
MEDIA_TYPE_DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
#: A Docker image configuration.
MEDIA_TYPE_DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
#: A Docker gzip-compressed tar layer.
MEDIA_TYPE_DOCKER_LAYER: Final = "application/vnd.docker.image.rootfs.diff.tar.gzip"
#: A Docker foreign layer (fetched from its ``urls``, not pushed).
MEDIA_TYPE_DOCKER_FOREIGN_LAYER: Final = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

# -- families ---------------------------------------------------------------------------

#: Media types parsed as :class:`~ocicas.Manifest`.
MANIFEST_MEDIA_TYPES: Final = frozenset({MEDIA_TYPE_IMAGE_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST})
#: Media types parsed as :class:`~ocicas.Index`.
INDEX_MEDIA_TYPES: Final = frozenset({MEDIA_TYPE_IMAGE_INDEX, MEDIA_TYPE_DOCKER_MANIFEST_LIST})
#: Media types parsed as :class:`~ocicas.ImageConfig`.
CONFIG_MEDIA_TYPES: Final = frozenset({MEDIA_TYPE_IMAGE_CONFIG, MEDIA_TYPE_DOCKER_CONFIG})
#: Layer media types of both specs (layers are streamed, never parsed).
LAYER_MEDIA_TYPES: Final = frozenset(
    {
        MEDIA_TYPE_IMAGE_LAYER,
        MEDIA_TYPE_IMAGE_LAYER_GZIP,
        MEDIA_TYPE_IMAGE_LAYER_ZSTD,
        MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE,
        MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_GZIP,
        MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_ZSTD,
        MEDIA_TYPE_DOCKER_LAYER,
        MEDIA_TYPE_DOCKER_FOREIGN_LAYER,
    }
)
