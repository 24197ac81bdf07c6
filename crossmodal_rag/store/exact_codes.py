"""Exact search over float16 codes: scan half the bytes, re-rank, prove nothing was missed.

An ``SQfp16`` index (FAISS ``IndexScalarQuantizer``, wrapped in ``IDMap2``) stores each vector as
float16: 2d bytes instead of 4d, so a single-query scan reads half the memory of ``Flat``. Its
scores differ from exact ones by at most ``|q . (x - fp16(x))| <= 2^-11 |q|`` per rounding; the
exact vectors the search re-ranks with (the collection's float16 shards, normalised) are within
as much again. So after re-ranking a shortlist of the top ``m`` code scores exactly, any vector
outside it scores at most ``s_m + B`` exactly (``s_m`` the shortlist's lowest code score, ``B``
the bound): when that is below the k-th exact score, the result is the exact top-k. Otherwise
the shortlist is widened (x4) and the query scanned again — rare with the default depth.
"""

from __future__ import annotations

import faiss
import numpy as np

from .ann import describe_index

__all__ = ["DEFAULT_EXACT_DEPTH", "error_bound", "search_codes_exact"]

#: Shortlist of k x this many code scores re-ranked exactly on the first pass. 8: at 100k and 1M
#: (benchmarks' powerlaw data) no query needed a second pass, and p50 fell from 3.67 to 3.36 ms
#: (100k) and 32.4 to 30.4 ms (1M) against depth 32 (fewer shard rows read, a smaller heap);
#: depth 4 sent 7-15% of the queries to a second pass.
DEFAULT_EXACT_DEPTH = 8
#: float16 keeps 11 significant bits: round-to-nearest is within 2^-11 relative (2^-10 if the
#: encoder truncates); the codes and the re-rank vectors each carry such an error, x2 margin.
FP16_SCORE_ERROR = 8 * 2.0**-11


def error_bound(index: faiss.Index, queries: np.ndarray) -> np.ndarray | None:
    """Per query ``(Q,)``: the most a code score can differ from the re-rank score of the same
    item (unit vectors); None for codes without a bound (SQ8, PQ)."""
    if describe_index(index).get("codes") != "fp16":
        return None
    return FP16_SCORE_ERROR * np.linalg.norm(queries, axis=1)


def search_codes_exact(index: faiss.Index, queries: np.ndarray, k: int, vectors_of, *,
                       sel: faiss.IDSelector | None = None, depth: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``queries`` ``(Q, D)`` over a float16-code ``index``: ``(scores,
    ids)``, ``(Q, k)``, scores from ``vectors_of(ids) -> (n, D)`` float32; rows short of k hits
    (a filter ``sel`` allowing fewer) padded with id -1."""
    bound = error_bound(index, queries)
    if bound is None:
        raise ValueError("search_codes_exact needs float16 codes (an SQfp16 index)")
    n = int(index.ntotal)
    out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(queries), k), -1, dtype=np.int64)
    todo = np.arange(len(queries))
    fetch = min(max(k * (depth or DEFAULT_EXACT_DEPTH), k), n)
    params = faiss.SearchParameters()
    if sel is not None:
        params.sel = sel
    while len(todo):
        code_s, ids = index.search(np.ascontiguousarray(queries[todo]), fetch, params=params)
        again = []
        for row, qn in enumerate(todo):
            held = ids[row] >= 0
            cand = ids[row][held]
            if len(cand) == 0:
                continue
            exact = vectors_of(cand) @ queries[qn]
            order = np.argsort(-exact, kind="stable")[:k]
            out_s[qn, : len(order)] = exact[order]
            out_i[qn, : len(order)] = cand[order]
            exhausted = len(cand) < fetch or fetch >= n
            if not exhausted and len(order) == k and code_s[row][held][-1] + bound[qn] >= exact[order[-1]]:
                again.append(qn)  # an item outside the shortlist could still beat the k-th
        todo = np.asarray(again, dtype=np.int64)
        fetch = min(fetch * 4, n)
    return out_s, out_i
