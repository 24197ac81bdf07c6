"""Span-constrained decoding (generation/constrained.py): every answer is a span of the sources (or
a whole allowed phrase), checked against brute force on a character vocabulary and on tiny random
LMs of both runtimes, which agree on the constrained greedy answer."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag.generation import GenerationSettings, Generator
from crossmodal_rag.generation.constrained import SpanConstraint, span_windows

END = 0


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def decode_all(c: SpanConstraint, depth: int) -> set[str]:
    """Every answer the constraint lets through within ``depth`` tokens (brute force over its
    allowed sets): the texts that ended with the end token."""
    done, frontier = set(), [("", c)]
    for _ in range(depth):
        nxt = []
        for text, state in frontier:
            for tok in state.allowed().tolist():
                if tok == END:
                    done.add(text)
                    continue
                if tok == ord("\n"):
                    continue
                child = state.restart()
                for t in chars(text) + [tok]:
                    child.advance(t)
                nxt.append((text + chr(tok), child))
        frontier = nxt
    return done


def test_answers_are_exactly_the_spans_of_the_sources_and_the_whole_phrases() -> None:
    sources = ["ab cd", "cde"]
    c = SpanConstraint.build(sources, chars, [END], whole=["no"])
    got = decode_all(c, 7)
    # oracle: every span that starts at a word start (with or without the space before it, first
    # letter either case), plus the whole phrase with or without a leading space
    want = set()
    for text in sources:
        for i in range(len(text)):
            if i and text[i - 1] != " " or text[i] == " ":
                continue
            for start in (text[i:], text[i].upper() + text[i + 1:]):
                for v in (start, " " + start):
                    want |= {v[:j] for j in range(1, len(v) + 1)}
    want |= {"no", " no"}
    assert got == want
    assert "n" not in got and "d" not in got  # a whole phrase ends only at its end; "d" starts no word


def test_a_token_outside_the_spans_frees_decoding_and_the_first_step_cannot_end() -> None:
    c = SpanConstraint.build(["xy"], chars, [END])
    assert END not in c.allowed()
    c.advance(ord("q"))
    assert c.free and len(c.allowed()) == 0
    logp = np.log(np.full(128, 1 / 128))
    assert np.array_equal(c.mask(logp), logp)


def test_source_weights_bias_only_where_the_copy_starts() -> None:
    c = SpanConstraint.build(["ab", "cd"], chars, [END], weights=[0.0, -3.0])
    m = c.mask(np.zeros(128))
    assert m[ord("a")] == 0.0 and m[ord("c")] == -3.0 and m[ord("z")] == -np.inf
    c.advance(ord("c"))
    m = c.mask(np.zeros(128))
    assert m[ord("d")] == 0.0 and m[END] == 0.0  # no bias once the source is chosen


def test_windows_of_a_real_tokenizer_hold_the_answer_tokens(tiny_gguf: Path) -> None:
    gen = Generator(str(tiny_gguf), device="cpu").load()
    text = "The bridge was completed in 1825 by Ada."
    windows = span_windows([text], gen.tokenize)
    answer = gen.tokenize(" 1825 by Ada")
    assert any(w[: len(answer)] == tuple(answer) for w in windows)


def _is_span(answer: str, sources: list[str], whole: list[str]) -> bool:
    a = answer.strip()
    return a in whole or any(a.lower() in s.lower() for s in sources)


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Float weights: the runtimes' greedy choices agree (Q8_0 kernels quantise activations)."""
    from crossmodal_rag.testing import make_tiny_gguf

    return make_tiny_gguf(tmp_path_factory.mktemp("gguf32") / "tiny-llama.F32.gguf", seed=1, qtype="F32")


@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_lms_copy_spans_and_both_runtimes_agree(f32_gguf: Path, seed: int) -> None:
    """A random LM writes garbage unconstrained; constrained, every greedy answer of both runtimes
    (llama.cpp's generate and stream, transformers' generate) is a span of the sources, the same."""
    pytest.importorskip("cyllama", reason="the llama.cpp binding cyllama is not installed")
    from crossmodal_rag.generation.llamacpp import LlamaCppGenerator

    sources = [["The ferry leaves at 22:30 from pier four.", "Tickets cost nine euros."],
               ["Ada built the mill in 1642.", "The mill grinds rye."]][seed]
    whole = ["not in the sources"]
    s = GenerationSettings(max_new_tokens=12, copy_from=tuple(sources), copy_whole=tuple(whole))
    cpp = LlamaCppGenerator(str(f32_gguf)).load()
    hf = Generator(str(f32_gguf), device="cpu").load()
    prompts = ["Question: when? Answer:", "Context: x\nShort answer:"]
    a_cpp = [x[0] for x in cpp.generate(prompts, s)]
    a_hf = [x[0] for x in hf.generate(prompts, s)]
    a_stream = [cpp.stream(p, s).text() for p in prompts]
    for answer in itertools.chain(a_cpp, a_hf, a_stream):
        assert answer.strip() and _is_span(answer, sources, whole), answer
    assert a_cpp == a_stream
    assert [a.strip() for a in a_cpp] == [a.strip() for a in a_hf]
    free = [x[0] for x in cpp.generate(prompts, GenerationSettings(max_new_tokens=12))]
    assert not all(_is_span(a, sources, whole) for a in free)  # the constraint did the work
