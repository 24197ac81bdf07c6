"""Building indexes from embedding shards: in memory, or shard by shard onto disk.

The sharded build follows FAISS's on-disk recipe: train the IVF quantizer (and PQ codebooks)
once on a reproducible sample, add each shard to its own copy of the trained empty index (in
parallel), write the parts, then merge their inverted lists into one ``.ivfdata`` file that the
final index memory-maps. No step holds more than a shard's vectors (plus the sample) in RAM.
Every vector added is checked on the way (:func:`sound_chunks`): a float16 row that is not
finite, or is zero, stops the build with the items to re-embed, never an index that finds nothing.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..errors import CollectionError
from ..progress import bar, default_enabled
from .ann import SearchParams, Tuning, describe_index, recall_at_k, training_rows
from .families import hnsw_ef_construction
from .shards import EmbeddingShards, vector_faults
from .threads import single_thread_if
from .tuning import tune_grid, verify_tuning
from .vectors import VectorIndex, silence_c_stdout

__all__ = ["BuildReport", "build_index", "configure_graph", "drop_self", "exact_top_k", "sample_vectors",
           "sound_chunks", "tune_index"]

logger = logging.getLogger(__name__)


@dataclass
class BuildReport:
    """How an index was built (recorded in the manifest's ``build`` section)."""

    index_type: str
    count: int
    seed: int
    train_vectors: int
    sharded: bool
    parts: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def sound_chunks(shards: EmbeddingShards, live: np.ndarray) -> Any:
    """:meth:`EmbeddingShards.iter_chunks` of the ``live`` ids, refusing (CollectionError
    naming the ids and the fix) a chunk with a vector that is not finite or is zero."""
    for ids, vecs in shards.iter_chunks(live):
        faults = vector_faults(ids, vecs, 0.5)  # read back normalised: a zero row stays zero
        if len(faults):
            bad = faults.ids
            shown = ", ".join(map(str, bad[:10].tolist())) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise CollectionError(
                f"the {shards.name} embedding shards of {shards.folder} hold {len(bad)} vector(s) that are "
                f"not finite or are zero (items {shown}); no index is built from them: re-embed them with "
                f"`crossmodal-rag reindex --repair {shards.folder}`")
        yield ids, vecs


def sample_vectors(shards: EmbeddingShards, live: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Vectors at positions ``rows`` (sorted) of the live vectors in shard order."""
    out = np.empty((len(rows), shards.dim), dtype=np.float32)
    offset = filled = 0
    for _, vecs in sound_chunks(shards, live):
        lo, hi = np.searchsorted(rows, [offset, offset + len(vecs)])
        if hi > lo:
            out[filled : filled + hi - lo] = vecs[rows[lo:hi] - offset]
            filled += hi - lo
        offset += len(vecs)
    if filled != len(rows):
        raise CollectionError(f"the embedding shards hold {offset} live vectors, expected at least "
                              f"{rows[-1] + 1}; rebuild them with `crossmodal-rag reindex`")
    return out


#: IVF indexes with at least this many lists train their centroids by two-level k-means (see
#: :func:`train_coarse_two_level`).
TWO_LEVEL_MIN_NLIST = 4096


def _split_counts(sizes: np.ndarray, total: int) -> np.ndarray:
    """``total`` sub-centroids shared among clusters in proportion to ``sizes``: at least one per
    non-empty cluster, never more than its points."""
    alloc = np.minimum(np.maximum(np.floor(sizes * total / max(sizes.sum(), 1)), sizes > 0), sizes)
    alloc = alloc.astype(np.int64)
    while alloc.sum() > total:  # take from the cluster with the fewest points per centroid
        alloc[np.argmin(np.where(alloc > 1, sizes / np.maximum(alloc, 1), np.inf))] -= 1
    while alloc.sum() < total:  # give to the one with the most points per centroid
        alloc[np.argmax(np.where(alloc < sizes, sizes / np.maximum(alloc, 1), -np.inf))] += 1
    return alloc


def _sub_centroids(sub: np.ndarray, k: int, seed: int) -> np.ndarray:
    if k == 1:
        return sub.mean(axis=0, keepdims=True)
    km = faiss.Kmeans(sub.shape[1], k, niter=10, seed=seed)
    km.cp.min_points_per_centroid = 1  # small clusters: no warning, FAISS still trains
    km.train(sub)
    return km.centroids


def train_coarse_two_level(index: faiss.Index, sample: np.ndarray, seed: int) -> bool:
    """Train the centroids of an IVF ``index`` with many lists by two-level k-means: ~sqrt(nlist)
    clusters first, then each split in proportion to its points. Flat k-means costs samples x
    nlist x d per iteration (at 8,192 lists and 320k samples of d = 512, ~10 minutes on two busy
    cores); two levels cost samples x ~2 sqrt(nlist) x d. The index's own training then only
    trains its codes. Returns whether it trained (False: too few lists, or trained already)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or ivf.nlist < TWO_LEVEL_MIN_NLIST or ivf.quantizer.ntotal > 0:
        return False
    t0 = time.perf_counter()
    x = np.ascontiguousarray(sample, dtype=np.float32)
    nlist = int(ivf.nlist)
    top = faiss.Kmeans(x.shape[1], round(math.sqrt(nlist)), niter=10, seed=seed,
                       max_points_per_centroid=2048)
    top.train(x)
    _, assign = top.index.search(x, 1)
    assign = assign.ravel()
    counts = _split_counts(np.bincount(assign, minlength=top.k), nlist)
    parts = []
    with single_thread_if(True):  # ~sqrt(nlist) small k-means: a second OpenMP thread waits when loaded
        for c in np.flatnonzero(counts):
            parts.append(_sub_centroids(np.ascontiguousarray(x[assign == c]), int(counts[c]), seed + int(c)))
    centroids = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    ivf.quantizer.add(centroids)
    logger.info("two-level k-means: %d centroids from %d vectors in %.1f s", len(centroids), len(x),
                time.perf_counter() - t0)
    return True


#: Builds of at least this many vectors show a progress bar on stderr (the CLI's default).
PROGRESS_MIN_VECTORS = 50_000


def configure_graph(index: faiss.Index) -> bool:
    """Set ``efConstruction`` of an (id-mapped) HNSW ``index`` from its ``M``
    (:func:`.families.hnsw_ef_construction`) before vectors are added; False if not HNSW. An
    HNSW graph takes later additions as it is (removals rebuild it, see ``persist``)."""
    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else faiss.downcast_index(index)
    if not isinstance(inner, faiss.IndexHNSW):
        return False
    inner.hnsw.efConstruction = hnsw_ef_construction(inner.hnsw.nb_neighbors(1))
    return True


def build_index(
    index_type: str, shards: EmbeddingShards, live: np.ndarray, *, seed: int = 0,
    params: SearchParams | None = None, sharded: bool = False, out_dir: Path | None = None,
    basename: str = "index", workers: int = 2,
) -> tuple[VectorIndex, BuildReport]:
    """Build a ``index_type`` index over the ``live`` ids (sorted int64) held in ``shards``.

    ``sharded=True`` (IVF types only) adds each shard separately and merges the inverted lists
    into ``out_dir/basename.ivfdata`` on disk.
    """
    t0 = time.perf_counter()
    index = VectorIndex(shards.dim, index_type, params=params)
    configure_graph(index.index)
    rows = training_rows(len(live), index.index, seed)
    if len(rows):
        logger.info("training %s on %d of %d vectors (seed %d)", index_type, len(rows), len(live), seed)
        sample = sample_vectors(shards, live, rows)
        train_coarse_two_level(index.index, sample, seed)
        index.train(sample)
    parts = 1
    if sharded and index.kind == "ivf" and describe_index(index.index).get("codes") == "pqfs":
        logger.info("%s keeps fast-scan blocks in RAM: built in memory, not shard by shard",
                    index_type)
        sharded = False
    if sharded:
        if index.kind != "ivf":
            raise CollectionError(f"a sharded build needs an IVF index type, not {index_type!r}")
        if out_dir is None:
            raise CollectionError("a sharded build needs an output folder")
        index, parts = _build_sharded_ivf(index, shards, live, out_dir, basename, workers)
    else:
        with bar(total=len(live), desc=f"building {index_type}", unit="vec",
                 enabled=default_enabled() and len(live) >= PROGRESS_MIN_VECTORS) as pbar:
            for ids, vecs in sound_chunks(shards, live):
                index.add(ids, vecs)
                pbar.update(len(ids))
    if len(index) != len(live):
        raise CollectionError(f"built an index of {len(index)} vectors for {len(live)} live items; "
                              "the embedding shards are incomplete — run `crossmodal-rag reindex`")
    report = BuildReport(index_type=index_type, count=len(index), seed=seed, train_vectors=len(rows),
                         sharded=sharded, parts=parts, seconds=round(time.perf_counter() - t0, 3))
    return index, report


def _build_sharded_ivf(trained: VectorIndex, shards: EmbeddingShards, live: np.ndarray,
                       out_dir: Path, basename: str, workers: int) -> tuple[VectorIndex, int]:
    work = out_dir / f".build-{basename}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        def add_part(n: int) -> Path | None:
            part = trained.empty_like()
            one = EmbeddingShards(shards.folder, shards.name, shards.dim, [shards.shards[n]])
            for ids, vecs in sound_chunks(one, live):
                part.add(ids, vecs)
            if len(part) == 0:
                return None
            path = work / f"part-{n:06d}.faiss"
            faiss.write_index(part.index, str(path))
            return path

        with ThreadPoolExecutor(max(1, workers)) as pool:
            paths = [p for p in pool.map(add_part, range(len(shards.shards))) if p is not None]
        merged = trained.empty_like()
        ivf = faiss.extract_index_ivf(merged.index)
        data_path = out_dir / f"{basename}.ivfdata"
        data_path.unlink(missing_ok=True)
        ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(data_path))
        part_lists = faiss.InvertedListsPtrVector()
        opened = []
        for p in paths:
            part_index = faiss.read_index(str(p), faiss.IO_FLAG_MMAP)
            opened.append(part_index)  # keep the parts alive while their lists are merged
            part_lists.push_back(faiss.extract_index_ivf(part_index).invlists)
        with silence_c_stdout():  # FAISS reports the file resizing
            ntotal = ondisk.merge_from_multiple(part_lists.data(), part_lists.size(), False) \
                if paths else 0
        ivf.ntotal = ntotal
        merged.index.ntotal = ntotal
        ivf.replace_invlists(ondisk, True)
        ondisk.this.disown()
        del opened
        return merged, len(paths)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def exact_top_k(shards: EmbeddingShards, live: np.ndarray, queries: np.ndarray, k: int
                ) -> np.ndarray:
    """Ids ``(Q, k)`` of the exact top-``k`` live vectors for ``queries`` (chunked brute force)."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for ids, vecs in shards.iter_chunks(live):
        s = queries @ vecs.T
        cat_s = np.concatenate([best_s, s], axis=1)
        cat_i = np.concatenate([best_i, np.broadcast_to(ids, s.shape)], axis=1)
        kk = min(k, cat_s.shape[1])
        top = np.argpartition(-cat_s, kk - 1, axis=1)[:, :kk]
        best_s, best_i = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)


def drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """``ids`` ``(Q, k + 1)`` without each row's own id ``self_ids[row]`` (or its last column
    when the row does not hold it, or the query is not stored, id < 0): ``(Q, k)``."""
    drop = (ids == self_ids[:, None]) & (self_ids[:, None] >= 0)
    first = drop & (np.cumsum(drop, axis=1) == 1)
    first[~first.any(axis=1), -1] = True
    return ids[~first].reshape(len(ids), k)


#: Tuning with at least this many queries checks its setting on half of them (the other half tunes).
VERIFY_MIN_QUERIES = 40


def _search_fn(index: VectorIndex, query_ids: np.ndarray | None
               ) -> Callable[[np.ndarray, int, SearchParams], tuple[np.ndarray, np.ndarray]]:
    """The search tuning measures: ``index`` at given settings, each query's own stored id
    (``query_ids``, -1 for none) left out of its results (None: no query is stored)."""
    if query_ids is None:
        def search(q: np.ndarray, kk: int, params: SearchParams) -> tuple[np.ndarray, np.ndarray]:
            return index.search(q, kk, params=params)
        return search

    def search_loo(q: np.ndarray, kk: int, params: SearchParams) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = index.search(q, kk + 1, params=params)
        if len(q) != len(query_ids):  # a single query timed: its ids are not scored
            return scores[:, :kk], ids[:, :kk]
        return scores[:, :kk], drop_self(ids, query_ids, kk)
    return search_loo


def tune_index(index: VectorIndex, shards: EmbeddingShards, live: np.ndarray, queries: np.ndarray,
               *, k: int = 10, target_recall: float = 0.95, query_ids: np.ndarray | None = None
               ) -> Tuning:
    """Tune ``index``'s search knobs (main knob and re-rank depth, see :mod:`.tuning`) on
    ``queries`` against exact search over the same vectors; stores the chosen setting as the
    index's default.

    ``query_ids`` ``(Q,)``: the ids under which the queries are stored in the index (-1 for
    queries that are not, e.g. the other modality's vectors). A stored vector finds itself
    first, which makes recall look better than on new queries; with ``query_ids`` each query's
    own id is left out of both the exact and the searched top-k (leave-one-out), so the tuned
    setting holds for queries the collection has not seen.
    """
    k = min(k, len(live) - (query_ids is not None))
    qids = None if query_ids is None else np.asarray(query_ids, dtype=np.int64)
    truth = exact_top_k(shards, live, queries, k) if qids is None \
        else drop_self(exact_top_k(shards, live, queries, k + 1), qids, k)
    # every other query checks the tuned setting (tuning.verify_tuning); the rest tune it
    split = len(queries) >= VERIFY_MIN_QUERIES
    tune_rows = np.arange(0, len(queries), 2 if split else 1)
    check_rows = np.arange(1, len(queries), 2) if split else np.zeros(0, np.int64)
    search = _search_fn(index, None if qids is None else qids[tune_rows])
    result = tune_grid(search, index.index, queries[tune_rows], truth[tune_rows], k=k,
                       target_recall=target_recall, can_rerank=index.exact_vectors is not None)
    if len(check_rows):
        verify_tuning(_search_fn(index, None if qids is None else qids[check_rows]), index.index,
                      result, queries[check_rows], truth[check_rows], target_recall=target_recall)
    search = _search_fn(index, qids)
    if result.param:
        index.params = SearchParams(**{**index.params.to_dict(), result.param: result.value,
                                       "rerank": result.rerank})
        factor = _calibrate_filter(index, shards, live, queries, query_ids, k, target_recall)
        if factor is not None:
            index.params = SearchParams(**{**index.params.to_dict(), "filter_factor": factor})
    else:
        _, found = search(queries, k, index.params)
        result.measured.append({"value": 0, "recall": round(recall_at_k(found, truth), 4)})
    return result


def _calibrate_filter(index: VectorIndex, shards: EmbeddingShards, live: np.ndarray, queries: np.ndarray,
                      query_ids: np.ndarray | None, k: int, target_recall: float) -> int | None:
    """The filter factor of ``index`` at its tuned setting (:func:`.filtered.calibrate_filter`),
    measured on the tuning queries (leave-one-out as the tuning when ``query_ids`` is given)."""
    from .filtered import calibrate_filter

    def truth_of(allowed: np.ndarray) -> np.ndarray:
        if query_ids is None:
            return exact_top_k(shards, allowed, queries, k)
        return drop_self(exact_top_k(shards, allowed, queries, k + 1), query_ids, k)

    def search(q: np.ndarray, kk: int, p: SearchParams, sel: object) -> np.ndarray:
        if query_ids is None:
            return index.search_ann(q, kk, p, sel)[1]
        return drop_self(index.search_ann(q, kk + 1, p, sel)[1], query_ids, kk)

    return calibrate_filter(index, index.params, live, queries, truth_of, k=k,
                            target_recall=target_recall, search=search)
