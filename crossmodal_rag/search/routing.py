"""Query routing for collections with a text space (``index --text-model``).

A text query goes to the space that was trained for the pair it asks about:

* ``target="texts"``: the text space (sentence encoder over captions, passages, OCR text);
* ``target="images"``: CLIP (its image index), as without a text space;
* ``target="all"``: both lists, merged by reciprocal rank fusion (:mod:`crossmodal_rag.search.fusion`).
  A MiniLM cosine and a CLIP cosine are not on one scale (MiniLM's related texts score 0.5-0.9,
  CLIP's text-image matches 0.2-0.35), so sorting the union by score would let the text space
  crowd out every image; RRF uses ranks only. Each merged hit keeps its own space's cosine as
  ``score`` (and ``space`` says which); the order is the fused one.

Keyword and hybrid modes (:mod:`crossmodal_rag.search.hybrid`) fuse the text space's ranking with
the keyword ranking in the same way for ``texts``. Image queries, vectors and query arithmetic
(``plus``/``minus``) stay in CLIP's space (:func:`routes`). ``min_score`` applies to the space a
hit came from: ``auto`` is calibrated per space (:func:`text_space_threshold` for the text space).
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import QueryError
from .hits import Hit
from .request import SearchRequest
from .text_space import TextSpace

__all__ = ["routes", "space_threshold", "text_space_threshold"]

logger = logging.getLogger(__name__)


def routes(request: SearchRequest) -> bool:
    """Whether ``request`` is one the text space answers (when the collection has one): a text
    query alone, for texts or all, with routing asked for."""
    return (request.text_space and request.has_text and request.image is None and request.vector is None
            and not request.plus and not request.minus and request.target != "images")


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


def space_threshold(space: TextSpace, min_score: float | str | None) -> float | None:
    """``min_score`` in the text space: a number, ``"auto"`` (:func:`text_space_threshold`), or None."""
    if min_score is None or min_score == "":
        return None
    if isinstance(min_score, str) and min_score.strip().lower() == "auto":
        return text_space_threshold(space)
    try:
        return float(min_score)
    except ValueError:
        raise QueryError(f"min score must be a number or 'auto', got {min_score!r}") from None


def text_dense_scores(space: TextSpace, vector: np.ndarray, hits: list[Hit]) -> list[Hit]:
    """``hits`` with ``dense_score`` filled in where it is missing: the cosine of the text-space
    query ``vector`` ``(D,)`` with each item's own row (-1.0 for an item the space lacks)."""
    missing = [h.id for h in hits if h.dense_score is None]
    if not missing:
        return hits
    rows = np.searchsorted(space.ids, missing)
    found = (rows < len(space.ids)) & (space.ids[np.minimum(rows, len(space.ids) - 1)] == missing) \
        if len(space.ids) else np.zeros(len(missing), bool)
    scores = {i: float(space.vectors[r] @ vector) if ok else -1.0
              for i, r, ok in zip(missing, rows.tolist(), found.tolist(), strict=True)}
    return [h if h.dense_score is not None else h.ranked(h.rank, dense_score=scores[h.id]) for h in hits]
