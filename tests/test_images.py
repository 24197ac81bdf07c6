from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag.errors import ImageDecodeError
from crossmodal_rag.images import decode_image, load_image
from tests.badimages import jpeg_bytes, png_declaring, write_bad_images, write_odd_images


def test_bad_files_raise_with_one_line_reason(tmp_path: Path) -> None:
    expected = write_bad_images(tmp_path)
    for name, fragment in expected.items():
        with pytest.raises(ImageDecodeError) as info:
            load_image(tmp_path / name)
        assert fragment in info.value.reason, (name, info.value.reason)
        assert "\n" not in info.value.reason
        assert name in str(info.value)


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = jpeg_bytes((300, 200))
    assert decode_image(data, max_pixels=60_000).image.size == (300, 200)
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 59999"):
        decode_image(data, max_pixels=59_999)
    # A header declaring 3.6 gigapixels is refused at once, whatever the default limit.
    with pytest.raises(ImageDecodeError, match="exceeds"):
        decode_image(png_declaring(60_000, 60_000))


def test_odd_modes_become_rgb_with_their_values(tmp_path: Path) -> None:
    write_odd_images(tmp_path)
    px = {name: np.asarray(load_image(tmp_path / name).image) for name in (
        "grey.png", "sixteen.png", "palette.png", "rgba.png", "cmyk.jpg", "anim.gif")}
    for name, arr in px.items():
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, name
    assert px["grey.png"][0, 10].tolist() == [40, 40, 40]
    assert px["sixteen.png"][0, 0].tolist() == [255, 255, 255]  # 65535 maps to white, not clipped noise
    assert px["palette.png"][0, 0].tolist() == [255, 255, 255]  # transparent index composited on white
    assert px["rgba.png"][0, 0].tolist() == [255, 255, 255]
    r, g, b = px["cmyk.jpg"][4, 4].tolist()
    assert r > 200 and g < 60 and b < 60  # CMYK red stays red
    assert px["anim.gif"][0, 0].tolist() == [255, 0, 0]  # first frame


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    write_odd_images(tmp_path)
    decoded = load_image(tmp_path / "rotated.jpg")
    assert decoded.image.size == (20, 40)
    assert (decoded.width, decoded.height) == (20, 40)


def test_all_supported_containers_decode(tmp_path: Path) -> None:
    write_odd_images(tmp_path)
    for name in ("plain.webp", "plain.bmp", "plain.tiff"):
        d = load_image(tmp_path / name)
        assert d.image.size == (20, 10) and d.image.mode == "RGB"


# -- hostile files (issue 15): only regular files are read, never more than a cap --------------
def _child(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child with an address-space cap and a time limit: a hostile file that
    hangs the reader or is read until memory runs out fails the test instead of the machine."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit, cwd=Path(__file__).resolve().parents[1])


def test_non_regular_files_are_refused_without_reading(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.jpg")
    (tmp_path / "y.jpg").symlink_to("/dev/zero")
    (tmp_path / "d.jpg").mkdir()
    (tmp_path / "real.jpg").write_bytes(jpeg_bytes((30, 20)))
    (tmp_path / "link.jpg").symlink_to(tmp_path / "real.jpg")  # a link to a regular file is fine
    code = f"""
import json
from crossmodal_rag.errors import ImageDecodeError
from crossmodal_rag.images import load_image
out = {{}}
for name in ("x.jpg", "y.jpg", "d.jpg", "link.jpg"):
    try:
        out[name] = list(load_image({str(tmp_path)!r} + "/" + name).image.size)
    except ImageDecodeError as e:
        out[name] = e.reason
print(json.dumps(out))
"""
    r = _child(code, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "named pipe" in out["x.jpg"] and "regular" in out["x.jpg"]
    assert "character device" in out["y.jpg"]
    assert "directory" in out["d.jpg"]
    assert out["link.jpg"] == [30, 20]


def test_image_file_size_cap(tmp_path: Path) -> None:
    data = jpeg_bytes((300, 200))
    (tmp_path / "a.jpg").write_bytes(data)
    assert load_image(tmp_path / "a.jpg", max_bytes=len(data)).image.size == (300, 200)
    with pytest.raises(ImageDecodeError, match=f"exceeds the limit of {len(data) - 1} bytes"):
        load_image(tmp_path / "a.jpg", max_bytes=len(data) - 1)


def _solid_png(path: Path, width: int, height: int, rgb: tuple[int, int, int] = (200, 30, 30)) -> None:
    """An RGB PNG of one colour, written row by row (the test never holds the pixels)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp = zlib.compressobj(9)
    row = b"\x00" + bytes(rgb) * width
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _decode_in_child(path: Path, max_pixels: int | None = None) -> tuple[str, float]:
    """(outcome, MB the decode added to the child's peak resident memory)."""
    kw = f", max_pixels={max_pixels}" if max_pixels else ""
    code = f"""
import json, resource
from crossmodal_rag.errors import ImageDecodeError
from crossmodal_rag.images import load_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    d = load_image({str(path)!r}{kw})
    outcome = f"decoded {{d.width}}x{{d.height}} as {{d.image.size[0]}}x{{d.image.size[1]}}"
except ImageDecodeError as e:
    outcome = "refused: " + e.reason
print(json.dumps([outcome, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024]))
"""
    r = _child(code, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    outcome, peak = json.loads(r.stdout.strip().splitlines()[-1])
    return outcome, peak


def test_large_non_jpeg_is_refused_or_decoded_in_bounded_memory(tmp_path: Path) -> None:
    """A 12k x 12k PNG is under the pixel limit but took ~1.2 GB to decode whole: it is refused at
    once (formats decoded at full size are held to a quarter of the limit). An 8k x 8k one is
    decoded and reduced to at most 2048 pixels a side (as JPEG is), holding about one full-size
    buffer at the peak (Pillow keeps RGB at 4 bytes a pixel), not three."""
    big = tmp_path / "big.png"
    _solid_png(big, 12_000, 12_000)
    outcome, peak = _decode_in_child(big)
    assert outcome.startswith("refused") and "decoded at full size" in outcome, outcome
    assert peak < 50, peak
    ok = tmp_path / "ok.png"
    _solid_png(ok, 8000, 8000)
    outcome, peak = _decode_in_child(ok)
    assert outcome == "decoded 8000x8000 as 2000x2000", outcome
    one_buffer = 8000 * 8000 * 4 / 2**20
    assert peak < 1.3 * one_buffer, peak
    # raising the limit lets the trusted 12k image through, reduced the same way
    outcome, _ = _decode_in_child(big, max_pixels=4 * 12_000 * 12_000)
    assert outcome == "decoded 12000x12000 as 1500x1500", outcome


def test_large_images_of_every_mode_are_reduced_with_their_colour(tmp_path: Path) -> None:
    """Reduction (box filter, or nearest for palette/bilevel) keeps a solid image's colour, in
    every mode; the long side lands in [1024, 2048] and the original size is reported."""
    import io

    from PIL import Image

    cases = {"P": ("PNG", 5, [255, 255, 255]), "1": ("PNG", 1, [255, 255, 255]),
             "I;16": ("PNG", 65535, [255, 255, 255]), "L": ("PNG", 40, [40, 40, 40]),
             "RGBA": ("PNG", (10, 200, 30, 255), [10, 200, 30]), "CMYK": ("TIFF", (0, 255, 255, 0), None),
             "RGB": ("JPEG", (10, 200, 30), None)}
    for mode, (fmt, colour, expected) in cases.items():
        img = Image.new(mode, (4100, 300), colour)
        if mode == "P":
            img.putpalette([255, 255, 255] * 256)
        buf = io.BytesIO()
        img.save(buf, fmt)
        d = decode_image(buf.getvalue(), mode)
        assert (d.width, d.height) == (4100, 300), mode
        assert 1024 <= d.image.width <= 2048 and d.image.mode == "RGB", (mode, d.image.size)
        px = np.asarray(d.image)[d.image.height // 2, d.image.width // 2].tolist()
        if expected is not None:
            assert px == expected, (mode, px)
        elif mode == "CMYK":
            assert px[0] > 200 and px[1] < 60 and px[2] < 60, px
        else:
            assert abs(px[0] - 10) < 8 and abs(px[1] - 200) < 8 and abs(px[2] - 30) < 8, px
