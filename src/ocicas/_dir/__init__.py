"""The directory engine: an OCI image layout on a local filesystem.

``engine.py`` composes the parts: ``put.py`` (the put pipeline into a temporary
file), ``index.py`` (``index.json``: cache, cross-process lock, rewrite) and
``fs.py`` (file-system primitives relative to directory descriptors).
"""

from .engine import TEMP_PREFIX, DirEngine, create_layout, open_layout

__all__ = ["TEMP_PREFIX", "DirEngine", "create_layout", "open_layout"]
