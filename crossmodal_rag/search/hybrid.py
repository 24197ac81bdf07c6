"""Search modes: ``dense`` (the CLIP index), ``keyword`` (the full-text index, BM25),
``hybrid`` (the two ranked lists fused by reciprocal rank fusion, k = 60) and ``auto``, the
default: the keyword ranking joins the dense one only when the query's words are informative
(:mod:`crossmodal_rag.search.evidence`), fused by min-max scaled scores.

query text -> keyword ranking (store.fulltext) ---\\
query vector -> dense ranking (search.dense) --> RRF (hybrid) or evidence fusion (auto) -> hits

Keyword hits are the texts that match (captions, passages, OCR text) and, for ``target="images"``,
the images those captions and OCR texts belong to, each image ranked by its best-matching text.
``--where`` filters every mode. ``min_score`` keeps its dense meaning in every mode: a hit whose
cosine with the query embedding is below it is dropped (keyword mode then embeds the query too).

A fused hit's ``score`` is its fused score (RRF in hybrid mode, the evidence fusion in auto
mode); ``dense_score`` (the cosine) and ``keyword_score`` (BM25, None when the keyword index did
not find it) say where it came from. Both lists are fused :data:`FUSED_DEPTH` deep whatever ``k``
(at least ``k``), so the first rows of a page do not depend on its length.

A query without words to match (emoji, punctuation: :func:`keyword_note` says so) finds no
keyword hits: keyword mode returns none, hybrid mode the dense half alone, and auto mode searches
densely. Auto mode also searches densely, with a warning, when the keyword index is damaged
(:class:`~crossmodal_rag.store.fulltext.DamagedIndexError`; an explicit keyword or hybrid search
raises it), and whenever :func:`weigh` finds no informative keyword (a long pasted text, a
question of common words). :mod:`crossmodal_rag.search.engine` runs the modes; this module holds their steps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ..errors import QueryError
from ..store import bm25, fulltext
from ..store.bm25 import Bm25Stats
from ..store.metadata import MetadataStore
from . import evidence
from .evidence import Evidence, EvidenceSettings
from .fusion import RRF_K, reciprocal_rank_fusion
from .hits import Hit, Space, hit_of
from .request import check_mode

__all__ = ["EVIDENCE", "FUSED_DEPTH", "choose_mode", "dense_scores", "fuse", "fuse_evidence", "fused_depth",
           "keyword_hits", "keyword_note", "keyword_text", "weigh"]

logger = logging.getLogger(__name__)

#: The rule of ``auto`` mode: the measured defaults (docs/search-modes.md, "How the default was chosen").
EVIDENCE = EvidenceSettings()
#: Each list fused (hybrid and auto) is this deep whatever ``k`` (:func:`fused_depth`).
FUSED_DEPTH = EVIDENCE.depth


def fused_depth(k: int) -> int:
    """How deep each fused list is for ``k`` hits: :data:`FUSED_DEPTH`, or ``k`` when larger."""
    return max(FUSED_DEPTH, k)


def choose_mode(mode: str | None, store: MetadataStore, *, has_text: bool, query: str | None = None) -> str:
    """The mode to search in: ``mode`` checked, or (None / ``"auto"``) ``hybrid`` when the query has
    text (and, when ``query`` is given, words for keyword search to match) and the collection has
    texts in a readable keyword index, else ``dense``."""
    if mode in (None, "auto"):
        if not has_text or (query is not None and keyword_note(query) is not None):
            return "dense"
        return "hybrid" if _indexed(store) else "dense"
    check_mode(mode)
    if mode != "dense" and not has_text:
        raise QueryError(f"{mode} search needs a text query (an image alone searches in dense mode)")
    return mode


def _indexed(store: MetadataStore) -> bool:
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


def weigh(store: MetadataStore, query: str) -> Evidence:
    """Auto mode's decision for a text ``query`` (:func:`~crossmodal_rag.search.evidence.weigh_evidence`
    with the document frequencies of its words in this collection's word index): dense, or hybrid
    with a keyword query and weight, and why. A damaged index decides dense, with a warning.
    Raises :class:`~crossmodal_rag.errors.QueryError` only for query arithmetic it cannot read."""
    words = keyword_text(query)
    try:
        df, n = fulltext.doc_freqs(store, evidence.lookup_words(words))
    except fulltext.DamagedIndexError as e:
        logger.warning("%s; searching densely", e)
        return Evidence("dense", None, 0.0, "dense: the keyword index is damaged (run reindex)")
    return evidence.weigh_evidence(words, df, n, EVIDENCE)


def keyword_hits(store: MetadataStore, query: str, k: int, target: str = "images",
                 allowed: dict[str, np.ndarray] | None = None, *, arithmetic: bool = True,
                 stats: Bm25Stats | None = None) -> list[Hit]:
    """The best ``k`` keyword hits for ``target`` (``images``, ``texts``, ``all``), ``score`` =
    BM25. An image scores as its best-matching caption or OCR text. ``allowed``: ids per index a
    filter lets through (see :func:`crossmodal_rag.search.filters.allowed_ids`). ``arithmetic``:
    ``query`` is a search query (its added terms are matched, :func:`keyword_text`); False: it
    is a keyword query already (:attr:`Evidence.keyword_query`). ``stats``: BM25 statistics of
    several shards summed (:mod:`crossmodal_rag.store.bm25`), for scores the union would give."""
    text = keyword_text(query) if arithmetic else query
    depth = None if allowed is not None or target != "texts" else k
    ranked = (fulltext.search_store(store, text, limit=depth) if stats is None
              else bm25.search_global(store, text, stats, limit=depth))
    ok = None if allowed is None else {n: set(np.asarray(v).tolist()) for n, v in allowed.items()}
    items = store.get_items([i for i, _ in ranked])
    parents = store.get_items({it.parent_id for it in items.values() if it.parent_id is not None})
    hits: list[Hit] = []
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
                hits.append(hit_of(it, len(hits) + 1, score, mode="keyword", keyword_score=score))
        if len(hits) >= k:
            break
    return hits[:k]


def fuse(dense: Sequence[Hit], keyword: Sequence[Hit], k: int, rrf_k: int = RRF_K, *,
         space: Space = "clip") -> list[Hit]:
    """Hybrid hits: ``dense`` and ``keyword`` hit lists (best first) fused by reciprocal rank
    fusion; ``score`` = the fused score, ``dense_score`` = the hit's dense score where the dense
    list holds it; ``space``: the space of the dense list."""
    by_id: dict[int, Hit] = {}
    for h in (*keyword, *dense):  # a keyword hit carries the item's OCR text
        by_id.setdefault(h.id, h)
    dense_of = {h.id: h.score for h in dense}
    keyword_of = {h.id: h.score for h in keyword}
    fused = reciprocal_rank_fusion([[h.id for h in dense], [h.id for h in keyword]], rrf_k, limit=k)
    return [by_id[i].ranked(rank, score=score, mode="hybrid", dense_score=dense_of.get(i),
                            keyword_score=keyword_of.get(i), space=space)
            for rank, (i, score) in enumerate(fused, start=1)]


def fuse_evidence(dense: Sequence[Hit], keyword: Sequence[Hit], ev: Evidence, k: int, *,
                  space: Space = "clip") -> list[Hit]:
    """Auto mode's hits: ``dense`` (cosine) and ``keyword`` (BM25) hit lists fused as ``ev`` says
    (:func:`~crossmodal_rag.search.evidence.fuse_evidence`: min-max scaled scores, the keyword
    side weighted ``ev.keyword_weight``); ``score`` = the fused score, ``dense_score`` the cosine
    where the dense list holds it, the best ``k``."""
    by_id: dict[int, Hit] = {}
    for h in (*keyword, *dense):
        by_id.setdefault(h.id, h)
    dense_of = {h.id: h.score for h in dense}
    keyword_of = {h.id: h.score for h in keyword}
    fused = evidence.fuse_evidence(ev, [(h.id, h.score) for h in dense], [(h.id, h.score) for h in keyword],
                                   settings=replace(EVIDENCE, depth=fused_depth(k)), limit=k)
    return [by_id[i].ranked(rank, score=score, mode="hybrid", dense_score=dense_of.get(i),
                            keyword_score=keyword_of.get(i), space=space)
            for rank, (i, score) in enumerate(fused, start=1)]


def dense_scores(store: MetadataStore, dim: int, vector: np.ndarray, hits: list[Hit]) -> list[Hit]:
    """``hits`` with ``dense_score`` filled in where it is missing: the cosine of ``vector``
    ``(D,)`` with each item's stored ``dim``-d CLIP vector."""
    missing = [h.id for h in hits if h.dense_score is None]
    if not missing:
        return hits
    scores = dict(zip(missing, (store.vectors(missing, dim) @ vector).tolist(), strict=True))
    return [h if h.dense_score is not None else h.ranked(h.rank, dense_score=float(scores[h.id])) for h in hits]
