"""Builders of hostile uploads for the web tests (issue 25): PostScript disguised as JPEG, a fake
Ghostscript that leaves a marker when run, thin JPEGs, and progressive JPEGs with thousands of scans
(a "scan bomb": small on disk, seconds to minutes to decode)."""

from __future__ import annotations

import io
import os
import stat
import struct
from pathlib import Path

from PIL import Image

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke showpage\n%%EOF\n")
DOS_EPS = b"\xc5\xd0\xd3\xc6" + struct.pack("<IIIIIIH", 30, len(EPS), 0, 0, 0, 0, 0xFFFF) + EPS


def fake_ghostscript(folder: Path) -> Path:
    """Put an executable ``gs`` in ``folder`` that writes ``folder/gs-ran`` when run; returns that
    marker's path (absent until something runs ``gs``). Prepend ``folder`` to ``PATH``."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "gs-ran"
    gs = folder / "gs"
    gs.write_text(f"#!/bin/sh\necho \"$@\" >> '{marker}'\nexit 1\n")
    gs.chmod(gs.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return marker


def path_with(folder: Path) -> str:
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


def jpeg(size: tuple[int, int], color: tuple[int, int, int] = (90, 140, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=85)
    return buf.getvalue()


THIN_SIZES = [(3000, 1), (1, 5000), (60000, 2)]


def _segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each JPEG segment up to EOI; a scan's segment includes its data."""
    i, out = 2, []
    while i < len(data):
        marker = data[i + 1]
        if marker == 0xD9:
            out.append((marker, i, i + 2))
            break
        end = i + 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker == 0xDA:  # entropy-coded data runs to the next marker that is not a stuffed byte or RST
            while not (data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7):
                end += 1
        out.append((marker, i, end))
        i = end
    return out


def scan_bomb(side: int, scans: int) -> bytes:
    """A valid progressive greyscale JPEG of ``side`` x ``side`` with ``scans`` extra AC scans.

    Each extra scan is ~100 bytes (a Huffman table and an end-of-band run over the whole image) but
    makes the decoder visit every 8x8 block once more: ~1 ms per scan at 4096 x 4096 and ~3 ms at
    7000 x 7000 on a 2020s core, whatever reduced scale is asked for.
    """
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    segs = _segments(data)
    for n, (marker, start, end) in enumerate(segs):
        if marker != 0xDA:
            continue
        components = data[start + 4]
        ss, ah = data[start + 5 + 2 * components], data[start + 7 + 2 * components] >> 4
        if ss > 0 and ah == 0:  # an AC first scan: repeat it with the Huffman table before it
            prev = segs[n - 1]
            block = (data[prev[1]:prev[2]] if prev[0] == 0xC4 else b"") + data[start:end]
            eoi = segs[-1][1]
            return data[:eoi] + block * scans + data[eoi:]
    raise AssertionError("Pillow wrote no AC first scan")
