"""Search in a text-only collection (``index --text-only``): everything is found by its words.

A text-only collection has no image encoder (:mod:`crossmodal_rag.encoders.textonly`): its
stored vectors are stand-ins that mean nothing for search. So :mod:`crossmodal_rag.search.engine`
runs every request of such a collection as a search of its texts (captions, passages, OCR text:
the text space, the keyword index, or both, as the mode says), and this module

- refuses what cannot be answered without an image encoder (:func:`refusal`): an image query, a
  precomputed vector, ``plus``/``minus`` texts, a dense search with no text space, each with a
  :class:`~crossmodal_rag.errors.QueryError` naming why and what works instead;
- turns the ranked texts into images for ``target="images"`` (and adds them for ``"all"``,
  :func:`with_images`): an image ranks as its best-ranked caption or OCR text, as keyword search
  ranks images in any collection (:func:`crossmodal_rag.search.hybrid.keyword_hits`).

text query -> texts ranked (text space / keyword / both) --with_images--> images by their texts
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..encoders.spec import TEXT_ONLY
from ..errors import QueryError
from ..store.metadata import MetadataStore
from .hits import Hit, hit_of
from .request import SearchRequest

__all__ = ["TEXTS_PER_IMAGE", "is_text_only", "refusal", "text_depth", "with_images"]

#: Texts ranked per image asked for: an image may have several captions and an OCR text.
TEXTS_PER_IMAGE = 8


def is_text_only(encoder: str) -> bool:
    """Whether a collection whose manifest names ``encoder`` is text-only."""
    return encoder == TEXT_ONLY


def _why(folder: Path) -> str:
    # the folder by its name: the REST API answers this message too
    return (f"collection {folder.name!r} is a text-only collection (indexed with --text-only): it "
            "has no image encoder (no CLIP weights)")


def refusal(folder: Path, request: SearchRequest, *, has_text_space: bool,
            keyword_only: bool) -> QueryError | None:
    """The error for a ``request`` a text-only collection in ``folder`` cannot answer, or None.
    ``has_text_space``: the collection has its text space; ``keyword_only``: the request needs
    no embedding (keyword mode without ``min_score``)."""
    by_words = ("search it by words (captions, passages, OCR text), or index the images into a new "
                "collection with CLIP weights (--model) to search by image")
    if request.image is not None:
        return QueryError(f"{_why(folder)}, so it cannot be searched by an image; {by_words}")
    if request.vector is not None:
        return QueryError(f"{_why(folder)}, so it cannot be searched by a vector; {by_words}")
    if request.plus or request.minus:
        return QueryError(f"{_why(folder)}: --plus/--minus texts need one; write the query's words "
                          "instead (the text space reads a + b - c in the query itself)")
    if not request.has_text:
        return QueryError(f"{_why(folder)}: give a text query")
    if not has_text_space and not keyword_only:
        return QueryError(
            f"{_why(folder)} and no text space, so only keyword search works: add --mode keyword, "
            f"or give it a text space: `crossmodal-rag index SOURCE -c {folder.name} --text-model minilm`")
    return None


def text_depth(request: SearchRequest, fused_depth: int) -> int:
    """How many texts to rank for ``request``: ``k`` for texts; enough to find ``k`` images."""
    if request.target == "texts":
        return request.k
    return max(fused_depth, TEXTS_PER_IMAGE * request.k)


def with_images(store: MetadataStore, texts: Sequence[Hit], target: str, k: int,
                allowed: Mapping[str, np.ndarray] | None = None) -> tuple[Hit, ...]:
    """The best ``k`` hits for ``target`` from ranked text hits: for ``"images"`` each text's
    image (captions and OCR text have one; passages none), an image ranked at its best text; for
    ``"all"`` each text followed by its image, unless already listed. ``allowed``: the item ids
    per index a ``--where`` filter lets through (None: all)."""
    if target == "texts":
        return tuple(h.ranked(r) for r, h in enumerate(texts[:k], start=1))
    ok = None if allowed is None else {name: set(np.asarray(v).tolist()) for name, v in allowed.items()}
    parents = store.get_items(sorted({h.parent_id for h in texts if h.parent_id is not None}))
    out: list[Hit] = []
    seen: set[tuple[str, int]] = set()
    for h in texts:
        chosen: list[Hit] = []
        if target == "all" and (ok is None or h.id in ok.get("text", ())):
            chosen.append(h)
        parent = parents.get(h.parent_id) if h.parent_id is not None else None
        if parent is not None and parent.kind == "image" and (ok is None or parent.id in ok.get("image", ())):
            chosen.append(hit_of(parent, 0, h.score, mode=h.mode, space="text",
                                 dense_score=h.dense_score, keyword_score=h.keyword_score))
        for hit in chosen:
            key = ("image" if hit.kind == "image" else "text", hit.id)
            if key not in seen:
                seen.add(key)
                out.append(hit.ranked(len(out) + 1))
        if len(out) >= k:
            break
    return tuple(out[:k])
