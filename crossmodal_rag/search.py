"""Search over a collection's indexes: query vectors in, ranked :class:`Hit` records out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from .errors import QueryError
from .store.ann import SearchParams
from .store.metadata import MetadataStore
from .store.vectors import VectorIndex

__all__ = ["TARGETS", "Hit", "Target", "check_k", "check_target", "search_vectors"]

Target = Literal["images", "texts", "all"]
TARGETS: tuple[str, ...] = ("images", "texts", "all")
_INDEXES_OF_TARGET = {"images": ("image",), "texts": ("text",), "all": ("image", "text")}


@dataclass(frozen=True)
class Hit:
    """One ranked search result."""

    rank: int  # 1-based
    score: float  # cosine similarity between query and item embeddings
    id: int  # item id in the collection
    kind: str  # "image" | "caption" | "passage"
    path: str | None  # the image file (a caption's image for captions); None for passages
    text: str | None  # the caption or passage text; None for images
    captions: tuple[str, ...]  # an image's captions (empty for texts)
    parent_id: int | None  # for a caption: the image it describes
    title: str | None  # a passage's title

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["captions"] = list(self.captions)
        return d


def check_target(target: str) -> Target:
    if target not in TARGETS:
        raise QueryError(f"unknown search target {target!r}; choose one of {', '.join(TARGETS)}")
    return target  # type: ignore[return-value]


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise QueryError(f"k must be a positive integer, got {k!r}")
    return int(k)


def search_vectors(
    indexes: Mapping[str, VectorIndex],
    store: MetadataStore,
    queries: np.ndarray,
    k: int,
    target: str = "images",
    allowed: Mapping[str, np.ndarray] | None = None,
    min_score: float | None = None,
    params: SearchParams | None = None,
) -> list[list[Hit]]:
    """Top-``k`` hits for each row of ``queries`` ``(Q, D)``, best first.

    With ``target="all"`` image and text results are merged by score (scores of the two
    modalities are on the same cosine scale, though CLIP's modality gap favours same-modality hits).
    ``allowed`` maps index name -> ids a filter lets through; ``min_score`` drops weaker hits.
    """
    k = check_k(k)
    names = _INDEXES_OF_TARGET[check_target(target)]
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    return [_search_one(indexes, store, q, k, names, allowed, min_score, params) for q in queries]


def _search_one(indexes: Mapping[str, VectorIndex], store: MetadataStore, query: np.ndarray, k: int,
                names: tuple[str, ...], allowed: Mapping[str, np.ndarray] | None,
                min_score: float | None, params: SearchParams | None = None) -> list[Hit]:
    """Top-k items for one query. Windows of long texts count for their item (its best window's
    score), so the search fetches more until it has k distinct items or has seen everything."""
    fetch = k
    total = sum(len(indexes[n]) for n in names)
    while True:
        per_index = [indexes[n].search(query[None], fetch, None if allowed is None else allowed[n],
                                       params=params)
                     for n in names]
        scores = np.concatenate([s[0] for s, _ in per_index])
        ids = np.concatenate([i[0] for _, i in per_index])
        keep = ids >= 0
        if min_score is not None:
            keep &= scores >= min_score
        scores, ids = scores[keep], ids[keep]
        order = np.argsort(-scores, kind="stable")
        items = store.get_items(ids[order].tolist())
        parents = store.get_items([it.parent_id for it in items.values() if it.kind == "window"])
        best: dict[int, tuple[float, object]] = {}
        for j in order:
            item = items.get(int(ids[j]))
            if item is None:  # removed by a concurrent writer since the index was read
                continue
            if item.kind == "window":
                item = parents.get(item.parent_id)
                if item is None:
                    continue
            if item.id not in best:
                best[item.id] = (float(scores[j]), item)
        # fewer rows than asked for means nothing else passes the filter or the threshold
        exhausted = fetch >= total or len(ids) < fetch * len(names)
        if len(best) >= k or exhausted:
            break
        fetch = min(fetch * 4, total)
    hits: list[Hit] = []
    for score, item in list(best.values())[:k]:
        hits.append(Hit(rank=len(hits) + 1, score=score, id=item.id, kind=item.kind, path=item.path,
                        text=item.text, captions=item.captions, parent_id=item.parent_id,
                        title=item.title))
    return hits
