"""A ``.gguf`` generator on the transformers runtime (the fallback when the llama.cpp binding is not
installed, or ``CROSSMODAL_RAG_GGUF_RUNTIME=transformers``): a tiny Llama written by the gguf
package's own writer, checked against the same weights built in transformers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from transformers import LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from crossmodal_rag import Collection
from crossmodal_rag.generation import GenerationSettings, Generator, RagPipeline, RagSettings
from crossmodal_rag.search import Hit
from crossmodal_rag.testing import tiny_gguf_llama


@pytest.fixture(scope="module")
def gguf_gen(tiny_gguf: Path) -> Generator:
    return Generator(str(tiny_gguf), device="cpu").load()


@pytest.fixture(scope="module")
def oracle() -> LlamaForCausalLM:
    """The weights the file was written from, each 2-D one through Q8_0 and back, in transformers'
    own Llama (no GGUF code involved in building it)."""
    config, state = tiny_gguf_llama(seed=0)
    q8 = GGMLQuantizationType.Q8_0
    state = {k: torch.from_numpy(dequantize(quantize(v.numpy(), q8), q8)) if v.ndim == 2 else v
             for k, v in state.items()}
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(state)
    return model


def _byte_id(ch: str) -> int:
    """The id of a one-byte token in the file's vocabulary: EOS first, then the 256 byte symbols."""
    return 1 + list(bytes_to_unicode()).index(ord(ch))


def test_a_gguf_file_loads_with_the_weights_and_tokenizer_written(gguf_gen: Generator,
                                                                  oracle: LlamaForCausalLM) -> None:
    g = gguf_gen
    assert g.kind == "causal" and g.model.config.num_key_value_heads == 2
    tok = g.tokenizer
    assert tok.eos_token_id == 0 and tok.convert_ids_to_tokens(0) == "<|endoftext|>"
    # merges "Ġ t", "h e", "Ġt he" give ids 257, 258, 259 (after EOS and the 256 bytes)
    assert tok(" the cat", add_special_tokens=False)["input_ids"] == [259, _byte_id(" "), _byte_id("c"),
                                                                       _byte_id("a"), _byte_id("t")]
    assert tok("the", add_special_tokens=False)["input_ids"] == [_byte_id("t"), 258]
    ids = torch.tensor([g.prompt_ids("Question: what is the cat on?\nAnswer:")])
    assert ids[0, 0] == 0  # the BOS token leads a plain-text prompt
    with torch.no_grad():
        got, want = g.model(input_ids=ids).logits, oracle(input_ids=ids).logits
    assert float(want.std()) > 0.1  # logits that differ between positions and tokens
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4)


def _hit(rank: int, item_id: int, text: str, score: float) -> Hit:
    return Hit(rank=rank, score=score, id=item_id, kind="passage", path=None, text=text, captions=(),
               parent_id=None, title=None)


HITS = [_hit(1, 7, "the cat sits on the mat", 0.31), _hit(2, 8, "a red car in the snow", 0.29)]


def test_rag_answers_with_a_gguf_generator(gguf_gen: Generator, oracle: LlamaForCausalLM,
                                           sample_collection: Path) -> None:
    """concat through the GGUF generator: the answer is the oracle's greedy continuation of the same
    prompt, and Answer.logprob its teacher-forced log-probability (answer + end token)."""
    with Collection.open(sample_collection) as coll:
        # free decoding, as the oracle's greedy continuation (short questions are copied spans by default)
        pipe = RagPipeline(coll, gguf_gen, RagSettings(k=2, answer_style="free"), GenerationSettings(max_new_tokens=8))
        ans = pipe.ask("what is the cat on?", hits=HITS)
        seq = pipe.ask("what is the cat on?", hits=HITS, mode="rag-sequence")
    prompt = gguf_gen.prompt_ids(pipe.concat_prompt(ans.question, [h.text for h in HITS])[0])
    with torch.no_grad():
        out = oracle.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        want = gguf_gen.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip()
        text = re.sub(r"\s*\[\d+\]$", "", ans.answer)  # concat's [n] citation, added after scoring
        assert text == want
        answer = [*gguf_gen.tokenizer(text, add_special_tokens=False)["input_ids"], 0]
        logp = torch.log_softmax(oracle(input_ids=torch.tensor([prompt + answer])).logits[0].double(), -1)
    total = sum(float(logp[len(prompt) - 1 + t, a]) for t, a in enumerate(answer))
    assert ans.logprob == pytest.approx(total, abs=2e-3)
    assert ans.logprob_of == "log P(answer+eos | concat prompt)"
    assert sum(s.posterior for s in seq.sources) == pytest.approx(1.0)
    assert seq.answer == seq.candidates[0]["text"]


def test_cli_ask_with_a_gguf_generator(tiny_gguf: Path, sample_collection: Path) -> None:
    """The user's path end to end: ``ask --generator model.gguf --json`` in a subprocess, on the
    transformers runtime (tests/test_llama_cpp.py drives the llama.cpp one)."""
    env = {**{k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"},  # the notice is a progress line
           "CROSSMODAL_RAG_OFFLINE": "1", "CROSSMODAL_RAG_GGUF_RUNTIME": "transformers"}
    r = subprocess.run([sys.executable, "-m", "crossmodal_rag", "ask", "what is in the photo?",
                        "--collection", str(sample_collection), "--generator", str(tiny_gguf),
                        "--k", "2", "--max-new-tokens", "4", "--answer-style", "free", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["generator"] == str(tiny_gguf) and len(out["sources"]) == 2
    assert "(transformers runtime" in r.stderr  # the notice naming the runtime
    # the answer is transformers' greedy one for the prompt the CLI built (its retrieval may be hybrid)
    gen = Generator(str(tiny_gguf), device="cpu")
    answer = re.sub(r"\s*\[\d+\]$", "", out["answer"])  # concat's [n] citation, added after scoring
    assert answer == gen.generate(out["prompts"], GenerationSettings(max_new_tokens=4))[0][0]
