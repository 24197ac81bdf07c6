"""Safe image decoding: bytes or a path in, an RGB ``PIL.Image`` out, or a one-line reason why not.

What "safe" means here:

* the declared size is checked against a pixel limit *before* any pixel is decoded
  (Pillow's decompression-bomb guard stays on as a second line);
* truncated files are errors, never half-grey images (``LOAD_TRUNCATED_IMAGES`` stays off);
* EXIF orientation is applied; greyscale, palette, RGBA/LA (composited on white), CMYK and
  16-bit/32-bit/float images are converted to 8-bit RGB with their full range preserved;
* animated images give their first frame.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageDecodeError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_EXTENSIONS",
    "DecodedImage",
    "decode_image",
    "load_image",
    "to_rgb",
]

logger = logging.getLogger(__name__)

#: File name extensions that ingest treats as images (lower case).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})

#: Default limit on declared width*height (about 16k x 16k), well above any camera.
DEFAULT_MAX_IMAGE_PIXELS = 268_435_456

# A decoded JPEG larger than this on its long side is decoded at reduced scale (JPEG "draft"
# mode); CLIP sees at most a few hundred pixels, so nothing of value is lost and decoding a
# 50-megapixel photo becomes ~8x cheaper.
_DRAFT_SIDE = 1024


@dataclass(frozen=True)
class DecodedImage:
    """An image ready for an encoder, with facts about the original file."""

    image: Image.Image  # RGB, EXIF-oriented
    width: int  # original width in pixels (after EXIF rotation)
    height: int  # original height in pixels
    format: str  # Pillow format name, e.g. "JPEG"


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0  # 0..65535 -> 0..255
        else:
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        grey = Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "1":
        return img.convert("L").convert("RGB")
    return img.convert("RGB")  # L, CMYK, YCbCr, LAB, HSV


def decode_image(
    data: bytes, name: str = "<bytes>", *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> DecodedImage:
    """Decode image bytes safely.

    Args:
        data: the encoded file contents.
        name: used in error messages (usually the path).
        max_pixels: refuse images whose declared width*height exceeds this.

    Raises:
        ImageDecodeError: with a one-line ``reason`` (empty file, not an image, truncated,
            too many pixels, zero size, ...).
    """
    if not data:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Pillow's guard is a process-wide setting: hold it to this call's limit.
            Image.MAX_IMAGE_PIXELS = max_pixels
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError(name, f"zero-sized image ({width}x{height})")
            if width * height > max_pixels:
                raise ImageDecodeError(
                    name,
                    f"{width}x{height} = {width * height} pixels exceeds the limit of "
                    f"{max_pixels} (raise it with --max-image-pixels if the file is trusted)",
                )
            fmt = img.format or "unknown"
            if fmt == "JPEG" and max(width, height) > 2 * _DRAFT_SIDE:
                img.draft("RGB", (_DRAFT_SIDE, _DRAFT_SIDE))
            img.load()
            img = ImageOps.exif_transpose(img) or img
            rgb = to_rgb(img)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(
            name,
            f"declared size exceeds the limit of {max_pixels} pixels (decompression-bomb guard; "
            "raise --max-image-pixels if the file is trusted)",
        ) from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(name, "not a recognised image file") from e
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, MemoryError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "truncated" in reason.lower():
            reason = "truncated image file"
        raise ImageDecodeError(name, f"cannot decode image: {reason}") from e
    # After EXIF rotation the original width/height may swap.
    return DecodedImage(image=rgb, width=rgb.width, height=rgb.height, format=fmt)


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> DecodedImage:
    """Read and decode an image file; see :func:`decode_image`.

    Raises:
        ImageDecodeError: the path does not exist, is not a file, cannot be read, or the
            contents cannot be decoded.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as e:
        raise ImageDecodeError(str(path), "no such file") from e
    except IsADirectoryError as e:
        raise ImageDecodeError(str(path), "is a directory, not an image file") from e
    except OSError as e:
        raise ImageDecodeError(str(path), f"cannot read file: {e.strerror or e}") from e
    return decode_image(data, str(path), max_pixels=max_pixels)
