from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag import Collection
from crossmodal_rag.eval import (
    caption_scores,
    evaluate_captioning,
    evaluate_qa,
    evaluate_retrieval,
    exact_match,
    load_captioned,
    recall_at_k,
    token_f1,
)
from crossmodal_rag.generation import GenerationSettings, RagPipeline, RagSettings
from crossmodal_rag.testing import make_tiny_t5


def _brute_recall(sims: np.ndarray, cap_img: np.ndarray, k: int) -> tuple[float, float]:
    hits_t2i = []
    for c in range(sims.shape[0]):
        order = sorted(range(sims.shape[1]), key=lambda i: -sims[c, i])
        hits_t2i.append(cap_img[c] in order[:k])
    hits_i2t = []
    for i in range(sims.shape[1]):
        order = sorted(range(sims.shape[0]), key=lambda c: -sims[c, i])
        hits_i2t.append(any(cap_img[c] == i for c in order[:k]))
    return float(np.mean(hits_t2i)), float(np.mean(hits_i2t))


def test_recall_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    cap_img = np.repeat(np.arange(30), [1 + (i % 3) for i in range(30)])
    sims = rng.standard_normal((len(cap_img), 30))
    sims[np.arange(len(cap_img)), cap_img] += 1.5  # make it not hopeless
    t2i, i2t = recall_at_k(sims, cap_img, (1, 5, 10))
    for k in (1, 5, 10):
        assert (t2i[f"R@{k}"], i2t[f"R@{k}"]) == pytest.approx(_brute_recall(sims, cap_img, k))


def _by_hand(spec: str, items: list) -> tuple[np.ndarray, np.ndarray]:
    """(caption x image similarities, caption -> image) from the encoder run by hand."""
    from crossmodal_rag.encoders import load_encoder
    from crossmodal_rag.ingestion.images import load_image

    enc = load_encoder(spec)
    img = enc.encode_images([load_image(it.path).image for it in items])
    caps = [c for it in items for c in it.captions]
    cap_img = np.array([i for i, it in enumerate(items) for _ in it.captions])
    return enc.encode_texts(caps) @ img.T, cap_img


def test_evaluate_retrieval_on_sample_and_karpathy(tmp_path: Path, sample_dir: Path, tiny_oc_spec: str) -> None:
    report = evaluate_retrieval(sample_dir, tiny_oc_spec)
    assert (report.images, report.captions) == (15, 45)
    # oracle: the same encoder run by hand over the same pairs, ranked by brute force
    sims, cap_img = _by_hand(tiny_oc_spec, load_captioned(sample_dir))
    for k in (1, 5, 10):
        want = _brute_recall(sims, cap_img, k)
        assert (report.text_to_image[f"R@{k}"], report.image_to_text[f"R@{k}"]) == pytest.approx(want, abs=1e-9)
    np.testing.assert_allclose(report.positive_scores, sims[np.arange(len(cap_img)), cap_img], atol=1e-4)
    other = sims[cap_img[:, None] != np.arange(sims.shape[1])[None, :]]  # caption vs another image
    assert report.negative_scores
    assert np.abs(np.array(report.negative_scores)[:, None] - other[None, :]).min(1).max() < 2e-4
    karpathy = {"images": [
        {"filepath": "space", "filename": "astronaut.jpg", "split": "test", "sentences": [{"raw": "an astronaut"}]},
        {"filepath": "", "filename": "cat.jpg", "split": "test", "sentences": [{"raw": "a cat"}, {"raw": "a tabby"}]},
        {"filepath": "", "filename": "coffee.jpg", "split": "train", "sentences": [{"raw": "coffee"}]},
    ]}
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    items = load_captioned(tmp_path / "k.json", split="test", image_root=sample_dir)
    assert [i.path.name for i in items] == ["astronaut.jpg", "cat.jpg"] and items[1].captions == ("a cat", "a tabby")
    rep = evaluate_retrieval(tmp_path / "k.json", tiny_oc_spec, split="test", image_root=sample_dir, ks=(1, 2))
    assert (rep.images, rep.captions) == (2, 3) and set(rep.text_to_image) == {"R@1", "R@2"}
    sims, cap_img = _by_hand(tiny_oc_spec, items)
    want = _brute_recall(sims, cap_img, 1)  # R@2 of 2 images is 1 whatever the model does
    assert (rep.text_to_image["R@1"], rep.image_to_text["R@1"]) == pytest.approx(want, abs=1e-9)


def test_qa_metrics_by_hand() -> None:
    assert exact_match("The Cat!", ["a cat", "dog"]) == 1.0
    assert exact_match("cat food", ["cat"]) == 0.0
    # "the black cat" vs "a cat": tokens [black, cat] vs [cat]: P=1/2, R=1 -> F1=2/3
    assert token_f1("the black cat", ["a cat"]) == pytest.approx(2 / 3)
    assert token_f1("", ["cat"]) == 0.0 and token_f1("", [""]) == 1.0


def test_caption_scores() -> None:
    refs = [["a cat sitting on a mat", "a cat on a mat"], ["a red car on a street", "a parked red car"]]
    perfect = caption_scores(["a cat sitting on a mat", "a red car on a street"], refs)
    wrong = caption_scores(["two dogs running", "a plate of food"], refs)
    assert perfect["bleu4"] > 0.9 and perfect["rouge_l"] > 0.9 and perfect["cider"] > wrong["cider"]
    assert wrong["bleu4"] < 0.1 and wrong["rouge_l"] < 0.2


def test_generation_eval_runs(sample_collection: Path, sample_dir: Path, tmp_path: Path) -> None:
    t5 = str(make_tiny_t5(tmp_path / "t5"))
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "what animal?", "answers": ["cat"]}\n{"question": "x"}\n'
                  '{"question": "what is it?", "answer": "coffee", "image": "' + str(sample_dir / "coffee.jpg") + '"}\n')
    with Collection.open(sample_collection) as coll:
        pipe = RagPipeline(coll, t5, RagSettings(k=2), GenerationSettings(max_new_tokens=3))
        rep = evaluate_qa(pipe, qa)
        assert rep.n == 2 and len(rep.skipped) == 1 and {"exact_match", "f1"} == set(rep.scores)
        assert {"retrieve", "generate"} <= set(rep.timings)
        cap = evaluate_captioning(pipe, sample_dir, limit=3)
        assert cap.n == 3 and {"bleu4", "rouge_l", "cider"} == set(cap.scores)
        # the image itself is never among its own sources
        for ex in cap.examples:
            assert ex["sources"] and ex["image"] not in ex["sources"]


def test_viz_writes_pngs(sample_collection: Path, tmp_path: Path) -> None:
    from crossmodal_rag import viz

    with Collection.open(sample_collection) as coll:
        hits = coll.search("a cat", k=4, mode="dense")
        viz.result_grid(hits, save=tmp_path / "grid.png")
        viz.embedding_map(coll, save=tmp_path / "map.png")
        viz.recall_curves({"m": {"text_to_image": {"R@1": 0.1, "R@5": 0.5}, "image_to_text": {"R@1": 0.2, "R@5": 0.6}}},
                          save=tmp_path / "recall.png")
        viz.score_histogram([0.3, 0.32, 0.31], [0.1, 0.12, 0.2], threshold=0.25, save=tmp_path / "hist.png")
        viz.latency_chart({"concat": {"retrieve": 0.01, "generate": 0.2}}, save=tmp_path / "lat.png")
        with pytest.raises(ValueError, match="umap|method"):
            viz.embedding_map(coll, method="tsne")
    for name in ("grid", "map", "recall", "hist", "lat"):
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_generation_eval_retrieves_from_the_text_space(tmp_path: Path, tiny_oc_spec: str, sample_dir: Path) -> None:
    """`eval generation` asks as `ask` does: in a collection with a text space (index
    --text-model), each question's sources are the text space's own top-k for it."""
    from sentence_models import make_text_space_collection

    from crossmodal_rag.search.text_space import open_text_space

    passages = ["the red bridge crosses the river", "a cargo ship carried salt", "the festival is held in may"]
    folder = make_text_space_collection(tmp_path, tiny_oc_spec, sample_dir, passages, seed=2)
    qa = tmp_path / "qa.jsonl"
    questions = ["what did the ship carry?", "when is the festival?"]
    qa.write_text("".join(json.dumps({"question": q, "answer": "salt"}) + "\n" for q in questions))
    t5 = str(make_tiny_t5(tmp_path / "t5"))
    with Collection.open(folder) as coll:
        space = open_text_space(coll)
        pipe = RagPipeline(coll, t5, RagSettings(k=2, search_mode="dense"), GenerationSettings(max_new_tokens=2))
        rep = evaluate_qa(pipe, qa)
        assert [ex["sources"] for ex in rep.examples] == [
            [h.id for h in space.search(coll.store, q, k=2)] for q in questions]
        # keyword mode is honoured in a collection with a text space too (issue 27): its sources
        # are the keyword ranking's, as `search --mode keyword` gives it
        pipe = RagPipeline(coll, t5, RagSettings(k=2, search_mode="keyword"), GenerationSettings(max_new_tokens=2))
        rep = evaluate_qa(pipe, qa)
        assert [ex["sources"] for ex in rep.examples] == [
            [h.id for h in coll.search(q, k=2, target=pipe.settings.target, mode="keyword")] for q in questions]
