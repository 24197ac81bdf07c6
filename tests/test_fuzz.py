"""Fuzzing hostile inputs (hypothesis): malformed images and manifests never crash or hang;
each is decoded, or refused with a one-line reason. CROSSMODAL_RAG_FUZZ_EXAMPLES raises the
number of cases (the default keeps the suite quick)."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from crossmodal_rag.errors import ImageDecodeError, SourceError
from crossmodal_rag.ingestion.images import MAX_ASPECT_RATIO, decode_image
from crossmodal_rag.ingestion.sources import ImageRecord, Problem, TextRecord, read_source
from tests.badimages import (
    EPS,
    POSTSCRIPT,
    dos_eps,
    png_declaring,
    progressive_jpeg,
    scan_bomb_jpeg,
    thin_jpeg,
)

EXAMPLES = int(os.environ.get("CROSSMODAL_RAG_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _encoded(fmt: str, mode: str = "RGB", size: tuple[int, int] = (24, 16), **kw) -> bytes:
    rng = np.random.default_rng(len(fmt) + len(mode))
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


SEEDS = [
    _encoded("PNG"), _encoded("JPEG"), _encoded("GIF", "P"), _encoded("BMP"), _encoded("TIFF"),
    _encoded("WEBP"), _encoded("PNG", "I;16"), _encoded("JPEG", "CMYK"), _encoded("PNG", "RGBA"),
    _encoded("PNG", "P", transparency=0), _encoded("GIF", "P", save_all=True,
                                                 append_images=[Image.new("P", (24, 16))]),
    png_declaring(0, 10), png_declaring(10, 0), png_declaring(70000, 70000),
    _encoded("PNG") + b"PK\x03\x04polyglot-zip-tail" + b"<html><script>alert(1)</script>",
    b"GIF89a" + b"\xff\xff\xff\xff" + b"\x00" * 20,
    # issue 25: thin images, scan bombs, PostScript under image names or behind image headers
    thin_jpeg(3000, 1), thin_jpeg(1, 5000), thin_jpeg(60000, 2), _encoded("PNG", size=(1000, 1)),
    progressive_jpeg((300, 200)), scan_bomb_jpeg(2000), scan_bomb_jpeg(20_000, (1024, 1024)),
    EPS, POSTSCRIPT, dos_eps(), b"\xff\xd8\xff\xe0" + EPS, b"\x89PNG\r\n\x1a\n" + EPS,
]


def _check_decode(data: bytes) -> str:
    t0 = time.perf_counter()
    try:
        out = decode_image(data, "fuzz", max_pixels=4_000_000)
        result = "decoded"
        assert out.image.mode == "RGB" and out.image.width > 0 and out.image.height > 0
        assert max(out.image.size) <= MAX_ASPECT_RATIO * min(out.image.size), out.image.size
    except ImageDecodeError as e:
        assert e.reason and "\n" not in e.reason
        result = "refused"
    assert time.perf_counter() - t0 < 5, "decoding one item took too long"
    return result


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_crafted_files(seed: int) -> None:
    _check_decode(SEEDS[seed])


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _check_decode(data)


@FUZZ
@given(st.sampled_from(range(len(SEEDS))), st.data())
def test_mutated_images(seed: int, data: st.DataObject) -> None:
    blob = bytearray(SEEDS[seed])
    how = data.draw(st.sampled_from(["truncate", "flip", "insert", "header"]))
    if how == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    elif how == "insert":
        i = data.draw(st.integers(0, len(blob)))
        blob[i:i] = data.draw(st.binary(min_size=1, max_size=64))
    else:  # corrupt the dimensions region of the header
        for i in range(8, min(32, len(blob))):
            blob[i] = data.draw(st.integers(0, 255))
    _check_decode(bytes(blob))


@FUZZ
@given(st.integers(1, 2048), st.integers(1, 2048))
def test_ocr_input_is_bounded_for_every_shape(width: int, height: int) -> None:
    """Whatever the shape, what reaches the OCR engine is refused with a one-line reason or is
    one picture no longer than the image and at most OCR_TILE_ASPECT:1 (what the engine reads
    without letterboxing), made of tiles covering the image."""
    from crossmodal_rag.ingestion.ocr_budget import OCR_TILE_ASPECT, OcrInputError, plan_ocr

    try:
        layout = plan_ocr(width, height)
    except OcrInputError as e:
        assert str(e) and "\n" not in str(e)
        return
    pw, ph = layout.size
    assert max(pw, ph) <= max(width, height) and max(pw, ph) <= OCR_TILE_ASPECT * min(pw, ph)
    covered = np.zeros(max(width, height), bool)
    for left, top, right, bottom in layout.tiles:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        covered[(left if width >= height else top):(right if width >= height else bottom)] = True
    assert covered.all()


_ROW = st.one_of(
    st.dictionaries(st.sampled_from(["image", "caption", "captions", "text", "id", "title", "x"]),
                    st.one_of(st.text(max_size=40), st.integers(), st.none(), st.lists(st.text(max_size=10), max_size=3),
                              st.sampled_from(["../../etc/passwd", "/etc/shadow", "a.jpg", "sub/../a.jpg", "~/x.png"])),
                    max_size=5).map(json.dumps),
    st.text(max_size=80),
    st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
)


@FUZZ
@given(st.lists(_ROW, max_size=12), st.sampled_from(["jsonl", "csv"]))
def test_malformed_manifests(tmp_path_factory: pytest.TempPathFactory, rows: list[str], ext: str) -> None:
    root = tmp_path_factory.mktemp("m")
    (root / "a.jpg").write_bytes(SEEDS[1])
    path = root / f"m.{ext}"
    body = "\n".join(rows)
    if ext == "csv":
        body = "image,caption\n" + body
    path.write_bytes(body.encode("utf-8", "surrogatepass") if ext == "jsonl" else body.encode("latin-1", "replace"))
    try:
        records = list(read_source(path))
    except SourceError as e:
        assert str(e)
        return
    for rec in records:
        assert isinstance(rec, ImageRecord | TextRecord | Problem)
        if isinstance(rec, ImageRecord):
            assert rec.path.is_relative_to(root.resolve()), rec.path  # never outside the root
        if isinstance(rec, Problem):
            assert rec.reason and rec.item


def test_giant_line_and_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"text": "' + b"x" * 11_000_000 + b'"}\n' + b'\xff\xfe{"text": 1}\n' + b'{"text": "ok"}\n')
    records = list(read_source(path))
    reasons = [r.reason for r in records if isinstance(r, Problem)]
    assert any("longer than" in r for r in reasons) and any("UTF-8" in r for r in reasons)
    assert [r.text for r in records if isinstance(r, TextRecord)] == ["ok"]


# -- non-regular files everywhere a named file is read (issue 15) -----------------------------
def test_fifos_and_devices_never_block_the_other_readers(tmp_path: Path, tiny_oc_spec: str) -> None:
    """A chat session, an embedding shard, its metadata and an image header read through a
    FIFO or /dev/zero are refused at once (in a child with a time and memory limit)."""
    import resource
    import subprocess
    import sys

    os.mkfifo(tmp_path / "session.json")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    os.mkfifo(a / "part0.npy")  # a FIFO shard
    (a / "part0.jsonl").write_text('{"image_path": "x.jpg"}\n')
    np.save(b / "part1.npy", np.ones((1, 32), np.float32))
    (b / "part1.jsonl").symlink_to("/dev/zero")  # its metadata never ends
    code = f"""
import json
from crossmodal_rag.apps import ChatSession
from crossmodal_rag.errors import CrossmodalError
from crossmodal_rag.ingestion.importer import import_embeddings
out = {{}}
try:
    ChatSession.load({str(tmp_path / "session.json")!r})
except CrossmodalError as e:
    out["session"] = str(e)
for name in ("a", "b"):
    try:
        import_embeddings({str(tmp_path)!r} + "/" + name, {str(tmp_path)!r} + "/c-" + name, {tiny_oc_spec!r},
                          progress=False)
    except CrossmodalError as e:
        out[name] = str(e)
print(json.dumps(out))
"""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       preexec_fn=limit, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "named pipe" in out["session"]
    assert "named pipe" in out["a"]
    assert "metadata" in out["b"], out
