from __future__ import annotations

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
