"""Generation quality: QA (exact match, token F1) and retrieval-augmented captioning
(BLEU-4, ROUGE-L, CIDEr), with per-stage latency."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QueryError, SourceError
from ..generation.rag import RagPipeline
from ..progress import bar
from ..safe_io import MAX_JSON_BYTES, read_regular_text
from .datasets import load_captioned
from .metrics import caption_scores, exact_match, token_f1

__all__ = ["GenerationReport", "evaluate_captioning", "evaluate_qa"]


@dataclass
class GenerationReport:
    task: str  # "qa" | "caption"
    dataset: str
    generator: str
    mode: str
    n: int
    scores: dict[str, float]
    timings: dict[str, float]  # mean seconds per item and stage
    examples: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        scores = "  ".join(f"{k}={v:.3f}" for k, v in self.scores.items())
        times = "  ".join(f"{k}={v * 1000:.0f}ms" for k, v in self.timings.items())
        return f"{self.task} on {self.n} items ({self.generator}, {self.mode})\n{scores}\nper item: {times}"


def _mean_timings(all_timings: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for t in all_timings for k in t})
    return {k: float(np.mean([t.get(k, 0.0) for t in all_timings])) for k in keys}


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        lines = read_regular_text(path, max_bytes=MAX_JSON_BYTES, what="dataset file").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"cannot read {path}: {e}") from e
    rows = []
    for n, line in enumerate(lines, start=1):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}:{n}: invalid JSON: {e.msg}") from e
            if not isinstance(obj, dict):
                raise SourceError(f"{path}:{n}: expected a JSON object")
            rows.append((n, obj))
    return rows


def _load_models(pipeline: RagPipeline) -> None:
    """Load the generator and the encoder before a bar starts (each shows its own status line)."""
    pipeline.generator.load()
    pipeline.collection.encoder.load()


def evaluate_qa(pipeline: RagPipeline, dataset: str | Path, *, limit: int | None = None,
                mode: str | None = None, progress: bool = False) -> GenerationReport:
    """JSONL rows ``{"question", "answers": [...] (or "answer"), "image"?}``; an image path is
    relative to the file. Scores are means over rows of the best EM / F1 against any answer.
    ``progress``: a bar over the rows on stderr."""
    path = Path(dataset)
    rows = _read_jsonl(path)[:limit]
    ems, f1s, timings, examples, skipped = [], [], [], [], []
    _load_models(pipeline)
    for n, row in bar(rows, desc="eval: questions", unit=" row", enabled=progress):
        answers = row.get("answers") or ([row["answer"]] if row.get("answer") else [])
        if isinstance(answers, str):
            answers = [answers]
        if not row.get("question") or not answers:
            skipped.append(f"{path}:{n}: needs 'question' and 'answers'")
            continue
        image = row.get("image")
        if image and not Path(image).is_absolute():
            image = str(path.parent / image)
        try:
            ans = pipeline.ask(row["question"], image=image, mode=mode)
        except QueryError as e:
            skipped.append(f"{path}:{n}: {e}")
            continue
        ems.append(exact_match(ans.answer, answers))
        f1s.append(token_f1(ans.answer, answers))
        timings.append(ans.timings)
        examples.append({"question": row["question"], "prediction": ans.answer, "answers": answers,
                         "em": ems[-1], "f1": f1s[-1], "sources": [src.id for src in ans.sources]})
    if not ems:
        raise SourceError(f"{path}: no usable QA rows")
    return GenerationReport(task="qa", dataset=str(path), generator=pipeline.generator.spec,
                            mode=mode or pipeline.settings.mode, n=len(ems),
                            scores={"exact_match": float(np.mean(ems)), "f1": float(np.mean(f1s))},
                            timings=_mean_timings(timings), examples=examples, skipped=skipped)


def evaluate_captioning(pipeline: RagPipeline, dataset: str | Path, *, limit: int | None = None,
                        mode: str | None = None, exclude_self: bool = True,
                        split: str | None = None, progress: bool = False) -> GenerationReport:
    """Caption each image of a captioned dataset (any form :func:`load_captioned` reads) from
    its retrieved neighbours, and score against its own captions. ``exclude_self`` drops the
    image itself (and its captions) from what is retrieved, so an indexed image cannot copy its
    own reference captions. ``progress``: a bar over the images on stderr."""
    items = load_captioned(dataset, split=split)[:limit]
    preds, refs, timings, examples = [], [], [], []
    k = pipeline.settings.k
    _load_models(pipeline)
    for item in bar(items, desc="eval: captions", unit=" img", enabled=progress):
        hits, _ = pipeline.retrieve(None, item.path, k + 8, pipeline.settings.target)
        if exclude_self:
            hits = [h for h in hits if h.path != str(item.path)]
        hits = hits[:k]
        ans = pipeline.ask(image=item.path, hits=hits, mode=mode)
        preds.append(ans.answer)
        refs.append(list(item.captions))
        timings.append(ans.timings)
        examples.append({"image": str(item.path), "prediction": ans.answer, "references": list(item.captions),
                         "sources": [s.path for s in ans.sources]})
    if not preds:
        raise SourceError(f"{dataset}: no captioned images")
    return GenerationReport(task="caption", dataset=str(dataset), generator=pipeline.generator.spec,
                            mode=mode or pipeline.settings.mode, n=len(preds),
                            scores=caption_scores(preds, refs), timings=_mean_timings(timings),
                            examples=examples)
