"""A collection's description (manifest plus live counts) read from the manifest and SQLite
alone: no index file is loaded and neither FAISS nor any model is imported, so
``crossmodal-rag info`` answers at once on a collection of any size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .manifest import Manifest
from .metadata import MetadataStore

__all__ = ["describe", "read_summary"]


def describe(folder: Path, manifest: Manifest, store: MetadataStore) -> dict[str, Any]:
    """The manifest of the collection in ``folder`` plus its live counts, its path and how many
    committed generations its index files lag behind (replayed on open); the counts and the text
    space are read in one metadata snapshot, so they agree while a writer commits."""
    from ..search.text_space_audit import text_space_summary  # manifest + ids only: no model

    d = manifest.to_dict()
    d["path"] = str(folder)
    with store.snapshot():
        d["counts"] = store.counts()
        d["pending_generations"] = store.generation - manifest.generation
        text_space = text_space_summary(folder, store)
        captures = store.capture_summary()  # time span, top places and cameras (schema 5)
    if captures.get("dated") or captures.get("located") or captures.get("top_cameras"):
        d["captures"] = captures
    if text_space is not None:  # index --text-model
        d["text_space"] = text_space
    return d


def read_summary(folder: str | Path) -> dict[str, Any]:
    """:meth:`Collection.info <crossmodal_rag.collection.Collection.info>` of the collection in
    ``folder``, without opening it (read-only; takes no lock)."""
    path = Path(folder).expanduser().resolve()
    manifest = Manifest.read(path)
    store = MetadataStore(path, readonly=True)
    try:
        return describe(path, manifest, store)
    finally:
        store.close()
