"""Hits and sources as the API shows them: public paths, and the image and thumbnail URLs of the
item whose image shows each hit."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..search import Hit
from .models import HitOut, SearchOut
from .paths import PublicPaths

__all__ = ["hit_out", "image_id_of", "search_out", "urls"]


def image_id_of(kind: str, item_id: int, parent_id: int | None) -> int | None:
    """The item whose image shows an item: an image itself, a caption's or OCR text's image, else None."""
    return item_id if kind == "image" else parent_id if kind in ("caption", "ocr") else None


def urls(image_id: int | None) -> dict[str, str | None]:
    if image_id is None:
        return {"image_url": None, "thumbnail_url": None}
    return {"image_url": f"/api/items/{image_id}/image", "thumbnail_url": f"/api/items/{image_id}/thumbnail"}


def hit_out(h: Hit, paths: PublicPaths) -> HitOut:
    iid = image_id_of(h.kind, h.id, h.parent_id)
    return HitOut(**{**h.to_dict(), "path": paths.path(h.path)}, image_id=iid, **urls(iid))


def search_out(query: dict[str, Any], target: str, k: int, hits: Sequence[Hit], t0: float,
               paths: PublicPaths, mode: str = "dense", reason: str | None = None) -> SearchOut:
    return SearchOut(query=query, target=target, k=k, mode=mode, mode_reason=reason,
                     results=[hit_out(h, paths) for h in hits],
                     seconds=time.perf_counter() - t0)
