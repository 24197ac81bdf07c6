"""OCR input budget: a decoded image in, one bounded picture for the OCR engine out, and the boxes
read in it mapped back to the image.

Why: RapidOCR scales the short side of its input up to 30 pixels, letterboxes anything wider
than 8:1 to 8:1 and then scales the short side up to 736 for its detector, so a 1000x1 strip
became a 30000x7500 detector input (7.8 GB resident) and a 60000x1 PNG (1875x1 as decoded)
grew past 22 GB. What reaches the engine is therefore bounded here::

    decoded image (long side <= 2048 after decoding)
      -> thinner than OCR_MIN_SIDE, or more elongated than OCR_MAX_ASPECT:1?
             OcrInputError, a one-line reason (the image is skipped)
      -> at most OCR_TILE_ASPECT:1 (the engine's own letterbox ratio)? read as it is
      -> longer: cut along the long side into tiles of OCR_TILE_ASPECT x the short side,
         overlapping by OCR_OVERLAP short sides, laid side by side (a strip's tiles stacked,
         a tall receipt's tiles next to each other) with white gaps into one near-square mosaic
      -> one engine call -> each box moved back from its tile to the image -> a line read
         twice where tiles overlap kept once (merge_overlapping)

One call per image, on a picture no more elongated than the engine handles by itself (at most
about 8:1): an elongated image costs about what a photo costs, whatever its shape. Figures in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from ..errors import CrossmodalError

__all__ = [
    "OCR_MAX_ASPECT",
    "OCR_MAX_SIDE",
    "OCR_MIN_SIDE",
    "OCR_OVERLAP",
    "OCR_TILE_ASPECT",
    "OcrInputError",
    "OcrLayout",
    "merge_overlapping",
    "plan_ocr",
]

#: Images thinner than this (in pixels, as decoded) hold no readable text: skipped.
OCR_MIN_SIDE = 8
#: The long side of what the engine reads (decoding already reduces to about this).
OCR_MAX_SIDE = 2048
#: Images up to this many times longer than wide are read as they are; longer ones in tiles of
#: this ratio (RapidOCR letterboxes wider images to 8:1 itself).
OCR_TILE_ASPECT = 8
#: Neighbouring tiles share this many short sides (a line across a receipt lies whole in one
#: tile; a word along a banner, up to about twice the strip's height long).
OCR_OVERLAP = 2
#: Images more elongated than this are skipped (their mosaic would itself be elongated).
OCR_MAX_ASPECT = 100

Box = tuple[int, int, int, int]  # left, top, right, bottom in pixels
Point = tuple[float, float]


class OcrInputError(CrossmodalError, ValueError):
    """An image's shape is outside the OCR budget (too thin, too elongated); the message is a
    one-line reason and the image is skipped."""


@dataclass(frozen=True)
class OcrLayout:
    """Where each tile of the image lies in the picture the engine reads."""

    tiles: tuple[Box, ...]  # pieces of the image, in its pixels
    origins: tuple[tuple[int, int], ...]  # each tile's top-left corner in the picture
    size: tuple[int, int]  # the picture's width and height

    @property
    def tiled(self) -> bool:
        return len(self.tiles) > 1

    def compose(self, image: Image.Image) -> Image.Image:
        """The picture to read: ``image`` itself, or its tiles on white."""
        if not self.tiled:
            return image
        canvas = Image.new("RGB", self.size, (255, 255, 255))
        for box, origin in zip(self.tiles, self.origins, strict=True):
            canvas.paste(image.crop(box), origin)
        return canvas

    def to_image(self, points: Sequence[Point]) -> list[Point]:
        """Corners read in the picture, moved to the image (by the tile their centre lies in)."""
        if not self.tiled:
            return [(float(x), float(y)) for x, y in points]
        cx = sum(p[0] for p in points) / len(points)
        cy = sum(p[1] for p in points) / len(points)

        def distance(k: int) -> float:
            (ox, oy), (left, top, right, bottom) = self.origins[k], self.tiles[k]
            dx = max(ox - cx, 0.0, cx - (ox + right - left))
            dy = max(oy - cy, 0.0, cy - (oy + bottom - top))
            return dx + dy

        k = min(range(len(self.tiles)), key=distance)
        (ox, oy), (left, top, _, _) = self.origins[k], self.tiles[k]
        return [(float(x - ox + left), float(y - oy + top)) for x, y in points]


def _check(width: int, height: int, original: tuple[int, int] | None) -> None:
    shown = f"{original[0]}x{original[1]}" if original else f"{width}x{height}"
    if original and tuple(original) != (width, height):
        shown += f" (read at {width}x{height})"
    short, long = min(width, height), max(width, height)
    if short < OCR_MIN_SIDE:
        raise OcrInputError(f"{shown} image is too thin to hold readable text (OCR reads images at "
                            f"least {OCR_MIN_SIDE} pixels on each side)")
    if long > OCR_MAX_ASPECT * short:
        raise OcrInputError(f"{shown} image is more elongated than OCR reads ({long / short:.0f}:1; "
                            f"the OCR budget is {OCR_MAX_ASPECT}:1)")


def plan_ocr(width: int, height: int, original: tuple[int, int] | None = None) -> OcrLayout:
    """How a ``width`` x ``height`` image (long side <= OCR_MAX_SIDE) is read.

    Args:
        original: the file's size, for the message only.

    Raises:
        OcrInputError: the image is thinner than OCR_MIN_SIDE or more elongated than
            OCR_MAX_ASPECT:1.
    """
    _check(width, height, original)
    short, long = min(width, height), max(width, height)
    if long <= OCR_TILE_ASPECT * short:
        return OcrLayout(tiles=((0, 0, width, height),), origins=((0, 0),), size=(width, height))
    length = OCR_TILE_ASPECT * short
    step = length - OCR_OVERLAP * short
    count = 1 + math.ceil((long - length) / step)
    starts = [min(i * step, long - length) for i in range(count)]
    gap = max(4, short // 2)
    across = [i * (short + gap) for i in range(count)]
    extent = count * short + (count - 1) * gap
    if width >= height:  # a strip: its tiles stacked
        return OcrLayout(tiles=tuple((s, 0, s + length, height) for s in starts),
                         origins=tuple((0, a) for a in across), size=(length, extent))
    return OcrLayout(tiles=tuple((0, s, width, s + length) for s in starts),  # tall: side by side
                     origins=tuple((a, 0) for a in across), size=(extent, length))


def _extent(box: Sequence[Point]) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in box], [p[1] for p in box]
    return min(xs), min(ys), max(xs), max(ys)


def _area(e: tuple[float, float, float, float]) -> float:
    return max(0.0, e[2] - e[0]) * max(0.0, e[3] - e[1])


def merge_overlapping(boxes: Sequence[Sequence[Point]], confidences: Sequence[float],
                      min_cover: float = 0.5) -> list[int]:
    """Indexes of the lines to keep where tiles overlap: a line whose box is covered to at least
    ``min_cover`` of its area by a larger (or equal and more confident) kept line's box is the
    same text read twice, or cut at a tile's edge, and is dropped. Boxes in image pixels."""
    extents = [_extent(box) for box in boxes]
    order = sorted(range(len(boxes)), key=lambda i: (-_area(extents[i]), -confidences[i]))
    kept: list[int] = []
    for i in order:
        e = extents[i]
        area = _area(e)
        if not any(area > 0 and _area((max(e[0], k[0]), max(e[1], k[1]), min(e[2], k[2]), min(e[3], k[3])))
                   >= min_cover * area for k in (extents[j] for j in kept)):
            kept.append(i)
    return sorted(kept)
