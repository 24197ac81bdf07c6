"""The on-disk layout of a collection folder, and the durability policies for writing it.

Layout of ``DIR``::

    manifest.json           format version, encoder spec, dimension, index type, counts, and the
                            index files that reflect metadata generation N (replaced atomically)
    metadata.sqlite         items, captions, source paths, hashes and vectors (the commit log)
    index/image.N.faiss     FAISS index of image vectors (+ image.N.*.ivfdata: on-disk lists)
    index/text.N.faiss      FAISS index of caption and passage vectors
    embeddings/{image,text}/NNNNNN.f16.npy, .ids.npy
                            float16 copies of all vectors, in append-only shards: indexes are
                            rebuilt from them (``reindex``) without re-encoding
    .lock                   write lock (one writer at a time)

Crash safety: an item is committed when its SQLite transaction commits. Index files are
written under new names and the manifest is switched to them afterwards, so a kill at any point
leaves the last manifest's files intact; on open, any commits newer than the index files are
replayed from SQLite (:mod:`crossmodal_rag.store.reconcile`), so nothing committed is lost. A
new collection is built in a staging folder beside ``DIR`` and renamed into place, so ``DIR`` is
complete or absent (:mod:`crossmodal_rag.store.creation`). Writing: :mod:`.persist`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from ..errors import CollectionError
from .manifest import Manifest

__all__ = ["FSYNC_POLICIES", "INDEX_NAMES", "OWN_FOLDERS", "FsyncPolicy", "check_fsync", "now",
           "remove_unlisted_files"]

#: The two indexes of a collection: image vectors, and caption/passage (text) vectors.
INDEX_NAMES = ("image", "text")
#: Sub-folders whose files the manifest (index files) and the shards (embeddings) own: a writer
#: removes what neither lists.
OWN_FOLDERS = ("index", "embeddings/image", "embeddings/text")

#: Durability: "full" fsyncs SQLite commits (synchronous=FULL), index files, the manifest and
#: their folder; "normal" fsyncs index files and the manifest but lets SQLite's WAL sync at
#: checkpoints (a power cut may lose the last commits, never consistency); "off" fsyncs
#: nothing (safe against process crashes and kills, not against power loss).
FsyncPolicy = Literal["full", "normal", "off"]
FSYNC_POLICIES = ("full", "normal", "off")


def check_fsync(fsync: str) -> None:
    """Refuse an unknown durability policy, naming the valid ones."""
    if fsync not in FSYNC_POLICIES:
        raise CollectionError(f"unknown fsync policy {fsync!r}; choose one of {', '.join(FSYNC_POLICIES)}")


def now() -> str:
    """The time stamp written to the manifest (UTC, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def remove_unlisted_files(folder: Path, manifest: Manifest, shard_files: Iterable[str]) -> None:
    """Delete what :data:`OWN_FOLDERS` hold beyond the manifest's index files (and their on-disk
    lists) and ``shard_files`` (paths relative to ``folder``): files of older generations, and
    temporary files of an interrupted write."""
    keep = {f.path for f in manifest.files.values()}
    keep |= {f.data_path for f in manifest.files.values() if f.data_path}
    keep |= set(shard_files)
    for sub in OWN_FOLDERS:
        where = folder / sub
        if not where.is_dir():
            continue
        for stale in where.iterdir():
            if f"{sub}/{stale.name}" in keep:
                continue
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
