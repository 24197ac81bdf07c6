"""OCR (crossmodal_rag.ocr): the real PP-OCRv4 models (shipped in the rapidocr wheel) read
rendered text; boxes are checked against where the text was drawn; space restoration against
hand-placed character boxes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from crossmodal_rag.ocr import (
    OcrLine,
    OcrResult,
    OcrSettings,
    create_ocr_engine,
    ctc_decode,
    list_ocr_engines,
    ocr_image,
    rows,
)

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
            "from crossmodal_rag.ocr import create_ocr_engine, OcrUnavailableError\n"
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
