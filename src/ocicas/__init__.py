"""ocicas: an asyncio- and trio-native content-addressable store for OCI images.

The Python port of umoci's ``oci/cas``, on anyio: an :class:`Engine` protocol
with a directory engine (the OCI image layout, :func:`open_layout`), an in-memory
engine (:class:`MemoryEngine`) and a registry engine (:func:`open_registry`); typed
OCI models and :func:`from_descriptor`; the descriptor graph (:func:`walk`,
:func:`resolve_reference`); :func:`gc`; :func:`copy` between engines; and
:func:`build_image`. The ``ocicas`` command is in :mod:`ocicas.cli`.

The core needs only anyio. The registry engine needs httpx (``pip install 'ocicas[registry]'``)
and the command click and rich (``pip install 'ocicas[cli]'``); both load on first use, so
``import ocicas`` stays light.
"""

import importlib
from typing import TYPE_CHECKING, Any

from ._blob import Blob, BlobParser, from_descriptor, read_described, register_media_type, unregister_media_type
from ._build import build_image, build_index
from ._context import Context
from ._copy import DEFAULT_COPY_CONCURRENCY, CopyEvent, CopyProgress, CopyResult, copy
from ._descriptor import Descriptor, Platform
from ._digest import BLOB_ALGORITHM, SUPPORTED_ALGORITHMS, Digest
from ._dir import DirEngine, create_layout, open_layout
from ._engine import CHUNK_SIZE, DEFAULT_READ_LIMIT, AsyncReadable, BlobInfo, BlobReader, BlobSource, Engine
from ._errors import (
    AccessDeniedError,
    BlobNotFoundError,
    BlobTooLargeError,
    ClobberError,
    ContextCancelledError,
    ContextError,
    DeadlineExceededError,
    DigestMismatchError,
    EngineClosedError,
    InvalidError,
    LayoutExistsError,
    LayoutNotFoundError,
    NotFoundError,
    OCICASError,
    ReferenceNotFoundError,
    RegistryError,
    RegistryUnreachableError,
    SizeMismatchError,
    UnsupportedAlgorithmError,
    UnsupportedError,
)
from ._gc import DEFAULT_GRACE_PERIOD, GCPolicy, GCResult, gc
from ._graph import (
    DEFAULT_CONCURRENCY,
    DescriptorPath,
    Graph,
    children,
    is_node,
    parse_platform,
    platform_matches,
    resolve_reference,
    walk,
)
from ._json import DEFAULT_JSON_LIMIT
from ._layout_format import ANNOTATION_REF_NAME, IMAGE_LAYOUT_VERSION, validate_reference_name
from ._media_types import (
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
from ._memory_engine import MemoryEngine
from ._models import ContainerConfig, History, ImageConfig, Index, Manifest, RootFS

if TYPE_CHECKING:
    from .registry import RegistryEngine, RegistryLocation, RetryPolicy, open_registry, parse_registry_location

__version__ = "0.1.0"

# Names loaded on first access (PEP 562), with the module that defines them: importing
# ocicas.registry imports httpx, and raises ModuleNotFoundError saying how to install it.
_LAZY: dict[str, str] = {
    "RegistryEngine": ".registry",
    "RegistryLocation": ".registry",
    "RetryPolicy": ".registry",
    "open_registry": ".registry",
    "parse_registry_location": ".registry",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "ANNOTATION_REF_NAME",
    "BLOB_ALGORITHM",
    "CHUNK_SIZE",
    "CONFIG_MEDIA_TYPES",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_COPY_CONCURRENCY",
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_JSON_LIMIT",
    "DEFAULT_READ_LIMIT",
    "EMPTY_DESCRIPTOR",
    "EMPTY_JSON",
    "IMAGE_LAYOUT_VERSION",
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
    "SUPPORTED_ALGORITHMS",
    "AccessDeniedError",
    "AsyncReadable",
    "Blob",
    "BlobInfo",
    "BlobNotFoundError",
    "BlobParser",
    "BlobReader",
    "BlobSource",
    "BlobTooLargeError",
    "ClobberError",
    "ContainerConfig",
    "Context",
    "ContextCancelledError",
    "ContextError",
    "CopyEvent",
    "CopyProgress",
    "CopyResult",
    "DeadlineExceededError",
    "Descriptor",
    "DescriptorPath",
    "Digest",
    "DigestMismatchError",
    "DirEngine",
    "Engine",
    "EngineClosedError",
    "GCPolicy",
    "GCResult",
    "Graph",
    "History",
    "ImageConfig",
    "Index",
    "InvalidError",
    "LayoutExistsError",
    "LayoutNotFoundError",
    "Manifest",
    "MemoryEngine",
    "NotFoundError",
    "OCICASError",
    "Platform",
    "ReferenceNotFoundError",
    "RegistryEngine",
    "RegistryError",
    "RegistryLocation",
    "RegistryUnreachableError",
    "RetryPolicy",
    "RootFS",
    "SizeMismatchError",
    "UnsupportedAlgorithmError",
    "UnsupportedError",
    "__version__",
    "build_image",
    "build_index",
    "children",
    "copy",
    "create_layout",
    "from_descriptor",
    "gc",
    "is_node",
    "open_layout",
    "open_registry",
    "parse_platform",
    "parse_registry_location",
    "platform_matches",
    "read_described",
    "register_media_type",
    "resolve_reference",
    "unregister_media_type",
    "validate_reference_name",
    "walk",
]
