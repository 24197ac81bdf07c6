"""ONNX encoders (issue 29): export of tiny open_clip, transformers CLIP and sentence models,
equality with torch (fp32 within 1e-5), int8 towers, the fingerprint across runtimes, the
runtime choice and the export cache, and queries that never import torch (subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag.encoders import ClipEncoder, load_encoder, parse_model_spec
from crossmodal_rag.errors import EncoderMismatchError, ModelSpecError

TEXTS = ["a photo of a dog", "x", "a red car parked on a street at night " * 12, ""]


@pytest.fixture(scope="module")
def oc_export(tmp_path_factory: pytest.TempPathFactory, tiny_oc_spec: str) -> Path:
    """The tiny open_clip model exported through the real CLI, int8 towers included."""
    from crossmodal_rag.cli import main

    out = tmp_path_factory.mktemp("onnx") / "oc"
    assert main(["export-onnx", "-m", tiny_oc_spec, "--out", str(out), "--int8", "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory: pytest.TempPathFactory, tiny_hf_dir: Path) -> Path:
    from crossmodal_rag.encoders.onnx_export import export_clip

    return export_clip(f"hf:{tiny_hf_dir}", tmp_path_factory.mktemp("onnx") / "hf").folder


def test_export_layout_is_immichs(oc_export: Path, tiny_oc_spec: str) -> None:
    for name in ("config.json", "visual/model.onnx", "visual/preprocess_cfg.json", "visual/model_int8.onnx",
                 "textual/model.onnx", "textual/model_int8.onnx", "textual/tokenizer.json",
                 "textual/tokenizer_config.json"):
        assert (oc_export / name).is_file(), name
    config = json.loads((oc_export / "config.json").read_text())
    assert config["embed_dim"] == 32 and config["text_cfg"]["context_length"] == 77
    prep = json.loads((oc_export / "visual" / "preprocess_cfg.json").read_text())
    assert prep["size"] == [32, 32] and prep["resize_mode"] == "shortest"
    info = json.loads((oc_export / "crossmodal_rag_export.json").read_text())
    assert info["source"] == str(parse_model_spec(tiny_oc_spec)) and info["text_dynamic_length"]
    assert str(parse_model_spec(str(oc_export))) == f"onnx:{oc_export}"  # a bare folder is recognised


def test_open_clip_export_equals_torch(oc_export: Path, tiny_oc_spec: str, sample_dir: Path) -> None:
    torch_enc, onnx_enc = ClipEncoder(tiny_oc_spec), ClipEncoder(f"onnx:{oc_export}")
    assert onnx_enc.dim == torch_enc.dim == 32 and onnx_enc.max_text_tokens == 77
    # batches of mixed lengths (the ONNX text tower is cut after the longest) and one by one
    expected = torch_enc.encode_texts(TEXTS)
    assert np.abs(onnx_enc.encode_texts(TEXTS) - expected).max() <= 1e-5
    assert np.abs(np.concatenate([onnx_enc.encode_texts(t) for t in TEXTS]) - expected).max() <= 1e-5
    photos = sorted(sample_dir.glob("*.jpg"))[:4]
    assert np.abs(onnx_enc.encode_images(photos) - torch_enc.encode_images(photos)).max() <= 1e-5
    assert onnx_enc.text_windows("word " * 200) == torch_enc.text_windows("word " * 200)
    # a folder in immich's layout alone (no crossmodal_rag_export.json) loads the same
    import shutil

    immich = oc_export.parent / "immich-layout"
    shutil.copytree(oc_export, immich, ignore=shutil.ignore_patterns("crossmodal_rag_export.json", "*int8*"))
    assert np.abs(ClipEncoder(f"onnx:{immich}").encode_texts(TEXTS) - expected).max() <= 1e-5
    # int8 towers run and stay close to fp32
    int8 = ClipEncoder(f"onnx:int8:{oc_export}")
    assert ((int8.encode_texts(TEXTS) * expected).sum(1) > 0.95).all()
    assert int8.encode_images(photos).shape == (4, 32)


def test_transformers_export_equals_torch(hf_export: Path, tiny_hf_dir: Path, sample_dir: Path) -> None:
    torch_enc, onnx_enc = ClipEncoder(f"hf:{tiny_hf_dir}"), ClipEncoder(f"onnx:{hf_export}")
    assert np.abs(onnx_enc.encode_texts(TEXTS[:3]) - torch_enc.encode_texts(TEXTS[:3])).max() <= 1e-5
    # the towers on the same pixels (transformers' own resize differs from PIL's in the last bits)
    import torch

    pixels = torch.stack([torch_enc.preprocess(im) for im in _photos(sample_dir)])
    assert np.abs(onnx_enc.encode_pixels(pixels.numpy()) - torch_enc.encode_pixels(pixels)).max() <= 1e-5


def _photos(sample_dir: Path) -> list:
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in sorted(sample_dir.glob("*.jpg"))[:3]]


def test_fingerprint_accepts_the_export_and_refuses_other_weights(
        collection_copy: Path, oc_export: Path, hf_export: Path, tiny_oc_spec: str) -> None:
    from crossmodal_rag import Collection

    with Collection.open(collection_copy) as coll:
        expected = [(h.id, round(h.score, 5)) for h in coll.search("a cat on a sofa", k=5, mode="dense").hits]
    with Collection.open(collection_copy, model=f"onnx:{oc_export}") as coll:
        got = [(h.id, round(h.score, 5)) for h in coll.search("a cat on a sofa", k=5, mode="dense").hits]
    assert got == expected
    with pytest.raises(EncoderMismatchError, match="probe cosine"):
        Collection.open(collection_copy, model=f"onnx:{hf_export}")  # same dimension, other weights
    # the pass is remembered in the export (the next cold query loads no image tower) for this
    # fingerprint only: a collection whose stored probe differs is checked again, and refused
    assert (oc_export / "verified_fingerprints.json").is_file()
    from crossmodal_rag.maintenance import fingerprint
    from crossmodal_rag.store.metadata import MetadataStore

    store = MetadataStore(collection_copy)
    stored = fingerprint.read(store)
    with store.snapshot():
        fingerprint.write(store, fingerprint.Fingerprint(-stored.text, stored.image))
    store.close()
    with pytest.raises(EncoderMismatchError, match="text tower"):
        Collection.open(collection_copy, model=f"onnx:{oc_export}")


def test_collection_built_on_onnx_grows_and_searches_with_torch(
        tmp_path: Path, oc_export: Path, tiny_oc_spec: str, photos: Path) -> None:
    from crossmodal_rag import Collection
    from crossmodal_rag.search import SearchRequest

    folder = tmp_path / "c"
    with Collection.create(folder, f"onnx:{oc_export}") as coll:
        assert coll.add(photos).images_added == 5
    with Collection.open(folder, model=tiny_oc_spec, writable=True) as coll:  # and back to torch
        hits = coll.search(SearchRequest(image=str(photos / "cat.jpg"), k=1, mode="dense")).hits
        assert Path(hits[0].path).name == "cat.jpg" and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_runtime_choice_and_export_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         oc_export: Path, tiny_oc_spec: str) -> None:
    import shutil

    from crossmodal_rag.encoders.onnx_runtime import (
        RUNTIME_ENV,
        cached_clip_export,
        resolve_clip_spec,
    )

    spec = parse_model_spec(tiny_oc_spec)
    monkeypatch.setenv("CROSSMODAL_RAG_ONNX_DIR", str(tmp_path))
    monkeypatch.setenv(RUNTIME_ENV, "onnx")
    with pytest.raises(ModelSpecError, match="export-onnx --model"):
        resolve_clip_spec(spec)
    monkeypatch.setenv(RUNTIME_ENV, "auto")
    assert resolve_clip_spec(spec) == spec  # no export cached: torch
    shutil.copytree(oc_export, cached_clip_export(str(spec)))
    assert resolve_clip_spec(spec).backend == "onnx"
    assert load_encoder(spec).spec.backend == "onnx"
    monkeypatch.setenv(RUNTIME_ENV, "torch")
    assert resolve_clip_spec(spec) == spec
    monkeypatch.setenv(RUNTIME_ENV, "fast")
    with pytest.raises(ModelSpecError, match="auto, torch, onnx"):
        resolve_clip_spec(spec)
    with pytest.raises(ModelSpecError, match="not an ONNX CLIP export"):
        ClipEncoder(f"onnx:{tmp_path / 'nothing'}").load()


def test_sentence_encoder_export_equals_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from crossmodal_rag.encoders.onnx_export_text import export_sentence
    from crossmodal_rag.encoders.onnx_runtime import RUNTIME_ENV, cached_text_export
    from crossmodal_rag.encoders.onnx_sentence import OnnxSentenceBackend
    from crossmodal_rag.encoders.sentence import SentenceEncoder
    from tests.sentence_models import make_tiny_sentence_model

    spec = str(make_tiny_sentence_model(tmp_path / "st"))
    texts = ["a photo of a dog", "what is the capital of france?", "x " * 40]
    monkeypatch.setenv(RUNTIME_ENV, "torch")
    torch_enc = SentenceEncoder(spec)
    expected = torch_enc.encode_texts(texts)
    monkeypatch.setenv("CROSSMODAL_RAG_ONNX_DIR", str(tmp_path / "cache"))
    folder = export_sentence(spec, cached_text_export(spec), int8=True)
    monkeypatch.setenv(RUNTIME_ENV, "auto")
    enc = SentenceEncoder(spec)
    got = enc.encode_texts(texts)
    assert enc.backend_name == "onnx" and enc.device == "cpu"
    assert np.abs(got - expected).max() <= 1e-5
    assert enc.count_tokens("a dog, 2 cats") == torch_enc.count_tokens("a dog, 2 cats") > 3
    assert enc.max_text_tokens == torch_enc.max_text_tokens == 24
    int8 = OnnxSentenceBackend(folder, int8=True).encode(texts, "cpu")
    assert int8.shape == expected.shape and np.isfinite(int8).all()


_NO_TORCH = """
import sys
from crossmodal_rag import Collection
from crossmodal_rag.cli import main
with Collection.open(sys.argv[1]) as coll:
    assert coll.search("a cat", k=3).hits
assert "torch" not in sys.modules, "Collection.search imported torch"
assert main(["search", "a cat", "-c", sys.argv[1], "-k", "2", "-q"]) == 0
assert main(["search", "-c", sys.argv[1], "--image", sys.argv[2], "-k", "2", "-q", "--json"]) == 0
assert "torch" not in sys.modules, "the CLI search imported torch"
from fastapi.testclient import TestClient
from crossmodal_rag.generation.bundled import bundled_gguf
from crossmodal_rag.web.app import create_app
from crossmodal_rag.web.settings import WebSettings
app = create_app(WebSettings(collection=sys.argv[1], generator=str(bundled_gguf("smollm2")), max_new_tokens=4))
with TestClient(app, base_url="http://127.0.0.1") as client:
    found = client.get("/api/search", params={"q": "a cat", "k": 2})
    assert found.status_code == 200 and found.json()["results"], found.text
    assert "torch" not in sys.modules, "serve (start-up with a llama.cpp generator, search) imported torch"
    answered = client.post("/api/ask", json={"question": "What animal is it?", "k": 1, "mode": "concat", "target": "images"})
    assert answered.status_code == 200 and answered.json()["answer"], answered.text
assert "torch" not in sys.modules, "an answer in concat mode on llama.cpp imported torch"
print("torch-free")
"""


def test_queries_on_an_onnx_collection_never_import_torch(tmp_path: Path, oc_export: Path, sample_dir: Path) -> None:
    from crossmodal_rag import Collection

    folder = tmp_path / "c"
    with Collection.create(folder, f"onnx:{oc_export}") as coll:
        coll.add(sample_dir / "cat.jpg")
    env = dict(os.environ, CROSSMODAL_RAG_TEXT_MODEL="none")
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, str(folder), str(sample_dir / "cat.jpg")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch-free" in done.stdout
