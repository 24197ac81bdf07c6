"""Tuning an index's search knobs on held-out queries: the cheapest setting reaching a recall.

Every family is tuned by the same code over all of its knobs: the main knob (``nprobe`` for IVF,
``efSearch`` for HNSW) and, for compact codes (SQ8, float16, PQ), the re-rank depth (``k x
rerank`` candidates re-scored with exact vectors). For each re-rank depth the main knob is walked
from cheap to thorough until recall@k reaches the target (recall grows with it; going further
only costs more); a depth is abandoned as soon as its latency exceeds the best point found. A
setting reaches the target when the 95% lower confidence bound of its recall over the tuning
queries does, so the setting holds for other queries, not just these (``criterion="bound"``);
with ``criterion="mean"`` when the mean does, for callers that check the pick on a second,
independent set (:func:`verify_tuning`), which removes the mean's selection bias without the
bound's margin. The chosen point is the
reaching one with the lowest single-query p50; the whole measured curve is
kept (chosen row last) for ``info``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import faiss
import numpy as np

from .ann import SearchParams, Tuning, describe_index, recall_at_k

__all__ = ["CRITERIA", "knob_grid", "recall_lower_bound", "tune_grid", "verify_tuning"]

logger = logging.getLogger(__name__)

Search = Callable[[np.ndarray, int, SearchParams], tuple[np.ndarray, np.ndarray]]

#: Re-rank depths tried per code type (multiples of k); 0 = the codes' own order.
RERANK_DEPTHS = {"flat": (0,), "fp16": (0, 2), "sq8": (0, 2, 4, 8), "sq": (0, 2, 4, 8),
                 "pq": (4, 8, 16, 32), "pqfs": (8, 16, 32, 64)}
#: efSearch values tried, in steps of x1.14-x1.25 (an HNSW search costs about linearly in efSearch, so
#: a x1.5 step could cost up to a third more time than the target needs: real MiniLM 100k
#: needed between 48 and 64; benchmarks/RESULTS.md, "auto by measurement").
_EF_VALUES = (16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512,
              640, 768, 896, 1024)
#: Single queries timed per setting (the rest of the queries only measure recall).
TIMED_QUERIES = 100
#: A re-rank depth stops when recall gained less than this over its last two settings (lossy
#: codes cap recall without re-ranking: SQ8 at 1M plateaued at 0.947 from nprobe 1,024 to 8,192).
PLATEAU = 0.003
#: A setting reaches the target when the 95% lower confidence bound of its recall does (z of a
#: one-sided 95% bound): tuned on 500 queries to a bare mean of 0.95, 1,000 other queries of
#: the same distribution measured 0.937-0.953 (benchmarks/ann/families_*.json).
CONFIDENCE_Z = 1.645
#: When a tuned setting reaches the target: its recall's lower confidence bound, or its mean.
CRITERIA = ("bound", "mean")


def knob_grid(index: faiss.Index, k: int, *, can_rerank: bool = True
              ) -> tuple[str, list[int], tuple[int, ...]]:
    """(main knob, its values cheap to thorough, re-rank depths) of ``index``; ``("", [], (0,))``
    for an exact index. ``can_rerank=False`` (no exact vectors to re-rank with): depth 0 only."""
    d = describe_index(index)
    depths = RERANK_DEPTHS.get(d.get("codes", "flat"), (0,)) if can_rerank else (0,)
    if d["kind"] == "ivf":  # 1, 2, 3, 4, 6, 8, 12, ...: steps of x1.5 / x1.33, up to every list
        nlist = int(d["nlist"])
        values = sorted({v for i in range(17) for v in (1 << i, 3 << i >> 1) if 0 < v < nlist})
        return "nprobe", [*values, nlist], depths
    if d["kind"] == "hnsw":
        return "ef_search", [v for v in _EF_VALUES if v >= k], depths
    return "", [], (0,)


def recall_lower_bound(found: np.ndarray, truth: np.ndarray) -> float:
    """One-sided 95% lower confidence bound of recall@k over the population of queries:
    mean per-query recall - 1.645 x its standard error (0 queries: 1.0)."""
    per = np.array([len(np.intersect1d(f[f >= 0], t[t >= 0])) / max(int((t >= 0).sum()), 1)
                    for f, t in zip(found, truth, strict=True)])
    if len(per) < 2:
        return float(per.mean()) if len(per) else 1.0
    return float(per.mean() - CONFIDENCE_Z * per.std(ddof=1) / np.sqrt(len(per)))


def _measure(search: Search, queries: np.ndarray, truth: np.ndarray, k: int, params: SearchParams
             ) -> dict[str, float]:
    _, found = search(queries, k, params)
    times = []
    for q in queries[:TIMED_QUERIES]:
        t0 = time.perf_counter()
        search(q[None, :], k, params)
        times.append((time.perf_counter() - t0) * 1000)
    return {"recall": round(recall_at_k(found, truth), 4),
            "recall_lo": round(recall_lower_bound(found, truth), 4),
            "p50_ms": round(float(np.percentile(times, 50)), 4),
            "p99_ms": round(float(np.percentile(times, 99)), 4)}


def tune_grid(search: Search, index: faiss.Index, queries: np.ndarray, truth: np.ndarray, *,
              k: int = 10, target_recall: float = 0.95, can_rerank: bool = True,
              criterion: str = "bound") -> Tuning:
    """Pick the cheapest (lowest single-query p50) setting of ``index``'s knobs reaching
    ``target_recall`` by ``criterion`` (:data:`CRITERIA`: the recall's 95% lower bound over
    ``queries``, or its mean).

    ``search(queries, k, params)`` runs the real search path (index plus re-ranking);
    ``truth`` ``(Q, k)`` holds the exact top-``k`` ids of ``queries`` ``(Q, D)``. Single queries
    are timed one at a time, as a user's search runs. When no setting reaches the target, the
    one with the highest recall is chosen and ``reached`` is False.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown tuning criterion {criterion!r} (valid: {', '.join(CRITERIA)})")
    key = "recall_lo" if criterion == "bound" else "recall"
    param, values, depths = knob_grid(index, k, can_rerank=can_rerank)
    tuning = Tuning(param=param, value=None, target_recall=float(target_recall), reached=bool(not param),
                    k=int(k), queries=len(queries))
    if not param:
        return tuning
    rows: list[dict[str, float]] = []
    best: dict[str, float] | None = None
    for depth in depths:
        curve: list[float] = []
        for v in values:
            params = SearchParams(**{param: v}, rerank=depth)
            row = {"value": v, param: v, "rerank": depth, **_measure(search, queries, truth, k, params)}
            rows.append(row)
            logger.info("tuning %s=%d rerank=%d: recall@%d %.3f (>= %.3f), p50 %.3f ms", param, v,
                        depth, k, row["recall"], row["recall_lo"], row["p50_ms"])
            if best is not None and row["p50_ms"] > best["p50_ms"]:
                break  # this depth can no longer beat the best point
            if row[key] >= target_recall:
                if best is None or row["p50_ms"] < best["p50_ms"]:
                    best = row
                break
            curve.append(row["recall"])
            if len(curve) >= 3 and curve[-1] - curve[-3] < PLATEAU:
                break  # the codes cap recall at this depth: a deeper re-rank may not be
    tuning.reached = best is not None
    if best is None:
        best = max(rows, key=lambda r: (r["recall"], -r["p50_ms"]))
        logger.warning("no setting reached recall@%d %.2f (best %.3f at %s=%d rerank=%d)", k,
                       target_recall, best["recall"], param, best["value"], best["rerank"])
    rows.remove(best)
    tuning.measured = [*rows, best]
    tuning.value = int(best["value"])
    tuning.rerank = int(best["rerank"]) if len(depths) > 1 or depths[0] else None
    return tuning


def verify_tuning(search: Search, index: faiss.Index, tuning: Tuning, queries: np.ndarray,
                  truth: np.ndarray, *, target_recall: float = 0.95) -> Tuning:
    """Check ``tuning``'s setting on a second held-out set ``queries`` ``(Q, D)`` (exact top-k
    ``truth`` ``(Q, k)``) before it is accepted: a setting tuned to the bound on one set of
    queries can land under the target on others (SQ8 at 1M: 0.948 on fresh queries). While the
    mean recall on this set misses ``target_recall``, the main knob steps up (same re-rank
    depth); the rows measured here are appended to the curve marked ``"set": "verify"`` (the
    accepted one last). Sets ``verify_recall`` and ``verify_queries``; ``reached`` turns False
    when even the widest setting misses."""
    if not tuning.param or tuning.value is None or not len(queries):
        return tuning
    param, values, _ = knob_grid(index, tuning.k)
    start = values.index(tuning.value) if tuning.value in values else 0
    rows: list[dict[str, float]] = []
    for v in values[start:]:
        params = SearchParams(**{param: v}, rerank=tuning.rerank)
        row = {"value": v, param: v, "rerank": tuning.rerank or 0, "set": "verify",
               **_measure(search, queries, truth, tuning.k, params)}
        rows.append(row)
        logger.info("verifying %s=%d on %d other queries: recall@%d %.3f", param, v, len(queries),
                    tuning.k, row["recall"])
        if row["recall"] >= target_recall:
            break
    last = rows[-1]
    tuning.verify_queries = len(queries)
    tuning.verify_recall = float(last["recall"])
    tuning.reached = bool(tuning.reached and last["recall"] >= target_recall)
    if int(last["value"]) != tuning.value:
        tuning.value = int(last["value"])
        tuning.measured = [*tuning.measured, *rows]
    return tuning

