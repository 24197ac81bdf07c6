"""Image format sniffing: a file's leading bytes in, an allowed format name out, or a refusal.

Pillow can open some forty formats, and some of its plugins hand the content to other programs
(EPS and PostScript go to Ghostscript) or to large, rarely exercised parsers. Decoding is held
to the formats the project ingests (:data:`ALLOWED_IMAGE_FORMATS`, the formats of
``IMAGE_EXTENSIONS``): the format is read from the file's magic bytes before Pillow sees the
data, whatever the file is called, and Pillow is then asked to try only that format's plugin
(``Image.open(..., formats=[...])``). A PostScript file named ``photo.jpg`` is refused here with
a one-line reason; no plugin of another format ever runs.

The web server calls :func:`sniff_image_format` on an upload before decoding it, so an upload of
another format is refused (415) at once.
"""

from __future__ import annotations

from ..errors import ImageDecodeError

__all__ = ["ALLOWED_IMAGE_FORMATS", "SNIFF_BYTES", "ImageFormatError", "sniff_image_format"]

#: Pillow format names decoding accepts: the formats of ``IMAGE_EXTENSIONS`` (a camera's MPO,
#: a JPEG with extra pictures, is read as JPEG: Pillow's JPEG opener returns it).
ALLOWED_IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF")

#: Leading bytes :func:`sniff_image_format` needs to recognise every allowed format.
SNIFF_BYTES = 64

# ISO-BMFF 'ftyp' brands (major or compatible) of AVIF and HEIF image files.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})

# Allowed formats by signature: (offset, bytes) pairs that must all match.
_SIGNATURES: tuple[tuple[str, tuple[tuple[int, bytes], ...]], ...] = (
    ("JPEG", ((0, b"\xff\xd8\xff"),)),
    ("PNG", ((0, b"\x89PNG\r\n\x1a\n"),)),
    ("GIF", ((0, b"GIF87a"),)),
    ("GIF", ((0, b"GIF89a"),)),
    ("WEBP", ((0, b"RIFF"), (8, b"WEBP"))),
    ("TIFF", ((0, b"II*\x00"),)),
    ("TIFF", ((0, b"MM\x00*"),)),
    ("TIFF", ((0, b"II+\x00"),)),  # BigTIFF
    ("TIFF", ((0, b"MM\x00+"),)),
    ("BMP", ((0, b"BM"),)),
)

# Formats Pillow (or another reader) could open that are refused, named so the reason says what
# the file is: leading bytes -> name.
_REFUSED: tuple[tuple[bytes, str], ...] = (
    (b"%!PS", "PostScript/EPS"),
    (b"%!", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "PostScript/EPS"),  # DOS EPS binary header
    (b"%PDF", "PDF"),
    (b"8BPS", "Photoshop PSD"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"\xd7\xcd\xc6\x9a", "WMF"),
    (b"icns", "ICNS"),
    (b"DDS ", "DDS"),
    (b"qoif", "QOI"),
    (b"PK\x03\x04", "ZIP"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"),
    (b"\x89HDF", "HDF5"),
    (b"SIMPLE", "FITS"),
)


class ImageFormatError(ImageDecodeError):
    """The data is not one of the allowed image formats (the web answers 415)."""


def _allowed() -> str:
    return ", ".join(ALLOWED_IMAGE_FORMATS)


def _iso_media(data: bytes) -> str | None:
    """AVIF or HEIF for an ISO-BMFF file whose 'ftyp' box names an image brand, else None."""
    size = int.from_bytes(data[0:4], "big")
    end = min(len(data), size if 16 <= size <= 4096 else 16)
    brands = {data[8:12]} | {data[i:i + 4] for i in range(16, end - 3, 4)}
    if brands & _AVIF_BRANDS:
        return "AVIF"
    if brands & _HEIF_BRANDS:
        return "HEIF"
    return None


def sniff_image_format(data: bytes, name: str = "<bytes>") -> str:
    """The allowed format (a Pillow format name) announced by ``data``'s leading bytes.

    Args:
        data: the file, or at least its first :data:`SNIFF_BYTES` bytes.
        name: used in error messages (usually the path or the upload's file name).

    Returns:
        One of :data:`ALLOWED_IMAGE_FORMATS`.

    Raises:
        ImageFormatError: with a one-line ``reason`` naming what the file is when it is a known
            other format ("PostScript/EPS is not an allowed image format ..."), or saying that it
            is not a recognised image file.
    """
    head = bytes(data[:4096])
    for fmt, parts in _SIGNATURES:
        if all(head[off:off + len(sig)] == sig for off, sig in parts):
            return fmt
    if head[4:8] == b"ftyp":
        fmt = _iso_media(head)
        if fmt is not None:
            return fmt
        brand = head[8:12].decode("latin-1")
        raise ImageFormatError(name, f"ISO media file (brand {brand!r}, e.g. a video) is not an allowed "
                                     f"image format (allowed: {_allowed()})")
    stripped = head.lstrip(b" \t\r\n\xef\xbb\xbf")  # text formats may start with blanks or a BOM
    for sig, what in _REFUSED:
        if head.startswith(sig) or (what in ("SVG", "XML/SVG") and stripped.startswith(sig)):
            raise ImageFormatError(name, f"{what} is not an allowed image format (allowed: {_allowed()})")
    raise ImageFormatError(name, f"not a recognised image file (allowed formats: {_allowed()})")
