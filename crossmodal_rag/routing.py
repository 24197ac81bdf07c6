"""Query routing for collections with a text space (``index --text-model``).

A text query goes to the space that was trained for the pair it asks about:

* ``--target texts``: the text space (sentence encoder over captions, passages, OCR text);
* ``--target images``: CLIP (its image index), as without a text space;
* ``--target all``: both lists, merged by reciprocal rank fusion (:mod:`crossmodal_rag.fusion`).
  A MiniLM cosine and a CLIP cosine are not on one scale (MiniLM's related texts score 0.5-0.9,
  CLIP's text-image matches 0.2-0.35), so sorting the union by score would let the text space
  crowd out every image; RRF uses ranks only. Each merged hit keeps its own space's cosine as
  ``score``; the order is the fused one.

Keyword and hybrid modes (:mod:`crossmodal_rag.hybrid`) fuse the text space's ranking with the
keyword ranking in the same way for ``texts``. Image queries and query arithmetic
(``plus``/``minus``) stay in CLIP's space. ``min_score`` applies to the space a hit came from:
``auto`` is calibrated per space (:func:`text_space_threshold` for the text space).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .fusion import RRF_K, reciprocal_rank_fusion
from .text_space import TextSpace, open_text_space

__all__ = ["cached_text_space", "rag_search", "search", "text_space_threshold"]

logger = logging.getLogger(__name__)

_SPACES: dict[tuple[str, int], TextSpace | None] = {}


def cached_text_space(coll: Any) -> TextSpace | None:
    """The collection's text space, loaded once per version of its manifest file."""
    manifest = Path(coll.folder) / "text_space" / "manifest.json"
    try:
        stamp = manifest.stat().st_mtime_ns
    except OSError:
        return None
    key = (str(manifest), stamp)
    if key not in _SPACES:
        if len(_SPACES) > 8:
            _SPACES.clear()
        _SPACES[key] = open_text_space(coll)
    return _SPACES[key]


def text_space_threshold(space: TextSpace, quantile: float = 0.99, max_pairs: int = 20000,
                         seed: int = 0) -> float:
    """``min_score auto`` in the text space: the ``quantile`` of the cosine between unrelated
    rows (random pairs of different rows; a related pair rarely scores below it). ``max_pairs``
    bounds the cost; deterministic for a given ``seed``."""
    n = len(space)
    if n < 2:
        return -1.0
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, size=max_pairs)
    b = rng.integers(0, n, size=max_pairs)
    keep = a != b
    sims = (space.vectors[a[keep]] * space.vectors[b[keep]]).sum(1)
    return float(np.quantile(sims, quantile))


def _threshold(space: TextSpace, min_score: float | str | None) -> float | None:
    if min_score is None or min_score == "":
        return None
    if isinstance(min_score, str) and min_score.strip().lower() == "auto":
        return text_space_threshold(space)
    from .errors import QueryError

    try:
        return float(min_score)
    except ValueError:
        raise QueryError(f"min score must be a number or 'auto', got {min_score!r}") from None


def search(coll: Any, query: str | None, *, image: Any = None, k: int = 10, target: str = "images",
           where: list[str] | str | None = None, min_score: float | str | None = None,
           plus: list[str] | None = None, minus: list[str] | None = None, params: Any = None,
           mode: str | None = None) -> tuple[str, list[Any]] | None:
    """``(mode used, hits)`` for a text query routed as the module docstring says, or None when
    the collection has no text space or the query is for CLIP alone (then search as before)."""
    from . import hybrid
    from .search import check_k, check_target

    if image is not None or plus or minus or not query or not query.strip():
        return None
    if check_target(target) == "images":
        return None
    space = cached_text_space(coll)
    if space is None:
        return None
    k = check_k(k)
    chosen = hybrid.choose_mode(mode, coll.store, has_text=True)
    threshold = _threshold(space, min_score)
    depth = k if chosen == "dense" else max(k * hybrid.DEPTH_FACTOR, hybrid.MIN_DEPTH)
    texts = space.search(coll, query, depth, where, threshold)
    if chosen != "dense":
        from .filters import allowed_ids, parse_where

        conditions = parse_where(where)
        allowed = allowed_ids(coll.store, conditions) if conditions else None
        keyword = hybrid.keyword_hits(coll.store, query, depth, "texts", allowed)
        texts = keyword[:depth] if chosen == "keyword" else hybrid.fuse(texts, keyword, depth)
    if target == "texts":
        return chosen, [replace(h, rank=r) for r, h in enumerate(texts[:k], start=1)]
    from .search import TargetEmptyError

    try:
        images = coll.search(query, k=depth, target="images", where=where, min_score=min_score,
                             params=params)
    except TargetEmptyError:
        images = []
    by_key = {("image", h.id): h for h in images} | {("text", h.id): h for h in texts}
    fused = reciprocal_rank_fusion([[("image", h.id) for h in images], [("text", h.id) for h in texts]],
                                   RRF_K, limit=k)
    return chosen, [replace(by_key[key], rank=r) for r, (key, _) in enumerate(fused, start=1)]


def rag_search(coll: Any, question: str | None, *, k: int, target: str,
               where: list[str] | str | None = None,
               min_score: float | str | None = None) -> tuple[list[Any], float | None] | None:
    """Retrieval for ``ask`` in a collection with a text space: ``(hits, threshold)``, or None
    as :func:`search` (then the pipeline retrieves with CLIP). The hits are not cut by
    ``min_score`` (the pipeline abstains when the top hit is below it and shows the nearest
    sources, as with CLIP); ``threshold`` is ``min_score`` in the top hit's own space: a text
    hit's is the text space's (``auto``: :func:`text_space_threshold`), an image hit's CLIP's."""
    routed = search(coll, question, k=k, target=target, where=where, min_score=None, mode="dense")
    if routed is None:
        return None
    hits = routed[1]
    if min_score is None or min_score == "" or not hits:
        return hits, None
    if hits[0].kind == "image":
        return hits, coll.resolve_min_score(min_score, query_is_image=False, target="images")
    space = cached_text_space(coll)
    assert space is not None  # search() routed to it
    return hits, _threshold(space, min_score)
