"""``.gguf`` generators on llama.cpp (the cyllama binding, a dependency) against the
transformers runtime reading the same file: token ids, per-token log-probabilities, lock-step
decoding, answers and posteriors in all three RAG modes, streaming events and the CLI.

Stated tolerances (llama.cpp's kernels differ from torch's; quantised ones also quantise the
activations): on an F32 file every log-probability within 5e-3 nats (llama.cpp keeps the KV cache in f16) and the same greedy answers;
on a Q8_0 file within 0.15 nats per token and 0.03 on average (a tiny random model with sharp
attention: this file's worst case is 0.07). SmolLM2 (Q4_1): tests/e2e/test_smollm2.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cyllama", reason="the llama.cpp binding cyllama is not installed (a dependency: reinstall with the README install line)")

from crossmodal_rag import Collection
from crossmodal_rag.errors import ModelSpecError, QueryError
from crossmodal_rag.generation import GenerationSettings, Generator, RagPipeline, RagSettings
from crossmodal_rag.generation.llamacpp import LlamaCppGenerator
from crossmodal_rag.generation.models import gguf_runtime, load_generator
from crossmodal_rag.generation.stream import Final, Sources, Token
from crossmodal_rag.search import Hit
from crossmodal_rag.testing import make_tiny_gguf

F32_TOL, Q8_TOL = 5e-3, 0.15
PROMPTS = ["Question: what is the cat on?\nAnswer:", "the cat sits on the mat. Where is the cat?",
           "Ünïcödé and <|endoftext|> inside"]
ANSWERS = ["the mat", "on the mat, the cat", "é"]


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf32") / "tiny-llama.F32.gguf", seed=1, qtype="F32")


@pytest.fixture(scope="module")
def pair(f32_gguf: Path) -> tuple[LlamaCppGenerator, Generator]:
    """The F32 file on llama.cpp and on transformers."""
    return LlamaCppGenerator(str(f32_gguf)).load(), Generator(str(f32_gguf), device="cpu").load()


def _hit(rank: int, item_id: int, text: str, score: float) -> Hit:
    return Hit(rank=rank, score=score, id=item_id, kind="passage", path=None, text=text, captions=(),
               parent_id=None, title=None)


HITS = [_hit(1, 7, "the cat sits on the mat", 0.31), _hit(2, 8, "a red car in the snow", 0.30),
        _hit(3, 9, "the theatre is closed", 0.28)]


def test_runtime_choice_and_one_memory_mapped_load(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = str(tiny_gguf)
    assert gguf_runtime(spec) == "llama.cpp" and gguf_runtime("google/flan-t5-base") == "transformers"
    monkeypatch.setenv("CROSSMODAL_RAG_GGUF_RUNTIME", "transformers")
    assert gguf_runtime(spec) == "transformers" and isinstance(load_generator(spec, device="cpu"), Generator)
    monkeypatch.setenv("CROSSMODAL_RAG_GGUF_RUNTIME", "vulkan")
    with pytest.raises(ModelSpecError, match="auto, llama.cpp, transformers"):
        load_generator(spec)
    monkeypatch.delenv("CROSSMODAL_RAG_GGUF_RUNTIME")
    gen = load_generator(spec)
    assert isinstance(gen, LlamaCppGenerator) and load_generator(spec) is gen  # once per process
    gen.load()
    maps = Path("/proc/self/maps")
    if maps.exists():  # the weights are mapped from the file, not read into private memory
        assert str(tiny_gguf.resolve()) in maps.read_text()
    with pytest.raises(ModelSpecError, match="does not exist"):
        LlamaCppGenerator(str(tiny_gguf.with_name("missing.gguf"))).load()


def test_token_ids_agree_with_transformers(pair: tuple[LlamaCppGenerator, Generator]) -> None:
    cpp, hf = pair
    assert cpp.eos_ids == hf.eos_ids == {0} and not cpp.is_chat
    for p, a in zip(PROMPTS, ANSWERS, strict=True):
        assert cpp.prompt_ids(p) == hf.prompt_ids(p)
        assert cpp.answer_ids(a) == hf.answer_ids(a)
        assert cpp.count_tokens(p) == hf.count_tokens(p)
        assert cpp.truncate_tokens(p, 5) == hf.truncate_tokens(p, 5)
    ids = hf.tokenizer("Ünïcödé", add_special_tokens=False)["input_ids"]
    assert cpp.decode(ids) == hf.decode(ids) == "Ünïcödé"


@pytest.mark.parametrize("which", ["F32", "Q8_0"])
def test_answer_log_probabilities_agree(which: str, f32_gguf: Path, tiny_gguf: Path) -> None:
    """Teacher-forced log P(y_t | prompt, y_<t) per token, every answer under every prompt (the
    rag-sequence scoring pattern: each prompt decoded once, its answers continued from its cache)."""
    path = f32_gguf if which == "F32" else tiny_gguf
    cpp, hf = LlamaCppGenerator(str(path)).load(), Generator(str(path), device="cpu").load()
    prompts = [p for p in PROMPTS for _ in ANSWERS]
    answers = ANSWERS * len(PROMPTS)
    got, want = cpp.answer_token_logprobs(prompts, answers), hf.answer_token_logprobs(prompts, answers)
    assert [len(g) for g in got] == [len(w) for w in want]
    assert float(np.std(np.concatenate(want))) > 0.05  # not a flat distribution
    tol = F32_TOL if which == "F32" else Q8_TOL
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=tol)
    assert float(np.abs(np.concatenate(got) - np.concatenate(want)).mean()) < tol / 5
    np.testing.assert_allclose(cpp.sequence_logprobs(prompts, answers), [w.sum() for w in want],
                               atol=tol * 8)


def test_lock_step_decoding_agrees(pair: tuple[LlamaCppGenerator, Generator]) -> None:
    """k prompts of different lengths as k sequences of one context: the (k, V) next-token
    distributions after each fed token match transformers' padded batch with a KV cache."""
    cpp, hf = pair
    mine, ref = cpp.start(PROMPTS, max_new_tokens=4), hf.start(PROMPTS)
    try:
        for tok in (259, 70, 5):
            np.testing.assert_allclose(mine.logprobs().numpy(), ref.logprobs().numpy(), atol=F32_TOL)
            mine.feed(tok)
            ref.feed(tok)
        np.testing.assert_allclose(mine.logprobs().numpy(), ref.logprobs().numpy(), atol=F32_TOL)
    finally:
        mine.close()
    # the state released the context: the generator works again
    assert cpp.generate(PROMPTS[:1], GenerationSettings(max_new_tokens=3)) == \
        hf.generate(PROMPTS[:1], GenerationSettings(max_new_tokens=3))


def test_generation_agrees_and_streams(pair: tuple[LlamaCppGenerator, Generator]) -> None:
    cpp, hf = pair
    s = GenerationSettings(max_new_tokens=12)
    assert cpp.generate(PROMPTS, s) == hf.generate(PROMPTS, s)
    for gen in pair:
        stream = gen.stream(PROMPTS[0], s)
        pieces = list(stream)
        assert pieces and all(pieces) and "".join(pieces).strip() == stream.answer
        assert stream.answer == hf.generate(PROMPTS[:1], s)[0][0]
    sampled = GenerationSettings(max_new_tokens=8, do_sample=True, seed=3, top_p=0.9)
    assert cpp.generate(PROMPTS, sampled) == cpp.generate(PROMPTS, sampled)  # seeded
    with pytest.raises(QueryError, match="beam search"):
        cpp.generate(PROMPTS, GenerationSettings(num_beams=2))


@pytest.mark.parametrize("mode", ["concat", "rag-sequence", "rag-token"])
def test_rag_modes_agree_with_transformers(mode: str, pair: tuple[LlamaCppGenerator, Generator],
                                           sample_collection: Path) -> None:
    """The same answer, priors and (within the tolerance) posteriors and log P(y|x) on both runtimes."""
    out = {}
    with Collection.open(sample_collection) as coll:
        for gen in pair:
            pipe = RagPipeline(coll, gen, RagSettings(k=3, prior_temperature=0.02),
                               GenerationSettings(max_new_tokens=10))
            out[gen.runtime] = pipe.ask("what is the cat on?", hits=HITS, mode=mode)
    a, b = out["llama.cpp"], out["transformers"]
    assert a.answer == b.answer and a.prompts == b.prompts
    assert [s.prior for s in a.sources] == [s.prior for s in b.sources]
    np.testing.assert_allclose([s.logprob for s in a.sources], [s.logprob for s in b.sources], atol=20 * F32_TOL)
    np.testing.assert_allclose([s.posterior for s in a.sources], [s.posterior for s in b.sources], atol=0.01)
    assert a.logprob == pytest.approx(b.logprob, abs=20 * F32_TOL) and a.logprob_of == b.logprob_of
    assert sum(s.posterior for s in a.sources) == pytest.approx(1.0)


def test_stream_events_and_cancel(pair: tuple[LlamaCppGenerator, Generator], sample_collection: Path) -> None:
    cpp, _ = pair
    with Collection.open(sample_collection) as coll:
        pipe = RagPipeline(coll, cpp, RagSettings(k=3), GenerationSettings(max_new_tokens=10))
        answers = {}
        for mode in ("concat", "rag-token", "rag-sequence"):
            events = list(pipe.stream("what is the cat on?", hits=HITS, mode=mode))
            answers[mode] = events[-1].answer.answer
            first, tokens, final = events[0], events[1:-1], events[-1]
            assert isinstance(first, Sources) and isinstance(final, Final)
            assert all(isinstance(t, Token) and t.text for t in tokens)
            assert first.streaming == (mode != "rag-sequence") and (len(tokens) <= 1 or first.streaming)
            assert [s.prior for s in first.sources] == [s.prior for s in final.answer.sources]
            assert "".join(t.text for t in tokens).strip() == final.answer.answer
            assert 0 < final.answer.timings["first_token"] <= final.answer.timings["total"]
            json.dumps([e.to_dict() for e in events], allow_nan=False)  # what an SSE endpoint sends
        seen: list[object] = []
        assert pipe.ask("what is the cat on?", hits=HITS, on_event=seen.append).answer == answers["concat"]
        assert isinstance(seen[0], Sources) and isinstance(seen[-1], Final)
        cancel = threading.Event()
        events = []
        for event in pipe.stream("what is the cat on?", hits=HITS, mode="rag-token", cancel=cancel):
            events.append(event)
            if isinstance(event, Token):
                cancel.set()  # the client went away after the first token
        assert isinstance(events[0], Sources) and not any(isinstance(e, Final) for e in events)
        assert sum(isinstance(e, Token) for e in events) == 1
        with pytest.raises(QueryError, match="cancelled"):
            pipe.ask("what is the cat on?", hits=HITS, cancel=cancel)


def test_cli_ask_runs_on_llama_cpp(tiny_gguf: Path, sample_collection: Path) -> None:
    """``ask --generator model.gguf --json`` in a subprocess picks llama.cpp (and says so) and
    answers what the library does on it."""
    env = {**{k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"},  # the notice is a progress line
           "CROSSMODAL_RAG_OFFLINE": "1"}
    env.pop("CROSSMODAL_RAG_GGUF_RUNTIME", None)
    r = subprocess.run([sys.executable, "-m", "crossmodal_rag", "ask", "what is in the photo?",
                        "--collection", str(sample_collection), "--generator", str(tiny_gguf),
                        "--k", "2", "--max-new-tokens", "4", "--answer-style", "free", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "(llama.cpp runtime)" in r.stderr  # the one-line notice naming the runtime
    gen = LlamaCppGenerator(str(tiny_gguf))  # the answer is llama.cpp's greedy one for the prompt shown
    greedy = gen.generate(out["prompts"], GenerationSettings(max_new_tokens=4))[0][0]
    assert re.sub(r"\s*\[\d\]$", "", out["answer"]) == greedy  # concat answers end with a [n] citation


def test_cli_ask_streams_sources_then_tokens_then_posteriors(tiny_gguf: Path, sample_collection: Path) -> None:
    """Without ``--json``: the retrieved items with their priors, then the answer, then the
    sources with posteriors; the answer is the one ``--json`` gives."""
    env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1"}
    env.pop("CROSSMODAL_RAG_GGUF_RUNTIME", None)
    from crossmodal_rag.cli.output import safe

    base = [sys.executable, "-m", "crossmodal_rag", "ask", "what is in the photo?", "--collection",
            str(sample_collection), "--generator", str(tiny_gguf), "--k", "2", "--max-new-tokens", "6"]
    runs = [subprocess.run([*base, *extra], capture_output=True, text=True, env=env, timeout=300)
            for extra in ([], ["--json"])]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    answer = json.loads(runs[1].stdout)
    lines = runs[0].stdout.splitlines()
    assert lines[0] == "retrieved (prior = P(z|x)):"
    assert lines[1].startswith("  [1] prior ") and lines[2].startswith("  [2] prior ") and lines[3] == ""
    at = lines.index("sources:")
    assert "\n".join(lines[4:at]).strip() == safe(answer["answer"], newlines=True).strip()  # escaped
    assert [ln.split()[2] for ln in lines[at + 1:at + 3]] == [f"{s['posterior']:.3f}" for s in answer["sources"]]


def test_stream_printer_flushes_each_token(capsys: pytest.CaptureFixture[str],
                                           pair: tuple[LlamaCppGenerator, Generator],
                                           sample_collection: Path) -> None:
    """What the terminal shows after each event: the sources before any token, each token as it
    comes (not at the end), the posteriors last."""
    from crossmodal_rag.cli.rag import StreamPrinter

    cpp, _ = pair
    printer, shown = StreamPrinter(), []
    with Collection.open(sample_collection) as coll:
        pipe = RagPipeline(coll, cpp, RagSettings(k=2), GenerationSettings(max_new_tokens=6))
        for event in pipe.stream("what is the cat on?", hits=HITS[:2], mode="rag-token"):
            printer(event)
            shown.append((type(event).__name__, capsys.readouterr().out))
    kinds = [k for k, _ in shown]
    assert kinds[0] == "Sources" and kinds[-1] == "Final" and kinds.count("Token") >= 1
    assert "prior" in shown[0][1] and "posterior" not in shown[0][1]
    tokens = [text for k, text in shown if k == "Token"]
    final = event.answer.answer
    assert "".join(tokens).strip() == final and tokens[0]  # each token shown when it arrived
    assert "posterior" in shown[-1][1]
