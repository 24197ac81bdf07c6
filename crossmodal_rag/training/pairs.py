"""Image-caption pairs for training, read from any source the ingest understands."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SourceError
from ..ingestion.sources import ImageRecord, Problem, read_source

__all__ = ["CaptionedImages", "read_captioned_images"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionedImages:
    """Images with at least one caption each (``paths[i]`` has ``captions[i]``), and the source
    items that were skipped, with why."""

    paths: list[Path]
    captions: list[tuple[str, ...]]
    skipped: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def pairs(self) -> list[tuple[Path, str]]:
        """Every (image, caption) pair, images in source order."""
        return [(p, c) for p, caps in zip(self.paths, self.captions, strict=True) for c in caps]


def read_captioned_images(
    source: str | Path, *, image_root: str | Path | None = None, allow_outside_root: bool = False,
    min_images: int = 2,
) -> CaptionedImages:
    """Read the captioned images of ``source`` (folder with same-stem ``.txt`` captions,
    ``.jsonl``/``.csv`` manifest, COCO captions ``.json``). Images without a caption and text
    passages are skipped (listed in ``skipped``); images are not decoded here.

    Raises:
        SourceError: the source cannot be read, or holds fewer than ``min_images`` captioned images.
    """
    paths: list[Path] = []
    captions: list[tuple[str, ...]] = []
    skipped: list[Problem] = []
    seen: set[Path] = set()
    for rec in read_source(source, image_root=image_root, allow_outside_root=allow_outside_root):
        if isinstance(rec, Problem):
            skipped.append(rec)
        elif not isinstance(rec, ImageRecord):
            skipped.append(Problem(rec.origin or str(source), "a text passage, not an image-caption pair"))
        elif not rec.captions:
            skipped.append(Problem(str(rec.path), "image has no caption (add a same-stem .txt file "
                                                  "or a caption column)"))
        elif rec.path in seen:
            continue
        else:
            seen.add(rec.path)
            paths.append(rec.path)
            captions.append(rec.captions)
    if skipped:
        logger.warning("%s: skipped %d item(s), e.g. %s: %s", source, len(skipped), skipped[0].item,
                       skipped[0].reason)
    if len(paths) < min_images:
        raise SourceError(
            f"{source} holds {len(paths)} captioned image(s); training needs at least {min_images} "
            "(images with same-stem .txt captions, or a manifest with image and caption columns)"
        )
    return CaptionedImages(paths, captions, skipped)
