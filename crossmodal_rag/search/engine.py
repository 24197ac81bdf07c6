"""One search, run: a :class:`~crossmodal_rag.search.request.SearchRequest` and an open collection
in, a :class:`~crossmodal_rag.search.request.SearchResult` out.

request --plan (mode + why; auto: hybrid.weigh, the evidence rule)--+
        --routes?--> text space (routing) --\\
        \\-> CLIP: embed (query) -> dense ranking (dense) ---> [keyword ranking (hybrid) ->
                  RRF (hybrid) or evidence fusion (auto)] -> min_score cut -> hits

:meth:`Collection.search <crossmodal_rag.collection.Collection.search>` calls :func:`run`; nothing
here calls back into the collection's search, so ``k`` reaches FAISS through each module once.
The mode is resolved here (:func:`_plan`; ``auto``: dense unless the query's words are
informative keyword evidence, :mod:`crossmodal_rag.search.evidence`), and the result says which
ran and why (``SearchResult.reason``): no front end branches on it. Fused lists are
:data:`~crossmodal_rag.search.hybrid.FUSED_DEPTH` deep whatever ``k``. A keyword search that
needs no cosine embeds nothing (no model loads)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from ..errors import QueryError
from ..store import fulltext
from . import hybrid, routing, text_only
from .dense import TargetEmptyError, resolve_min_score, search_vectors
from .filters import allowed_ids, parse_where
from .fusion import RRF_K, reciprocal_rank_fusion
from .hits import Hit
from .request import SearchRequest, SearchResult

if TYPE_CHECKING:
    from .evidence import Evidence
    from .source import Searchable
    from .text_space import TextSpace

__all__ = ["dense_only", "run", "run_vectors"]

logger = logging.getLogger(__name__)


def run(coll: Searchable, request: SearchRequest) -> SearchResult:
    """Search ``coll`` as ``request`` asks (see the module docstring). A keyword search that
    needs no cosine (no ``min_score``, no ``dense_scores``) reads only the keyword index: it
    embeds nothing, so it loads no model (CLIP or the text space's)."""
    keyword_only = request.mode == "keyword" and (request.min_score in (None, "") or not request.cut) \
        and not request.dense_scores
    if text_only.is_text_only(coll.manifest.encoder):
        return _text_only(coll, request, keyword_only)
    space = coll.text_space if routing.routes(request) and not keyword_only else None
    if space is not None:
        return _routed(coll, space, request)
    return _clip(coll, request)


def dense_only(coll: Searchable, request: SearchRequest) -> bool:
    """Whether ``request`` runs as a plain dense search in CLIP's space (what the web batcher
    batches): not routed to a text space, and its mode resolves to dense."""
    if text_only.is_text_only(coll.manifest.encoder) or (routing.routes(request) and coll.text_space is not None):
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


@dataclass(frozen=True)
class _Plan:
    """How one request ranks: the mode that runs, why, and (auto fusing) the evidence rule's decision."""

    mode: str  # dense | keyword | hybrid
    reason: str  # one line for --json ("mode_reason") and -v
    evidence: Evidence | None = None  # auto mode's keyword query and weight, when it fuses


def _plan(coll: Searchable, r: SearchRequest) -> _Plan:
    """The mode ``r`` runs in: an explicit mode as asked; ``auto``: dense unless the query's words
    are informative keyword evidence in this collection (:func:`~crossmodal_rag.search.hybrid.weigh`)."""
    chosen = hybrid.choose_mode(r.mode, coll.store, has_text=r.has_text, query=r.text)
    if r.mode != "auto":
        how = {"dense": "embeddings only", "keyword": "BM25 only",
               "hybrid": f"reciprocal rank fusion of the dense and keyword rankings, each "
                         f"{hybrid.fused_depth(r.k)} deep"}[chosen]
        return _Plan(chosen, f"{chosen}: asked for ({how})")
    if chosen == "dense":
        why = ("an image or vector query" if not r.has_text
               else "no words or numbers to match (symbols or emoji only)" if hybrid.keyword_note(r.text)
               else "the collection has no texts in its keyword index")
        return _Plan("dense", f"auto: dense: {why}")
    ev = hybrid.weigh(coll.store, r.text or "")
    return _Plan(ev.mode, f"auto: {ev.reason}", ev if ev.mode == "hybrid" else None)


def _keyword(coll: Searchable, r: SearchRequest, plan: _Plan, depth: int, target: str,
             allowed: dict[str, np.ndarray] | None) -> list[Hit] | None:
    """The keyword ranking of ``plan``, ``depth`` deep; None when auto mode cannot read it (a
    damaged index, a keyword query the index refuses): the caller then searches densely."""
    try:
        if plan.evidence is not None:
            return hybrid.keyword_hits(coll.store, plan.evidence.keyword_query or "", depth, target, allowed,
                                       arithmetic=False)
        return hybrid.keyword_hits(coll.store, r.text or "", depth, target, allowed)
    except (fulltext.DamagedIndexError, QueryError) as e:
        if r.mode != "auto":
            raise
        logger.warning("%s; searching densely", e)
        return None


def _clip(coll: Searchable, request: SearchRequest) -> SearchResult:
    """A search in CLIP's space: dense, keyword or fused (hybrid, or auto's evidence fusion)."""
    r = request
    plan = _plan(coll, r)
    threshold = _clip_threshold(coll, r)
    cut = threshold if r.cut else None
    if plan.mode == "dense":
        return replace(_dense(coll, r, threshold, cut), reason=plan.reason)
    allowed = _allowed(coll, r)
    depth = r.k if plan.mode == "keyword" and cut is None else hybrid.fused_depth(r.k)
    keyword = _keyword(coll, r, plan, depth, r.target, allowed)
    if keyword is None:
        return replace(_dense(coll, r, threshold, cut), reason="auto: dense: the keyword index could not be read")
    if plan.mode == "keyword" and cut is None and not r.dense_scores:
        return SearchResult(_ranked(keyword, r.k), "keyword", threshold, reason=plan.reason)
    vector = _embed(coll, r)
    if plan.mode == "keyword":
        hits = keyword
    else:
        dense = search_vectors(coll.indexes, coll.store, vector[None], depth, r.target, allowed, cut,
                               params=r.params)[0]
        hits = (hybrid.fuse_evidence(dense, keyword, plan.evidence, depth) if plan.evidence is not None
                else hybrid.fuse(dense, keyword, len(dense) + len(keyword)))
    hits = hybrid.dense_scores(coll.store, coll.manifest.dim, vector, hits)
    if cut is not None:
        hits = [h for h in hits if h.dense_score is not None and h.dense_score >= cut]
    if r.dense_scores:
        hits = _with_dense_scores(hits)
    return SearchResult(_ranked(hits, r.k), plan.mode, threshold, vector, reason=plan.reason)


def _dense(coll: Searchable, request: SearchRequest, threshold: float | None, cut: float | None) -> SearchResult:
    vector = _embed(coll, request)
    hits = run_vectors(coll, vector, request, cut)[0]
    return SearchResult(tuple(hits), "dense", threshold, vector)


def _routed(coll: Searchable, space: TextSpace, request: SearchRequest) -> SearchResult:
    """A text query for texts (or all) in a collection with a text space (see :mod:`.routing`)."""
    r = request
    query = r.text or ""
    plan = _plan(coll, r)
    cut = routing.space_threshold(space, r.min_score) if r.cut else None
    depth = r.k if plan.mode == "dense" else hybrid.fused_depth(r.k)
    allowed = _allowed(coll, r)
    vector = space.embed_query(query)
    texts = space.search(coll.store, vector, depth, allowed, cut) if plan.mode != "keyword" else []
    if plan.mode != "dense":
        found = _keyword(coll, r, plan, depth, "texts", allowed)
        if found is None:
            plan = _Plan("dense", "auto: dense: the keyword index could not be read")
        else:
            keyword = [h.ranked(h.rank, space="text") for h in found]
            if plan.mode == "keyword":
                texts = routing.text_dense_scores(space, vector, keyword[:depth])
                if cut is not None:
                    texts = [h for h in texts if h.dense_score is not None and h.dense_score >= cut]
            elif plan.evidence is not None:
                texts = hybrid.fuse_evidence(texts, keyword, plan.evidence, depth, space="text")
            else:
                texts = hybrid.fuse(texts, keyword, depth, space="text")
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
    return SearchResult(hits, plan.mode, _routed_threshold(coll, space, r, hits), reason=plan.reason)


def _text_only(coll: Searchable, request: SearchRequest, keyword_only: bool) -> SearchResult:
    """A search of a text-only collection (:mod:`.text_only`): its texts ranked as the mode says,
    then turned into the images they belong to for ``target`` images or all."""
    space = coll.text_space if not keyword_only else None
    refused = text_only.refusal(coll.folder, request, has_text_space=coll.text_space is not None,
                                keyword_only=keyword_only)
    if refused is not None:
        raise refused
    # an image's own --where conditions are applied to the images, after the texts are ranked
    texts = SearchRequest.of(request, target="texts", k=text_only.text_depth(request, hybrid.fused_depth(request.k)),
                             where=request.where if request.target == "texts" else ())
    found = _routed(coll, space, texts) if space is not None else _clip(coll, texts)
    if request.target == "texts":
        return found
    hits = text_only.with_images(coll.store, found.hits, request.target, request.k, _allowed(coll, request))
    return replace(found, hits=hits, reason=f"{found.reason}; images by their captions and OCR text")


def _routed_threshold(coll: Searchable, space: TextSpace, request: SearchRequest,
                      hits: tuple[Hit, ...]) -> float | None:
    """``min_score`` as a number in the top hit's own space (None: no min_score, or no hits)."""
    if request.min_score is None or request.min_score == "" or not hits:
        return None
    if hits[0].space == "clip":
        return _clip_threshold(coll, request, "images")
    return routing.space_threshold(space, request.min_score)
