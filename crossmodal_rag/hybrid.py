"""Search modes: ``dense`` (the CLIP index), ``keyword`` (the full-text index, BM25) and
``hybrid`` (the two ranked lists fused by reciprocal rank fusion, k = 60).

query text -> keyword ranking (store.fulltext) ---\\
query vector -> dense ranking (search.search_vectors) --> RRF (fusion) -> hits

Keyword hits are the texts that match (captions, passages, OCR text) and, for ``target="images"``,
the images those captions and OCR texts belong to, each image ranked by its best-matching text.
``--where`` filters every mode. ``min_score`` keeps its dense meaning in every mode: a hit whose
cosine with the query embedding is below it is dropped (keyword mode then embeds the query too).

A hybrid hit's ``score`` is its fused RRF score; ``dense_score`` (the cosine) and
``keyword_score`` (BM25, None when the keyword index did not find it) say where it came from.

A query without words to match (emoji, punctuation: :func:`keyword_note` says so) finds no
keyword hits: keyword mode returns none, hybrid mode the dense half alone, and auto mode searches
densely. Auto mode also searches densely, with a warning, when the keyword index is damaged
(:class:`~crossmodal_rag.store.fulltext.DamagedIndexError`; an explicit keyword or hybrid search
raises it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .errors import QueryError
from .fusion import RRF_K, reciprocal_rank_fusion
from .store import fulltext

__all__ = ["MODES", "RankedHit", "choose_mode", "fuse", "keyword_hits", "keyword_note", "keyword_text", "rag_hits",
           "search"]

logger = logging.getLogger(__name__)

MODES = ("dense", "keyword", "hybrid")
#: Each list fused in hybrid mode is this many times ``k`` deep (at least :data:`MIN_DEPTH`).
DEPTH_FACTOR = 4
MIN_DEPTH = 40


@dataclass(frozen=True)
class RankedHit:
    """A search hit of the keyword or hybrid mode: the fields of
    :class:`~crossmodal_rag.search.Hit` plus the mode and the scores of each ranking."""

    rank: int
    score: float  # the mode's score: BM25 (keyword) or fused RRF (hybrid)
    id: int
    kind: str
    path: str | None
    text: str | None
    captions: tuple[str, ...]
    parent_id: int | None
    title: str | None
    mode: str = "hybrid"
    dense_score: float | None = None  # cosine with the query embedding (None: not computed)
    keyword_score: float | None = None  # BM25 (None: no keyword match)
    ocr: str | None = None  # an image's OCR text (index --ocr)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["captions"] = list(self.captions)
        return d


def _from_item(item: Any, rank: int, score: float, mode: str, **scores: float | None) -> RankedHit:
    return RankedHit(rank=rank, score=score, id=item.id, kind=item.kind, path=item.path, text=item.text,
                     captions=item.captions, parent_id=item.parent_id, title=item.title, mode=mode,
                     ocr=getattr(item, "ocr", None), **scores)


def choose_mode(mode: str | None, store: Any, *, has_text: bool, query: str | None = None) -> str:
    """The mode to search in: ``mode`` checked, or (None / ``"auto"``) ``hybrid`` when the query has
    text (and, when ``query`` is given, words for keyword search to match) and the collection has
    texts in a readable keyword index, else ``dense``."""
    if mode in (None, "auto"):
        if not has_text or (query is not None and keyword_note(query) is not None):
            return "dense"
        return "hybrid" if _indexed(store) else "dense"
    if mode not in MODES:
        raise QueryError(f"unknown search mode {mode!r}; choose one of {', '.join(MODES)} (or auto)")
    if mode != "dense" and not has_text:
        raise QueryError(f"{mode} search needs a text query (an image alone searches in dense mode)")
    return mode


def _indexed(store: Any) -> bool:
    try:
        return fulltext.store_count(store) > 0
    except fulltext.DamagedIndexError as e:  # auto mode: dense search needs no keyword index
        logger.warning("%s; searching densely", e)
        return False


def keyword_note(query: str | None) -> str | None:
    """Why keyword search finds nothing for ``query`` whatever the collection holds (it has no
    letters or digits: emoji, punctuation), or None when it holds words to match."""
    if query is None or not query.strip():
        return None
    try:
        parsed = fulltext.parse_keyword_query(keyword_text(query))
    except QueryError:
        return None  # too long, or not arithmetic: the search itself says so
    if not parsed.empty:
        return None
    shown = query if len(query) <= 60 else query[:57] + "..."
    return f"keyword query {shown!r} holds no words (letters or digits) to match: no keyword hits"


def keyword_text(query: str) -> str:
    """The words of a text query that keyword search matches: the positive terms of query
    arithmetic (``cat + snow - indoors`` -> ``cat snow``); a plain query as it is."""
    from .query import parse_query

    return " ".join(t.text for t in parse_query(query) if t.weight > 0)


def _ranked_texts(store: Any, query: str, depth: int | None) -> list[tuple[int, float]]:
    return fulltext.search_store(store, keyword_text(query), limit=depth)


def keyword_hits(store: Any, query: str, k: int, target: str = "images",
                 allowed: dict[str, np.ndarray] | None = None) -> list[RankedHit]:
    """The best ``k`` keyword hits for ``target`` (``images``, ``texts``, ``all``), ``score`` =
    BM25. An image scores as its best-matching caption or OCR text. ``allowed``: ids per index a
    filter lets through (see :func:`crossmodal_rag.filters.allowed_ids`)."""
    ranked = _ranked_texts(store, query, None if allowed is not None or target != "texts" else k)
    ok = None if allowed is None else {n: set(np.asarray(v).tolist()) for n, v in allowed.items()}
    items = store.get_items([i for i, _ in ranked])
    parents = store.get_items({it.parent_id for it in items.values() if it.parent_id is not None})
    hits: list[RankedHit] = []
    seen: set[int] = set()
    for item_id, score in ranked:
        item = items.get(item_id)
        if item is None:
            continue
        chosen = []
        if target in ("texts", "all") and (ok is None or item_id in ok["text"]):
            chosen.append(item)
        parent = parents.get(item.parent_id) if item.parent_id is not None else None
        if target in ("images", "all") and parent is not None and parent.kind == "image" \
                and (ok is None or parent.id in ok["image"]):
            chosen.append(parent)
        for it in chosen:
            if it.id not in seen:
                seen.add(it.id)
                hits.append(_from_item(it, len(hits) + 1, score, "keyword", keyword_score=score))
        if len(hits) >= k:
            break
    return hits[:k]


def fuse(dense: Sequence[Any], keyword: Sequence[RankedHit], k: int, rrf_k: int = RRF_K) -> list[RankedHit]:
    """Hybrid hits: ``dense`` and ``keyword`` hit lists (best first) fused by reciprocal rank
    fusion; ``score`` = the fused score, ``dense_score`` = the hit's dense score where the dense
    list holds it."""
    by_id: dict[int, Any] = {}
    for h in (*keyword, *dense):  # a keyword hit carries the item's OCR text
        by_id.setdefault(h.id, h)
    dense_of = {h.id: h.score for h in dense}
    keyword_of = {h.id: h.score for h in keyword}
    fused = reciprocal_rank_fusion([[h.id for h in dense], [h.id for h in keyword]], rrf_k, limit=k)
    return [_from_item(by_id[i], rank, score, "hybrid", dense_score=dense_of.get(i),
                       keyword_score=keyword_of.get(i))
            for rank, (i, score) in enumerate(fused, start=1)]


def _dense_scores(coll: Any, vector: np.ndarray, hits: list[RankedHit]) -> list[RankedHit]:
    """``hits`` with ``dense_score`` filled in from the stored vectors where it is missing."""
    missing = [h.id for h in hits if h.dense_score is None]
    if not missing:
        return hits
    scores = dict(zip(missing, (coll.store.vectors(missing, coll.manifest.dim) @ vector).tolist(), strict=True))
    return [h if h.dense_score is not None else _replace(h, dense_score=float(scores[h.id])) for h in hits]


def _replace(hit: RankedHit, **changes: Any) -> RankedHit:
    from dataclasses import replace

    return replace(hit, **changes)


def search(coll: Any, query: str | None = None, *, image: Any = None, k: int = 10, target: str = "images",
           where: list[str] | str | None = None, min_score: float | str | None = None,
           plus: list[str] | None = None, minus: list[str] | None = None, params: Any = None,
           mode: str | None = None) -> tuple[str, list[Any]]:
    """Search ``coll`` (a :class:`~crossmodal_rag.collection.Collection`) in ``mode`` (None or
    ``"auto"``: see :func:`choose_mode`); returns ``(the mode used, hits)``. Dense hits are the
    collection's own :class:`~crossmodal_rag.search.Hit` records; keyword and hybrid hits are
    :class:`RankedHit` records."""
    from .filters import allowed_ids, parse_where
    from .search import check_k, check_target

    check_target(target)
    k = check_k(k)
    has_text = query is not None and bool(query.strip())
    chosen = choose_mode(mode, coll.store, has_text=has_text, query=query)

    def dense() -> tuple[str, list[Any]]:
        return "dense", coll.search(query, image=image, k=k, target=target, where=where, min_score=min_score,
                                    plus=plus, minus=minus, params=params)

    if chosen == "dense":
        return dense()
    threshold = coll.resolve_min_score(min_score, query_is_image=image is not None, target=target)
    conditions = parse_where(where)
    allowed = allowed_ids(coll.store, conditions) if conditions else None
    depth = k if chosen == "keyword" and threshold is None else max(k * DEPTH_FACTOR, MIN_DEPTH)
    try:
        keyword = keyword_hits(coll.store, query, depth, target, allowed)
    except fulltext.DamagedIndexError as e:
        if mode not in (None, "auto"):
            raise
        logger.warning("%s; searching densely", e)
        return dense()
    if chosen == "keyword" and threshold is None:
        return chosen, keyword
    vector = coll.embed_query(query, image, plus=plus, minus=minus)
    if chosen == "keyword":
        hits = _dense_scores(coll, vector, keyword)
    else:
        dense = coll.search_vectors(vector[None, :], k=depth, target=target, where=where, min_score=threshold,
                                    params=params)[0]
        hits = _dense_scores(coll, vector, fuse(dense, keyword, len(dense) + len(keyword)))
    if threshold is not None:
        hits = [h for h in hits if h.dense_score >= threshold]
    return chosen, [_replace(h, rank=r) for r, h in enumerate(hits[:k], start=1)]


def rag_hits(coll: Any, question: str | None, *, k: int, target: str = "texts",
             where: list[str] | str | None = None, min_score: float | str | None = None,
             mode: str | None = None) -> tuple[str, list[RankedHit] | None]:
    """Retrieval for RAG in ``mode``: ``(the mode used, hits)``, hits None in dense mode (the
    pipeline retrieves as before). Keyword and hybrid hits keep their order but carry the dense
    cosine as ``score``, so that priors (softmax of score / temperature) and the abstain
    threshold mean what they mean in dense mode."""
    chosen = choose_mode(mode, coll.store, has_text=bool(question and question.strip()), query=question)
    if chosen == "dense":
        return chosen, None
    chosen, hits = search(coll, question, k=k, target=target, where=where, min_score=min_score,
                          mode=chosen if mode not in (None, "auto") else mode)
    if chosen == "dense":  # auto mode and a damaged keyword index
        return chosen, None
    if any(h.dense_score is None for h in hits):
        hits = _dense_scores(coll, coll.embed_query(question), hits)
    return chosen, [_replace(h, score=float(h.dense_score)) for h in hits]
