"""Approximate-nearest-neighbour index types: choosing one, training it, and its search knobs.

Index types are FAISS index-factory strings over inner product on L2-normalised vectors; the
families ``auto`` chooses among (IVF with an HNSW coarse quantiser over SQ8, float16 or fast-scan
PQ codes; IVF-Flat; HNSW; exact ``Flat`` / ``SQfp16``) and their sizes are in
:mod:`.families`. ``auto`` picks exact search for small collections and otherwise the fastest
family measured at the nearest size (:data:`.families.MEASURED`) that fits the memory budget.
Search-time knobs (``nprobe`` for IVF, ``efSearch`` for HNSW, ``rerank`` for compact codes) are
:class:`SearchParams`; :func:`.tuning.tune_grid` picks the cheapest setting of all of them that
reaches a target recall@10 against exact search on held-out queries.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from ..errors import CollectionError
from .families import (
    estimate_index_bytes,
    family_spec,
    nlist_for,
    rank_families,
)

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
    "nlist_for",
    "parse_memory",
    "recall_at_k",
    "training_rows",
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
    # under a filter letting through s of the items, the knob grows to this x knob / s
    # (calibrated by tuning, see filtered.calibrate_filter; None: the default factor)
    filter_factor: int | None = None

    def __post_init__(self) -> None:
        for name in ("nprobe", "ef_search", "filter_factor"):
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
        unknown = sorted(set(data) - {"nprobe", "ef_search", "rerank", "filter_factor"})
        if unknown:
            raise CollectionError(f"unknown search parameters {unknown} (valid: nprobe, ef_search, "
                                  "rerank, filter_factor)")
        return cls(**data)


@dataclass
class Tuning:
    """What :func:`tune` measured: one row per setting tried, and the one chosen."""

    param: str  # main knob: "nprobe" or "ef_search"; "" for exact indexes (nothing to tune)
    value: int | None  # its chosen setting
    target_recall: float
    reached: bool  # False: even the most thorough setting tried missed the target
    k: int
    queries: int
    measured: list[dict[str, float]] = field(default_factory=list)  # the curve; chosen row last
    rerank: int | None = None  # chosen re-rank depth (compact codes), None: not tuned
    verify_queries: int = 0  # second held-out set the setting was checked on (0: not checked)
    verify_recall: float | None = None  # recall@k on it at the accepted setting

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


def choose_index(n: int, dim: int, max_memory: int | None = None) -> str:
    """The index type ``auto`` means for ``n`` vectors of ``dim`` under a memory budget (bytes).

    - up to :data:`EXACT_MAX_VECTORS` vectors: ``Flat`` (exact), or ``SQfp16`` (exact over
      float16 codes, half the bytes) when only that fits;
    - otherwise the approximate family measured fastest at recall@10 0.95 at the nearest
      benchmark size (:func:`.families.rank_families`) whose index fits the budget; fast-scan
      PQ codes with fewer bytes when nothing else fits.

    Raises:
        CollectionError: if not even the smallest fast-scan PQ codes fit the budget.
    """
    if max_memory is not None and max_memory <= 0:
        raise CollectionError("the memory budget must be positive")

    def fits(spec: str | None) -> bool:
        return spec is not None and (max_memory is None
                                     or estimate_index_bytes(spec, n, dim) <= max_memory)

    if n <= EXACT_MAX_VECTORS:
        for spec in ("Flat", "SQfp16"):
            if fits(spec):
                return spec
    for family in rank_families(n):
        spec = family_spec(family, n, dim)
        if fits(spec):
            return spec  # type: ignore[return-value]
    smallest = f"IVF{nlist_for(n)},PQ4np"
    for per_vector in (dim / 8 + 8, dim / 16 + 8, dim / 32 + 8, dim / 64 + 8):  # fewer PQ bytes
        spec = family_spec("ivf_hnsw_pqfs", n, dim, per_vector)
        if fits(spec):
            return spec  # type: ignore[return-value]
        smallest = spec or smallest
    need = estimate_index_bytes(smallest, n, dim)
    raise CollectionError(
        f"{n:,} vectors of {dim} dimensions do not fit a {format_memory(max_memory or 0)} index "
        f"budget even as fast-scan PQ codes (needs about {format_memory(need)}); raise "
        "--max-index-memory or shard the collection"
    )


# -- training --------------------------------------------------------------------------------
def _codes_of(index: Any) -> str:
    """How a (downcast) FAISS index stores vectors: flat, sq8, fp16, sq, pq or pqfs."""
    if isinstance(index, (faiss.IndexIVFScalarQuantizer, faiss.IndexScalarQuantizer, faiss.IndexHNSWSQ)):
        sq = faiss.downcast_index(index.storage).sq if isinstance(index, faiss.IndexHNSWSQ) else index.sq
        return {faiss.ScalarQuantizer.QT_8bit: "sq8", faiss.ScalarQuantizer.QT_fp16: "fp16"}.get(
            int(sq.qtype), "sq")
    if isinstance(index, (faiss.IndexIVFPQFastScan, faiss.IndexPQFastScan)):
        return "pqfs"
    if isinstance(index, (faiss.IndexIVFPQ, faiss.IndexPQ)) or "PQ" in type(index).__name__:
        return "pq"
    return "flat"


def describe_index(index: faiss.Index) -> dict[str, Any]:
    """Kind and main sizes of a (possibly wrapped) FAISS index.

    ``codes`` is how vectors are stored (flat, sq8, fp16, pq, pqfs); ``pq`` is True for lossy
    codes, whose shortlists are re-ranked with exact vectors; ``coarse`` is the IVF quantiser
    (flat or hnsw)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        codes = _codes_of(faiss.downcast_index(ivf))
        coarse = "hnsw" if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW) else "flat"
        return {"kind": "ivf", "nlist": int(ivf.nlist), "pq": codes != "flat", "codes": codes,
                "coarse": coarse}
    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        codes = _codes_of(inner)
        return {"kind": "hnsw", "M": int(inner.hnsw.nb_neighbors(1)), "pq": codes != "flat",
                "codes": codes}
    if isinstance(inner, faiss.IndexFlat):
        return {"kind": "flat", "pq": False, "codes": "flat"}
    if isinstance(inner, faiss.IndexScalarQuantizer):
        return {"kind": "flat", "pq": True, "codes": _codes_of(inner)}
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
#: The HNSW coarse quantiser of an IVF index searches max(this, nprobe) candidates.
QUANTIZER_EF_MIN = 32


def search_parameters(index: faiss.Index, params: SearchParams, sel: Any = None,
                      described: dict[str, Any] | None = None) -> Any:
    """A FAISS ``SearchParameters`` object for ``index`` (None if nothing is set);
    ``described``: ``describe_index(index)`` when the caller has it already."""
    d = described if described is not None else describe_index(index)
    kind = d["kind"]
    if kind == "ivf":
        p = faiss.SearchParametersIVF()
        nprobe = int(params.nprobe) if params.nprobe is not None else \
            int(faiss.extract_index_ivf(index).nprobe)
        p.nprobe = nprobe
        if d.get("coarse") == "hnsw":  # the graph must return at least nprobe centroids
            qp = faiss.SearchParametersHNSW()
            qp.efSearch = max(QUANTIZER_EF_MIN, nprobe)
            p.quantizer_params = qp
            p._quantizer_params = qp  # keep the Python object alive with p
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
#: the factors reach recall@10 >= 0.95 at every selectivity in RESULTS.md, "Filtered search", on
#: IVF-Flat and HNSW). They are the defaults: tuning replaces them with the factor measured to
#: reach the target on the index itself (``SearchParams.filter_factor``): on IVF with an HNSW
#: coarse quantiser and twice the lists, x2 gave 0.93 at 10%.
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
    (the graph walk keeps only allowed ids as results), or x ``params.filter_factor`` / s when
    tuning calibrated one, capped at their limits.
    """
    knob = _stored_knob(index, params)
    if knob is None:
        return params
    name, value, limit = knob
    s = min(max(float(selectivity), 1e-9), 1.0)
    if name == "nprobe":
        widened = (params.filter_factor or FILTER_NPROBE_FACTOR) * value / s
    else:
        widened = (params.filter_factor or FILTER_EF_FACTOR) * max(value, k) / s
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


# -- tuning --------------------------------------------------------------------------------
def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` ``(Q, k)`` found in the same row of ``found``."""
    if truth.size == 0:
        return 1.0
    hits = sum(len(np.intersect1d(f[f >= 0], t[t >= 0])) for f, t in zip(found, truth, strict=True))
    return hits / max(int((truth >= 0).sum()), 1)
