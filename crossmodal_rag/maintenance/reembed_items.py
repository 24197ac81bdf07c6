"""Stored items embedded again from their sources: an image from its file (when the file still
has the bytes it was indexed with), a text item from its stored text, as ingest embedded them.
Used by ``reembed`` (every item, with a new encoder: :mod:`crossmodal_rag.maintenance.reembed`) and by
``reindex --repair`` (the items whose stored vectors are bad: :mod:`crossmodal_rag.maintenance.repair`).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ..encoders import ClipEncoder
from ..errors import CollectionError, ImageDecodeError
from ..ingestion.images import decode_image, read_image_file
from ..progress import tqdm

if TYPE_CHECKING:
    from ..store.metadata import Item, MetadataStore

__all__ = ["image_vectors", "read_rgb", "text_vectors"]


def read_rgb(path: Path) -> tuple[Any, str]:
    """(RGB PIL image, sha256 of the file's bytes); raises ImageDecodeError."""
    data = read_image_file(path)  # a regular file only, at most 512 MiB
    return decode_image(data, str(path)).image, hashlib.sha256(data).hexdigest()


class ItemSource(Protocol):
    """What re-embedding reads of a collection (:class:`crossmodal_rag.Collection`)."""

    folder: Path  # named in errors
    store: MetadataStore  # the items' source paths

    def get(self, ids: int | list[int]) -> list[Item]: ...


def image_vectors(coll: ItemSource, encoder: ClipEncoder, ids: np.ndarray, batch_size: int = 32,
                  progress: bool = False) -> tuple[np.ndarray, dict[int, str]]:
    """``(vectors (len(ids), D), failures)``: the image items ``ids`` embedded by ``encoder``
    from their source files (the first readable path whose bytes still have the item's
    sha256); ``failures`` maps each id that has none to why (its row stays zero)."""
    out = np.zeros((len(ids), encoder.dim), dtype=np.float32)
    failures: dict[int, str] = {}
    bar = tqdm(total=len(ids), desc="re-embed images", unit=" img", file=sys.stderr,
               disable=not progress or not len(ids), dynamic_ncols=True)
    for start in range(0, len(ids), batch_size):
        chunk = [int(i) for i in ids[start : start + batch_size]]
        found = {item.id: item for item in coll.get(chunk)}
        pixels, rows = [], []
        for row, item_id in enumerate(chunk, start=start):
            item = found.get(item_id)
            if item is None:
                failures[item_id] = "no such item"
                continue
            reasons = []
            for p in coll.store.paths_of(item.id):
                try:
                    image, sha = read_rgb(Path(p))
                except ImageDecodeError as e:
                    reasons.append(f"{p}: {e.reason}")
                    continue
                if item.sha256 and sha != item.sha256:
                    reasons.append(f"{p}: changed since it was indexed")
                    continue
                pixels.append(encoder.preprocess(image))
                rows.append(row)
                break
            else:
                failures[item.id] = "; ".join(reasons) or "no source path"
        if pixels:
            out[rows] = encoder.encode_pixels(torch.stack(pixels))
        bar.update(len(chunk))
    bar.close()
    return out, failures


def _text_of(item: Any) -> str:
    if item.kind == "passage" and item.title:
        return f"{item.title}. {item.text}"
    return item.text or ""


def text_vectors(coll: ItemSource, encoder: ClipEncoder, ids: np.ndarray) -> np.ndarray:
    """The text items ``ids`` (captions, passages, windows, OCR text) embedded by ``encoder``
    from their stored text, as ingest embedded them: ``(len(ids), D)``."""
    out = np.zeros((len(ids), encoder.dim), dtype=np.float32)
    for start in range(0, len(ids), 256):
        chunk = [int(i) for i in ids[start : start + 256]]
        texts = []
        for item in coll.get(chunk):
            text = _text_of(item)
            texts.append(text if item.kind == "window" else encoder.text_windows(text)[0])
        if len(texts) != len(chunk):
            raise CollectionError(f"{coll.folder}: text items {chunk} changed while being re-embedded")
        out[start : start + len(chunk)] = encoder.encode_texts(texts)
    return out
