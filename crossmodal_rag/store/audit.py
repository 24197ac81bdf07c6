"""Auditing an index file against the metadata: the ids it holds and the vector under each id.

Used by :meth:`crossmodal_rag.collection.Collection.check`, on an index loaded fresh from its
file (memory-mapped, read-only), never on the collection's in-memory indexes (which are
reconciled with the metadata on open and would always agree).

How vectors are compared, for every index type: the index's own ``reconstruct`` gives the vector
it holds for an id (IVF indexes get a hash-table direct map, in memory only, to find ids). An
exact index (Flat, HNSW over flat storage, IVF-Flat) holds the metadata vector itself or its
float16 copy from the embedding shards (indexes are rebuilt from those), so it must match within
the float16 precision. A quantised index (PQ, SQ, OPQ) holds a code; the reference is what the
index's own codec makes of the same vector (``sa_decode(sa_encode(v))``, of the metadata vector
and of its float16 copy): the stored reconstruction may be at most a little farther from the
metadata vector than that. A vector replaced by another unrelated one lands far outside that
bound; one swapped with a near neighbour closer than the codec's own error cannot be told apart
by any codec-level comparison, and is not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import faiss
import numpy as np

from .shards import EmbeddingShards
from .vectors import VectorIndex

__all__ = [
    "CHECK_ALL_MAX_VECTORS",
    "VectorAudit",
    "audit_vectors",
    "examples",
    "id_disagreement",
    "sample_ids",
]

#: Indexes of up to this many vectors are compared in full; larger ones by a seeded random sample
#: of this many. A defect touching 1 vector in 10,000 is then missed with probability
#: (1 - 1e-4) ** 200,000 ~ 2e-9.
CHECK_ALL_MAX_VECTORS = 200_000
#: float16 copies of unit vectors differ from the float32 ones by under 5e-4 per component.
FLOAT16_ATOL = 2e-3
#: A stored code may be this much farther from the metadata vector than the codec's own
#: round trip of it (relative, absolute): room for float16 input and ties between codes.
_CODEC_SLACK = (1.25, 0.01)
_CHUNK = 10_000
_EXAMPLES = 5


@dataclass
class VectorAudit:
    """What comparing one index's vectors found."""

    compared: int  # ids whose vectors were compared
    total: int  # ids in the metadata
    bad_index: list[int] = field(default_factory=list)  # index vector != metadata vector
    bad_shards: list[int] = field(default_factory=list)  # float16 copy != metadata vector
    unsupported: str = ""  # why the index's vectors could not be read back (then not compared)


def sample_ids(ids: np.ndarray, max_vectors: int | None, seed: int) -> np.ndarray:
    """All ``ids`` if there are at most ``max_vectors`` (None: no limit), else a seeded sample."""
    if max_vectors is None or len(ids) <= max_vectors:
        return ids
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(ids, size=max_vectors, replace=False))


def id_disagreement(held: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids in the index only, ids in the metadata only)``, both sorted."""
    return (np.setdiff1d(held, live, assume_unique=True), np.setdiff1d(live, held, assume_unique=True))


def examples(ids: np.ndarray | list[int]) -> str:
    """A few ids for a message: ``"3, 7, 9 and 12 more"``."""
    ids = [int(i) for i in ids]
    more = f" and {len(ids) - _EXAMPLES} more" if len(ids) > _EXAMPLES else ""
    return ", ".join(map(str, ids[:_EXAMPLES])) + more


def _reader(index: faiss.Index) -> Callable[[np.ndarray], np.ndarray] | None:
    """ids -> the vectors ``(n, d)`` ``index`` holds for them, or None if it cannot say."""
    ivf = faiss.try_extract_index_ivf(index)
    try:
        if ivf is not None:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # in memory: the file is untouched
        index.reconstruct_batch(np.zeros(0, np.int64))
    except RuntimeError:
        return None
    return lambda ids: index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))


def _codec(index: faiss.Index) -> Callable[[np.ndarray], np.ndarray] | None:
    """``x -> sa_decode(sa_encode(x))`` of the index's codec (None: the codec is exact or
    unknown, compared as exact)."""
    target = index
    if hasattr(index, "id_map"):
        target = faiss.downcast_index(index.index)
        if isinstance(target, faiss.IndexHNSW):
            target = faiss.downcast_index(target.storage)
    if isinstance(target, faiss.IndexFlat):
        return None
    try:
        target.sa_decode(target.sa_encode(np.zeros((1, index.d), np.float32)))
    except RuntimeError:
        return None
    return lambda x: target.sa_decode(target.sa_encode(np.ascontiguousarray(x, dtype=np.float32)))


def audit_vectors(
    index: VectorIndex | None, ids: np.ndarray, metadata: Callable[[np.ndarray], np.ndarray],
    shards: EmbeddingShards, held_by_shards: np.ndarray,
) -> VectorAudit:
    """Compare, for each of ``ids`` (sorted), the metadata vector with the index's vector (ids
    the index holds; None: no index to compare) and with its float16 shard copy (ids in
    ``held_by_shards``).

    ``metadata``: ids -> float32 vectors ``(n, d)`` as committed.
    """
    audit = VectorAudit(compared=len(ids), total=len(ids))
    read = None if index is None else _reader(index.index)
    if index is not None and read is None:
        audit.unsupported = f"a {type(faiss.downcast_index(index.index)).__name__} index cannot reconstruct"
    codec = None if read is None else _codec(index.index)  # type: ignore[union-attr]
    in_index = np.zeros(0, np.int64) if read is None else index.ids()  # type: ignore[union-attr]
    slack, floor = _CODEC_SLACK
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        meta = metadata(chunk)
        sharded = np.isin(chunk, held_by_shards)
        copies = np.full_like(meta, np.nan)
        if sharded.any():
            copies[sharded] = shards.lookup(chunk[sharded])
            off = np.abs(copies[sharded] - meta[sharded]).max(axis=1) > FLOAT16_ATOL
            audit.bad_shards += chunk[sharded][off].tolist()
            sharded[np.flatnonzero(sharded)[off]] = False  # a wrong copy is no reference below
        if read is None:
            continue
        here = np.isin(chunk, in_index)
        if not here.any():
            continue
        got, want = read(chunk[here]), meta[here]
        err = np.linalg.norm(got - want, axis=1)
        if codec is None:  # exact: the vector itself or its float16 copy
            bound = np.full(len(want), FLOAT16_ATOL)
        else:
            refs = [codec(want)]
            has_copy = sharded[here]
            if has_copy.any():
                ref16 = refs[0].copy()
                ref16[has_copy] = codec(copies[here][has_copy])
                refs.append(ref16)
            own = np.max([np.linalg.norm(r - want, axis=1) for r in refs], axis=0)
            bound = own * slack + floor
        audit.bad_index += chunk[here][err > bound].tolist()
    return audit
