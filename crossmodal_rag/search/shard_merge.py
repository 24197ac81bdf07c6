"""The merge steps of a search over several shards (:mod:`crossmodal_rag.search.shards`): hit lists
of several shards into one by a score, and the merged dense and keyword lists fused as one
collection fuses them (item ids repeat across shards, so the fusion keys on (shard, id))."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from . import evidence, hybrid
from .hits import Hit
from .request import SearchResult

__all__ = ["dense_scored", "first_threshold", "fuse_merged", "merge_by"]


def merge_by(lists: Sequence[tuple[str, Sequence[Hit]]], score: Callable[[Hit], float | None],
             limit: int | None = None) -> list[Hit]:
    """Hits of several shards ``[(shard name, best-first hits), ...]`` -> one best-first list by
    ``score`` (ties: shard order, then rank), each hit naming its shard."""
    rows = [(-(score(h) if score(h) is not None else -np.inf), i, h.rank, h.ranked(h.rank, shard=name))
            for i, (name, hits) in enumerate(lists) for h in hits]
    rows.sort(key=lambda row: row[:3])
    merged = [row[3] for row in rows]
    return merged if limit is None else merged[:limit]


def first_threshold(results: Sequence[tuple[str, SearchResult]]) -> float | None:
    """The first shard's ``min_score`` as a number (every shard resolves it alike for a number)."""
    return next((res.threshold for _, res in results if res.threshold is not None), None)


def dense_scored(hits: list[Hit], dense_scores: bool) -> list[Hit]:
    """RAG's view (``dense_scores``): each hit's ``score`` is its cosine, in the mode's order."""
    if not dense_scores:
        return hits
    return [h.ranked(h.rank, score=float(h.dense_score)) for h in hits if h.dense_score is not None]


def fuse_merged(dense: list[Hit], keyword: list[Hit], ev: evidence.Evidence | None, depth: int, space: str,
                *, limit_all: bool) -> list[Hit]:
    """The merged dense and keyword lists fused as one collection fuses them. Item ids repeat
    across shards, so each (shard, id) gets a global number for the fusion and back."""
    keys: dict[tuple[str | None, int], int] = {}
    for h in (*dense, *keyword):
        keys.setdefault((h.shard, h.id), len(keys))
    back = {g: key for key, g in keys.items()}
    kw_cos = {keys[(h.shard, h.id)]: h.dense_score for h in keyword}
    as_global = [[h.ranked(h.rank, id=keys[(h.shard, h.id)]) for h in hits] for hits in (dense, keyword)]
    if ev is not None:
        fused = hybrid.fuse_evidence(as_global[0], as_global[1], ev, depth, space=space)  # type: ignore[arg-type]
    else:
        limit = len(dense) + len(keyword) if limit_all else depth
        fused = hybrid.fuse(as_global[0], as_global[1], limit, space=space)  # type: ignore[arg-type]
    out = []
    for h in fused:
        shard, item_id = back[h.id]
        cos = h.dense_score if h.dense_score is not None else kw_cos.get(h.id)
        out.append(h.ranked(h.rank, id=item_id, shard=shard, dense_score=cos))
    return out
