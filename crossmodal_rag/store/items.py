"""An item as the metadata store hands it out (:class:`Item`), the type each column of an item
row must hold (a damaged or hostile file may store any type anywhere), and small helpers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["FILTER_COLUMNS", "INDEX_OF_KIND", "ROW_TYPES", "Item", "chunks"]

#: Which FAISS index holds each item kind.
INDEX_OF_KIND = {"image": "image", "caption": "text", "passage": "text", "window": "text", "ocr": "text"}


@dataclass(frozen=True)
class Item:
    """One stored item (an image, a caption of an image, the text read in an image, or a text passage)."""

    id: int
    kind: str  # "image" | "caption" | "ocr" | "passage"
    path: str | None  # image file (for a caption or OCR text: its image's file); None for passages
    text: str | None  # caption or passage text
    captions: tuple[str, ...]  # an image's captions
    parent_id: int | None  # a caption's image
    title: str | None
    ext_id: str | None  # the id a passage corpus gave it
    width: int | None
    height: int | None
    format: str | None
    size_bytes: int | None
    sha256: str | None
    added_at: float
    extra: dict[str, Any]
    ocr: str | None = None  # an image's OCR text (index --ocr), None without
    capture: dict[str, Any] | None = None  # when/where/camera (store/captures.py); a caption's: its image's
    generated: tuple[str, ...] = ()  # captions a VLM wrote (store/generated.py): an image's, or a caption's own text

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["captions"] = list(self.captions)
        if self.capture is None:  # no capture metadata read (a passage, or not back-filled yet)
            del d["capture"]
        if self.generated:
            d["generated"] = list(self.generated)
        else:
            del d["generated"]
        return d


_TEXT, _INT = (str, type(None)), (int, type(None))
#: Column -> accepted Python types of a row as :meth:`MetadataStore.get_items` selects it.
ROW_TYPES = (("id", int), ("kind", str), ("parent_id", _INT), ("sha256", _TEXT), ("text", _TEXT),
              ("title", _TEXT), ("ext_id", _TEXT), ("width", _INT), ("height", _INT),
              ("format", _TEXT), ("size_bytes", _INT), ("extra", _TEXT), ("added_at", (int, float)))


#: Columns of an item as :meth:`MetadataStore.filter_candidates` reads them.
FILTER_COLUMNS = ("id", "kind", "parent_id", "text", "title", "format", "size_bytes", "width",
                   "height", "added_at", "extra")


def chunks(seq: Sequence[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(seq), n):
        yield list(seq[i : i + n])
