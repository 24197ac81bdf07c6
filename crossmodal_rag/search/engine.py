"""One search, run: a :class:`~crossmodal_rag.search.request.SearchRequest` and an open collection
in, a :class:`~crossmodal_rag.search.request.SearchResult` out.

request --routes?--> text space (routing) --\\
        \\-> CLIP: embed (query) -> dense ranking (dense) ---> [keyword ranking (hybrid) -> RRF (fusion)]
                                                                    -> min_score cut -> hits

:meth:`Collection.search <crossmodal_rag.collection.Collection.search>` calls :func:`run`; nothing
here calls back into the collection's search, so ``k`` reaches FAISS through each module once.
The mode is resolved here (``auto``: :func:`~crossmodal_rag.search.hybrid.choose_mode`): no
front end branches on it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from ..errors import QueryError
from ..store import fulltext
from . import hybrid, routing
from .dense import TargetEmptyError, resolve_min_score, search_vectors
from .filters import allowed_ids, parse_where
from .fusion import RRF_K, reciprocal_rank_fusion
from .hits import Hit
from .request import SearchRequest, SearchResult

if TYPE_CHECKING:
    from .source import Searchable
    from .text_space import TextSpace

__all__ = ["dense_only", "run", "run_vectors"]

logger = logging.getLogger(__name__)


def run(coll: Searchable, request: SearchRequest) -> SearchResult:
    """Search ``coll`` as ``request`` asks (see the module docstring)."""
    space = coll.text_space if routing.routes(request) else None
    if space is not None:
        return _routed(coll, space, request)
    return _clip(coll, request)


def dense_only(coll: Searchable, request: SearchRequest) -> bool:
    """Whether ``request`` runs as a plain dense search in CLIP's space (what the web batcher
    batches): not routed to a text space, and its mode resolves to dense."""
    if routing.routes(request) and coll.text_space is not None:
        return False
    mode = hybrid.choose_mode(request.mode, coll.store, has_text=request.has_text, query=request.text)
    return mode == "dense" and not request.dense_scores


def run_vectors(coll: Searchable, vectors: np.ndarray, request: SearchRequest,
                threshold: float | None = None) -> list[list[Hit]]:
    """Dense search in CLIP's space for each row of ``vectors`` ``(Q, D)`` with ``request``'s
    ``k``, target, filters and params, cut at ``threshold`` (already resolved); one hit list per row."""
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    if vectors.ndim != 2 or vectors.shape[1] != coll.manifest.dim:
        raise QueryError(f"query vectors are {vectors.shape[-1]}-d; this collection is {coll.manifest.dim}-d")
    return search_vectors(coll.indexes, coll.store, vectors, request.k, request.target,
                          _allowed(coll, request), threshold, params=request.params)


def _allowed(coll: Searchable, request: SearchRequest) -> dict[str, np.ndarray] | None:
    conditions = parse_where(request.where)
    return allowed_ids(coll.store, conditions) if conditions else None


def _clip_threshold(coll: Searchable, request: SearchRequest, target: str | None = None) -> float | None:
    return resolve_min_score(request.min_score, coll.store, coll.manifest.dim,
                             query_is_image=request.image is not None, target=target or request.target)


def _embed(coll: Searchable, request: SearchRequest) -> np.ndarray:
    if request.vector is not None:
        return np.asarray(request.vector, dtype=np.float32).reshape(-1)
    return coll.embed_query(request.text, request.image, plus=list(request.plus), minus=list(request.minus))


def _ranked(hits: list[Hit], k: int) -> tuple[Hit, ...]:
    return tuple(h.ranked(r) for r, h in enumerate(hits[:k], start=1))


def _with_dense_scores(hits: list[Hit]) -> list[Hit]:
    """RAG's view: each hit's ``score`` is its dense cosine, in the mode's order."""
    return [h.ranked(h.rank, score=float(h.dense_score)) for h in hits]  # type: ignore[arg-type]


def _clip(coll: Searchable, request: SearchRequest) -> SearchResult:
    """A search in CLIP's space: dense, keyword or hybrid."""
    r = request
    chosen = hybrid.choose_mode(r.mode, coll.store, has_text=r.has_text, query=r.text)
    threshold = _clip_threshold(coll, r)
    cut = threshold if r.cut else None
    if chosen == "dense":
        return _dense(coll, r, threshold, cut)
    allowed = _allowed(coll, r)
    depth = r.k if chosen == "keyword" and cut is None else max(r.k * hybrid.DEPTH_FACTOR, hybrid.MIN_DEPTH)
    try:
        keyword = hybrid.keyword_hits(coll.store, r.text or "", depth, r.target, allowed)
    except fulltext.DamagedIndexError as e:
        if r.mode != "auto":
            raise
        logger.warning("%s; searching densely", e)
        return _dense(coll, r, threshold, cut)
    if chosen == "keyword" and cut is None and not r.dense_scores:
        return SearchResult(_ranked(keyword, r.k), chosen, threshold)
    vector = _embed(coll, r)
    if chosen == "keyword":
        hits = keyword
    else:
        dense = search_vectors(coll.indexes, coll.store, vector[None], depth, r.target, allowed, cut,
                               params=r.params)[0]
        hits = hybrid.fuse(dense, keyword, len(dense) + len(keyword))
    hits = hybrid.dense_scores(coll.store, coll.manifest.dim, vector, hits)
    if cut is not None:
        hits = [h for h in hits if h.dense_score is not None and h.dense_score >= cut]
    if r.dense_scores:
        hits = _with_dense_scores(hits)
    return SearchResult(_ranked(hits, r.k), chosen, threshold, vector)


def _dense(coll: Searchable, request: SearchRequest, threshold: float | None, cut: float | None) -> SearchResult:
    vector = _embed(coll, request)
    hits = run_vectors(coll, vector, request, cut)[0]
    return SearchResult(tuple(hits), "dense", threshold, vector)


def _routed(coll: Searchable, space: TextSpace, request: SearchRequest) -> SearchResult:
    """A text query for texts (or all) in a collection with a text space (see :mod:`.routing`)."""
    r = request
    query = r.text or ""
    chosen = hybrid.choose_mode(r.mode, coll.store, has_text=True)
    cut = routing.space_threshold(space, r.min_score) if r.cut else None
    depth = r.k if chosen == "dense" else max(r.k * hybrid.DEPTH_FACTOR, hybrid.MIN_DEPTH)
    allowed = _allowed(coll, r)
    vector = space.embed_query(query)
    texts = space.search(coll.store, vector, depth, allowed, cut)
    if chosen != "dense":
        keyword = [h.ranked(h.rank, space="text") for h in hybrid.keyword_hits(coll.store, query, depth, "texts",
                                                                                 allowed)]
        texts = keyword[:depth] if chosen == "keyword" else hybrid.fuse(texts, keyword, depth, space="text")
        if r.dense_scores:
            texts = routing.text_dense_scores(space, vector, texts)
    if r.dense_scores:
        texts = _with_dense_scores(texts)
    if r.target == "texts":
        hits = _ranked(texts, r.k)
    else:
        try:
            images = _clip(coll, SearchRequest.of(r, target="images", mode="dense", k=depth)).hits
        except TargetEmptyError:
            images = ()
        by_key = {("image", h.id): h for h in images} | {("text", h.id): h for h in texts}
        fused = reciprocal_rank_fusion([[("image", h.id) for h in images], [("text", h.id) for h in texts]],
                                       RRF_K, limit=r.k)
        hits = tuple(by_key[key].ranked(rank) for rank, (key, _) in enumerate(fused, start=1))
    return SearchResult(hits, chosen, _routed_threshold(coll, space, r, hits))


def _routed_threshold(coll: Searchable, space: TextSpace, request: SearchRequest,
                      hits: tuple[Hit, ...]) -> float | None:
    """``min_score`` as a number in the top hit's own space (None: no min_score, or no hits)."""
    if request.min_score is None or request.min_score == "" or not hits:
        return None
    if hits[0].space == "clip":
        return _clip_threshold(coll, request, "images")
    return routing.space_threshold(space, request.min_score)
