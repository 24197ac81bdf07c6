"""Filtered search on approximate indexes: the top-k among the ids a filter allows.

An ANN search given an id selector visits the part of the index it would visit without one
and keeps the allowed ids found there: under a selective filter it returns fewer than k hits,
and not the best ones (before this module: 3 of 10 on IVF and 1 of 10 on HNSW at 2% of the
items). Two strategies, chosen by the size of the allowed set, make the filtered top-k right:

* **few allowed ids** (up to :data:`EXACT_MAX_ALLOWED`): their vectors are scored by brute
  force, which is exact, complete and, at that size, faster than a widened ANN search (on
  IVF-Flat, a search of every list under the selector, exact too, when that is cheaper);
* **many**: the ANN search runs with the selector and its knob (``nprobe`` / ``efSearch``)
  widened for the filter's selectivity (:func:`~.ann.filtered_params`); query rows that come
  back with fewer than k hits are searched again wider, and rows still short at the knob's
  limit are searched exactly. PQ shortlists are re-ranked with exact vectors as usual.

Measured at 100k x 512 on IVF, HNSW and IVF-PQ: ``benchmarks/RESULTS.md`` ("Filtered search").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import faiss
import numpy as np

from .ann import SearchParams, filtered_params, wider_params
from .threads import NUMPY_MAX_QUERIES, single_thread_if
from .tuning import recall_lower_bound

__all__ = ["EXACT_MAX_ALLOWED", "calibrate_filter", "exact_allowed_search", "id_selector",
           "search_filtered"]

logger = logging.getLogger(__name__)

#: A filter allowing at most this many ids is searched exactly (brute force over their
#: vectors). Measured at 100k x 512 (RESULTS.md, "Filtered search"): the exact path costs
#: ~1.2 us per allowed id (float16 shard lookup + scoring); HNSW32 widened for 3% selectivity
#: ~7 ms vs 3.9 ms exact, for 10% 2.3 ms vs 13 ms, so the two cross near 4-5k ids.
EXACT_MAX_ALLOWED = 4_096
#: An IVF-Flat search probing every list under the selector is exact too; it costs ~1/250 of
#: the exact path per id held (a selector test), so it is used when allowed x this > held.
_SCAN_IDS_PER_EXACT_ID = 250
#: The selectivity tuning calibrates the filter factor at (see :func:`calibrate_filter`).
CALIBRATION_SELECTIVITY = 0.1
#: Factors tried, in order; the first whose recall bound reaches the target is kept.
CALIBRATION_FACTORS = (2, 4, 8, 16, 32, 64)
#: The calibration's recall bound must clear the target by this much: one random filter and the
#: tuning queries stand for every filter and query (at exactly the target, SQ8 at 100k measured
#: 0.945 on other filters and fresh queries; benchmarks/RESULTS.md, "Filtered search").
CALIBRATION_MARGIN = 0.01
#: Rows of allowed vectors scored per block by the exact path (bounded memory).
_EXACT_BLOCK = 16_384

VectorSource = Callable[[np.ndarray], np.ndarray]


class VectorIndex(Protocol):
    """What filtered search uses of a ``store.vectors.VectorIndex`` (named here, not imported:
    vectors imports this module)."""

    index: faiss.Index
    exact_vectors: VectorSource | None

    @property
    def kind(self) -> str: ...

    @property
    def uses_pq(self) -> bool: ...

    def __len__(self) -> int: ...

    def search_ann(self, queries: np.ndarray, k: int, p: SearchParams,
                   sel: faiss.IDSelector | None = None) -> tuple[np.ndarray, np.ndarray]: ...


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
    ``vectors_of(ids) -> (n, D)`` returns: ``(scores, ids)``, both ``(Q, k)``, best first.

    Scored by FAISS's exhaustive kernel, on one thread for a few queries: numpy's BLAS product
    waits for its second thread on a busy machine (a 1,000 x 512 product: 0.01 ms idle, ~30 ms
    loaded, vs 0.13 ms here either way).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(allowed), _EXACT_BLOCK):
        ids = allowed[start : start + _EXACT_BLOCK]
        vecs = np.ascontiguousarray(vectors_of(ids), dtype=np.float32)
        with single_thread_if(len(queries) <= NUMPY_MAX_QUERIES):
            s, rows = faiss.knn(queries, vecs, min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
        best_s = np.concatenate([best_s, s], axis=1)
        best_i = np.concatenate([best_i, ids[rows]], axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
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


def _scan_is_exact_and_cheaper(index: VectorIndex, p: SearchParams, n_allowed: int) -> bool:
    """Whether the widened search probes every list of an IVF-Flat index (so is exact) at less
    cost than scoring the allowed ids' vectors."""
    if index.kind != "ivf" or index.uses_pq or p.nprobe is None:
        return False
    every_list = p.nprobe >= faiss.extract_index_ivf(index.index).nlist
    return every_list and n_allowed * _SCAN_IDS_PER_EXACT_ID > len(index)


def search_filtered(index: VectorIndex, queries: np.ndarray, k: int, allowed: np.ndarray,
                    params: SearchParams) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of ``queries`` ``(Q, D)`` among sorted unique ``allowed`` ids on an approximate
    ``index``: ``(scores, ids)``, ``(Q, k)``; ``k`` <= ``len(allowed)`` is the caller's."""
    vectors_of = _vector_source(index)
    p = filtered_params(index.index, params, len(allowed) / max(len(index), 1), k)
    if (vectors_of is not None and len(allowed) <= EXACT_MAX_ALLOWED
            and not _scan_is_exact_and_cheaper(index, p, len(allowed))):
        return exact_allowed_search(vectors_of, allowed, queries, k)
    sel = id_selector(allowed)
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


def calibrate_filter(index: VectorIndex, params: SearchParams, live: np.ndarray, queries: np.ndarray,
                     truth_of: Callable[[np.ndarray], np.ndarray], *, k: int, target_recall: float,
                     search: Callable[[np.ndarray, int, SearchParams, faiss.IDSelector], np.ndarray],
                     seed: int = 0) -> int | None:
    """The smallest filter factor (:data:`CALIBRATION_FACTORS`) with which a widened search of
    ``index`` at ``params`` reaches ``target_recall`` (its 95% lower bound, as in tuning, plus
    :data:`CALIBRATION_MARGIN`) under a
    random filter letting :data:`CALIBRATION_SELECTIVITY` of ``live`` through; None when such a
    filter is searched exactly anyway (at most :data:`EXACT_MAX_ALLOWED` ids) or the index has
    no knob. The largest factor when none reaches it.

    ``truth_of(allowed)`` gives the exact top-``k`` ids ``(Q, k)`` among ``allowed``;
    ``search(queries, k, p, sel)`` the searched ids (the tuning's own search path).
    """
    n_allowed = int(len(live) * CALIBRATION_SELECTIVITY)
    if index.kind == "flat" or n_allowed <= EXACT_MAX_ALLOWED or n_allowed < k:
        return None
    allowed = np.sort(np.random.default_rng(seed).choice(live, n_allowed, replace=False))
    truth, sel = truth_of(allowed), id_selector(allowed)
    factor = CALIBRATION_FACTORS[-1]
    for f in CALIBRATION_FACTORS:
        p = filtered_params(index.index, SearchParams(**{**params.to_dict(), "filter_factor": f}),
                            CALIBRATION_SELECTIVITY, k)
        lo = recall_lower_bound(search(queries, k, p, sel), truth)
        logger.info("filter calibration: factor %d (%s) at %.0f%% selectivity: recall@%d bound %.3f",
                    f, p.to_dict(), 100 * CALIBRATION_SELECTIVITY, k, lo)
        if lo >= min(target_recall + CALIBRATION_MARGIN, 1.0) or wider_params(index.index, p) is None:
            factor = f
            break
    return factor
