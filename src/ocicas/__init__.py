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

if TYPE_CHECKING:
    from ._blob import Blob, BlobParser, from_descriptor, read_described, register_media_type, unregister_media_type
    from ._build import build_image, build_index
    from ._context import Context
    from ._copy import DEFAULT_COPY_CONCURRENCY, CopyEvent, CopyProgress, CopyResult, copy
    from ._descriptor import Descriptor, Platform
    from ._digest import BLOB_ALGORITHM, SUPPORTED_ALGORITHMS, Digest
    from ._dir import DirEngine, create_layout, open_layout
    from ._engine import (
        CHUNK_SIZE,
        DEFAULT_READ_LIMIT,
        AsyncReadable,
        BlobInfo,
        BlobReader,
        BlobSource,
        Engine,
        RawBlob,
    )
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
    from ._lease import Lease
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
    from .registry import RegistryEngine, RegistryLocation, RetryPolicy, open_registry, parse_registry_location

__version__ = "0.1.0"

# Every public name loads on first access (PEP 562), as anyio's do: `import ocicas` stays light, and the
# registry engine (httpx) loads only when used; without httpx it raises ModuleNotFoundError saying how to
# install it. Name -> the module that defines it; the imports above say the same to type checkers.
_LAZY: dict[str, str] = {
    "Blob": "._blob",
    "BlobParser": "._blob",
    "from_descriptor": "._blob",
    "read_described": "._blob",
    "register_media_type": "._blob",
    "unregister_media_type": "._blob",
    "build_image": "._build",
    "build_index": "._build",
    "Context": "._context",
    "DEFAULT_COPY_CONCURRENCY": "._copy",
    "CopyEvent": "._copy",
    "CopyProgress": "._copy",
    "CopyResult": "._copy",
    "copy": "._copy",
    "Descriptor": "._descriptor",
    "Platform": "._descriptor",
    "BLOB_ALGORITHM": "._digest",
    "SUPPORTED_ALGORITHMS": "._digest",
    "Digest": "._digest",
    "DirEngine": "._dir",
    "create_layout": "._dir",
    "open_layout": "._dir",
    "CHUNK_SIZE": "._engine",
    "DEFAULT_READ_LIMIT": "._engine",
    "AsyncReadable": "._engine",
    "BlobInfo": "._engine",
    "BlobReader": "._engine",
    "BlobSource": "._engine",
    "Engine": "._engine",
    "Lease": "._lease",
    "RawBlob": "._engine",
    "AccessDeniedError": "._errors",
    "BlobNotFoundError": "._errors",
    "BlobTooLargeError": "._errors",
    "ClobberError": "._errors",
    "ContextCancelledError": "._errors",
    "ContextError": "._errors",
    "DeadlineExceededError": "._errors",
    "DigestMismatchError": "._errors",
    "EngineClosedError": "._errors",
    "InvalidError": "._errors",
    "LayoutExistsError": "._errors",
    "LayoutNotFoundError": "._errors",
    "NotFoundError": "._errors",
    "OCICASError": "._errors",
    "ReferenceNotFoundError": "._errors",
    "RegistryError": "._errors",
    "RegistryUnreachableError": "._errors",
    "SizeMismatchError": "._errors",
    "UnsupportedAlgorithmError": "._errors",
    "UnsupportedError": "._errors",
    "DEFAULT_GRACE_PERIOD": "._gc",
    "GCPolicy": "._gc",
    "GCResult": "._gc",
    "gc": "._gc",
    "DEFAULT_CONCURRENCY": "._graph",
    "DescriptorPath": "._graph",
    "Graph": "._graph",
    "children": "._graph",
    "is_node": "._graph",
    "parse_platform": "._graph",
    "platform_matches": "._graph",
    "resolve_reference": "._graph",
    "walk": "._graph",
    "DEFAULT_JSON_LIMIT": "._json",
    "ANNOTATION_REF_NAME": "._layout_format",
    "IMAGE_LAYOUT_VERSION": "._layout_format",
    "validate_reference_name": "._layout_format",
    "CONFIG_MEDIA_TYPES": "._media_types",
    "EMPTY_DESCRIPTOR": "._media_types",
    "EMPTY_JSON": "._media_types",
    "INDEX_MEDIA_TYPES": "._media_types",
    "LAYER_MEDIA_TYPES": "._media_types",
    "MANIFEST_MEDIA_TYPES": "._media_types",
    "MEDIA_TYPE_DESCRIPTOR": "._media_types",
    "MEDIA_TYPE_DOCKER_CONFIG": "._media_types",
    "MEDIA_TYPE_DOCKER_FOREIGN_LAYER": "._media_types",
    "MEDIA_TYPE_DOCKER_LAYER": "._media_types",
    "MEDIA_TYPE_DOCKER_MANIFEST": "._media_types",
    "MEDIA_TYPE_DOCKER_MANIFEST_LIST": "._media_types",
    "MEDIA_TYPE_EMPTY_JSON": "._media_types",
    "MEDIA_TYPE_IMAGE_CONFIG": "._media_types",
    "MEDIA_TYPE_IMAGE_INDEX": "._media_types",
    "MEDIA_TYPE_IMAGE_LAYER": "._media_types",
    "MEDIA_TYPE_IMAGE_LAYER_GZIP": "._media_types",
    "MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE": "._media_types",
    "MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_GZIP": "._media_types",
    "MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_ZSTD": "._media_types",
    "MEDIA_TYPE_IMAGE_LAYER_ZSTD": "._media_types",
    "MEDIA_TYPE_IMAGE_MANIFEST": "._media_types",
    "MEDIA_TYPE_LAYOUT_HEADER": "._media_types",
    "MemoryEngine": "._memory_engine",
    "ContainerConfig": "._models",
    "History": "._models",
    "ImageConfig": "._models",
    "Index": "._models",
    "Manifest": "._models",
    "RootFS": "._models",
    "RegistryEngine": ".registry",
    "RegistryLocation": ".registry",
    "RetryPolicy": ".registry",
    "open_registry": ".registry",
    "parse_registry_location": ".registry",
}


if not TYPE_CHECKING:  # hidden from type checkers, so they still flag a misspelt name

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
    "RawBlob",
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
    "Lease",
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
