"""Hits and sources as the API shows them: public paths, and the image and thumbnail URLs of the
item whose image shows each hit."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from ..search import Hit
from .models import HitOut, SearchOut
from .paths import PublicPaths

__all__ = ["hit_out", "image_id_of", "search_out", "sharded", "urls"]


def image_id_of(kind: str, item_id: int, parent_id: int | None) -> int | None:
    """The item whose image shows an item: an image itself, a caption's or OCR text's image, else None."""
    return item_id if kind == "image" else parent_id if kind in ("caption", "ocr") else None


def urls(image_id: int | None, shard: str | None = None) -> dict[str, str | None]:
    """The image and thumbnail URLs of an item (of ``shard``, when the server searches several)."""
    if image_id is None:
        return {"image_url": None, "thumbnail_url": None}
    of = "" if shard is None else "?shard=" + quote(shard, safe="")
    return {"image_url": f"/api/items/{image_id}/image{of}", "thumbnail_url": f"/api/items/{image_id}/thumbnail{of}"}


def hit_out(h: Hit, paths: PublicPaths) -> HitOut:
    iid = image_id_of(h.kind, h.id, h.parent_id)
    return HitOut(**{**h.to_dict(), "path": paths.path(h.path)}, image_id=iid, **urls(iid, h.shard))


def sharded(result: Any) -> dict[str, Any]:
    """The fields of a result over several shards (partial, shards, missing_shards); none for one collection."""
    if not hasattr(result, "missing"):
        return {}
    d = result.to_dict()
    return {"partial": d["partial"], "shards": d["shards"], "missing_shards": d["missing_shards"]}


def search_out(query: dict[str, Any], target: str, k: int, hits: Sequence[Hit], t0: float,
               paths: PublicPaths, mode: str = "dense", reason: str | None = None,
               shards: dict[str, Any] | None = None) -> SearchOut:
    """``shards``: :func:`sharded` of the result."""
    return SearchOut(query=query, target=target, k=k, mode=mode, mode_reason=reason,
                     results=[hit_out(h, paths) for h in hits],
                     seconds=time.perf_counter() - t0, **(shards or {}))
