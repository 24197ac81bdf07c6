"""OCR (crossmodal_rag.ingestion.ocr): the real PP-OCRv4 models (shipped in the rapidocr wheel) read
rendered text; boxes are checked against where the text was drawn; space restoration against
hand-placed character boxes."""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from crossmodal_rag.ingestion.ocr import (
    OcrLine,
    OcrResult,
    OcrSettings,
    create_ocr_engine,
    ctc_decode,
    list_ocr_engines,
    ocr_image,
    rows,
)
from tests.badimages import white_png

REPO = Path(__file__).resolve().parents[1]


def _bench_docs():
    """benchmarks/ocr_docs.py, the benchmark set's generator (benchmarks/ is not a package)."""
    if "ocr_docs" not in sys.modules:
        spec = importlib.util.spec_from_file_location("ocr_docs", REPO / "benchmarks" / "ocr_docs.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["ocr_docs"] = mod  # dataclasses look their module up while being defined
        spec.loader.exec_module(mod)
    return sys.modules["ocr_docs"]


RECEIPT = ["LIDL Store 4711 Berlin", "Invoice no. 2026-0815", "Milk 1.29", "Bread 2.49", "TOTAL EUR 3.78"]


def _receipt(scale: int = 1) -> tuple[Image.Image, list[tuple[float, float, float, float]]]:
    """The receipt of the issue in DejaVu Sans 28 px, and each line's drawn bounding box."""
    docs = _bench_docs()
    f = ImageFont.truetype(str(docs.font_dir() / "DejaVuSans.ttf"), 28 * scale)
    img = Image.new("RGB", (640 * scale, 360 * scale), "white")
    d = ImageDraw.Draw(img)
    boxes = []
    for i, line in enumerate(RECEIPT):
        xy = (30 * scale, (30 + 60 * i) * scale)
        d.text(xy, line, fill="black", font=f)
        boxes.append(d.textbbox(xy, line, font=f))
    return img, boxes


@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("rapidocr_onnxruntime")
    return create_ocr_engine(OcrSettings(threads=1))


def _words(result: OcrResult) -> set[str]:
    return {w.lower() for w in result.text.split()}


# -- CTC decoding with the spaces the argmax misses: hand-made frame probabilities --------------
CHARSET = ["<blank>", "a", "b", "c", " "]


def _frames(rows: list[tuple[int, float]], space: list[float] | None = None) -> np.ndarray:
    """``(T, 5)`` probabilities: frame t gives ``p`` to character ``i``, the space its share,
    the blank the rest."""
    probs = np.zeros((len(rows), len(CHARSET)))
    for t, (i, p) in enumerate(rows):
        sp = space[t] if space else 0.0
        probs[t, i] = p
        probs[t, 4] += sp
        probs[t, 0] += 1.0 - p - sp
    return probs


def test_ctc_decode_is_greedy_ctc_without_a_threshold() -> None:
    # a a _ a b b _ _ c: repeats collapse, a blank separates two a's
    probs = _frames([(1, .9), (1, .8), (0, 0), (1, .7), (2, .9), (2, .9), (0, 0), (0, 0), (3, .6)])
    text, conf = ctc_decode(probs, CHARSET)
    assert text == "aabc"
    assert conf == pytest.approx((.9 + .7 + .9 + .6) / 4)  # first frame of each run


def test_ctc_decode_puts_a_space_where_its_probability_reaches_the_threshold() -> None:
    rows = [(1, .9), (0, 0), (0, 0), (2, .9), (0, 0), (3, .9)]
    space = [0, .002, .03, 0, .005, 0]  # a ..(0.03).. b ..(0.005).. c
    probs = _frames(rows, space)
    assert ctc_decode(probs, CHARSET)[0] == "abc"  # the space never wins the argmax
    assert ctc_decode(probs, CHARSET, 0.01)[0] == "a bc"
    assert ctc_decode(probs, CHARSET, 0.004)[0] == "a b c"
    assert ctc_decode(probs, CHARSET, 0.05)[0] == "abc"
    # A space the argmax found is kept once, never doubled.
    probs = _frames([(1, .9), (4, .6), (2, .9)], [0, .4, 0])
    assert ctc_decode(probs, CHARSET, 0.01)[0] == "a b"
    assert ctc_decode(np.zeros((0, 5)), CHARSET, 0.01) == ("", 0.0)


def _line(text: str, x0: float, y0: float, x1: float, y1: float) -> OcrLine:
    return OcrLine(text, ((x0, y0), (x1, y0), (x1, y1), (x0, y1)), 0.9)


def test_rows_put_a_tilted_receipts_prices_beside_their_items() -> None:
    # Detected out of order: the right-hand prices sit 8 px lower (a tilted photo), boxes 30 high.
    lines = [_line("2.49", 400, 108, 460, 138), _line("Milk", 20, 40, 90, 70),
             _line("1.29", 400, 48, 460, 78), _line("Bread", 20, 100, 100, 130),
             _line("TOTAL 3.78", 20, 160, 200, 190)]
    assert [[ln.text for ln in row] for row in rows(lines)] == [
        ["Milk", "1.29"], ["Bread", "2.49"], ["TOTAL 3.78"]]
    result = OcrResult(tuple(lines), "x")
    assert result.text == "Milk 1.29\nBread 2.49\nTOTAL 3.78"
    # Two lines a full line apart never merge, however far left or right.
    assert len(rows([_line("a", 0, 0, 10, 30), _line("b", 500, 31, 510, 61)])) == 2


def test_settings_round_trip_and_refuse_unknown_keys() -> None:
    s = OcrSettings(min_confidence=0.7, space_threshold=0.05)
    assert OcrSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown OCR setting"):
        OcrSettings.from_dict({"engine": "rapidocr", "langs": "en"})
    with pytest.raises(ValueError, match="rapidocr"):
        OcrSettings(engine="nope")
    assert "rapidocr" in list_ocr_engines()


def test_result_round_trips_through_json_dicts() -> None:
    r = OcrResult((OcrLine("Total 3.78", ((1.0, 2.0), (50.5, 2.0), (50.5, 20.0), (1.0, 20.0)), 0.98),),
                  "rapidocr-ppocrv4")
    assert OcrResult.from_dict(r.to_dict()) == r
    assert r.text == "Total 3.78"


# -- the real model --------------------------------------------------------------------------------
def test_reads_the_receipt_with_words_boxes_and_confidence(engine) -> None:
    img, drawn = _receipt()
    result = engine.read(img)
    words = _words(result)
    for w in ("lidl", "store", "4711", "berlin", "invoice", "2026-0815", "milk", "1.29", "3.78"):
        assert w in words, (w, result.text)
    assert len(result.lines) == len(RECEIPT)
    for line, (x0, y0, x1, y1) in zip(result.lines, drawn, strict=True):
        xs = [p[0] for p in line.box]
        ys = [p[1] for p in line.box]
        # the detected box covers the drawn text, give or take the detector's margin
        assert min(xs) <= x0 + 4 and max(xs) >= x1 - 4, (line, (x0, x1))
        assert min(ys) <= y0 + 4 and max(ys) >= y1 - 4, (line, (y0, y1))
        assert max(ys) - min(ys) < 2.5 * (y1 - y0)
        assert 0.8 <= line.confidence <= 1.0


def test_without_space_restoration_the_model_glues_words(engine) -> None:
    img, _ = _receipt()
    glued = create_ocr_engine(OcrSettings(restore_spaces=False, threads=1)).read(img)
    restored = engine.read(img)
    # The measured failure this module corrects: the same characters, fewer word boundaries.
    assert "".join(glued.text.split()) == "".join(restored.text.split())
    assert len(restored.text.split()) > len(glued.text.split())


def test_boxes_are_in_original_pixels_for_reduced_and_rotated_files(tmp_path: Path, engine) -> None:
    img, drawn = _receipt(scale=4)  # 2560 x 1440: decoded at half size, boxes scaled back
    rotated = img.transpose(Image.Transpose.ROTATE_90)  # stored sideways, EXIF says turn it back
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "receipt.jpg"
    rotated.save(path, quality=92, exif=exif.tobytes())
    result = ocr_image(path, engine)
    assert "invoice" in _words(result) and "4711" in _words(result)
    first = result.lines[0]
    x0, y0, x1, y1 = drawn[0]
    xs = [p[0] for p in first.box]
    ys = [p[1] for p in first.box]
    assert abs(min(xs) - x0) < 40 and abs(max(xs) - x1) < 40, (first.box, drawn[0])
    assert abs(min(ys) - y0) < 40 and abs(max(ys) - y1) < 40, (first.box, drawn[0])


def test_an_image_without_text_gives_no_lines(engine, sample_dir: Path) -> None:
    result = ocr_image(sample_dir / "dahlia.jpg", engine)
    assert all(line.confidence >= 0.5 for line in result.lines)
    assert len(result.text) < 20  # a flower: nothing, or a stray short guess


def test_missing_engine_names_the_extra() -> None:
    code = ("import sys; sys.modules['rapidocr_onnxruntime'] = None\n"
            "from PIL import Image\n"
            "from crossmodal_rag.ingestion.ocr import create_ocr_engine, OcrUnavailableError\n"
            "try:\n    create_ocr_engine().read(Image.new('RGB', (40, 40)))\n"
            "except OcrUnavailableError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install "crossmodal-rag[ocr]"' in out.stdout


def test_benchmark_set_is_deterministic_and_answers_are_in_the_text(tmp_path: Path) -> None:
    docs = _bench_docs()
    a = docs.generate(tmp_path / "a", docs=8, memos=1, seed=3, photos=False)
    b = docs.generate(tmp_path / "b", docs=8, memos=1, seed=3, photos=False)
    assert [(d.name, d.lines, d.questions) for d in a] == [(d.name, d.lines, d.questions) for d in b]
    assert {d.layout for d in a} == {"receipt", "sign", "slide", "error", "memo"}
    for d in a:
        for q in d.questions:
            assert q.answer in " ".join(d.lines), (q, d.lines)
    assert docs.load(tmp_path / "a") == a
    for p in (tmp_path / "a").glob("*.png"):
        assert (tmp_path / "b" / p.name).read_bytes() == p.read_bytes()


# -- the OCR budget (issue 25): what reaches the engine is bounded ------------------------------
def test_layout_tiles_cover_the_image_and_map_back() -> None:
    """Elongated images are cut into tiles of at most OCR_TILE_ASPECT:1 that cover every pixel,
    neighbours sharing OCR_OVERLAP short sides, laid into a picture no more elongated than a
    tile; every pixel of a tile in the picture maps back to the same pixel of the image."""
    from crossmodal_rag.ingestion.ocr_budget import OCR_OVERLAP, OCR_TILE_ASPECT, plan_ocr

    rng = np.random.default_rng(0)
    for w, h in ((300, 200), (2048, 64), (64, 2048), (2048, 21), (200, 2000), (1700, 200)):
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        layout = plan_ocr(w, h)
        short, long = min(w, h), max(w, h)
        if long <= OCR_TILE_ASPECT * short:
            assert not layout.tiled and layout.compose(img) is img
            continue
        spans = sorted((b[0], b[2]) if w >= h else (b[1], b[3]) for b in layout.tiles)
        assert spans[0][0] == 0 and spans[-1][1] == long
        for (_, a1), (b0, _) in itertools.pairwise(spans):
            assert a1 - b0 >= OCR_OVERLAP * short  # neighbours overlap
        for b in layout.tiles:
            bw, bh = b[2] - b[0], b[3] - b[1]
            assert max(bw, bh) <= OCR_TILE_ASPECT * min(bw, bh)
        pw, ph = layout.size
        assert max(pw, ph) <= OCR_TILE_ASPECT * min(pw, ph), layout.size
        picture = np.asarray(layout.compose(img))
        src = np.asarray(img)
        for (ox, oy), (left, top, right, bottom) in zip(layout.origins, layout.tiles, strict=True):
            for _ in range(20):
                x, y = ox + rng.integers(0, right - left), oy + rng.integers(0, bottom - top)
                (ix, iy), = layout.to_image([(float(x), float(y))])
                assert picture[y, x].tolist() == src[int(iy), int(ix)].tolist()


def test_merge_keeps_one_of_each_line_read_twice() -> None:
    from crossmodal_rag.ingestion.ocr_budget import merge_overlapping

    def box(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]

    boxes = [box(100, 10, 200, 40), box(101, 11, 199, 40),  # the same word in two tiles
             box(150, 10, 200, 40),  # its tail, cut at a tile's edge
             box(300, 10, 400, 40), box(100, 50, 200, 80)]  # other words
    assert merge_overlapping(boxes, [0.9, 0.95, 0.99, 0.9, 0.9]) == [0, 3, 4]


def _banner() -> tuple[Image.Image, dict[str, tuple[int, int, int, int]]]:
    """A 2048x64 strip of ten words (the engine alone letterboxes it to 8:1), and where each is."""
    f = ImageFont.truetype(str(_bench_docs().font_dir() / "DejaVuSans.ttf"), 28)
    img = Image.new("RGB", (2048, 64), "white")
    d = ImageDraw.Draw(img)
    drawn = {}
    for i, word in enumerate(["ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT", "GOLF", "HOTEL",
                              "INDIA", "JULIET"]):
        d.text((20 + 200 * i, 15), word, fill="black", font=f)
        drawn[word] = d.textbbox((20 + 200 * i, 15), word, font=f)
    return img, drawn


def test_elongated_images_are_read_whole_with_boxes_in_place(engine) -> None:
    """A 32:1 banner and a 10:1 receipt, read through the tiled mosaic: every word or line once,
    each box where it was drawn."""
    img, drawn = _banner()
    result = engine.read(img)
    assert [ln.text for ln in result.lines] == list(drawn), result.text
    for line in result.lines:
        x0, y0, x1, y1 = drawn[line.text]
        xs, ys = [p[0] for p in line.box], [p[1] for p in line.box]
        assert abs(min(xs) - x0) < 12 and abs(max(xs) - x1) < 12, (line, drawn[line.text])
        assert abs(min(ys) - y0) < 12 and abs(max(ys) - y1) < 12, (line, drawn[line.text])
    f = ImageFont.truetype(str(_bench_docs().font_dir() / "DejaVuSans.ttf"), 24)
    tall = Image.new("RGB", (200, 2000), "white")
    d = ImageDraw.Draw(tall)
    lines = [f"Item {i:02d} {i}.99" for i in range(25)]
    for i, text in enumerate(lines):
        d.text((10, 20 + 78 * i), text, fill="black", font=f)
    result = engine.read(tall)
    assert [ln.text for ln in result.lines] == lines, result.text
    for i, line in enumerate(result.lines):
        assert abs(min(p[1] for p in line.box) - (20 + 78 * i)) < 15, line


def test_thin_images_never_reach_the_engine_and_reads_stay_bounded(tmp_path: Path) -> None:
    """The real engine in a child capped at 3 GB of address space: 1000x1 and 60000x1 PNGs (7.8 GB
    and 22.9 GB before) are refused with a one-line reason before the engine allocates; the
    costliest shape the budget lets through whole (8:1 at 2048 pixels) reads within the cap,
    under 2 GB resident and a minute."""
    pytest.importorskip("rapidocr_onnxruntime")
    import json
    import resource

    for w, h in ((1000, 1), (60000, 1)):
        white_png(tmp_path / f"{w}x{h}.png", w, h)
    Image.new("RGB", (2048, 256), "white").save(tmp_path / "wide.png")
    code = f"""
import json, resource, time
from crossmodal_rag.ingestion.ocr import OcrInputError, OcrSettings, create_ocr_engine, ocr_image
engine = create_ocr_engine(OcrSettings(threads=1)).load()
out = {{}}
for name in ("1000x1.png", "60000x1.png", "wide.png"):
    t = time.perf_counter()
    try:
        out[name] = [len(ocr_image({str(tmp_path)!r} + "/" + name, engine).lines)]
    except OcrInputError as e:
        out[name] = str(e)
    out[name + ":s"] = time.perf_counter() - t
# this process's own peak (VmHWM): ru_maxrss would carry the forking test process's peak
out["peak_mb"] = int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1]) / 1024
print(json.dumps(out))
"""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       preexec_fn=limit, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["1000x1.png"] == ("1000x1 image is too thin to hold readable text (OCR reads images at least 8 "
                                 "pixels on each side)")
    assert out["60000x1.png"].startswith("60000x1 (read at 1875x1) image is too thin to hold readable text")
    assert out["1000x1.png:s"] < 1 and out["60000x1.png:s"] < 1
    assert out["wide.png"] == [0] and out["wide.png:s"] < 60
    assert out["peak_mb"] < 2048, out  # 0.9-1.0 GB measured here
