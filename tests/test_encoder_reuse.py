"""A seq2seq answer encodes each distinct prompt once: ``generate`` and the posterior scoring of
the same answer share encoder states (``Generator.encoder_reuse``), with the same results as
encoding again. Counted with a forward hook on the real encoder."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag import Collection
from crossmodal_rag.generation import GenerationSettings, Generator, RagPipeline, RagSettings
from crossmodal_rag.search import Hit


def _hit(rank: int, text: str, score: float) -> Hit:
    return Hit(rank=rank, score=score, id=rank, kind="passage", path=None, text=text, captions=(),
               parent_id=None, title=None)


HITS = [_hit(1, "the cat sits on the mat", 0.31), _hit(2, "a red car in the snow", 0.30),
        _hit(3, "the theatre is closed", 0.28)]


@pytest.mark.parametrize("mode", ["concat", "rag-token", "rag-sequence"])
def test_each_prompt_is_encoded_once_per_answer(mode: str, t5_dir: Path, sample_collection: Path) -> None:
    gen = Generator(str(t5_dir), device="cpu").load()
    rows: list[int] = []
    hook = gen.model.get_encoder().register_forward_hook(lambda m, args, kw, out: rows.append(
        int(out.last_hidden_state.shape[0])), with_kwargs=True)
    try:
        with Collection.open(sample_collection) as coll:
            pipe = RagPipeline(coll, gen, RagSettings(k=3), GenerationSettings(max_new_tokens=6))
            ans = pipe.ask("what is the cat on?", hits=HITS, mode=mode)
            encoded = sum(rows)
            reuse = type(gen).encoder_reuse
            type(gen).encoder_reuse = lambda self: contextlib.nullcontext()  # every prompt encoded again
            try:
                again = pipe.ask("what is the cat on?", hits=HITS, mode=mode)
            finally:
                type(gen).encoder_reuse = reuse
    finally:
        hook.remove()
    prompts = 1 + len(HITS) if mode == "concat" else len(HITS)  # distinct prompts of one answer
    assert encoded == prompts
    assert sum(rows) - encoded > prompts  # without reuse, scoring encodes them again
    assert again.answer == ans.answer
    np.testing.assert_allclose([s.posterior for s in again.sources], [s.posterior for s in ans.sources], atol=1e-5)
    assert again.logprob == pytest.approx(ans.logprob, abs=1e-4)
