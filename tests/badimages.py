"""Builders of hostile and unusual image files, used by several test modules."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose data is one tiny row (a 'bomb')."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 3)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_bad_images(folder: Path) -> dict[str, str]:
    """Write one file of each bad kind; returns file name -> expected reason fragment."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    (folder / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = "empty file"
    good = jpeg_bytes((256, 256))
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    expected["truncated.jpg"] = "truncated"
    (folder / "notimage.png").write_text("this is plain text, not a PNG\n")
    expected["notimage.png"] = "not a recognised image"
    (folder / "bomb.png").write_bytes(png_declaring(60000, 60000))
    expected["bomb.png"] = "exceeds the limit"
    (folder / "dangling.jpg").symlink_to(folder / "does-not-exist.jpg")
    expected["dangling.jpg"] = "no such file"
    (folder / "folder.jpg").mkdir()
    expected["folder.jpg"] = "directory"
    return expected


def write_odd_images(folder: Path) -> dict[str, Image.Image]:
    """Valid but unusual images (modes, EXIF, animation); returns name -> the image written."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Image.Image] = {}
    grey = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1)), mode="L")
    grey.save(folder / "grey.png")
    out["grey.png"] = grey
    sixteen = Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16))
    sixteen.save(folder / "sixteen.png")
    out["sixteen.png"] = sixteen
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(folder / "palette.png", transparency=0)
    out["palette.png"] = pal
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.save(folder / "rgba.png")
    out["rgba.png"] = rgba
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    cmyk.save(folder / "cmyk.jpg", "JPEG")
    out["cmyk.jpg"] = cmyk
    tall = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    tall.save(folder / "rotated.jpg", "JPEG", exif=exif.tobytes())
    out["rotated.jpg"] = tall
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out["anim.gif"] = frames[0]
    Image.new("RGB", (20, 10), (10, 20, 30)).save(folder / "plain.webp", "WEBP")
    Image.new("RGB", (20, 10), (10, 20, 30)).save(folder / "plain.bmp", "BMP")
    Image.new("RGB", (20, 10), (10, 20, 30)).save(folder / "plain.tiff", "TIFF")
    return out


# -- decode bombs and disguised formats (issue 25) --------------------------------------------
def white_png(path: Path, width: int, height: int) -> Path:
    """A white RGB PNG written by hand, so any size costs bytes, not pixels (a 1000x1 one is 83
    bytes, 60000x1 254): the shape of the OCR memory bombs."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    raw = b"".join(b"\x00" + b"\xff" * width * 3 for _ in range(height))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return path


def thin_jpeg(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A valid JPEG of a degenerate shape (3000x1, 1x5000, 60000x2): Pillow's reduced-scale
    decoding divided by zero on these."""
    return jpeg_bytes((width, height), color)


def progressive_jpeg(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    """A small progressive JPEG as libjpeg writes it (6 scans grey, 10 colour)."""
    buf = io.BytesIO()
    Image.new(mode, size, 128 if mode == "L" else (90, 140, 200)).save(buf, "JPEG", progressive=True, quality=90)
    return buf.getvalue()


def scan_bomb_jpeg(scans: int, size: tuple[int, int] = (512, 512)) -> bytes:
    """A valid progressive JPEG with about ``scans`` scans: libjpeg's last scan (a refinement of
    the AC coefficients, with its Huffman table) repeated. libjpeg only warns about the repeated
    progression and makes one pass over the image per scan (~50 ns per 8x8 block): 20,000 scans
    of 2048x2048 take about a minute. Built in microseconds; ~34 bytes a scan."""
    data = progressive_jpeg(size, "L")
    eoi = data.rindex(b"\xff\xd9")
    last_scan = data.rindex(b"\xff\xda", 0, eoi)
    table = data.rindex(b"\xff\xc4", 0, last_scan)
    unit = data[table:eoi]
    base = data.count(b"\xff\xda")
    return data[:eoi] + unit * max(0, scans - base) + data[eoi:]


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 0 lineto 16 16 lineto closepath fill\nshowpage\n%%EOF\n")
POSTSCRIPT = b"%!PS-Adobe-3.0\n%%Pages: 1\n%%EndComments\n/Helvetica findfont 12 scalefont setfont\nshowpage\n"


def dos_eps(ps: bytes = EPS) -> bytes:
    """EPS with the binary 'DOS EPS' header (C5 D0 D3 C6) that Pillow's EPS plugin also opens."""
    header = struct.pack("<IIIIIII", 0xC6D3D0C5, 30, len(ps), 0, 0, 0, 0) + b"\xff\xff"
    return header + ps


def fake_ghostscript(folder: Path) -> Path:
    """An executable named ``gs`` in ``folder`` that records each run in the file named by
    $GS_MARKER (and fails); put ``folder`` first on PATH to see whether anything starts Ghostscript."""
    folder.mkdir(parents=True, exist_ok=True)
    gs = folder / "gs"
    gs.write_text('#!/bin/sh\necho "$@" >> "${GS_MARKER:-/dev/null}"\nexit 1\n')
    gs.chmod(0o755)
    return folder
