"""On-disk parts of a collection: the manifest, the SQLite metadata and the FAISS indexes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .manifest import FORMAT_VERSION, Manifest
from .metadata import MetadataStore

if TYPE_CHECKING:
    from .vectors import VectorIndex

__all__ = ["FORMAT_VERSION", "Manifest", "MetadataStore", "VectorIndex"]


def __getattr__(name: str) -> Any:
    """``VectorIndex`` loads FAISS: imported on first use, so the manifest and metadata modules
    stay importable without it."""
    if name == "VectorIndex":
        from .vectors import VectorIndex

        return VectorIndex
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
