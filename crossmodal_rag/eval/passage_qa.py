"""Judging real answers on a passage QA set (``data/passages_qa``): retrieval recall and
answer quality of a RAG pipeline, per question.

For each question: the passages retrieved (by the collection's text space when it has one, as
``ask`` retrieves), whether the gold passage is among them, the answer, whether it contains the
gold answer (both normalised: lower case, punctuation and articles dropped, whitespace squeezed),
and whether the posterior puts most weight on the gold passage.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..generation.rag import RagPipeline

__all__ = ["QAItem", "QARecord", "answer_questions", "contains_answer", "load_passage_qa",
           "normalise_answer", "summarise"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


@dataclass(frozen=True)
class QAItem:
    id: str
    question: str
    answer: str  # the gold answer, a span of the gold passage
    passage_id: str
    passage: str  # the gold passage's text


@dataclass(frozen=True)
class QARecord:
    """One question answered."""

    id: str
    mode: str
    answer: str
    correct: bool  # the answer contains the gold answer (normalised)
    gold_rank: int | None  # the gold passage's rank among the sources (1-based), None: not retrieved
    gold_posterior: float  # its posterior (0.0 when not retrieved)
    posterior_top_is_gold: bool  # the gold passage carries the largest posterior
    seconds: float


def load_passage_qa(folder: str | Path) -> list[QAItem]:
    """The questions of a QA folder (``passages.jsonl`` + ``qa.jsonl``), in file order."""
    folder = Path(folder)
    passages = {}
    for line in (folder / "passages.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        passages[row["id"]] = row["text"]
    items = []
    for line in (folder / "qa.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        items.append(QAItem(row["id"], row["question"], row["answer"], row["passage_id"],
                            passages[row["passage_id"]]))
    return items


def normalise_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace squeezed (SQuAD's normalisation)."""
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def contains_answer(answer: str, gold: str) -> bool:
    """Whether the normalised ``gold`` occurs in the normalised ``answer`` as whole words."""
    a, g = f" {normalise_answer(answer)} ", f" {normalise_answer(gold)} "
    return g.strip() != "" and g in a


def answer_questions(pipeline: RagPipeline, items: Iterable[QAItem], mode: str,
                     hits_for: Any = None) -> list[QARecord]:
    """Ask every question through ``pipeline`` in ``mode``. ``hits_for(question) -> hits | None``
    supplies the retrieval (e.g. the text space's, as the CLI's ``ask`` does); None: the pipeline
    retrieves."""
    records = []
    for item in items:
        hits = hits_for(item.question) if hits_for is not None else None
        ans = pipeline.ask(item.question, mode=mode, hits=hits)
        gold = [s for s in ans.sources if (s.text or "").strip() == item.passage.strip()]
        top = max(ans.sources, key=lambda s: s.posterior) if ans.sources else None
        records.append(QARecord(
            id=item.id, mode=mode, answer=ans.answer, correct=contains_answer(ans.answer, item.answer),
            gold_rank=gold[0].rank if gold else None,
            gold_posterior=float(gold[0].posterior) if gold else 0.0,
            posterior_top_is_gold=bool(gold) and top is not None and top.rank == gold[0].rank,
            seconds=float(ans.timings.get("total", 0.0))))
    return records


def summarise(records: list[QARecord]) -> dict[str, Any]:
    """Shares over ``records``: answer contains gold, posterior top is gold, gold retrieved."""
    n = len(records)
    if not n:
        return {"n": 0}
    return {"n": n,
            "answer_contains_gold": sum(r.correct for r in records) / n,
            "posterior_top_is_gold": sum(r.posterior_top_is_gold for r in records) / n,
            "gold_retrieved": sum(r.gold_rank is not None for r in records) / n,
            "mean_gold_posterior": sum(r.gold_posterior for r in records) / n,
            "seconds_per_question": sum(r.seconds for r in records) / n}


def to_jsonable(records: list[QARecord]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]
