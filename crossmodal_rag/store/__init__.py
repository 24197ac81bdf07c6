"""On-disk parts of a collection: the manifest, the SQLite metadata and the FAISS indexes."""

from .manifest import FORMAT_VERSION, Manifest, atomic_write_bytes
from .metadata import MetadataStore
from .vectors import VectorIndex

__all__ = ["FORMAT_VERSION", "Manifest", "MetadataStore", "VectorIndex", "atomic_write_bytes"]
