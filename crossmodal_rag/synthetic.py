"""Synthetic image-caption data: one coloured shape on a plain background, with a caption that
describes it ("a large red circle at the top left on a white background").

Every attribute is visible in the picture and named in the caption, so a model that learns the
data can be measured exactly (retrieval recall, caption exact match). Everything is a function
of the seed: the same seed writes the same bytes (for a given Pillow version).

Attributes: 5 shapes x 6 colours x 2 sizes x 9 positions (a 3x3 grid) x 3 backgrounds = 1,620
distinct captions; each picture also has a little seeded jitter in position and size.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .safe_io import atomic_write_text

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "ShapeAttrs",
    "all_attribute_combinations",
    "caption_of",
    "make_shapes",
    "render_shape_example",
    "sample_attrs",
]

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 225),
    "yellow": (240, 210, 30), "purple": (140, 50, 180), "orange": (245, 130, 20),
}
SIZES: dict[str, float] = {"small": 0.12, "large": 0.19}  # radius as a share of the image side
#: name -> (column, row) in a 3x3 grid; the phrase used in captions
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "centre": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
_POSITION_PHRASE = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "centre": "in the centre", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128),
}
_CELL_CENTRES = (0.23, 0.5, 0.77)  # grid-cell centres as shares of the side
_JITTER = 0.03  # max centre offset, share of the side
_SCALE_JITTER = 0.1  # max relative radius change


@dataclass(frozen=True)
class ShapeAttrs:
    """What one synthetic picture shows (the caption names the first five fields)."""

    shape: str  # one of SHAPES
    colour: str  # a key of COLOURS
    size: str  # "small" | "large"
    position: str  # a key of POSITIONS
    background: str  # a key of BACKGROUNDS
    dx: float = 0.0  # centre offset, share of the side, within +-_JITTER
    dy: float = 0.0
    scale: float = 1.0  # radius multiplier, within 1 +- _SCALE_JITTER

    def __post_init__(self) -> None:
        for name, valid in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES),
                            ("position", POSITIONS), ("background", BACKGROUNDS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}")

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        """The attributes the caption names (two pictures with the same key share a caption)."""
        return (self.shape, self.colour, self.size, self.position, self.background)


def caption_of(attrs: ShapeAttrs) -> str:
    """The caption of a picture, e.g. ``"a large red circle at the top left on a white background"``."""
    return (f"a {attrs.size} {attrs.colour} {attrs.shape} {_POSITION_PHRASE[attrs.position]} "
            f"on a {attrs.background} background")


def all_attribute_combinations() -> list[tuple[str, str, str, str, str]]:
    """Every (shape, colour, size, position, background), in a fixed order (1,620 of them)."""
    return list(itertools.product(SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS))


def sample_attrs(rng: np.random.Generator, key: tuple[str, str, str, str, str] | None = None) -> ShapeAttrs:
    """Random attributes (or the given ``key``'s) with random jitter, drawn from ``rng``."""
    if key is None:
        key = (SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
               list(SIZES)[rng.integers(len(SIZES))], list(POSITIONS)[rng.integers(len(POSITIONS))],
               list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))])
    dx, dy = (float(v) for v in rng.uniform(-_JITTER, _JITTER, size=2))
    scale = float(rng.uniform(1 - _SCALE_JITTER, 1 + _SCALE_JITTER))
    return ShapeAttrs(*key, dx=round(dx, 4), dy=round(dy, 4), scale=round(scale, 4))


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def render_shape_example(attrs: ShapeAttrs, size: int = 64) -> Image.Image:
    """Draw ``attrs`` as an RGB image of ``size`` x ``size`` pixels."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[attrs.background])
    draw = ImageDraw.Draw(img)
    col, row = POSITIONS[attrs.position]
    cx = (_CELL_CENTRES[col] + attrs.dx) * size
    cy = (_CELL_CENTRES[row] + attrs.dy) * size
    r = SIZES[attrs.size] * attrs.scale * size
    fill = COLOURS[attrs.colour]
    if attrs.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif attrs.shape == "square":
        h = r * 0.85
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif attrs.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=fill)
    elif attrs.shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    else:  # cross: a plus sign
        w = r * 0.35
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    return img


def _iter_attrs(n: int, rng: np.random.Generator, distinct: bool) -> Iterator[ShapeAttrs]:
    if not distinct:
        for _ in range(n):
            yield sample_attrs(rng)
        return
    combos = all_attribute_combinations()
    if n > len(combos):
        raise ValueError(f"distinct captions: n must be <= {len(combos)}, got {n}")
    for i in rng.permutation(len(combos))[:n]:
        yield sample_attrs(rng, combos[int(i)])


def make_shapes(
    out_dir: str | Path, n: int, seed: int = 0, size: int = 64, *, distinct: bool = False,
    prefix: str = "shape",
) -> list[tuple[Path, str]]:
    """Write ``n`` synthetic pictures into ``out_dir``: ``PREFIX-00000.png`` with a same-stem
    ``.txt`` caption, and ``manifest.jsonl`` (``image``, ``caption`` and the attributes as extra
    columns), readable by ``crossmodal-rag index`` as a folder or as a manifest.

    Args:
        n: number of pictures.
        seed: everything (attributes, jitter) follows from it; the same seed writes the same bytes.
        size: image side in pixels.
        distinct: every picture gets a different caption (``n`` <= 1,620).

    Returns:
        ``[(png_path, caption), ...]`` in file-name order.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width = max(5, len(str(n - 1)))
    written: list[tuple[Path, str]] = []
    rows: list[str] = []
    for i, attrs in enumerate(_iter_attrs(n, rng, distinct)):
        stem = f"{prefix}-{i:0{width}d}"
        caption = caption_of(attrs)
        png = out / f"{stem}.png"
        render_shape_example(attrs, size).save(png, format="PNG", optimize=False)
        (out / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
        semantic = {k: v for k, v in asdict(attrs).items() if k not in ("dx", "dy", "scale")}
        rows.append(json.dumps({"image": png.name, "caption": caption, **semantic}))
        written.append((png, caption))
    atomic_write_text(out / "manifest.jsonl", "".join(r + "\n" for r in rows))
    return written
