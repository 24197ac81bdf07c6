"""Decode budgets: what one image may cost to decode, checked from its bytes and header before a
pixel is decoded, and the shape of what leaves decoding.

The data's way through the checks::

    bytes -> allowed format (image_sniff) -> JPEG scan count (a linear marker walk, no decoding)
          -> header: width x height against the pixel limit (a quarter of it for what is decoded
             at full size: non-JPEG formats and progressive or multi-scan JPEGs), and a JPEG's
             scans x pixels against its work budget
          -> decode (reduced) -> padded to at most MAX_ASPECT_RATIO (a 60000x2 strip reaches an
             encoder as a bounded image, never as a 420000x224 resize)

The budgets, and what each holds (measured figures in ``benchmarks/RESULTS.md``):

* pixel count: ``max_pixels`` (``--max-image-pixels``, 268 megapixels by default) for baseline
  JPEGs, which are decoded at reduced scale; a quarter of it for images decoded at full size;
* progressive / multi-scan JPEGs: libjpeg buffers every coefficient of the whole image (about
  6 bytes a pixel; reduced-scale decoding does not help), so they are held to the quarter too;
* scans: at most :data:`MAX_JPEG_SCANS` (a progressive JPEG has about 10; each scan is a pass
  over the whole image, ~50 ns per 8x8 block), and scans x pixels at most
  :data:`JPEG_SCAN_WORK` times the pixel limit;
* aspect ratio: what leaves decoding is at most :data:`MAX_ASPECT_RATIO` : 1 (padded on white,
  centred), so an encoder's resize of the short side cannot blow up the long one.
"""

from __future__ import annotations

import math
import re

from PIL import Image

from ..errors import ImageDecodeError

__all__ = [
    "FULL_DECODE_SHARE",
    "JPEG_SCAN_WORK",
    "MAX_ASPECT_RATIO",
    "MAX_JPEG_SCANS",
    "check_jpeg_scans",
    "check_pixels",
    "jpeg_scan_count",
    "pad_to_aspect",
]

#: Images decoded at full size (not JPEG, or a progressive/multi-scan JPEG) are held to
#: 1/FULL_DECODE_SHARE of the pixel limit (67 megapixels by default).
FULL_DECODE_SHARE = 4
#: A JPEG with more scans than this is refused before decoding (libjpeg's progressive scripts
#: write 6 to 10; each scan costs a pass over the whole image).
MAX_JPEG_SCANS = 100
#: A JPEG's scans x pixels is held to this many times the pixel limit (2.1 giga-pixel-scans by
#: default: e.g. 10 scans of a 67-megapixel progressive image fit, 100 scans of one do not).
JPEG_SCAN_WORK = 8
#: Decoded images longer than this many times their width (or wider than this many times their
#: height) are padded on white to this ratio before any encoder sees them.
MAX_ASPECT_RATIO = 20

_PIXELS_FLAG = "raise it with --max-image-pixels if the file is trusted"
# The end of a scan's entropy-coded data: a marker, i.e. 0xFF followed by anything but a
# stuffed zero, a restart marker (D0-D7) or another 0xFF (fill).
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (not DHT, JPG, DAC)
_SOF_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


def jpeg_scan_count(data: bytes, stop_after: int = MAX_JPEG_SCANS + 1) -> int:
    """The number of scans (passes over the image) the decoder makes of the JPEG in ``data``.

    Walks the markers as libjpeg does (segment lengths; each scan's entropy-coded data to the
    next marker) up to the first EOI, so thumbnails inside APP segments are not counted. A
    sequential JPEG whose first scan holds every component is one pass: the decoder expects EOI
    after it and reads no further scan, so the walk stops there without reading the entropy data.
    Otherwise (progressive, or components in separate scans) the walk is linear in the file's
    size (about 1 ms per MB; a baseline photo costs microseconds). Stops counting at ``stop_after``.
    """
    n = len(data)
    pos = 2  # after SOI
    scans = 0
    components = 0
    progressive = False
    while pos + 1 < n and scans < stop_after:
        if data[pos] != 0xFF:  # stray bytes: a decoder skips to the next marker
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI: the decoder stops here
            break
        if marker in _STANDALONE or marker == 0x00:
            pos += 2
            continue
        if pos + 4 > n:
            break
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF and pos + 9 < n:
            progressive = marker in _SOF_PROGRESSIVE
            components = data[pos + 9]
        if marker == 0xDA:
            scans += 1
            if scans == 1 and not progressive and pos + 4 < n and data[pos + 4] >= components > 0:
                return 1  # a single interleaved sequential scan: the decoder reads no other
            found = _MARKER.search(data, end)
            if found is None:
                break
            pos = found.start()
        else:
            pos = end
    return scans


def check_jpeg_scans(scans: int, name: str) -> None:
    """Refuse a JPEG with more than :data:`MAX_JPEG_SCANS` scans (a decode-time bomb)."""
    if scans > MAX_JPEG_SCANS:
        raise ImageDecodeError(
            name, f"JPEG with more than {MAX_JPEG_SCANS} scans exceeds the scan budget of {MAX_JPEG_SCANS} "
            "(progressive JPEGs have about 10; each scan is a pass over the whole image)")


def check_pixels(name: str, width: int, height: int, fmt: str, max_pixels: int, *,
                 full_decode: bool, scans: int = 1) -> None:
    """Refuse by declared size, before any pixel is decoded.

    Args:
        full_decode: the image is decoded at full size (not a baseline JPEG), so it is held to
            ``max_pixels // FULL_DECODE_SHARE``.
        scans: a JPEG's scan count; scans x pixels is held to ``JPEG_SCAN_WORK * max_pixels``.
    """
    if width <= 0 or height <= 0:
        raise ImageDecodeError(name, f"zero-sized image ({width}x{height})")
    pixels = width * height
    if pixels > max_pixels:
        raise ImageDecodeError(
            name, f"{width}x{height} = {pixels} pixels exceeds the limit of {max_pixels} ({_PIXELS_FLAG})")
    share = max_pixels // FULL_DECODE_SHARE
    if full_decode and pixels > share:
        what = "progressive or multi-scan JPEG images" if fmt in ("JPEG", "MPO") else f"{fmt} images"
        raise ImageDecodeError(
            name, f"{width}x{height} = {pixels} pixels exceeds the limit of {share} for {what}, which "
            f"are decoded at full size (a quarter of the limit of {max_pixels}; {_PIXELS_FLAG})")
    work = JPEG_SCAN_WORK * max_pixels
    if scans * pixels > work:
        raise ImageDecodeError(
            name, f"{scans} scans x {pixels} pixels exceeds the JPEG decoding budget of {work} "
            f"pixel-scans ({JPEG_SCAN_WORK}x the pixel limit; {_PIXELS_FLAG})")


def pad_to_aspect(img: Image.Image, ratio: float, fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """``img`` (RGB), centred on ``fill`` so that its long side is at most ``ratio`` times its
    short side; unchanged when it already is."""
    w, h = img.size
    if max(w, h) <= ratio * min(w, h):
        return img
    short = math.ceil(max(w, h) / ratio)
    size = (w, short) if w >= h else (short, h)
    canvas = Image.new("RGB", size, fill)
    canvas.paste(img, ((size[0] - w) // 2, (size[1] - h) // 2))
    return canvas
