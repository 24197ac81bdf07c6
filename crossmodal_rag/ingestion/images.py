"""Safe image decoding: bytes or a path in, an RGB ``PIL.Image`` out, or a one-line reason why not.

What "safe" means here:

* only the allowed formats are decoded (:data:`ALLOWED_IMAGE_FORMATS`, the formats of
  ``IMAGE_EXTENSIONS``): the format is sniffed from the magic bytes and Pillow tries only that
  plugin, so a PostScript file named ``x.jpg`` is refused and no external program (Ghostscript)
  ever starts (:mod:`crossmodal_rag.ingestion.image_sniff`);
* the declared size is checked against the budgets of :mod:`crossmodal_rag.ingestion.decode_budget`
  *before* any pixel is decoded: pixel count, a JPEG's scan count and scans x pixels (Pillow's
  decompression-bomb guard stays on as a second line);
* truncated files are errors, never half-grey images (``LOAD_TRUNCATED_IMAGES`` stays off);
* EXIF orientation is applied; greyscale, palette, RGBA/LA (composited on white), CMYK and
  16-bit/32-bit/float images are converted to 8-bit RGB with their full range preserved;
* animated images give their first frame;
* HEIC/HEIF (phones' default) and AVIF are read through Pillow plugins registered on first use
  when installed (``pillow-heif``; AVIF is built into Pillow >= 11.3, else ``pillow-avif-plugin``);
  without one, such a file is skipped with a reason naming the package to install;
* a file is read only if it is a regular file of at most ``MAX_IMAGE_BYTES`` (a FIFO or a link
  to ``/dev/zero`` is refused, never read: see :mod:`crossmodal_rag.safe_io`);
* memory is bounded by what is decoded: a baseline JPEG larger than 2048 pixels a side is decoded
  at reduced scale (``draft``); other formats and progressive JPEGs are decoded whole, so they
  are held to a quarter of the pixel limit (67 megapixels by default) and reduced right after
  decoding;
* any shape that decodes can be encoded: a 60000x2 strip is decoded (reduced scale never goes
  below one pixel a side) and padded on white to at most ``MAX_ASPECT_RATIO`` : 1;
* whatever a plugin raises becomes an :class:`ImageDecodeError` with a one-line reason.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageDecodeError
from ..safe_io import MAX_IMAGE_BYTES, read_regular
from .decode_budget import (
    MAX_ASPECT_RATIO,
    check_jpeg_scans,
    check_pixels,
    jpeg_scan_count,
    pad_to_aspect,
)
from .image_sniff import ALLOWED_IMAGE_FORMATS, ImageFormatError, sniff_image_format

__all__ = [
    "ALLOWED_IMAGE_FORMATS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_EXTENSIONS",
    "MAX_ASPECT_RATIO",
    "MAX_IMAGE_BYTES",
    "DecodedImage",
    "ImageFormatError",
    "decode_image",
    "format_support",
    "load_image",
    "read_image_file",
    "sniff_image_format",
    "to_rgb",
]

logger = logging.getLogger(__name__)

#: File name extensions that ingest treats as images (lower case).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff",
                              ".heic", ".heif", ".avif"})

#: Default limit on declared width*height (about 16k x 16k), well above any camera.
DEFAULT_MAX_IMAGE_PIXELS = 268_435_456

# An image larger than twice this on its long side is decoded at reduced scale (JPEG "draft"
# mode) or, for other formats, reduced right after decoding, by a power of two that keeps the long
# side at least this; CLIP sees at most a few hundred pixels, so nothing of value is lost and
# decoding a 50-megapixel photo becomes ~8x cheaper.
_DRAFT_SIDE = 1024
_ORIENTATION = 0x0112
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_REDUCIBLE = frozenset({"L", "LA", "La", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "I", "F", "LAB", "HSV"})


@dataclass(frozen=True)
class DecodedImage:
    """An image ready for an encoder, with facts about the original file."""

    image: Image.Image  # RGB, EXIF-oriented
    width: int  # original width in pixels (after EXIF rotation)
    height: int  # original height in pixels
    format: str  # Pillow format name, e.g. "JPEG"


# Formats read through an optional plugin: Pillow format name -> (file signature brands, the
# package that adds it). Registered by _register_plugins() on the first decode.
_PLUGIN_HINT = {"HEIF": "pillow-heif", "AVIF": "pillow-avif-plugin (or Pillow >= 11.3)"}
_plugins_registered = False


def _register_plugins() -> None:
    """Register the HEIF and AVIF openers of the plugins that are installed (once per process)."""
    global _plugins_registered
    if _plugins_registered:
        return
    _plugins_registered = True
    Image.init()  # Pillow's own plugins (AVIF among them when built with it)
    try:
        import pillow_heif
    except ImportError:
        logger.debug("pillow-heif is not installed: HEIC/HEIF files cannot be read")
    else:
        pillow_heif.register_heif_opener()  # HEIF only: AVIF through Pillow or its own plugin
    from PIL import features

    if not features.check("avif"):
        try:
            import pillow_avif  # noqa: F401  (registers the AVIF opener on import)
        except ImportError:
            logger.debug("Pillow lacks AVIF and pillow-avif-plugin is not installed")


def format_support() -> dict[str, bool]:
    """Whether HEIF and AVIF files can be decoded here, e.g. ``{"HEIF": True, "AVIF": True}``."""
    _register_plugins()
    return {fmt: fmt in Image.OPEN for fmt in ("HEIF", "AVIF")}


def _plugin_missing(fmt: str) -> str | None:
    """Why a sniffed HEIF/AVIF file cannot be read when its plugin is not registered, else None."""
    if fmt not in _PLUGIN_HINT or fmt in Image.OPEN:
        return None
    return f"{fmt} image, but no plugin to read it is installed (pip install {_PLUGIN_HINT[fmt]})"


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


def _reduction(width: int, height: int) -> int:
    """The power of two to shrink an image by so its long side stays >= ``_DRAFT_SIDE``."""
    factor = 1
    while max(width, height) // (factor * 2) >= _DRAFT_SIDE and max(width, height) > 2 * _DRAFT_SIDE:
        factor *= 2
    return factor


def _open(data: bytes, name: str, max_pixels: int) -> tuple[Image.Image, int, int, str]:
    """Open ``data`` with its sniffed format's plugin only and check the budgets on its header;
    (image, width, height, format). No pixel is decoded."""
    fmt = sniff_image_format(data, name)  # ImageFormatError for anything else
    missing = _plugin_missing(fmt)
    if missing:
        raise ImageFormatError(name, missing)
    scans = 1
    if fmt == "JPEG":
        scans = jpeg_scan_count(data)
        check_jpeg_scans(scans, name)
    img = Image.open(io.BytesIO(data), formats=[fmt])
    width, height = img.size
    progressive = bool(img.info.get("progressive")) or scans > 1
    full_decode = not (img.format in ("JPEG", "MPO") and not progressive)
    check_pixels(name, width, height, img.format or fmt, max_pixels, full_decode=full_decode, scans=scans)
    return img, width, height, img.format or fmt


def _reason(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name."""
    text = str(e).strip()
    reason = text.splitlines()[0] if text else type(e).__name__
    if "truncated" in reason.lower():
        return "truncated image file"
    if isinstance(e, (OSError, SyntaxError, ValueError, EOFError, TypeError, MemoryError)):
        return reason
    return f"{type(e).__name__}: {reason}" if text else reason


def decode_image(
    data: bytes, name: str = "<bytes>", *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_aspect_ratio: float | None = MAX_ASPECT_RATIO,
) -> DecodedImage:
    """Decode image bytes safely.

    Args:
        data: the encoded file contents.
        name: used in error messages (usually the path).
        max_pixels: refuse images whose declared width*height exceeds this (baseline JPEG), or
            a quarter of it (other formats and progressive JPEGs, which are decoded at full size).
        max_aspect_ratio: pad the decoded image on white (centred) so that its long side is at
            most this many times its short side; None leaves it as decoded (OCR, which bounds
            its own input).

    Returns:
        The image, reduced by a power of two when its long side exceeds 2048 pixels, with the
        original (EXIF-rotated) width and height.

    Raises:
        ImageDecodeError: with a one-line ``reason`` (empty file, not an allowed format,
            truncated, too many pixels or scans, zero size, ...); :class:`ImageFormatError`,
            a subclass, when the data is not an allowed image format.
    """
    if not data:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    _register_plugins()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Pillow's guard is a process-wide setting: hold it to this call's limit.
            Image.MAX_IMAGE_PIXELS = max_pixels
            img, width, height, fmt = _open(data, name, max_pixels)
            factor = _reduction(width, height)
            if fmt in ("JPEG", "MPO") and factor > 1:  # never below one pixel a side
                img.draft("RGB", (max(1, width // factor), max(1, height // factor)))
            img.load()
            orientation = img.getexif().get(_ORIENTATION, 1)
            factor = _reduction(*img.size)  # what draft did not do (all of it for other formats)
            if factor > 1:
                img = img.reduce(factor) if img.mode in _REDUCIBLE else img.resize(
                    ((img.width + factor - 1) // factor, (img.height + factor - 1) // factor),
                    Image.Resampling.BOX)
            if orientation in _TRANSPOSE:
                img = img.transpose(_TRANSPOSE[orientation])
            rgb = to_rgb(img)
            if max_aspect_ratio is not None:
                rgb = pad_to_aspect(rgb, max_aspect_ratio)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(
            name,
            f"declared size exceeds the limit of {max_pixels} pixels (decompression-bomb guard; "
            "raise --max-image-pixels if the file is trusted)",
        ) from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(name, "not a recognised image file (its header does not parse)") from e
    except Exception as e:  # any plugin's failure on a hostile file is this file's problem only
        raise ImageDecodeError(name, f"cannot decode image: {_reason(e)}") from e
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees one way or the other
        width, height = height, width
    return DecodedImage(image=rgb, width=width, height=height, format=fmt)


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               max_bytes: int = MAX_IMAGE_BYTES,
               max_aspect_ratio: float | None = MAX_ASPECT_RATIO) -> DecodedImage:
    """Read and decode an image file; see :func:`decode_image`.

    Only a regular file (or a symlink to one) of at most ``max_bytes`` is read.

    Raises:
        ImageDecodeError: the path does not exist, is not a regular file (a FIFO, a device, a
            directory), is larger than ``max_bytes``, cannot be read, or cannot be decoded.
    """
    return decode_image(read_image_file(path, max_bytes=max_bytes), str(path), max_pixels=max_pixels,
                        max_aspect_ratio=max_aspect_ratio)


def read_image_file(path: str | Path, *, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of the image file at ``path``, read as :func:`load_image` reads them.

    Raises:
        ImageDecodeError: with a one-line reason.
    """
    try:
        return read_regular(Path(path), max_bytes=max_bytes, what="image file")
    except FileNotFoundError as e:
        raise ImageDecodeError(str(path), "no such file") from e
    except OSError as e:  # includes safe_io.FileReadError (not a regular file, too large)
        raise ImageDecodeError(str(path), f"cannot read file: {e.strerror or e}") from e
