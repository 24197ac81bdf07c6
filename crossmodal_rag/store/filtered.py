"""Filtered search on approximate indexes: the top-k among the ids a filter allows.

An ANN search given an id selector visits the part of the index it would visit without one
and keeps the allowed ids found there: under a selective filter it returns fewer than k hits,
and not the best ones (before this module: 3 of 10 on IVF and 1 of 10 on HNSW at 2% of the
items). Two strategies, chosen by the size of the allowed set, make the filtered top-k right:

* **few allowed ids** (up to :data:`EXACT_MAX_ALLOWED`): their vectors are scored by brute
  force, which is exact, complete and, at that size, faster than a widened ANN search;
* **many**: the ANN search runs with the selector and its knob (``nprobe`` / ``efSearch``)
  widened for the filter's selectivity (:func:`~.ann.filtered_params`); query rows that come
  back with fewer than k hits are searched again wider, and rows still short at the knob's
  limit are searched exactly. PQ shortlists are re-ranked with exact vectors as usual.

Measured at 100k x 512 on IVF, HNSW and IVF-PQ: ``benchmarks/RESULTS.md`` ("Filtered search").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import faiss
import numpy as np

from .ann import SearchParams, filtered_params, wider_params

if TYPE_CHECKING:
    from .vectors import VectorIndex

__all__ = ["EXACT_MAX_ALLOWED", "exact_allowed_search", "id_selector", "search_filtered"]

logger = logging.getLogger(__name__)

#: A filter allowing at most this many ids is searched exactly (brute force over their
#: vectors). At 100k x 512 scoring 20k gathered float16 vectors costs about what the widened
#: ANN search costs at that selectivity (see RESULTS.md, "Filtered search").
EXACT_MAX_ALLOWED = 20_000
#: Rows of allowed vectors scored per block by the exact path (bounded memory).
_EXACT_BLOCK = 16_384

VectorSource = Callable[[np.ndarray], np.ndarray]


def unique_ids(allowed: np.ndarray) -> np.ndarray:
    """``allowed`` as sorted unique int64 (a sorted unique array is returned as it is)."""
    allowed = np.ascontiguousarray(allowed, dtype=np.int64).ravel()
    if len(allowed) > 1 and not (allowed[1:] > allowed[:-1]).all():
        allowed = np.unique(allowed)
    return allowed


def id_selector(allowed: np.ndarray) -> faiss.IDSelector:
    """A FAISS selector for sorted unique ``allowed``: a bitmap when the ids are dense enough
    (one bit per id up to the largest, cheap to build and to test), else a hash set."""
    top = int(allowed[-1]) if len(allowed) else 0
    if len(allowed) and int(allowed[0]) >= 0 and top < max(64 * len(allowed), 1 << 20):
        bits = np.zeros(top + 1, dtype=bool)
        bits[allowed] = True
        return faiss.IDSelectorBitmap(np.packbits(bits, bitorder="little"))  # keeps the array
    return faiss.IDSelectorBatch(allowed)


def exact_allowed_search(vectors_of: VectorSource, allowed: np.ndarray, queries: np.ndarray,
                         k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` of ``queries`` ``(Q, D)`` among ``allowed`` ids, whose vectors
    ``vectors_of(ids) -> (n, D)`` returns: ``(scores, ids)``, both ``(Q, k)``, best first."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(allowed), _EXACT_BLOCK):
        ids = allowed[start : start + _EXACT_BLOCK]
        vecs = np.ascontiguousarray(vectors_of(ids), dtype=np.float32)
        cat_s = np.concatenate([best_s, queries @ vecs.T], axis=1)
        cat_i = np.concatenate([best_i, np.broadcast_to(ids, (len(queries), len(ids)))], axis=1)
        kk = min(k, cat_s.shape[1])
        top = np.argpartition(-cat_s, kk - 1, axis=1)[:, :kk]
        best_s, best_i = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return (np.take_along_axis(best_s, order, 1).astype(np.float32),
            np.take_along_axis(best_i, order, 1).astype(np.int64))


def _vector_source(index: VectorIndex) -> VectorSource | None:
    """Where exact vectors of ids come from: the collection's (float16 shards / metadata), or
    the index itself when it stores them under an id map (HNSW, Flat)."""
    if index.exact_vectors is not None:
        return index.exact_vectors
    if hasattr(index.index, "id_map") and index.kind == "hnsw":
        return lambda ids: index.index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
    return None


def search_filtered(index: VectorIndex, queries: np.ndarray, k: int, allowed: np.ndarray,
                    params: SearchParams) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of ``queries`` ``(Q, D)`` among sorted unique ``allowed`` ids on an approximate
    ``index``: ``(scores, ids)``, ``(Q, k)``; ``k`` <= ``len(allowed)`` is the caller's."""
    vectors_of = _vector_source(index)
    if vectors_of is not None and len(allowed) <= EXACT_MAX_ALLOWED:
        return exact_allowed_search(vectors_of, allowed, queries, k)
    sel = id_selector(allowed)
    p = filtered_params(index.index, params, len(allowed) / max(len(index), 1), k)
    scores, ids = index.search_ann(queries, k, p, sel)
    short = (ids >= 0).sum(axis=1) < k
    while short.any():
        wider = wider_params(index.index, p)
        if wider is None:
            break
        p = wider
        logger.debug("filtered search: %d of %d rows short of %d hits; widening to %s",
                     int(short.sum()), len(queries), k, p.to_dict())
        scores[short], ids[short] = index.search_ann(queries[short], k, p, sel)
        short = (ids >= 0).sum(axis=1) < k
    if short.any() and vectors_of is not None:  # the knob is at its limit: search those exactly
        scores[short], ids[short] = exact_allowed_search(vectors_of, allowed, queries[short], k)
    return scores, ids
