"""Approximate-nearest-neighbour index types: choosing one, training it, and tuning its search.

Index types are FAISS index-factory strings over inner product on L2-normalised vectors:

=================  ============================================  ==============================
type               factory string (examples)                     bytes per vector (d = 512)
=================  ============================================  ==============================
exact              ``Flat``                                      4d + 8 = 2056
HNSW graph         ``HNSW32``                                    4d + 8 + ~2 x 4 x M = 2312
IVF, exact codes   ``IVF4096,Flat``                              4d + 8 = 2056 (+ centroids)
IVF, PQ codes      ``IVF4096,PQ64np``, ``OPQ64,IVF4096,PQ64np``  m + 8 = 72 (+ centroids)
=================  ============================================  ==============================

``auto`` picks exact search for small collections, IVF-Flat when the vectors fit the memory
budget, and IVF-PQ (with exact re-ranking of a shortlist from the float16 embedding shards) when
they do not. Search-time knobs (``nprobe`` for IVF, ``efSearch`` for HNSW, ``rerank`` for PQ) are
:class:`SearchParams`; :func:`tune` picks the fastest setting that reaches a target recall@10
against exact search on held-out queries and records what it measured.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from ..errors import CollectionError

__all__ = [
    "AUTO",
    "SearchParams",
    "Tuning",
    "choose_index",
    "describe_index",
    "estimate_index_bytes",
    "filtered_params",
    "format_memory",
    "min_training_vectors",
    "parse_memory",
    "recall_at_k",
    "training_rows",
    "tune",
    "wider_params",
]

logger = logging.getLogger(__name__)

AUTO = "auto"
#: Collections up to this many vectors per index are searched exactly under ``auto``:
#: a 50k x 512 scan is ~100 MB and a few milliseconds.
EXACT_MAX_VECTORS = 50_000
#: FAISS warns below 39 training points per centroid; this many gives stable k-means.
_POINTS_PER_CENTROID = 64
_MAX_TRAINING_VECTORS = 262_144
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class SearchParams:
    """Search-time settings of an approximate index (None: the index's stored default)."""

    nprobe: int | None = None  # IVF: inverted lists visited per query (1..nlist)
    ef_search: int | None = None  # HNSW: candidate-list size (>= k)
    rerank: int | None = None  # PQ: re-score k x rerank candidates with exact vectors; 0 = off

    def __post_init__(self) -> None:
        for name in ("nprobe", "ef_search"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise CollectionError(f"{name} must be a positive integer, got {v!r}")
        if self.rerank is not None and (not isinstance(self.rerank, int) or self.rerank < 0):
            raise CollectionError(f"rerank must be a non-negative integer, got {self.rerank!r}")

    def merged(self, override: SearchParams | None) -> SearchParams:
        """These defaults with ``override``'s non-None fields on top."""
        if override is None:
            return self
        return SearchParams(**{k: (v if v is not None else getattr(self, k))
                               for k, v in asdict(override).items()})

    def to_dict(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SearchParams:
        data = dict(data or {})
        unknown = sorted(set(data) - {"nprobe", "ef_search", "rerank"})
        if unknown:
            raise CollectionError(f"unknown search parameters {unknown} (valid: nprobe, ef_search, rerank)")
        return cls(**data)


@dataclass
class Tuning:
    """What :func:`tune` measured: one row per setting tried, and the one chosen."""

    param: str  # "nprobe", "ef_search" or "rerank"; "" for exact indexes (nothing to tune)
    value: int | None  # chosen setting
    target_recall: float
    reached: bool  # False: even the most thorough setting tried missed the target
    k: int
    queries: int
    measured: list[dict[str, float]] = field(default_factory=list)  # value, recall, p50_ms, p99_ms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- sizes ---------------------------------------------------------------------------------
def parse_memory(text: str | int | float | None) -> int | None:
    """``"4G"``, ``"512M"``, ``"1.5GiB"``, ``"2000000"`` -> bytes (binary units); None stays None."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        value = int(text)
    else:
        # possessive, so the match never backtracks: linear on any input (e.g. 100k digits)
        m = re.fullmatch(r"\s*+([0-9]++(?:\.[0-9]++)?+|\.[0-9]++)\s*+([kmgtKMGT]?+)(?:i?+[bB])?+\s*+", str(text))
        if not m:
            raise CollectionError(
                f"cannot read memory size {text!r}; write e.g. 4G, 512M, 1.5GiB or a byte count"
            )
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise CollectionError(f"memory size must be positive, got {text!r}")
    return value


def format_memory(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def nlist_for(n: int) -> int:
    """Inverted lists for ``n`` vectors: about 4 sqrt(n), a power of two, with enough training
    points per centroid."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** max(4, round(math.log2(target)))
    while nlist > 16 and n < nlist * 39:
        nlist //= 2
    return int(min(nlist, 1 << 16))


def _pq_m(dim: int, budget_per_vector: float) -> int | None:
    """Largest PQ code size (bytes) dividing ``dim`` that fits ``budget_per_vector``."""
    for m in (128, 96, 64, 48, 32, 24, 16, 8, 4):
        if m <= dim and dim % m == 0 and m + 8 <= budget_per_vector:
            return m
    return None


def estimate_index_bytes(spec: str, n: int, dim: int) -> int:
    """Resident memory of an index of ``n`` ``dim``-d vectors (codes, ids, centroids, graph)."""
    s = spec.replace(" ", "")
    overhead = 0
    m_ivf = re.search(r"IVF(\d+)", s)
    if m_ivf:
        overhead += int(m_ivf.group(1)) * dim * 4
    m_opq = re.search(r"OPQ(\d+)(?:_(\d+))?", s)
    if m_opq:
        overhead += dim * dim * 4
    m_pq = re.search(r"(?<![O])PQ(\d+)(?:x(\d+))?", s)
    if m_pq:
        bits = int(m_pq.group(2) or 8)
        per = int(m_pq.group(1)) * bits / 8
        overhead += int(m_pq.group(1)) * (1 << bits) * (dim // max(int(m_pq.group(1)), 1)) * 4
    elif "SQ8" in s:
        per = dim
    elif "SQfp16" in s:
        per = 2 * dim
    else:
        per = 4 * dim
    m_hnsw = re.search(r"HNSW(\d+)", s)
    if m_hnsw:
        per += 2 * int(m_hnsw.group(1)) * 4 * 1.1  # level-0 links (2M) + upper levels
    per += 8  # the id
    return int(n * per + overhead)


def choose_index(n: int, dim: int, max_memory: int | None = None) -> str:
    """The index type ``auto`` means for ``n`` vectors of ``dim`` under a memory budget (bytes).

    - up to :data:`EXACT_MAX_VECTORS` vectors: ``Flat`` (exact);
    - otherwise, if the vectors fit the budget: ``IVF{nlist},Flat``;
    - otherwise ``IVF{nlist},PQ{m}np`` with the largest code size that fits (re-ranked from the
      float16 shards at search time).

    Raises:
        CollectionError: if not even 4-byte PQ codes fit the budget.
    """
    if max_memory is not None and max_memory <= 0:
        raise CollectionError("the memory budget must be positive")
    if n <= EXACT_MAX_VECTORS:
        flat = estimate_index_bytes("Flat", n, dim)
        if max_memory is None or flat <= max_memory:
            return "Flat"
    nlist = nlist_for(n)
    ivf_flat = f"IVF{nlist},Flat"
    if max_memory is None or estimate_index_bytes(ivf_flat, n, dim) <= max_memory:
        return ivf_flat
    per = (max_memory - nlist * dim * 4) / max(n, 1)
    m = _pq_m(dim, per)
    if m is None:
        need = estimate_index_bytes(f"IVF{nlist},PQ4np", n, dim)
        raise CollectionError(
            f"{n:,} vectors of {dim} dimensions do not fit a {format_memory(max_memory)} index "
            f"budget even as 4-byte PQ codes (needs about {format_memory(need)}); raise "
            "--max-index-memory or shard the collection"
        )
    return f"IVF{nlist},PQ{m}np"


# -- training --------------------------------------------------------------------------------
def describe_index(index: faiss.Index) -> dict[str, Any]:
    """Kind and main sizes of a (possibly wrapped) FAISS index."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        pq = isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ) or "PQ" in type(
            faiss.downcast_index(ivf)).__name__
        return {"kind": "ivf", "nlist": int(ivf.nlist), "pq": bool(pq)}
    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        return {"kind": "hnsw", "M": int(inner.hnsw.nb_neighbors(1))}
    if isinstance(inner, faiss.IndexFlat):
        return {"kind": "flat"}
    return {"kind": type(inner).__name__}


def min_training_vectors(index: faiss.Index) -> int:
    """The fewest vectors that can train ``index`` (0 for types that need no training)."""
    if index.is_trained:
        return 0
    need = 0
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        need = max(need, int(ivf.nlist))
        sub = faiss.downcast_index(ivf)
        if hasattr(sub, "pq"):
            need = max(need, 1 << int(sub.pq.nbits))
    return max(need, 1)


def training_rows(n_total: int, index: faiss.Index, seed: int) -> np.ndarray:
    """Sorted row numbers (of ``n_total``) to train ``index`` on, drawn reproducibly from ``seed``."""
    need = min_training_vectors(index)
    if need == 0:
        return np.zeros(0, dtype=np.int64)
    if n_total < need:
        raise CollectionError(
            f"this index type needs at least {need:,} vectors to train; the collection has "
            f"{n_total:,}. Use --index auto (exact search for small collections) or a smaller "
            "IVF list count"
        )
    ivf = faiss.try_extract_index_ivf(index)
    want = need * _POINTS_PER_CENTROID if ivf is None else max(int(ivf.nlist) * _POINTS_PER_CENTROID,
                                                                  need * 39)
    cap = max(_MAX_TRAINING_VECTORS, 39 * (int(ivf.nlist) if ivf is not None else 0))
    want = min(n_total, max(want, min(n_total, 10_000)), cap)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=want, replace=False)).astype(np.int64)


# -- search-time parameters --------------------------------------------------------------------
def search_parameters(index: faiss.Index, params: SearchParams, sel: Any = None) -> Any:
    """A FAISS ``SearchParameters`` object for ``index`` (None if nothing is set)."""
    kind = describe_index(index)["kind"]
    if kind == "ivf":
        p = faiss.SearchParametersIVF()
        if params.nprobe is not None:
            p.nprobe = int(params.nprobe)
    elif kind == "hnsw":
        p = faiss.SearchParametersHNSW()
        if params.ef_search is not None:
            p.efSearch = int(params.ef_search)
    else:
        p = faiss.SearchParameters()
    if sel is not None:
        p.sel = sel
    return p


#: Under a filter letting through a fraction s of the items, ``nprobe`` grows to
#: this x nprobe / s and ``efSearch`` to this x max(efSearch, k) / s (see :func:`filtered_params`;
#: the factors reach recall@10 >= 0.95 at every selectivity in RESULTS.md, "Filtered search").
FILTER_NPROBE_FACTOR = 2.0
FILTER_EF_FACTOR = 4.0
#: The widest ``efSearch`` a filtered HNSW search tries before searching the short rows exactly.
FILTER_EF_MAX = 16_384


def _stored_knob(index: faiss.Index, params: SearchParams) -> tuple[str, int, int] | None:
    """(knob, value in force, its limit) of an IVF or HNSW ``index`` under ``params``."""
    d = describe_index(index)
    if d["kind"] == "ivf":
        value = params.nprobe or int(faiss.extract_index_ivf(index).nprobe)
        return "nprobe", value, int(d["nlist"])
    if d["kind"] == "hnsw":
        inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else index
        value = params.ef_search or int(inner.hnsw.efSearch)
        return "ef_search", value, max(min(int(index.ntotal), FILTER_EF_MAX), value)
    return None


def filtered_params(index: faiss.Index, params: SearchParams, selectivity: float, k: int
                    ) -> SearchParams:
    """``params`` widened for a filter that lets through ``selectivity`` (0..1] of the items.

    The filtered top-k lies among roughly the unfiltered top k / s, so the search must look
    about 1 / s times as far as the setting tuned for an unfiltered top-k, and a little further
    (the tuned setting sits at the target's edge): ``nprobe`` x 2 / s, ``efSearch`` x 4 / s
    (the graph walk keeps only allowed ids as results), capped at their limits.
    """
    knob = _stored_knob(index, params)
    if knob is None:
        return params
    name, value, limit = knob
    s = min(max(float(selectivity), 1e-9), 1.0)
    if name == "nprobe":
        widened = FILTER_NPROBE_FACTOR * value / s
    else:
        widened = FILTER_EF_FACTOR * max(value, k) / s
    return SearchParams(**{**params.to_dict(), name: int(min(limit, math.ceil(widened)))})


def wider_params(index: faiss.Index, params: SearchParams) -> SearchParams | None:
    """The next wider setting (x4) of ``index``'s knob for a filtered search, or None at its
    limit (all lists for IVF; :data:`FILTER_EF_MAX` or the vector count for HNSW)."""
    knob = _stored_knob(index, params)
    if knob is None:
        return None
    name, value, limit = knob
    if value >= limit:
        return None
    return SearchParams(**{**params.to_dict(), name: int(min(limit, value * 4))})


def tunable_param(index: faiss.Index) -> str:
    d = describe_index(index)
    return {"ivf": "nprobe", "hnsw": "ef_search"}.get(d["kind"], "")


def candidate_values(index: faiss.Index, k: int) -> list[int]:
    d = describe_index(index)
    if d["kind"] == "ivf":
        values, v = [], 1
        while v < d["nlist"]:
            values.append(v)
            v *= 2
        return [*values, int(d["nlist"])]
    if d["kind"] == "hnsw":
        return [v for v in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024) if v >= k]
    return []


# -- tuning --------------------------------------------------------------------------------
def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` ``(Q, k)`` found in the same row of ``found``."""
    if truth.size == 0:
        return 1.0
    hits = sum(len(np.intersect1d(f[f >= 0], t[t >= 0])) for f, t in zip(found, truth, strict=True))
    return hits / max(int((truth >= 0).sum()), 1)


def tune(
    search: Callable[[np.ndarray, int, SearchParams], tuple[np.ndarray, np.ndarray]],
    index: faiss.Index, queries: np.ndarray, truth: np.ndarray, *, k: int = 10,
    target_recall: float = 0.95, rerank: int | None = None,
) -> Tuning:
    """Pick the fastest setting of ``index``'s search knob reaching ``target_recall``.

    ``search(queries, k, params)`` runs the real search path (the index plus any re-ranking);
    ``truth`` ``(Q, k)`` holds the exact top-``k`` ids of ``queries`` ``(Q, D)``. Settings are
    tried from cheapest to most thorough (recall grows with them), so the first that reaches the
    target is the fastest; latency is measured one query at a time, as a user's search runs.
    """
    param = tunable_param(index)
    tuning = Tuning(param=param, value=None, target_recall=float(target_recall), reached=True,
                    k=int(k), queries=len(queries))
    if not param:
        return tuning
    tuning.reached = False
    values = candidate_values(index, k)
    for v in values:
        params = SearchParams(**{param: v}, rerank=rerank)
        _, found = search(queries, k, params)
        rec = recall_at_k(found, truth)
        times = []
        for q in queries[: min(len(queries), 200)]:
            t0 = time.perf_counter()
            search(q[None, :], k, params)
            times.append((time.perf_counter() - t0) * 1000)
        row = {"value": v, "recall": round(rec, 4), "p50_ms": round(float(np.percentile(times, 50)), 4),
               "p99_ms": round(float(np.percentile(times, 99)), 4)}
        tuning.measured.append(row)
        logger.info("tuning %s=%d: recall@%d %.3f, p50 %.2f ms", param, v, k, rec, row["p50_ms"])
        tuning.value = v
        if rec >= target_recall:
            tuning.reached = True
            break
    if not tuning.reached:
        logger.warning("no %s setting reached recall@%d %.2f (best %.3f); using the most thorough",
                       param, k, target_recall, max(r["recall"] for r in tuning.measured))
    return tuning
