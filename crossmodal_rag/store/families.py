"""Index families ``auto`` chooses among, their factory strings, and what they measured.

Every family is a FAISS index-factory string over inner product, built by
:func:`~.build.build_index` and tuned by :func:`~.tuning.tune_grid` like any other type:

==================  =================================  =====================================
family              factory string (n = 1M, d = 512)   bytes per vector (d = 512)
==================  =================================  =====================================
``flat``            ``Flat``                           4d + 8 = 2056
``exact_fp16``      ``SQfp16``                         2d + 8 = 1032, exact (bounded re-rank)
``ivf_flat``        ``IVF4096,Flat``                   4d + 8 = 2056
``ivf_hnsw_sq8``    ``IVF8192_HNSW32,SQ8``             d + 8 = 520 (+ shard re-rank)
``ivf_hnsw_fp16``   ``IVF8192_HNSW32,SQfp16``          2d + 8 = 1032
``ivf_hnsw_pqfs``   ``IVF8192_HNSW32,PQ128x4fs``       d/8 + 8 = 72 (+ shard re-rank)
``hnsw``            ``HNSW32`` (M by size)             4d + 8 + ~8.8 M = 2338
==================  =================================  =====================================

Compact codes (SQ8, fast-scan PQ) fetch ``k x rerank`` candidates and re-score them with the
float32 vectors of the collection's float16 shards; ``rerank`` is tuned with ``nprobe``.
:data:`MEASURED` holds what ``benchmarks/bench_ann_families.py`` measured per family; ``auto``
(:func:`~.ann.choose_index`) ranks the families that fit the memory budget by it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = [
    "DEFAULT_BYTES_PER_VECTOR",
    "FAMILIES",
    "MEASURED",
    "Measured",
    "estimate_index_bytes",
    "family_spec",
    "hnsw_ef_construction",
    "hnsw_m_for",
    "nlist_for",
    "nlist_hnsw_for",
    "rank_families",
]

FAMILIES = ("flat", "exact_fp16", "ivf_flat", "ivf_hnsw_sq8", "ivf_hnsw_fp16", "ivf_hnsw_pqfs",
            "hnsw")
#: Families ``auto`` may pick for a large collection (exact ones are for small collections).
APPROXIMATE = ("ivf_hnsw_sq8", "ivf_hnsw_fp16", "ivf_hnsw_pqfs", "ivf_flat", "hnsw")


def nlist_for(n: int) -> int:
    """Inverted lists for ``n`` vectors under a flat coarse quantiser: about 4 sqrt(n), a power
    of two, with enough training points per centroid."""
    return _pow2_lists(n, 4)


def nlist_hnsw_for(n: int) -> int:
    """Inverted lists under an HNSW coarse quantiser: about 8 sqrt(n). The graph finds the
    nearest centroids without scanning them all, so twice the lists (half the vectors scanned
    per probe) pays; more would cost k-means training time (~n_train x nlist x d)."""
    return _pow2_lists(n, 8)


def _pow2_lists(n: int, factor: int) -> int:
    target = factor * math.sqrt(max(n, 1))
    nlist = 2 ** max(4, round(math.log2(target)))
    while nlist > 16 and n < nlist * 39:
        nlist //= 2
    return int(min(nlist, 1 << 16))


def hnsw_m_for(n: int, dim: int = 512) -> int:
    """HNSW ``M`` (links per vector) by size and dimension: 16 for up to 250k vectors of at most
    128 dimensions, 32 otherwise (recall at 1M, and text embeddings of 384 dimensions at 100k,
    need the links: HNSW16 needed efSearch 1,024 on 100k ``powerlaw`` vectors, RESULTS.md)."""
    return 16 if n <= 250_000 and dim <= 128 else 32


def hnsw_ef_construction(m: int) -> int:
    """``efConstruction`` for an HNSW graph of ``M`` links: 2 M + 16 (48 for M 16, 80 for M 32;
    FAISS's default 40 builds a thinner graph that needs a wider efSearch at query time)."""
    return 2 * int(m) + 16


def pqfs_m_for(dim: int, budget_per_vector: float | None = None) -> int | None:
    """Fast-scan PQ sub-quantisers (4 bits each): d/4 (d/8 bytes) by default, fewer to fit
    ``budget_per_vector`` bytes; even and dividing ``dim``. None if none fits."""
    for m in (dim // 4, dim // 8, dim // 16, dim // 32):
        if m < 2 or m % 2 or dim % m:
            continue
        if budget_per_vector is None or m / 2 + 8 <= budget_per_vector:
            return m
    return None


def family_spec(family: str, n: int, dim: int, budget_per_vector: float | None = None) -> str | None:
    """The factory string of ``family`` for ``n`` ``dim``-d vectors (None if it cannot fit)."""
    if family == "flat":
        return "Flat"
    if family == "exact_fp16":
        return "SQfp16"
    if family == "ivf_flat":
        return f"IVF{nlist_for(n)},Flat"
    if family == "hnsw":
        return f"HNSW{hnsw_m_for(n, dim)}"
    coarse = f"IVF{nlist_hnsw_for(n)}_HNSW32"
    if family == "ivf_hnsw_sq8":
        return f"{coarse},SQ8"
    if family == "ivf_hnsw_fp16":
        return f"{coarse},SQfp16"
    if family == "ivf_hnsw_pqfs":
        m = pqfs_m_for(dim, budget_per_vector)
        return None if m is None else f"{coarse},PQ{m}x4fs"
    raise ValueError(f"unknown index family {family!r} (valid: {', '.join(FAMILIES)})")


def estimate_index_bytes(spec: str, n: int, dim: int) -> int:
    """Resident memory of an index of ``n`` ``dim``-d vectors (codes, ids, centroids, graph)."""
    s = spec.replace(" ", "")
    overhead = 0
    m_ivf = re.search(r"IVF(\d+)(_HNSW(\d+))?", s)
    if m_ivf:
        nlist = int(m_ivf.group(1))
        overhead += nlist * dim * 4 + nlist * 8  # centroids + list headers
        if m_ivf.group(3):
            overhead += int(nlist * 2 * int(m_ivf.group(3)) * 4 * 1.1)  # the centroids' graph
    if re.search(r"OPQ(\d+)", s):
        overhead += dim * dim * 4
    m_pq = re.search(r"(?<![O])PQ(\d+)(?:x(\d+))?", s)
    if m_pq:
        m, bits = int(m_pq.group(1)), int(m_pq.group(2) or 8)
        per = m * bits / 8
        overhead += m * (1 << bits) * (dim // max(m, 1)) * 4
    elif "SQ8" in s:
        per = dim
    elif "SQfp16" in s:
        per = 2 * dim
    else:
        per = 4 * dim
    m_hnsw = re.match(r"HNSW(\d+)", s)  # a graph over the vectors (not the coarse quantiser)
    if m_hnsw:
        per += 2 * int(m_hnsw.group(1)) * 4 * 1.1  # level-0 links (2M) + upper levels
    per += 8  # the id
    return int(n * per + overhead)


@dataclass(frozen=True)
class Measured:
    """One family at one size, tuned to recall@10 >= 0.95 on held-out queries (the worst of the
    benchmark's distributions), from ``benchmarks/bench_ann_families.py``."""

    family: str
    n: int  # database vectors (d = 512)
    recall: float  # recall@10 on evaluation queries at the tuned setting
    p50_ms: float  # single query, one thread, quiet 2-core machine
    bytes_per_vector: float  # resident index bytes / n (re-rank shards not counted)
    reached: bool = True  # tuning reached the target recall


#: From ``benchmarks/ann/families_{clustered,powerlaw}_{100000,1000000}.json`` (RESULTS.md, "ANN
#: families"; ``python benchmarks/bench_ann_families.py --sizes 1000000 --dists powerlaw,clustered``
#: and ``--sizes 100000``, the quiet 2-core machine, 2026-12-01 07:00-07:16 UTC): per family and
#: size, the worst recall@10 on fresh queries and the worst single-query p50 over the two
#: distributions, each at the setting tuned on it. ``reached`` is False where fresh-query recall
#: stayed under 0.95 on some distribution.
MEASURED: tuple[Measured, ...] = (
    Measured("ivf_hnsw_fp16", 100_000, recall=0.953, p50_ms=0.243, bytes_per_vector=1080),
    Measured("ivf_hnsw_sq8", 100_000, recall=0.960, p50_ms=0.293, bytes_per_vector=568),
    Measured("ivf_flat", 100_000, recall=0.970, p50_ms=0.713, bytes_per_vector=2077),
    Measured("ivf_hnsw_pqfs", 100_000, recall=0.913, p50_ms=0.984, bytes_per_vector=141, reached=False),
    Measured("hnsw", 100_000, recall=0.931, p50_ms=1.297, bytes_per_vector=2200, reached=False),
    Measured("ivf_hnsw_fp16", 1_000_000, recall=0.953, p50_ms=0.983, bytes_per_vector=1051),
    Measured("hnsw", 1_000_000, recall=0.957, p50_ms=0.957, bytes_per_vector=2328),
    Measured("ivf_flat", 1_000_000, recall=0.964, p50_ms=1.894, bytes_per_vector=2064),
    Measured("ivf_hnsw_sq8", 1_000_000, recall=0.948, p50_ms=1.164, bytes_per_vector=539, reached=False),
    Measured("ivf_hnsw_pqfs", 1_000_000, recall=0.750, p50_ms=1.274, bytes_per_vector=99, reached=False),
)


#: Resident index bytes per vector a default pick stays within when it can (issue 21: <= 1.2 KB):
#: a faster family above it (a full-precision HNSW graph, 2.3 KB) ranks after those within it.
DEFAULT_BYTES_PER_VECTOR = 1200


def rank_families(n: int, table: tuple[Measured, ...] | None = None) -> list[str]:
    """Approximate families ordered fastest first at the measured size nearest ``n`` (log
    scale), those within :data:`DEFAULT_BYTES_PER_VECTOR` before those above it; families
    missing the target there or unmeasured come last in :data:`APPROXIMATE` order."""
    table = MEASURED if table is None else table
    sizes = sorted({m.n for m in table})
    if not sizes:
        return list(APPROXIMATE)
    near = min(sizes, key=lambda s: abs(math.log(s) - math.log(max(n, 1))))
    rows = {m.family: m for m in table if m.n == near}
    good = sorted((f for f in APPROXIMATE if f in rows and rows[f].reached),
                  key=lambda f: (rows[f].bytes_per_vector > DEFAULT_BYTES_PER_VECTOR, rows[f].p50_ms))
    return good + [f for f in APPROXIMATE if f not in good]
