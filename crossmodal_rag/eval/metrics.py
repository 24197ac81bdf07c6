"""Metrics: SQuAD-style exact match and token F1 for QA; BLEU-4, ROUGE-L and CIDEr for captions
(computed by pycocoevalcap's scorers, the reference implementations of the COCO caption
benchmark, on lower-cased, punctuation-stripped tokens; its Java PTB tokenizer is not used)."""

from __future__ import annotations

import re
import string
from collections import Counter

__all__ = ["caption_scores", "exact_match", "normalize_answer", "token_f1", "tokenize_caption"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (the SQuAD convention)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, answers: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: list[str]) -> float:
    """Best token-overlap F1 against any reference answer."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for a in answers:
        gold = normalize_answer(a).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def tokenize_caption(s: str) -> str:
    return " ".join("".join(ch if ch not in _PUNCT else " " for ch in s.lower()).split())


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-4, ROUGE-L and CIDEr of predictions against their reference captions."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as e:  # pragma: no cover - an eval extra
        raise ImportError("caption metrics need pycocoevalcap: pip install 'crossmodal-rag[eval]'") from e
    if len(predictions) != len(references):
        raise ValueError("one list of references per prediction")
    res = {i: [tokenize_caption(p) or "empty"] for i, p in enumerate(predictions)}
    gts = {i: [tokenize_caption(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "rouge_l": float(rouge), "cider": float(cider)}
