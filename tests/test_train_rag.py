"""``train rag``: the marginal loss against a hand computation, gradients into the query projection
and the generator, a short run that learns, checkpoints that reload exactly, ``ask`` with the
trained folder (projection auto-detected), and the encoder-mismatch error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from crossmodal_rag import Collection
from crossmodal_rag.cli import main
from crossmodal_rag.errors import EncoderMismatchError, ModelSpecError, SourceError
from crossmodal_rag.generation import Generator, RagPipeline, RagSettings
from crossmodal_rag.generation.checkpoint import (
    QUERY_PROJECTION_FILE,
    RAG_CONFIG_FILE,
    QueryProjection,
    RagCheckpointConfig,
    load_rag_checkpoint,
)
from crossmodal_rag.testing import make_tiny_causal_lm, make_tiny_t5
from crossmodal_rag.training import TrainSettings, split_indices, train
from crossmodal_rag.training.rag import (
    RagExample,
    RagTrainSettings,
    RagTrainTask,
    load_rag_examples,
    token_logprobs,
)

ENTITIES = ("blik", "dax", "wug", "fep", "tor", "mip")
COLOURS = ("red", "blue", "green", "gold")
CODES = iter(f"{a}{b}{c}" for a in "kqzx" for b in "aeiou" for c in "rstvn")
FACTS = [(e, c, next(CODES)) for e in ENTITIES for c in COLOURS]  # 24 passages, one code each
SHORT = {"prompt_template": "{context} | {question}", "item_template": "{text}"}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest (and steadiest on a busy machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_tiny_t5(tmp_path_factory.mktemp("t5") / "t5", seed=0)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["dropout_rate"] = 0.0
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory, tiny_oc_spec: str) -> dict[str, Path]:
    """A passage collection and a QA file whose answers each sit in exactly one passage."""
    root = tmp_path_factory.mktemp("facts")
    corpus = root / "passages.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{e} {c} code {code}."}) + "\n" for e, c, code in FACTS))
    with Collection.create(root / "coll", tiny_oc_spec) as coll:
        coll.add(corpus)
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"{e} {c} code?", "answer": code}) + "\n"
                          for e, c, code in FACTS))
    return {"collection": root / "coll", "qa": qa, "root": root}


def make_task(facts: dict[str, Path], generator: str | Path, coll: Collection, **kw: object) -> RagTrainTask:
    examples, skipped = load_rag_examples(facts["qa"])
    assert not skipped and len(examples) == len(FACTS)
    settings = RagTrainSettings(**{"k": 3, "candidates": 6, "temperature": 0.1, **SHORT, **kw})  # type: ignore[arg-type]
    return RagTrainTask(coll, str(generator), examples, settings)


def perturb(proj: QueryProjection, seed: int = 0, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.eye(proj.dim) + scale * torch.randn(proj.dim, proj.dim, generator=g)
    weights = {"weight": w}
    if proj.bias is not None:
        weights["bias"] = 0.1 * torch.randn(proj.dim, generator=g)
    proj.set_weights(weights)


def hand_priors(task: RagTrainTask, coll: Collection, i: int) -> tuple[list[int], np.ndarray]:
    """Top-k over the candidate set by numpy, from the raw vectors, and log P(z|x)."""
    s = task.settings
    q = coll.embed_query(task.examples[i].question)
    w = task.projection.weights()
    pq = w["weight"].double().numpy() @ q.astype(np.float64)
    if "bias" in w:
        pq = pq + w["bias"].double().numpy()
    pq /= np.linalg.norm(pq)
    ids = task.candidate_ids[i]
    z = coll.store.vectors(ids.tolist(), coll.manifest.dim).astype(np.float64)
    scores = z @ pq / s.temperature
    top = sorted(np.argsort(-scores, kind="stable")[: s.k].tolist(), key=lambda c: -scores[c])
    logits = scores[top]
    return top, logits - np.logaddexp.reduce(logits)


@pytest.mark.parametrize("mode", ["rag-sequence", "rag-token"])
def test_marginal_loss_matches_hand_computation(mode: str, facts: dict[str, Path], t5_dir: Path) -> None:
    with Collection.open(facts["collection"]) as coll:
        task = make_task(facts, t5_dir, coll, mode=mode, bias=True)
        perturb(task.projection)
        batch = [0, 5, 11, 17]
        with torch.no_grad():
            loss = float(task.loss(batch, train=False))
        g, pipe = task.generator, task.pipeline
        expected = []
        for i in batch:
            top, log_prior = hand_priors(task, coll, i)
            question, answer = task.questions[i], task.answers[i]
            prompts = [pipe.item_prompt(question, task.item_texts[i][c]) for c in top]
            if mode == "rag-sequence":  # log sum_z P(z|x) P(y|x,z), P(y|x,z) by the inference scorer
                ll = g.sequence_logprobs(prompts, [answer] * len(top))
                expected.append(-np.logaddexp.reduce(log_prior + ll))
            else:  # sum_t log sum_z P(z|x) P(y_t|x,z,y<t), by lock-step decoding (as rag-token asks)
                state = g.start(prompts)
                total = 0.0
                for tok in g.answer_ids(answer):
                    lp = state.logprobs()[:, tok].double().numpy()
                    total += np.logaddexp.reduce(log_prior + lp)
                    state.feed(tok)
                expected.append(-total)
        assert loss == pytest.approx(float(np.mean(expected)), rel=1e-4, abs=1e-4)


def test_token_logprobs_match_the_inference_scorer(tmp_path: Path) -> None:
    """Both generator kinds: the differentiable per-token scores sum to sequence_logprobs."""
    lm = Generator(str(make_tiny_causal_lm(tmp_path / "lm", seed=1)), device="cpu").load()
    t5 = Generator(str(make_tiny_t5(tmp_path / "t5", seed=1)), device="cpu").load()
    prompts = ["blik red code?", "a much longer prompt about the dax", "x"]
    answers = ["kar", "a two word answer", "zz"]
    for g in (lm, t5):
        tok, mask = token_logprobs(g, [g.prompt_ids(p) for p in prompts], [g.answer_ids(a) for a in answers])
        assert tok.shape == mask.shape
        assert mask.sum(1).tolist() == [len(g.answer_ids(a)) for a in answers]
        np.testing.assert_allclose(tok.sum(1).detach().numpy(), g.sequence_logprobs(prompts, answers),
                                   rtol=1e-5, atol=1e-4)


def test_gradients_reach_the_projection_and_the_generator(facts: dict[str, Path], t5_dir: Path) -> None:
    with Collection.open(facts["collection"]) as coll:
        task = make_task(facts, t5_dir, coll, bias=True, temperature=0.02)
        perturb(task.projection, scale=0.1)
        task.loss([0, 1, 2, 3], train=True).backward()
        assert task.projection.delta.grad is not None and task.projection.delta.grad.abs().sum() > 0
        assert task.projection.delta_bias is not None and task.projection.delta_bias.grad.abs().sum() > 0
        grads = [p.grad for p in task.generator.model.parameters()]
        assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)
        assert len(task.trainable_parameters()) == 2 + len(grads)

        frozen = make_task(facts, t5_dir, coll, freeze_generator=True)
        assert frozen.trainable_parameters() == [frozen.projection.delta]
        frozen.loss([0, 1], train=True).backward()
        assert all(p.grad is None for p in frozen.generator.model.parameters())
        assert frozen.projection.delta.grad.abs().sum() > 0


def test_short_training_lowers_the_loss_and_raises_the_answer_posterior(
    facts: dict[str, Path], t5_dir: Path, tmp_path: Path
) -> None:
    with Collection.open(facts["collection"]) as coll:
        task = make_task(facts, t5_dir, coll)
        train_idx, _ = split_indices(task.num_examples(), 0.0, 0)
        idx = train_idx.tolist()
        with torch.no_grad():
            loss0 = float(task.loss(idx, train=False))
        before = task.evaluate(idx)
        settings = TrainSettings(max_steps=50, batch_size=8, lr=5e-3, val_fraction=0.0, eval_every=50,
                                 checkpoint_every=50, patience=0, seed=0)
        train(task, settings, tmp_path / "run", progress=False)
        with torch.no_grad():
            loss1 = float(task.loss(idx, train=False))
        after = task.evaluate(idx)
    assert loss1 < 0.5 * loss0
    assert before["answer_in_topk"] > 0.3
    assert after["posterior_answer_item"] > before["posterior_answer_item"] + 0.05
    assert (tmp_path / "run" / "best" / QUERY_PROJECTION_FILE).is_file()


def test_checkpoint_reloads_with_identical_outputs(facts: dict[str, Path], t5_dir: Path, tmp_path: Path) -> None:
    with Collection.open(facts["collection"]) as coll:
        task = make_task(facts, t5_dir, coll, bias=True)
        perturb(task.projection, seed=3)
        with torch.no_grad():
            for p in task.generator.model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        task.save_artifact(tmp_path / "ckpt")
        ckpt = load_rag_checkpoint(tmp_path / "ckpt")
        config = json.loads((tmp_path / "ckpt" / RAG_CONFIG_FILE).read_text())
        assert RagCheckpointConfig.from_dict(config) == ckpt.config == task.checkpoint_config()
        assert ckpt.config.encoder == coll.manifest.encoder and ckpt.config.bias
        queries = np.random.default_rng(0).standard_normal((5, coll.manifest.dim)).astype(np.float32)
        with torch.no_grad():
            expected = task.projection(torch.from_numpy(queries)).numpy()
        np.testing.assert_allclose(ckpt.apply(queries), expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(ckpt.apply(queries[0])), 1.0, rtol=1e-6)
        prompts = [p for row in task.prompts[:3] for p in row]
        answers = [a for a in task.answers[:3] for _ in range(task.candidate_ids.shape[1])]
        reloaded = Generator(str(tmp_path / "ckpt"), device="cpu")
        np.testing.assert_allclose(reloaded.sequence_logprobs(prompts, answers),
                                   task.generator.sequence_logprobs(prompts, answers), rtol=1e-6, atol=1e-5)

        # resume state round trip: a fresh task loaded from the state computes the same loss
        other = make_task(facts, t5_dir, coll, bias=True)
        other.load_state_dict(task.state_dict())
        with torch.no_grad():
            assert float(other.loss([0, 1, 2], train=False)) == pytest.approx(
                float(task.loss([0, 1, 2], train=False)), rel=1e-6)


def test_settings_and_config_round_trip_and_reject_unknown_keys() -> None:
    s = RagTrainSettings(k=2, mode="rag-token", bias=True, question="what is it?")
    assert RagTrainSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(ValueError, match="unknown"):
        RagTrainSettings.from_dict({"k": 2, "kk": 3})
    for bad in ({"k": 0}, {"k": 4, "candidates": 2}, {"temperature": 0}, {"mode": "concat"},
                {"freeze_generator": True, "freeze_projection": True}, {"prompt_template": "{question}"}):
        with pytest.raises(ValueError):
            RagTrainSettings(**bad)  # type: ignore[arg-type]
    proj = QueryProjection(4, bias=False)
    with pytest.raises(ValueError):
        proj.set_weights({"weight": torch.eye(4), "bias": torch.zeros(4)})


def test_examples_from_qa_and_from_captioned_images(tmp_path: Path, photos: Path) -> None:
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "q1", "answers": ["a1", "b"]}\n\nnot json\n{"question": "q2"}\n'
                  '{"question": "q3", "answer": "a3", "image": "photos/cat.jpg"}\n'
                  '{"question": "q4", "answer": "a4", "image": "missing.jpg"}\n')
    assert photos == tmp_path / "photos"
    examples, skipped = load_rag_examples(qa)
    assert examples == [RagExample("a1", "q1"), RagExample("a3", "q3", str(tmp_path / "photos" / "cat.jpg"))]
    assert len(skipped) == 3 and any(":3:" in s for s in skipped) and any("missing.jpg" in s for s in skipped)

    pairs, skipped = load_rag_examples(photos)
    assert len(pairs) >= 5 and all(ex.image and ex.question is None for ex in pairs)
    cat = next(ex for ex in pairs if ex.image.endswith("cat.jpg"))
    assert cat.answer in (photos / "cat.txt").read_text()

    # a .jsonl with neither QA rows nor image-caption rows names both formats
    for text in ('{"q": 1}\n', ""):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(SourceError, match='holds no training pairs: a QA file needs rows like {"question"'):
            load_rag_examples(bad)


def test_image_caption_pairs_train_by_image_retrieval(sample_collection: Path, photos: Path, t5_dir: Path) -> None:
    examples, _ = load_rag_examples(photos)
    with Collection.open(sample_collection) as coll:
        task = RagTrainTask(coll, str(t5_dir), examples, RagTrainSettings(k=2, candidates=3, max_answer_chars=40))
        pipe = RagPipeline(coll, task.generator, RagSettings(k=2), query_projection=None)
        # the candidates are what the pipeline retrieves for the image (top-k at W = identity)
        hits, _ = pipe.retrieve(None, examples[0].image, 3, "texts")
        assert task.candidate_ids[0].tolist() == [h.id for h in hits]
        assert task.questions[0] == RagSettings().default_question
        loss = task.loss([0, 1], train=True)
        assert torch.isfinite(loss)


def test_cli_train_then_ask_and_chat_use_the_projection(facts: dict[str, Path], t5_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc = main(["-q", "train", "rag", str(facts["qa"]), "--collection", str(facts["collection"]), "--out", str(out),
               "--generator", str(t5_dir), "--k", "3", "--temperature", "0.2", "--steps", "4", "--batch-size", "4",
               "--lr", "1e-2", "--projection-lr-scale", "1", "--eval-every", "2", "--val-fraction", "0.25",
               "--prompt-template", SHORT["prompt_template"], "--item-template", SHORT["item_template"]])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == "rag" and summary["steps"] == 4 and summary["examples"] == len(FACTS)
    assert "answer_in_topk" in summary["val_metrics"]
    best = out / "best"
    ckpt = load_rag_checkpoint(best)
    assert not np.allclose(ckpt.projection.weights()["weight"].numpy(), np.eye(ckpt.config.dim))

    question = "blik red code?"
    rc = main(["ask", question, "--collection", str(facts["collection"]), "--generator", str(best), "--k", "3",
               "--mode", "rag-sequence", "--max-new-tokens", "6", "--json"])
    assert rc == 0
    answer = json.loads(capsys.readouterr().out)
    with Collection.open(facts["collection"]) as coll:  # oracle: search with the projected query
        hits = coll.search_vectors(ckpt.apply(coll.embed_query(question))[None], k=3, target="texts")[0]
    assert [s["id"] for s in answer["sources"]] == [h.id for h in hits]
    np.testing.assert_allclose([s["score"] for s in answer["sources"]], [h.score for h in hits], rtol=1e-5)
    scores = np.array([h.score for h in hits]) / 0.2  # the trained temperature
    np.testing.assert_allclose([s["prior"] for s in answer["sources"]],
                               np.exp(scores - np.logaddexp.reduce(scores)), rtol=1e-5)
    assert answer["prompts"][0].endswith(f" | {question}")  # the trained prompt template

    rc = main(["chat", "what about the dax?", "--collection", str(facts["collection"]), "--generator", str(best),
               "--k", "2", "--max-new-tokens", "4", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["sources"]


def test_mismatched_encoder_is_a_clear_error(facts: dict[str, Path], t5_dir: Path, tiny_hf_dir: Path,
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Collection.open(facts["collection"]) as coll:
        make_task(facts, t5_dir, coll).save_artifact(tmp_path / "ckpt")
    other = tmp_path / "other"
    with Collection.create(other, f"hf:{tiny_hf_dir}") as coll:  # also 32-d, different weights
        coll.add(facts["root"] / "passages.jsonl")
    with Collection.open(other) as coll, pytest.raises(EncoderMismatchError, match="trained for encoder"):
        RagPipeline(coll, str(tmp_path / "ckpt"))
    rc = main(["ask", "blik red code?", "--collection", str(other), "--generator", str(tmp_path / "ckpt")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "trained for encoder" in err and "Traceback" not in err
    # the same weights under another name (a moved model folder) are accepted by their probe
    with Collection.open(facts["collection"]) as coll:
        cfg = json.loads((tmp_path / "ckpt" / RAG_CONFIG_FILE).read_text())
        cfg["encoder"] = "open_clip:local-dir:/moved/elsewhere"
        (tmp_path / "ckpt" / RAG_CONFIG_FILE).write_text(json.dumps(cfg))
        assert RagPipeline(coll, str(tmp_path / "ckpt")).query_projection is not None
        (tmp_path / "ckpt" / QUERY_PROJECTION_FILE).unlink()
        with pytest.raises(ModelSpecError):
            load_rag_checkpoint(tmp_path / "ckpt")


def test_a_collection_whose_encoder_has_another_image_tower_is_refused(
        facts: dict[str, Path], t5_dir: Path, tiny_oc_dir: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from crossmodal_rag.maintenance import fingerprint
    from tests.test_collection import _with_other_image_tower

    ckpt = tmp_path / "ckpt"
    with Collection.open(facts["collection"]) as coll:
        make_task(facts, t5_dir, coll).save_artifact(ckpt)
    cfg = json.loads((ckpt / RAG_CONFIG_FILE).read_text())
    other = f"open_clip:local-dir:{_with_other_image_tower(tiny_oc_dir, tmp_path / 'other-image-tower')}"
    with Collection.create(tmp_path / "other", other) as coll:
        coll.add(facts["root"] / "passages.jsonl")
        stored = fingerprint.read(coll.store)
    assert stored is not None and stored.image is not None
    # the text towers agree (all the old check compared); the image towers do not
    assert fingerprint.rows_cosine(stored.text, np.asarray(cfg["encoder_probe"])) >= fingerprint.MIN_COSINE
    assert fingerprint.rows_cosine(stored.image, np.asarray(cfg["encoder_image_probe"])) < fingerprint.MIN_COSINE
    with Collection.open(tmp_path / "other") as coll, \
            pytest.raises(EncoderMismatchError, match="different embeddings from .*image tower.*trained for encoder"):
        RagPipeline(coll, str(ckpt))
    with Collection.open(facts["collection"]) as coll:  # its own collection: both towers agree
        assert RagPipeline(coll, str(ckpt)).query_projection is not None
    # a checkpoint written before image probes (format 1) still loads: text checked, a warning
    old = {k: v for k, v in cfg.items() if k != "encoder_image_probe"} | {"format_version": 1}
    (ckpt / RAG_CONFIG_FILE).write_text(json.dumps(old))
    assert load_rag_checkpoint(ckpt).config.encoder_image_probe is None
    with caplog.at_level(logging.WARNING, logger="crossmodal_rag"), Collection.open(facts["collection"]) as coll:
        assert RagPipeline(coll, str(ckpt)).query_projection is not None
    assert "only the text tower" in caplog.text and str(ckpt.resolve()) in caplog.text
