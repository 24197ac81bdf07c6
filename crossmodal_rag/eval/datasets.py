"""Captioned image datasets for evaluation: a Karpathy-split JSON (COCO / Flickr30k), a COCO
captions JSON, or anything the ingest reads (a folder with same-stem .txt captions, a JSONL/CSV
manifest)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import SourceError
from ..ingestion.sources import ImageRecord, read_source
from ..safe_io import MAX_JSON_BYTES, read_regular_text

__all__ = ["CaptionedImage", "load_captioned"]


@dataclass(frozen=True)
class CaptionedImage:
    path: Path
    captions: tuple[str, ...]


def load_captioned(source: str | Path, *, split: str | None = None,
                   image_root: str | Path | None = None) -> list[CaptionedImage]:
    """Images with at least one caption, in a stable order.

    A Karpathy JSON (``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}``)
    is filtered by ``split`` (e.g. ``test``); image paths are ``image_root/filepath/filename``
    (default root: the JSON's folder).
    """
    path = Path(source).expanduser()
    if path.suffix.lower() == ".json" and path.is_file():
        try:
            data = json.loads(read_regular_text(path, max_bytes=MAX_JSON_BYTES, what="dataset file"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SourceError(f"cannot read {path} as JSON: {e}") from e
        images = data.get("images") if isinstance(data, dict) else None
        if isinstance(images, list) and images and isinstance(images[0], dict) and "sentences" in images[0]:
            root = Path(image_root).expanduser() if image_root else path.parent
            out = []
            for img in images:
                if split and img.get("split") != split:
                    continue
                caps = tuple(s.get("raw", "").strip() for s in img.get("sentences", []) if s.get("raw", "").strip())
                if caps:
                    out.append(CaptionedImage((root / img.get("filepath", "") / img["filename"]).resolve(), caps))
            return out
    records = read_source(path, image_root=image_root)
    return [CaptionedImage(r.path, r.captions) for r in records if isinstance(r, ImageRecord) and r.captions]
