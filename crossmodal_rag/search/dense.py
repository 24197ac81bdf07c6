"""Dense search over a collection's vector indexes: query vectors ``(Q, D)`` in, ranked
:class:`~crossmodal_rag.search.hits.Hit` records out (a long text's windows count for their item)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import QueryError
from ..store.ann import SearchParams
from ..store.items import Item
from ..store.metadata import MetadataStore
from ..store.vectors import VectorIndex
from .calibration import auto_threshold
from .hits import Hit, Space, hit_of
from .query import check_query_vectors
from .request import check_k, check_target

__all__ = ["TargetEmptyError", "resolve_min_score", "search_vectors"]

_INDEXES_OF_TARGET = {"images": ("image",), "texts": ("text",), "all": ("image", "text")}


class TargetEmptyError(QueryError):
    """A search of a modality the collection does not hold (images in a passages-only collection)."""

    def __init__(self, target: str, alternative: str) -> None:
        self.target, self.alternative = target, alternative  # e.g. "images", "texts"
        super().__init__(f"the collection holds no {target} to search, only {alternative}: search "
                         f"those instead (target {alternative!r})")


def _check_holds(indexes: Mapping[str, VectorIndex], target: str) -> None:
    """Refuse a ``target`` whose indexes are all empty while the other modality's are not."""
    def holds(t: str) -> bool:
        return any(n in indexes and len(indexes[n]) for n in _INDEXES_OF_TARGET[t])

    if holds(target):
        return
    held = [t for t in ("images", "texts") if t != target and holds(t)]
    if held:
        raise TargetEmptyError(target, held[0])


def resolve_min_score(min_score: float | str | None, store: MetadataStore, dim: int, *,
                      query_is_image: bool, target: str) -> float | None:
    """A number, ``"auto"`` (the threshold calibrated on ``store``'s ``dim``-d vectors, see
    :mod:`crossmodal_rag.search.calibration`), or None (no threshold)."""
    if min_score is None or min_score == "":
        return None
    if isinstance(min_score, str):
        if min_score.strip().lower() == "auto":
            return auto_threshold(store, dim, query_is_image, target)
        try:
            return float(min_score)
        except ValueError:
            raise QueryError(f"min score must be a number or 'auto', got {min_score!r}") from None
    return float(min_score)


def search_vectors(
    indexes: Mapping[str, VectorIndex],
    store: MetadataStore,
    queries: np.ndarray,
    k: int,
    target: str = "images",
    allowed: Mapping[str, np.ndarray] | None = None,
    min_score: float | None = None,
    params: SearchParams | None = None,
    space: Space = "clip",
) -> list[list[Hit]]:
    """Top-``k`` hits for each row of ``queries`` ``(Q, D)``, best first.

    With ``target="all"`` image and text results are merged by score (scores of the two
    modalities are on the same cosine scale, though CLIP's modality gap favours same-modality hits).
    ``allowed`` maps index name -> ids a filter lets through; ``min_score`` drops weaker hits;
    ``space`` names the embedding space of ``indexes`` on each hit.
    """
    k = check_k(k)
    names = _INDEXES_OF_TARGET[check_target(target)]
    _check_holds(indexes, target)
    queries = check_query_vectors(queries)  # NaN, infinity or zero: a QueryError, never 0 hits
    # the first fetch of every query in one index search per index (a batch: one FAISS call)
    first = _fetch(indexes, queries, k, names, allowed, min_score, params)
    return [_search_one(indexes, store, q, k, names, allowed, min_score, params, first=f, space=space)
            for q, f in zip(queries, first, strict=True)]


def _search_one(indexes: Mapping[str, VectorIndex], store: MetadataStore, query: np.ndarray, k: int,
                names: tuple[str, ...], allowed: Mapping[str, np.ndarray] | None,
                min_score: float | None, params: SearchParams | None = None,
                first: tuple[np.ndarray, np.ndarray, float] | None = None, space: Space = "clip") -> list[Hit]:
    """Top-k items for one query. Windows of long texts count for their item (its best window's
    score), so the search fetches more until it has k distinct items that no unseen row can
    beat, or has seen everything. ``first``: the first fetch (``k`` rows), already made."""
    fetch = k
    total = max(len(indexes[n]) if allowed is None else min(len(indexes[n]), len(allowed[n]))
                for n in names)
    while True:
        scores, ids, bound = first or _fetch(indexes, query[None], fetch, names, allowed, min_score, params)[0]
        first = None
        order = np.argsort(-scores, kind="stable")
        best = _best_per_item(store, scores[order], ids[order])
        # an unseen row scores at most ``bound`` (the lowest row fetched from an index that
        # may hold more): with k items at or above it, no unseen row changes the top k
        complete = len(best) >= k and list(best.values())[k - 1][0] >= bound
        if complete or bound == -np.inf or fetch >= total:
            break
        fetch = min(fetch * 4, total)
    return [hit_of(item, rank, score, space=space)
            for rank, (score, item) in enumerate(list(best.values())[:k], start=1)]


def _fetch(indexes: Mapping[str, VectorIndex], queries: np.ndarray, fetch: int, names: tuple[str, ...],
           allowed: Mapping[str, np.ndarray] | None, min_score: float | None,
           params: SearchParams | None) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """For each row of ``queries`` ``(Q, D)`` (one index search per index for all rows): the top
    ``fetch`` rows of each index (at or above ``min_score``), ``(scores, ids)``, and the best score
    a row not fetched could have (-inf when every index gave all it has)."""
    found = {n: indexes[n].search(queries, fetch, None if allowed is None else allowed[n], params=params)
             for n in names}
    out = []
    for row in range(len(queries)):
        all_scores, all_ids, bound = [], [], -np.inf
        for n in names:
            s, i = found[n][0][row], found[n][1][row]
            keep = i >= 0
            s, i = s[keep], i[keep]
            # fewer rows than asked for: nothing else in this index passes the filter
            more = len(i) >= fetch and len(i) < len(indexes[n])
            if min_score is not None:
                more = more and bool(len(s)) and float(s.min()) >= min_score
                keep = s >= min_score
                s, i = s[keep], i[keep]
            if more:
                bound = max(bound, float(s.min()))
            all_scores.append(s)
            all_ids.append(i)
        out.append((np.concatenate(all_scores), np.concatenate(all_ids), bound))
    return out


def _best_per_item(store: MetadataStore, scores: np.ndarray, ids: np.ndarray
                   ) -> dict[int, tuple[float, Item]]:
    """Item id -> (best score, item) over rows sorted best first; a window counts for its item."""
    items = store.get_items(ids.tolist())
    parents = store.get_items([it.parent_id for it in items.values() if it.kind == "window"])
    best: dict[int, tuple[float, Item]] = {}
    for score, row_id in zip(scores.tolist(), ids.tolist(), strict=True):
        item = items.get(int(row_id))
        if item is None:  # removed by a concurrent writer since the index was read
            continue
        if item.kind == "window":
            item = parents.get(item.parent_id)
            if item is None:
                continue
        if item.id not in best:
            best[item.id] = (float(score), item)
    return best
