"""GGUF vision-language models on llama.cpp: a tiny random LLaVA-style GGUF VLM (model + mmproj)
loaded through the user's spec, checked against libmtmd driven directly through cyllama (its own
model, projector and context: the whole prompt tokenized with the pictures and evaluated at once,
then decoded one token at a time); RAG with pictures against a hand computation; bad projectors.

Tolerance: both sides run the same llama.cpp kernels on the same F32 file; batches differ (the
generator decodes prompts in its shared cache, answers of several pairs in one batch), so
log-probabilities agree to 1e-4 nats and greedy answers token for token.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cyllama.llama.mtmd", reason="the llama.cpp binding cyllama with libmtmd is not installed")

from crossmodal_rag import Collection
from crossmodal_rag.errors import ModelSpecError, QueryError
from crossmodal_rag.generation import GenerationSettings, RagPipeline, RagSettings
from crossmodal_rag.generation.kv_cache import log_softmax
from crossmodal_rag.generation.models import load_generator
from crossmodal_rag.generation.vision_prompt import ImageLimits, VisionPrompt
from crossmodal_rag.generation.vlm_gguf import parse_gguf_vlm
from crossmodal_rag.generation.vlm_llamacpp import MARKER, LlamaCppVisionGenerator
from crossmodal_rag.testing_vlm import make_tiny_gguf_vlm

RED = Image.new("RGB", (50, 40), (200, 10, 10))
BLUE = Image.new("RGB", (40, 50), (10, 20, 220))
TOL = 1e-4


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tiny_gguf_vlm(tmp_path_factory.mktemp("gguf-vlm"), seed=1)


class Direct:
    """libmtmd through cyllama alone: a fresh context per prompt, the whole prompt evaluated by
    ``eval_chunks``, then tokens decoded one at a time."""

    def __init__(self, model: Path, mmproj: Path) -> None:
        from cyllama.llama import llama_cpp, mtmd

        class Model(llama_cpp.LlamaModel):  # the n_vocab cyllama's get_logits_ith reads
            @property
            def n_vocab(self) -> int:
                return int(self.get_vocab().n_vocab)

        self.lib, self.mtmd = llama_cpp, mtmd
        params = llama_cpp.LlamaModelParams()
        params.n_gpu_layers = 0
        self.model = Model(path_model=str(model), params=params, verbose=False)
        mp = mtmd.MtmdContextParams()
        mp.use_gpu, mp.warmup, mp.n_threads = False, False, 1
        self.ctx = mtmd.MtmdContext(str(mmproj), self.model, mp)

    def rows(self, text: str, images: list[Image.Image], feed: list[int]) -> np.ndarray:
        """log P(. | prompt, feed[:i]) for i = 0..len(feed): ``(len(feed) + 1, V)``."""
        lib = self.lib
        cp = lib.LlamaContextParams()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = 512
        cp.n_threads = cp.n_threads_batch = 1
        ctx = lib.LlamaContext(model=self.model, params=cp, verbose=False)
        bitmaps = [self.mtmd.MtmdBitmap.create_image(im.width, im.height, im.convert("RGB").tobytes()) for im in images]
        chunks = self.ctx.tokenize(text, bitmaps, False, True)
        n = self.ctx.eval_chunks(ctx, chunks, 0, 0, 512, True)
        out = [log_softmax(ctx.get_logits_ith(-1))]
        batch = lib.LlamaBatch(n_tokens=8, embd=0, n_seq_max=1)
        for i, tok in enumerate(feed):
            batch.clear()
            batch.add(int(tok), n + i, [0], True)
            ctx.decode(batch)
            out.append(log_softmax(ctx.get_logits_ith(0)))
        return np.stack(out)

    def greedy(self, text: str, images: list[Image.Image], n: int, eos: set[int]) -> list[int]:
        ids: list[int] = []
        for _ in range(n):
            tok = int(np.argmax(self.rows(text, images, ids)[-1]))
            if tok in eos:
                break
            ids.append(tok)
        return ids

    def logprobs(self, text: str, images: list[Image.Image], answer_ids: list[int]) -> np.ndarray:
        rows = self.rows(text, images, answer_ids[:-1])
        return rows[np.arange(len(answer_ids)), answer_ids]


@pytest.fixture(scope="module")
def direct(files: tuple[Path, Path]) -> Direct:
    return Direct(*files)


def test_answers_and_scores_equal_a_direct_libmtmd_call(files: tuple[Path, Path], direct: Direct) -> None:
    model, proj = files
    spec = f"vlm:{model},mmproj={proj}"
    gen = load_generator(spec)  # the user's path: the spec, checked, then loaded on first use
    assert isinstance(gen, LlamaCppVisionGenerator) and gen.sees_images and load_generator(spec) is gen
    vp = VisionPrompt("What is this?", (RED,), ("Query image",))
    text = gen.render(vp)
    assert text == f"User:Query image:{MARKER}What is this?\nAssistant:"  # the GGUF's chat template
    # greedy answers, token for token
    s = GenerationSettings(max_new_tokens=6)
    ref = direct.greedy(text, [RED], 6, gen.eos_ids)
    stream = gen.stream(vp, s)
    assert stream.text() == gen.decode(ref).strip() and stream.ids == ref
    assert gen.generate([vp], s)[0][0] == gen.decode(ref).strip()
    # teacher-forced log-probabilities (every mode's posterior), the picture reaching the model
    blue = VisionPrompt("What is this?", (BLUE,), ("Query image",))
    answer = "a red box"
    a_ids = gen.answer_ids(answer)
    got = gen.answer_token_logprobs([vp, blue], [answer, answer])
    np.testing.assert_allclose(got[0], direct.logprobs(text, [RED], a_ids), atol=TOL)
    np.testing.assert_allclose(got[1], direct.logprobs(gen.render(blue), [BLUE], a_ids), atol=TOL)
    assert np.abs(got[0] - got[1]).max() > 1e-2  # another picture, other log-probabilities
    # two pictures in one prompt (concat), each after its label
    two = VisionPrompt("Which is red?", (BLUE, RED), ("Query image", "[1]"))
    assert gen.render(two) == f"User:Query image:{MARKER}[1]:{MARKER}Which is red?\nAssistant:"
    np.testing.assert_allclose(gen.answer_token_logprobs([two], [answer])[0],
                               direct.logprobs(gen.render(two), [BLUE, RED], a_ids), atol=TOL)
    # RAG-token's lock-step rows: k prompts, one decode per step
    state = gen.start([vp, blue])
    try:
        for tok in a_ids[:3]:
            state.feed(tok)
        rows = state.logprobs().numpy()
    finally:
        state.close()
    for row, (p, im) in zip(rows, ((vp, RED), (blue, BLUE)), strict=True):
        np.testing.assert_allclose(row, direct.rows(gen.render(p), [im], a_ids[:3])[-1], atol=TOL)
    assert gen.cache_stats()["reused_tokens"] > 0  # prompts decoded once, then found in the cache


def test_limits_are_checked(files: tuple[Path, Path]) -> None:
    model, proj = files
    gen = LlamaCppVisionGenerator(parse_gguf_vlm(f"vlm:{model},mmproj={proj}"),
                                  limits=ImageLimits(max_images=2, max_image_tokens=16))
    assert gen.prompt_ids(VisionPrompt("q", (RED,), ("a",))).count(-1) == 15  # 16 positions: at the limit
    with pytest.raises(QueryError, match="take 32 tokens"):
        gen.prompt_ids(VisionPrompt("q", (RED, BLUE), ("a", "b")))
    with pytest.raises(QueryError, match="limit is 2"):
        gen.prompt_ids(VisionPrompt("q", (RED, BLUE, RED), ("a", "b", "c")))


@pytest.fixture(scope="module")
def gguf_pipe(files: tuple[Path, Path], sample_collection: Path, tmp_path_factory: pytest.TempPathFactory):
    dest = tmp_path_factory.mktemp("gguf-vlm-coll") / "c"
    shutil.copytree(sample_collection, dest, ignore=shutil.ignore_patterns(".lock"))
    coll = Collection.open(dest)
    model, proj = files
    gen = LlamaCppVisionGenerator(parse_gguf_vlm(f"vlm:{model},mmproj={proj}"),
                                  limits=ImageLimits(max_images=4, max_side=2048, max_image_tokens=256))

    def make(mode: str) -> RagPipeline:
        return RagPipeline(coll, gen, RagSettings(
            k=2, mode=mode, target="images", prior_temperature=0.5, max_context_tokens=200,
            prompt_template="Context: {context}\nQuestion: {question}\nAnswer:"), GenerationSettings(max_new_tokens=2))
    yield make
    coll.close()


def test_rag_modes_with_pictures_match_a_hand_computation(gguf_pipe, direct: Direct, sample_dir: Path) -> None:
    """Each item's prompt shows the query picture and its own; P(y|x,z) from libmtmd alone; the
    mixtures by hand."""
    query = sample_dir / "cat.jpg"
    q = Image.open(query).convert("RGB")
    for mode in ("rag-sequence", "rag-token", "concat"):
        pipe = gguf_pipe(mode)
        gen = pipe.generator
        ans = pipe.ask("what is shown?", image=query)
        assert ans.answer is not None and len(ans.sources) == 2
        imgs = [Image.open(s.path).convert("RGB") for s in ans.sources]
        a_ids = gen.answer_ids(re.sub(r"\s*\[\d+\]$", "", ans.answer) if mode == "concat" else ans.answer)
        texts = [gen.render(VisionPrompt(pipe.item_prompt(ans.question, s.text), (q, im), ("Query image", "[1]")))
                 for s, im in zip(ans.sources, imgs, strict=True)]
        per_token = [direct.logprobs(t, [q, im], a_ids) for t, im in zip(texts, imgs, strict=True)]
        lp = np.array([t.sum() for t in per_token])
        log_prior = np.log([s.prior for s in ans.sources])
        post = np.exp(log_prior + lp - np.logaddexp.reduce(log_prior + lp))
        np.testing.assert_allclose([s.logprob for s in ans.sources], lp, atol=1e-3, err_msg=mode)
        np.testing.assert_allclose([s.posterior for s in ans.sources], post, atol=1e-4, err_msg=mode)
        if mode == "rag-sequence":
            assert ans.logprob == pytest.approx(float(np.logaddexp.reduce(log_prior + lp)), abs=1e-3)
            assert ans.prompt_images == [[str(query), s.path] for s in ans.sources]
        elif mode == "rag-token":
            mix = np.logaddexp.reduce(log_prior[:, None] + np.stack(per_token), axis=0).sum()
            assert ans.logprob == pytest.approx(float(mix), abs=1e-3)
        else:  # one prompt with the query picture and the retrieved ones it includes
            shown = [im for im, s in zip(imgs, ans.sources, strict=True) if s.image]
            assert shown and all(s.image == s.path for s in ans.sources if s.included)
            concat = direct.logprobs(ans.prompts[0], [q, *shown], a_ids).sum()
            assert ans.prompt_images[0][0] == str(query) and len(ans.prompt_images[0]) == 1 + len(shown)
            assert ans.logprob == pytest.approx(float(concat), abs=1e-3)
        assert math.isfinite(ans.logprob), mode


def test_a_bad_projector_is_refused_naming_the_file(files: tuple[Path, Path], tmp_path: Path) -> None:
    from gguf import GGUFWriter

    model, _ = files

    def load(mmproj: Path) -> LlamaCppVisionGenerator:
        return LlamaCppVisionGenerator(parse_gguf_vlm(f"vlm:{model},mmproj={mmproj}")).load()

    with pytest.raises(ModelSpecError, match=f"projector {re.escape(str(model))} is not a multimodal projector"):
        load(model)  # the language model given as its own projector
    _, narrow = make_tiny_gguf_vlm(tmp_path / "narrow", hidden=48)  # another model's projector
    with pytest.raises(ModelSpecError, match=f"{re.escape(str(narrow))} makes 48-wide embeddings .* 64-wide"):
        load(narrow)
    # a projector without image_mean: libmtmd would abort the process (GGML_ASSERT)
    bare = tmp_path / "bare.gguf"
    w = GGUFWriter(str(bare), "clip")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "mlp")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelSpecError, match=f"{re.escape(str(bare))} lacks clip.vision.image_mean"):
        load(bare)
    # complete metadata, no tensors: llama.cpp's own refusal, quoted
    empty = tmp_path / "empty.gguf"
    w = GGUFWriter(str(empty), "clip")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "mlp")
    for key in ("embedding_length", "feed_forward_length", "block_count", "projection_dim",
                "attention.head_count", "image_size", "patch_size"):
        w.add_uint32(f"clip.vision.{key}", 64 if key in ("embedding_length", "projection_dim") else 8)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    gen = LlamaCppVisionGenerator(parse_gguf_vlm(f"vlm:{model},mmproj={empty}"))
    with pytest.raises(ModelSpecError, match=f"cannot use the projector {re.escape(str(empty))} .*tensor"):
        gen.load()
    assert gen.model is None  # not half loaded: the next call tries again
