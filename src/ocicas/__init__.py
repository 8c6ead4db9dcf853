"""ocicas: an asyncio- and trio-native content-addressable store for OCI images.

The Python port of umoci's ``oci/cas``: an :class:`Engine` protocol with a
directory engine (the OCI image layout, :func:`open_layout`) and an in-memory
engine (:class:`MemoryEngine`), on anyio.
"""

from ._context import Context
from ._descriptor import Descriptor, Platform
from ._digest import BLOB_ALGORITHM, SUPPORTED_ALGORITHMS, Digest
from ._dir_engine import DirEngine, create_layout, open_layout
from ._engine import CHUNK_SIZE, DEFAULT_READ_LIMIT, AsyncReadable, BlobInfo, BlobReader, BlobSource, Engine
from ._errors import (
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
    SizeMismatchError,
    UnsupportedAlgorithmError,
    UnsupportedError,
)
from ._gc import DEFAULT_GRACE_PERIOD, GCPolicy, GCResult, gc
from ._graph import DEFAULT_CONCURRENCY, DescriptorPath, Graph, children, is_node, resolve_reference, walk
from ._layout_format import ANNOTATION_REF_NAME, IMAGE_LAYOUT_VERSION, validate_reference_name
from ._memory_engine import MemoryEngine

__version__ = "0.1.0"

__all__ = [
    "ANNOTATION_REF_NAME",
    "BLOB_ALGORITHM",
    "CHUNK_SIZE",
    "DEFAULT_READ_LIMIT",
    "IMAGE_LAYOUT_VERSION",
    "SUPPORTED_ALGORITHMS",
    "AsyncReadable",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_GRACE_PERIOD",
    "BlobInfo",
    "BlobNotFoundError",
    "BlobReader",
    "BlobSource",
    "BlobTooLargeError",
    "ClobberError",
    "Context",
    "ContextCancelledError",
    "ContextError",
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
    "InvalidError",
    "LayoutExistsError",
    "LayoutNotFoundError",
    "MemoryEngine",
    "NotFoundError",
    "OCICASError",
    "Platform",
    "ReferenceNotFoundError",
    "SizeMismatchError",
    "UnsupportedAlgorithmError",
    "UnsupportedError",
    "__version__",
    "children",
    "create_layout",
    "gc",
    "is_node",
    "open_layout",
    "resolve_reference",
    "validate_reference_name",
    "walk",
]
