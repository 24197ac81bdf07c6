"""HEIC/HEIF and AVIF: decoded with their EXIF orientation, ingested and used as query images.

The fixtures are written by the same plugins that read them (pillow-heif, Pillow's AVIF), from
known pixels, so every check compares against the image that went in.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossmodal_rag.errors import ImageDecodeError
from crossmodal_rag.ingestion.images import (
    IMAGE_EXTENSIONS,
    decode_image,
    format_support,
    load_image,
)

FORMATS = {"HEIF": ".heic", "AVIF": ".avif"}


def _needs(fmt: str) -> None:
    if not format_support()[fmt]:
        pytest.skip(f"no {fmt} plugin installed")


def _pattern(width: int = 96, height: int = 48) -> Image.Image:
    """Left half blue, right half red, a green bar along the top: no symmetry hides a rotation."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (0, 0, 255)
    arr[:, width // 2 :] = (255, 0, 0)
    arr[: height // 6] = (0, 255, 0)
    return Image.fromarray(arr)


def _save(img: Image.Image, fmt: str, orientation: int = 1) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format=fmt, exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def _close(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size, (a.size, b.size)
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def test_extensions_are_ingested() -> None:
    assert {".heic", ".heif", ".avif"} <= IMAGE_EXTENSIONS


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_decode_applies_exif_orientation(fmt: str, orientation: int) -> None:
    _needs(fmt)
    src = _pattern()
    want = src.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270,
                          8: Image.Transpose.ROTATE_90}[orientation]) if orientation != 1 else src
    out = decode_image(_save(src, fmt, orientation), f"x{FORMATS[fmt]}")
    assert out.format == fmt
    assert (out.width, out.height) == want.size
    assert out.image.mode == "RGB"
    assert _close(out.image, want) < 8.0  # lossy, but the halves and the bar are where they belong


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_truncated_file_is_a_one_line_reason(fmt: str) -> None:
    _needs(fmt)
    data = _save(_pattern(), fmt)
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data[: len(data) // 2], "cut" + FORMATS[fmt])
    assert "\n" not in e.value.reason


def test_heic_without_its_plugin_names_the_package(tmp_path: Path) -> None:
    _needs("HEIF")
    path = tmp_path / "phone.heic"
    path.write_bytes(_save(_pattern(), "HEIF"))
    code = ("import sys; sys.modules['pillow_heif'] = None\n"  # as if it were not installed
            "from crossmodal_rag.ingestion.images import load_image\n"
            "from crossmodal_rag.errors import ImageDecodeError\n"
            f"try:\n    load_image({str(path)!r})\nexcept ImageDecodeError as e:\n    print(e.reason)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install pillow-heif" in out.stdout


def test_ingest_and_image_queries(tmp_path: Path, sample_dir: Path, tiny_oc_spec: str) -> None:
    _needs("HEIF")
    _needs("AVIF")
    from crossmodal_rag import Collection

    folder = tmp_path / "phone"
    folder.mkdir()
    for name, ext, fmt in (("cat", ".heic", "HEIF"), ("coffee", ".avif", "AVIF")):
        with Image.open(sample_dir / f"{name}.jpg") as im:
            (folder / f"{name}{ext}").write_bytes(_save(im.convert("RGB"), fmt, orientation=6))
    (folder / "pagoda.jpg").write_bytes((sample_dir / "pagoda.jpg").read_bytes())
    with Collection.create(tmp_path / "coll", tiny_oc_spec) as coll:
        report = coll.add(folder)
        assert report.images_added == 3
        hits = coll.search(image=folder / "cat.heic", k=3, mode="dense")
        assert Path(hits[0].path).name == "cat.heic"
        assert hits[0].score > 0.999  # the same decode at ingest and at query time
        hits = coll.search(image=folder / "coffee.avif", k=3, mode="dense")
        assert Path(hits[0].path).name == "coffee.avif"
        items = {Path(h.path).name: h.id for h in coll.search(image=folder / "pagoda.jpg", k=3, mode="dense")}
        stored = {Path(it.path).name: it for it in coll.get(list(items.values()))}
    assert stored["cat.heic"].format == "HEIF"
    assert stored["coffee.avif"].format == "AVIF"
    with Image.open(sample_dir / "cat.jpg") as im:
        w, h = im.size
    assert (stored["cat.heic"].width, stored["cat.heic"].height) == (h, w)  # rotated by EXIF
    decoded = load_image(folder / "cat.heic").image
    with Image.open(sample_dir / "cat.jpg") as im:
        assert _close(decoded, im.convert("RGB").transpose(Image.Transpose.ROTATE_270)) < 10.0


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_web_thumbnails_of_heic_and_avif_are_jpeg(fmt: str) -> None:
    _needs(fmt)
    from crossmodal_rag.web.routes.items import MEDIA
    from crossmodal_rag.web.thumbnails import render_thumbnail

    data = render_thumbnail(_save(_pattern(), fmt, orientation=6), "x" + FORMATS[fmt], 32, 10**8)
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (16, 32)  # rotated, then fitted in 32
    assert MEDIA[fmt] == f"image/{fmt.lower()}"


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_mutated_files_are_one_line_refusals(fmt: str) -> None:
    """Byte flips in HEIF/AVIF files made the plugins raise RuntimeError ("Missing or empty image
    item", libheif's security limits) through decode_image: every mutation is now decoded or an
    ImageDecodeError with a one-line reason, never another exception."""
    import random

    _needs(fmt)
    base = _save(_pattern(32, 24), fmt)
    rng = random.Random(25)
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(300):
        blob = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        try:
            out = decode_image(bytes(blob), "m" + FORMATS[fmt])
            assert out.image.mode == "RGB"
            outcomes["decoded"] += 1
        except ImageDecodeError as e:
            assert e.reason and "\n" not in e.reason
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0, outcomes  # the mutations do break files
