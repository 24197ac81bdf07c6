"""Recommendation from liked items: items close to what the user liked, not already liked,
re-ranked for diversity with maximal marginal relevance (MMR)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import QueryError
from ..search import Hit, SearchRequest, check_k

if TYPE_CHECKING:
    from ..collection import Collection

__all__ = ["Recommendation", "mmr", "recommend"]


@dataclass(frozen=True)
class Recommendation:
    hit: Hit  # the item (its score is the similarity to the liked profile)
    mmr: float  # the MMR value at which it was picked

    def to_dict(self) -> dict[str, Any]:
        return {**self.hit.to_dict(), "mmr": self.mmr}


def mmr(query: np.ndarray, candidates: np.ndarray, k: int, diversity: float) -> list[tuple[int, float]]:
    """Maximal marginal relevance: pick k rows of ``candidates`` ``(N, D)`` one at a time,
    maximising ``(1 - diversity) * sim(query, c) - diversity * max_{s picked} sim(c, s)``.

    ``diversity`` = 0 is plain similarity ranking. Returns (row, value) pairs in pick order.
    """
    if not 0.0 <= diversity <= 1.0:
        raise QueryError(f"diversity must be between 0 and 1, got {diversity}")
    relevance = candidates @ query
    sims = candidates @ candidates.T
    picked: list[tuple[int, float]] = []
    redundancy = np.full(len(candidates), -np.inf)
    available = np.ones(len(candidates), dtype=bool)
    for _ in range(min(k, len(candidates))):
        red = np.where(np.isfinite(redundancy), redundancy, 0.0)
        value = (1 - diversity) * relevance - diversity * red
        value[~available] = -np.inf
        j = int(np.argmax(value))
        picked.append((j, float(value[j])))
        available[j] = False
        redundancy = np.maximum(redundancy, sims[j])
    return picked


def recommend(
    collection: Collection, liked_ids: list[int] | None = None,
    liked_images: list[str | Path] | None = None, *, k: int = 10, diversity: float = 0.3,
    target: str = "images", pool: int | None = None, where: list[str] | None = None,
) -> list[Recommendation]:
    """Items similar to the liked ones (ids in the collection and/or image files), liked ones
    excluded. The profile is the normalised mean of the liked embeddings; ``pool`` candidates
    (default ``5 * k``) are re-ranked by MMR with the given ``diversity`` in [0, 1]."""
    k = check_k(k)
    liked_ids = [int(i) for i in liked_ids or []]
    vectors = []
    if liked_ids:
        known = {it.id for it in collection.get(liked_ids)}
        missing = [i for i in liked_ids if i not in known]
        if missing:
            raise QueryError(f"liked item(s) {missing} are not in the collection")
        vectors.append(collection.store.vectors(liked_ids, collection.manifest.dim))
    for image in liked_images or []:
        vectors.append(collection.embed_query(image=image)[None])
    if not vectors:
        raise QueryError("recommend needs liked item ids and/or liked images")
    liked = np.concatenate(vectors)
    profile = liked.mean(axis=0)
    norm = np.linalg.norm(profile)
    if norm < 1e-8:
        raise QueryError("the liked items cancel out; like more items")
    profile = (profile / norm).astype(np.float32)
    pool = max(pool or 5 * k, k)
    hits = list(collection.search(SearchRequest(vector=profile, k=pool + len(liked_ids), target=target,  # type: ignore[arg-type]
                                                where=where or (), mode="dense")))
    exclude = set(liked_ids)
    hits = [h for h in hits if h.id not in exclude and (h.parent_id is None or h.parent_id not in exclude)]
    hits = hits[:pool]
    if not hits:
        return []
    cand = collection.store.vectors([h.id for h in hits], collection.manifest.dim)
    picked = mmr(profile, cand, k, diversity)
    out = []
    for rank, (j, value) in enumerate(picked, start=1):
        h = hits[j]
        out.append(Recommendation(h.ranked(rank), value))
    return out
