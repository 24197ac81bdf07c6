"""Rank fusion: several best-first result lists -> one, by reciprocal rank fusion (RRF).

Scores from different spaces (a sentence encoder's cosine, CLIP's cosine, a keyword index's BM25)
are not comparable: a cosine of 0.3 is a strong CLIP match and a weak MiniLM one. RRF therefore
uses only each item's *rank* in each list (Cormack, Clarke and Buettcher, SIGIR 2009)::

    score(d) = sum over lists i that contain d of  w_i / (k + rank_i(d))      (rank 1-based)

An item found by several lists rises above one found by a single list at a similar rank; ``k``
(60 in the paper, and here) damps the head, so rank 1 vs rank 2 in one list (1/61 vs 1/62)
weighs little against agreement between lists.

Pure Python (no numpy): ids are any hashable values, e.g. item ids or ``(kind, id)`` pairs.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

__all__ = ["RRF_K", "reciprocal_rank_fusion"]

#: The damping constant of Cormack et al. (2009), the usual default.
RRF_K = 60

T = TypeVar("T", bound=Hashable)


def reciprocal_rank_fusion(
    ranked_lists: Sequence[Sequence[T]],
    k: int = RRF_K,
    *,
    weights: Sequence[float] | None = None,
    limit: int | None = None,
) -> list[tuple[T, float]]:
    """Fuse best-first lists of ids into one best-first list of ``(id, fused score)``.

    Args:
        ranked_lists: each a best-first sequence of ids; an id may appear in several lists. An id
            repeated within one list counts once, at its best (first) rank.
        k: damping constant, > 0 (see the module docstring).
        weights: one non-negative weight per list (default 1.0 each).
        limit: keep only the best ``limit`` fused ids (None: all).

    Returns:
        ``[(id, score), ...]`` by descending score; equal scores keep the order in which the ids
        were first met (list by list, rank by rank), so the result is deterministic.

    Raises:
        ValueError: ``k`` <= 0, a negative or wrongly counted ``weights``, or ``limit`` < 0.
    """
    if not k > 0:
        raise ValueError(f"reciprocal_rank_fusion: k must be > 0, got {k!r}")
    if weights is None:
        weights = [1.0] * len(ranked_lists)
    elif len(weights) != len(ranked_lists):
        raise ValueError(
            f"reciprocal_rank_fusion: {len(weights)} weights for {len(ranked_lists)} lists "
            "(give one weight per list)")
    elif any(not w >= 0 for w in weights):
        raise ValueError(f"reciprocal_rank_fusion: weights must be >= 0, got {list(weights)!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"reciprocal_rank_fusion: limit must be >= 0, got {limit!r}")

    scores: dict[T, float] = {}  # dicts keep insertion order: the tie-break order
    for ids, weight in zip(ranked_lists, weights, strict=True):
        seen: set[T] = set()
        for rank, item in enumerate(ids, start=1):
            if item in seen:
                continue
            seen.add(item)
            scores[item] = scores.get(item, 0.0) + weight / (k + rank)
    order = {item: i for i, item in enumerate(scores)}
    fused = sorted(scores.items(), key=lambda pair: (-pair[1], order[pair[0]]))
    return fused if limit is None else fused[:limit]
