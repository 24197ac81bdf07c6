"""Recommendation over several index shards: :func:`crossmodal_rag.apps.recommend`'s profile, search
and MMR re-ranking, with liked items named ``SHARD:ID`` and candidates from every shard."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..apps.recommend import Recommendation, mmr
from ..errors import QueryError
from ..search import SearchRequest, check_k
from .local import LocalShard

__all__ = ["parse_liked", "recommend_shards"]


def parse_liked(values: Sequence[str], names: Sequence[str]) -> list[tuple[str, int]]:
    """``SHARD:ID`` strings -> ``(shard, id)``; a shard not among ``names`` or a bad id is refused by name."""
    out = []
    for value in values:
        shard, _, item = value.rpartition(":")
        if shard not in names or not item.isdigit():
            raise QueryError(f"liked item {value!r} is not SHARD:ID with SHARD one of {', '.join(names)} "
                             "(hits name their shard in --json)")
        out.append((shard, int(item)))
    return out


def recommend_shards(shards: object, liked: Sequence[tuple[str, int]] = (), liked_images: Sequence[str | Path] = (),
                     *, k: int = 10, diversity: float = 0.3, target: str = "images", pool: int | None = None,
                     where: Sequence[str] = ()) -> list[Recommendation]:
    """Items of any shard close to the liked ones (``(shard, id)`` and image files), liked ones
    excluded, re-ranked by MMR; ``shards`` is :func:`~crossmodal_rag.serving.open_shards`' set."""
    k = check_k(k)
    local: dict[str, LocalShard] = {s.name: s for s in shards.shards}  # type: ignore[attr-defined]
    vectors = []
    for name, item in liked:
        coll = local[name].collection
        if not coll.get([item]):
            raise QueryError(f"liked item {name}:{item} is not in shard {name}")
        vectors.append(coll.store.vectors([item], coll.manifest.dim))
    for image in liked_images:
        vectors.append(shards.embed(SearchRequest(image=image))[None])  # type: ignore[attr-defined]
    if not vectors:
        raise QueryError("recommend needs liked items (SHARD:ID) and/or liked images")
    profile = np.concatenate(vectors).mean(axis=0)
    norm = np.linalg.norm(profile)
    if norm < 1e-8:
        raise QueryError("the liked items cancel out; like more items")
    profile = (profile / norm).astype(np.float32)
    pool = max(pool or 5 * k, k)
    found = shards.search(SearchRequest(vector=profile, k=pool + len(liked), target=target,  # type: ignore[attr-defined, arg-type]
                                        where=tuple(where), mode="dense"))
    exclude = set(liked)
    hits = [h for h in found if (h.shard, h.id) not in exclude
            and (h.parent_id is None or (h.shard, h.parent_id) not in exclude)][:pool]
    if not hits:
        return []
    cand = np.concatenate([local[h.shard].collection.store.vectors([h.id], local[h.shard].collection.manifest.dim)
                           for h in hits if h.shard is not None])
    return [Recommendation(hits[j].ranked(rank), value)
            for rank, (j, value) in enumerate(mmr(profile, cand, k, diversity), start=1)]
