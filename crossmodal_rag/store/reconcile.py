"""Keeping the in-memory indexes and the float16 shards in step with the metadata.

The metadata (SQLite) is the commit log; the index files and the shards follow it. On open,
commits newer than the index files are replayed into the in-memory indexes (:func:`reconcile`);
on persist, vectors committed since the last shard are appended to the float16 shards
(:func:`append_new_vectors`), which are compacted when many small ingests left many small
shards. A collection migrated from schema version 1 (when ids could be reused) has its shards
compared with the metadata once (:func:`repair_shards`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .audit import audit_vectors, examples
from .metadata import UNVERIFIED_SHARDS_KEY, MetadataStore
from .shards import EmbeddingShards
from .vectors import VectorIndex

__all__ = ["MAX_SMALL_SHARDS", "Reconciled", "append_new_vectors", "compact_if_fragmented",
           "forget_verified_shards", "reconcile", "repair_shards", "unverified_shards"]

logger = logging.getLogger(__name__)

#: More shards than this, averaging under a quarter of the shard size, are compacted on persist.
MAX_SMALL_SHARDS = 64
_ADD_CHUNK = 10_000  # vectors read from the metadata per index.add
_SHARD_CHUNK = 100_000  # vectors read from the metadata per shard append


@dataclass
class Reconciled:
    """What :func:`reconcile` did."""

    added: int = 0  # items added to the indexes
    removed: int = 0  # items removed from them
    changed: set[str] = field(default_factory=set)  # indexes that differ from their files now
    rebuild: set[str] = field(default_factory=set)  # indexes to rebuild from the shards


def reconcile(store: MetadataStore, indexes: Mapping[str, VectorIndex], dim: int) -> Reconciled:
    """Make ``indexes`` (name -> index of ``dim``-d vectors) hold exactly the items committed in
    ``store``. Call inside ``store.snapshot()``, so all indexes see one generation. An index
    that cannot forget (a graph) or is not trained yet is marked for a rebuild instead."""
    done = Reconciled()
    for name, index in indexes.items():
        want, have = store.ids(name), index.ids()
        extra = np.setdiff1d(have, want, assume_unique=True)
        missing = np.setdiff1d(want, have, assume_unique=True)
        if len(extra) or len(missing):
            done.changed.add(name)
        if len(extra):
            if index.supports_remove:
                done.removed += index.remove(extra)
            else:  # graphs cannot forget; hits on removed items are skipped until rebuilt
                done.rebuild.add(name)
        if len(missing) and not index.is_trained:
            done.rebuild.add(name)
            continue
        for start in range(0, len(missing), _ADD_CHUNK):
            chunk = missing[start : start + _ADD_CHUNK]
            index.add(chunk, store.vectors(chunk.tolist(), dim))
        done.added += len(missing)
    return done


def append_new_vectors(store: MetadataStore, shards: EmbeddingShards, live: np.ndarray, dim: int,
                       *, fsync: bool) -> None:
    """Append the vectors committed since the last shard: the ``live`` ids above the shards'
    highest, as ids are never given twice."""
    new = live[live > shards.max_id]
    for start in range(0, len(new), _SHARD_CHUNK):
        chunk = new[start : start + _SHARD_CHUNK]
        shards.append(chunk, store.vectors(chunk.tolist(), dim), fsync=fsync)


def compact_if_fragmented(shards: EmbeddingShards, live: np.ndarray, *, fsync: bool) -> None:
    """Many small ingests: merge their shards (keeping the ``live`` ids)."""
    if len(shards.shards) > MAX_SMALL_SHARDS and len(shards) < len(shards.shards) * 25_000:
        shards.compact(live, fsync=fsync)


def unverified_shards(store: MetadataStore) -> set[str]:
    """Indexes whose shards a migration from schema version 1 left to compare."""
    return {n for n in (store.get_meta(UNVERIFIED_SHARDS_KEY) or "").split(",") if n}


def forget_verified_shards(store: MetadataStore, verified: set[str]) -> None:
    """After the manifest lists the compared (and fixed) shards: record them as verified."""
    left = unverified_shards(store) - verified
    store.put_meta(UNVERIFIED_SHARDS_KEY, ",".join(sorted(left)) or None)


def repair_shards(store: MetadataStore, name: str, shards: EmbeddingShards, live: np.ndarray,
                  dim: int, *, fsync: bool) -> bool:
    """Compare every live float16 copy of index ``name`` with its metadata vector and rewrite
    the copies that differ (a removed item's vector kept under its reused id, in a collection
    made when ids could be reused). Returns whether any was rewritten: then the index must be
    rebuilt from the corrected shards (one built from them holds the old vectors too)."""
    held = shards.held_ids()
    logger.info("comparing the %s embedding shards with the metadata once (collection made "
                "before item ids were never reused)", name)
    audit = audit_vectors(None, np.intersect1d(live, held),
                          lambda chunk: store.vectors(chunk.tolist(), dim), shards, held)
    if not audit.bad_shards:
        return False
    bad = np.asarray(sorted(audit.bad_shards), dtype=np.int64)
    logger.warning("%s embedding shards held another item's vector under %d reused id(s) "
                   "(e.g. %s); rewritten from the metadata, rebuilding the %s index", name,
                   len(bad), examples(bad), name)
    shards.compact(live, fsync=fsync, replace=bad,
                   vectors_of=lambda ids: store.vectors(ids.tolist(), dim))
    return True
