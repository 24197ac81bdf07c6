"""Image prefixes: the mapper, its checkpoints, generation with prefix embeddings (checked against
hand-built ``inputs_embeds`` forward passes), RAG and captioning with prefixes, and training."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from crossmodal_rag import Collection, ModelSpecError, WeightsUnavailableError
from crossmodal_rag.cli import main
from crossmodal_rag.generation import GenerationSettings, Generator, RagPipeline, RagSettings
from crossmodal_rag.generation.caption import Captioner
from crossmodal_rag.generation.prefix import (
    ImagePrefix,
    PrefixConfig,
    PrefixMapper,
    PrefixMismatchError,
    PrefixSettings,
    caption_prompt,
    load_image_prefix,
)

SMALL = PrefixSettings(prefix_length=3, hidden_size=16, num_layers=1)


@pytest.fixture(scope="module", params=["seq2seq", "causal"])
def gen(request: pytest.FixtureRequest, t5_dir: Path, lm_dir: Path) -> Generator:
    return Generator(str(t5_dir if request.param == "seq2seq" else lm_dir), device="cpu").load()


def make_prefix(folder: Path, encoder: str, generator: str, *, dim: int = 32, embed: int = 32,
                settings: PrefixSettings = SMALL, seed: int = 0, retrieval_k: int = 0) -> Path:
    torch.manual_seed(seed)
    mapper = PrefixMapper(settings, dim, embed)
    config = PrefixConfig(settings=settings, encoder=encoder, encoder_dim=dim, generator=generator,
                          embed_dim=embed, retrieval_k=retrieval_k)
    ImagePrefix(config, mapper).save(folder)
    return folder


def naive_logprob(g: Generator, prompt: str, answer: str, prefix: torch.Tensor) -> float:
    """log P(answer | prefix, prompt): one unpadded sequence, embeddings concatenated by hand,
    one forward pass per answer token."""
    table = g.model.get_input_embeddings()
    p_ids, a_ids = g.prompt_ids(prompt), g.answer_ids(answer)
    total = 0.0
    with torch.no_grad():
        for t, tok in enumerate(a_ids):
            if g.kind == "seq2seq":
                enc = torch.cat([prefix, table(torch.tensor(p_ids))])[None]
                dec = torch.tensor([[g.model.config.decoder_start_token_id, *a_ids[:t]]])
                logits = g.model(inputs_embeds=enc, decoder_input_ids=dec).logits
            else:
                seq = torch.cat([prefix, table(torch.tensor(p_ids + a_ids[:t]))])[None]
                logits = g.model(inputs_embeds=seq).logits
            total += float(torch.log_softmax(logits[0, -1].double(), -1)[tok])
    return total


# -- the mapper and its checkpoints --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_mapper_shapes_and_checkpoint_round_trip(kind: str, tmp_path: Path, tiny_oc_spec: str) -> None:
    s = PrefixSettings(kind=kind, prefix_length=5, hidden_size=16, num_layers=2, num_heads=2)
    assert PrefixSettings.from_dict(json.loads(json.dumps(s.__dict__))) == s
    folder = make_prefix(tmp_path / "ckpt", tiny_oc_spec, "t5-folder", dim=24, embed=40, settings=s)
    prefix = load_image_prefix(folder, device="cpu")
    x = np.random.default_rng(0).normal(size=(3, 24)).astype(np.float32)
    out = prefix.prefixes(x)
    assert out.shape == (3, 5, 40)
    torch.manual_seed(0)  # the same initial weights as saved
    again = PrefixMapper(s, 24, 40).eval()
    with torch.no_grad():
        np.testing.assert_array_equal(out.numpy(), again(torch.from_numpy(x)).numpy())
    assert prefix.config.settings == s and prefix.config.encoder == tiny_oc_spec
    with pytest.raises(PrefixMismatchError, match="24-d"):
        prefix.prefixes(np.zeros((1, 32), np.float32))
    with pytest.raises(ValueError, match="unknown prefix settings"):
        PrefixSettings.from_dict({"kind": "mlp", "length": 4})
    with pytest.raises(ValueError, match="mapper kind"):
        PrefixSettings(kind="lstm")


def test_mapper_input_scaling(tmp_path: Path, tiny_oc_spec: str) -> None:
    """scale_input multiplies the unit-length embedding by sqrt(D) before the network; a checkpoint
    written before the setting existed loads with it off (so its outputs do not change)."""
    scaled = PrefixSettings(prefix_length=2, hidden_size=8, num_layers=1)
    plain = PrefixSettings(prefix_length=2, hidden_size=8, num_layers=1, scale_input=False)
    assert scaled.scale_input
    torch.manual_seed(0)
    a = PrefixMapper(scaled, 16, 4).eval()
    b = PrefixMapper(plain, 16, 4).eval()
    b.load_state_dict(a.state_dict())
    x = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x * 4.0))  # sqrt(16)
        assert not torch.allclose(a(x), b(x))
    folder = make_prefix(tmp_path / "old", tiny_oc_spec, "t5-folder", dim=16, embed=4, settings=plain)
    cfg = json.loads((folder / "prefix_config.json").read_text())
    del cfg["settings"]["scale_input"]  # as written by an earlier version
    (folder / "prefix_config.json").write_text(json.dumps(cfg))
    assert load_image_prefix(folder, device="cpu").config.settings.scale_input is False


def test_checkpoint_errors(tmp_path: Path, tiny_oc_spec: str, t5_dir: Path, lm_dir: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelSpecError, match="does not exist or has no prefix_config.json"):
        load_image_prefix(tmp_path / "missing")
    folder = make_prefix(tmp_path / "ckpt", tiny_oc_spec, str(t5_dir))
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "prefix_config.json").write_text("{not json")
    with pytest.raises(ModelSpecError, match="invalid prefix_config.json"):
        load_image_prefix(bad)
    (bad / "prefix_config.json").write_text((folder / "prefix_config.json").read_text())
    (bad / "mapper.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ModelSpecError, match="damaged"):
        load_image_prefix(bad)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsUnavailableError, match="--image-prefix"):
        load_image_prefix("someorg/some-prefix")

    prefix = load_image_prefix(folder)
    prefix.check_encoder(tiny_oc_spec, 32)
    with pytest.raises(PrefixMismatchError, match=r"trained on embeddings of .*xmrag|train prefix"):
        prefix.check_encoder("hf:/elsewhere/clip", 32)
    with pytest.raises(PrefixMismatchError, match="64-d"):
        prefix.check_encoder(tiny_oc_spec, 64)
    prefix.check_generator(Generator(str(t5_dir), device="cpu"))
    with pytest.raises(PrefixMismatchError, match=str(lm_dir)):
        prefix.check_generator(Generator(str(lm_dir), device="cpu"))


# -- generation with prefixes ----------------------------------------------------------------------
def test_scoring_with_prefixes_matches_hand_built_embeddings(gen: Generator) -> None:
    h = gen.model.get_input_embeddings().embedding_dim
    torch.manual_seed(1)
    pa, pb = torch.randn(3, h), torch.randn(5, h)
    prompts = ["question: what is it?", "a longer prompt " * 3, "x"]
    answers = ["a red circle", "", "it is a square"]
    got = gen.sequence_logprobs(prompts, answers, prefixes=[pa, pb, pa])
    want = [naive_logprob(gen, p, a, x) for p, a, x in zip(prompts, answers, [pa, pb, pa], strict=True)]
    np.testing.assert_allclose(got, want, atol=2e-3)
    plain = gen.sequence_logprobs(prompts, answers)
    np.testing.assert_array_equal(gen.sequence_logprobs(prompts, answers, prefixes=[None] * 3), plain)
    assert np.all(np.abs(got - plain) > 1e-4)  # the prefix changes what the model reads
    # mixed batch: rows without a prefix score as they do alone
    mixed = gen.sequence_logprobs(prompts, answers, prefixes=[pa, None, None])
    np.testing.assert_allclose(mixed[1:], plain[1:], atol=2e-3)
    # gradients reach the prefix vectors (what train prefix relies on)
    x = pa.clone().requires_grad_(True)
    tok, sel = gen.token_logprobs(prompts[:1], answers[:1], prefixes=[x])
    (tok * sel).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_generate_and_lockstep_decoding_with_prefixes_agree(gen: Generator) -> None:
    h = gen.model.get_input_embeddings().embedding_dim
    torch.manual_seed(2)
    prefixes = [torch.randn(4, h) * 3, torch.randn(4, h) * 3]
    prompts = ["describe the image:", "a much longer prompt about the image"]
    settings = GenerationSettings(max_new_tokens=6)
    texts = gen.generate(prompts, settings, prefixes=prefixes)
    eos = gen.tokenizer.eos_token_id
    for i, p in enumerate(prompts):  # greedy by hand through DecodeState, one row
        state = gen.start([p], [prefixes[i]])
        tokens = []
        for _ in range(6):
            tok = int(torch.argmax(state.logprobs()[0]))
            tokens.append(tok)
            if tok == eos:
                break
            state.feed(tok)
        want = gen.tokenizer.decode([t for t in tokens if t != eos], skip_special_tokens=True).strip()
        assert texts[i][0] == want
    # lock-step rows equal single-row decoding (padding and the cache handle prefixes)
    both = gen.start(prompts, prefixes).logprobs()
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(both[i].numpy(), gen.start([p], [prefixes[i]]).logprobs()[0].numpy(),
                                   atol=1e-4)
    plain = gen.start(prompts).logprobs()
    assert not torch.allclose(plain, both, atol=1e-3)


@pytest.fixture(scope="module")
def prefix_ckpts(tmp_path_factory: pytest.TempPathFactory, tiny_oc_spec: str, t5_dir: Path,
                 lm_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prefixes")
    return {"seq2seq": make_prefix(root / "t5", tiny_oc_spec, str(t5_dir), retrieval_k=2),
            "causal": make_prefix(root / "lm", tiny_oc_spec, str(lm_dir))}


@pytest.mark.parametrize("mode", ["concat", "rag-sequence", "rag-token"])
def test_rag_with_image_prefixes(mode: str, gen: Generator, prefix_ckpts: dict[str, Path],
                                 sample_collection: Path, sample_dir: Path) -> None:
    prefix = load_image_prefix(prefix_ckpts[gen.kind], device="cpu")
    with Collection.open(sample_collection) as coll:
        pipe = RagPipeline(coll, gen, RagSettings(k=2, mode=mode, target="all"),
                           GenerationSettings(max_new_tokens=5), image_prefix=prefix)
        ans = pipe.ask("what is it?", image=sample_dir / "cat.jpg")
        qvec = coll.embed_query(image=sample_dir / "cat.jpg")
        enc = coll.encoder
    assert ans.image_prefix == str(prefix_ckpts[gen.kind].resolve())
    q = prefix.prefixes(qvec)[0]
    # each item's prompt carries its own image's prefix (images) or the query's (captions)
    item_prefixes = []
    for s in ans.sources:
        if s.kind == "image":
            assert s.prefix_image == s.path
            item_prefixes.append(prefix.prefixes(enc.encode_images([s.path]))[0])
        else:
            assert s.prefix_image == str(sample_dir / "cat.jpg")
            item_prefixes.append(q)
    prompts = [pipe.item_prompt(ans.question, s.text) for s in ans.sources]
    if mode == "rag-token":  # oracle: each item decoded alone, the next-token mixtures by hand
        states = [gen.start([p], [x]) for p, x in zip(prompts, item_prefixes, strict=True)]
        log_prior = torch.tensor(np.log([s.prior for s in ans.sources]), dtype=torch.float32)[:, None]
        tokens: list[int] = []
        for _ in range(5):
            lp = torch.cat([st.logprobs() for st in states])
            tokens.append(int(torch.argmax(torch.logsumexp(lp + log_prior, 0))))
            if tokens[-1] == gen.tokenizer.eos_token_id:
                break
            for st in states:
                st.feed(tokens[-1])
        assert ans.answer == gen.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    # every mode scores the returned text (plus the end token) under each item's prompt
    # (concat's [n] citations are added after scoring: issue 28)
    text = re.sub(r"\s*\[\d+\]", "", ans.answer).strip() if mode == "concat" else ans.answer
    want = gen.sequence_logprobs(prompts, [text] * len(prompts), prefixes=item_prefixes)
    np.testing.assert_allclose([s.logprob for s in ans.sources], want, atol=2e-3)
    if mode == "concat":
        assert ans.prefix_images == [str(sample_dir / "cat.jpg")]
        expected = gen.generate(ans.prompts, pipe.generation, prefixes=[q])[0][0]
        assert text == expected  # the decoded text, before its citation
    else:
        assert ans.prefix_images == [s.prefix_image for s in ans.sources]


def test_pipeline_refuses_a_mismatched_prefix(prefix_ckpts: dict[str, Path], sample_collection: Path,
                                              lm_dir: Path) -> None:
    prefix = load_image_prefix(prefix_ckpts["seq2seq"], device="cpu")
    with Collection.open(sample_collection) as coll, pytest.raises(PrefixMismatchError, match="generator"):
        RagPipeline(coll, Generator(str(lm_dir), device="cpu"), image_prefix=prefix)


# -- captioning ------------------------------------------------------------------------------------
def test_caption_cli_end_to_end(prefix_ckpts: dict[str, Path], sample_collection: Path, sample_dir: Path,
                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(prefix_ckpts["seq2seq"])
    cat, coffee = str(sample_dir / "cat.jpg"), str(sample_dir / "coffee.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    args = ["caption", cat, str(broken), coffee, "--collection", str(sample_collection),
            "--image-prefix", ckpt, "--max-new-tokens", "6"]
    assert main(args) == 2  # a bad image is reported, the others are captioned
    out, err = capsys.readouterr()
    assert "broken.jpg" in err and len(out.strip().splitlines()) == 2
    assert main(["caption", cat, "--collection", str(sample_collection), "--image-prefix", ckpt,
                 "--max-new-tokens", "6", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    # the oracle: the same neighbours (the image itself left out), prompt and greedy caption
    prefix = load_image_prefix(ckpt, device="cpu")
    with Collection.open(sample_collection) as coll:
        vec = coll.encoder.encode_images([cat])
        hits = [h for h in coll.search_vectors(vec, k=3, target="texts")[0]
                if Path(h.path or "").resolve() != Path(cat).resolve()][:2]
        assert [s["id"] for s in record["sources"]] == [h.id for h in hits]
        assert record["prompt"] == caption_prompt([h.text for h in hits])
        g = Generator(prefix.generator_spec, device="cpu")
        want = g.generate([record["prompt"]], GenerationSettings(max_new_tokens=6),
                          prefixes=[prefix.prefixes(vec)[0]])[0][0]
        assert record["caption"] == want
        assert Captioner(prefix, collection=coll, k=0, generator=g).caption(cat).prompt == caption_prompt([])
    assert main(["caption", str(tmp_path / "nope.jpg"), "--image-prefix", ckpt]) == 2
    assert main(["caption", cat, "--image-prefix", str(tmp_path / "no-ckpt")]) == 1
    assert "no prefix_config.json" in capsys.readouterr().err
    # without a collection, --model must still be the checkpoint's encoder (refused before loading)
    assert main(["caption", cat, "--image-prefix", ckpt, "--model", "open_clip:ViT-B-32/laion2b_s34b_b79k"]) == 1
    assert "was trained on embeddings of" in capsys.readouterr().err


# -- training --------------------------------------------------------------------------------------
def test_train_prefix_cli_loss_falls_and_checkpoint_loads(tmp_path: Path, tiny_oc_spec: str,
                                                          t5_dir: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    from crossmodal_rag.synthetic import make_shapes

    make_shapes(tmp_path / "shapes", 48, seed=3, size=32)
    out = tmp_path / "run"
    rc = main(["-q", "train", "prefix", str(tmp_path / "shapes"), "--out", str(out), "--model", tiny_oc_spec,
               "--generator", str(t5_dir), "--train-generator", "--prefix-length", "2", "--hidden-size", "32",
               "--steps", "30", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "0",
               "--eval-every", "15", "--val-fraction", "0.25", "--seed", "1"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 48 and summary["steps"] == 30
    assert "exact_match" in summary["last_validation"]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["split"] == "train"]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    prefix = load_image_prefix(summary["image_prefix"], device="cpu")
    assert prefix.config.generator_trained and prefix.config.encoder == tiny_oc_spec
    assert prefix.generator_spec == str((out / "best" / "generator").resolve())
    prefix.check_generator(Generator(prefix.generator_spec, device="cpu"))
    assert any((out / "cache").glob("image_embeddings-*.npz"))  # embedded once, cached
