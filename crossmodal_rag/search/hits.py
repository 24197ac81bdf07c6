"""The hit record every search mode returns: an item, its rank, and the score of each ranking."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ..store.items import Item

__all__ = ["Hit", "Space", "hit_of"]

#: The embedding space a hit was ranked in: CLIP's, or the collection's text space (index --text-model).
Space = Literal["clip", "text"]


@dataclass(frozen=True)
class Hit:
    """One ranked search result.

    ``score`` is the score of the ranking that ran (``mode``): the cosine in dense mode, BM25 in
    keyword mode, the fused reciprocal-rank score in hybrid mode. ``dense_score`` and
    ``keyword_score`` are the scores of each ranking, where it was computed.
    """

    rank: int  # 1-based
    score: float  # the mode's score (see the class docstring)
    id: int  # item id in the collection
    kind: str  # "image" | "caption" | "passage" | "ocr"
    path: str | None  # the image file (a caption's image for captions); None for passages
    text: str | None  # the caption or passage text; None for images
    captions: tuple[str, ...]  # an image's captions (empty for texts)
    parent_id: int | None  # for a caption: the image it describes
    title: str | None  # a passage's title
    ocr: str | None = None  # an image's OCR text (index --ocr)
    mode: str = "dense"  # the ranking that placed it: dense | keyword | hybrid
    dense_score: float | None = None  # cosine with the query embedding, in ``space`` (None: not computed)
    keyword_score: float | None = None  # BM25 (None: no keyword match)
    space: Space = "clip"  # where its dense score comes from: "clip" or "text" (the text space)
    capture: dict[str, Any] | None = None  # when/where/camera of the image (taken, city, country, make, ...)
    shard: str | None = None  # the index shard (collection) that holds it, in a search over several
    generated: tuple[str, ...] = ()  # captions a VLM wrote (index --caption-model): an image's, or this caption

    def to_dict(self) -> dict[str, Any]:
        """The hit as JSON output shows it: a dense hit without the per-ranking fields (they
        repeat ``score``), a keyword or hybrid hit with ``mode``, ``dense_score`` and
        ``keyword_score``; ``space`` only for a hit of the text space; ``shard`` only in a search
        over several shards (:mod:`crossmodal_rag.search.shards`)."""
        d = asdict(self)
        d["captions"] = list(self.captions)
        if self.mode == "dense":
            for key in ("mode", "dense_score", "keyword_score"):
                del d[key]
        if self.space == "clip":
            del d["space"]
        if self.shard is None:
            del d["shard"]
        if self.capture is None:  # no capture metadata (a passage, or an image not back-filled yet)
            del d["capture"]
        if self.generated:  # shown as generated; absent for human captions
            d["generated"] = list(self.generated)
        else:
            del d["generated"]
        return d

    def ranked(self, rank: int, **changes: Any) -> Hit:
        """This hit at ``rank`` (with ``changes``)."""
        return replace(self, rank=rank, **changes)


def hit_of(item: Item, rank: int, score: float, *, mode: str = "dense", space: Space = "clip",
           dense_score: float | None = None, keyword_score: float | None = None) -> Hit:
    """A :class:`Hit` for ``item`` (a :class:`~crossmodal_rag.store.items.Item`); a dense hit's
    ``dense_score`` is its ``score``."""
    if mode == "dense" and dense_score is None:
        dense_score = score
    return Hit(rank=rank, score=score, id=item.id, kind=item.kind, path=item.path, text=item.text,
               captions=item.captions, parent_id=item.parent_id, title=item.title,
               ocr=item.ocr, mode=mode, dense_score=dense_score,
               keyword_score=keyword_score, space=space, capture=item.capture, generated=item.generated)
