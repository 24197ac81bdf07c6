"""The spans a short answer may be copied from: the sources cut into segments, each weighted.

A tiny LM held to copying (:mod:`~crossmodal_rag.generation.constrained`) still copies the wrong
thing in three ways, measured on the bundled LMs (benchmarks/RESULTS.md, "Small local answerers"):
a span of the 2nd or 3rd source about a similar thing, a span that runs on across an OCR line
break (" / ") or a caption separator ("; "), and a span that starts at a preposition ("in
Kraibor"). Here the sources become the copy constraint's texts:

1. each source is cut into segments at sentence ends, OCR line breaks (" / "), caption
   separators ("; ", " | ") and line breaks, so no copied span crosses one;
2. each segment carries ``prior_weight * log P(z|x)`` of its source, which the constraint adds to
   every answer copied from it (:meth:`SpanConstraint.bias_steps
   <crossmodal_rag.generation.constrained.SpanConstraint.bias_steps>`): the retriever's trust,
   applied to the whole span and not only to its first token.

Spans never start at a function word (:data:`NO_START`): ``span_windows`` skips those word starts.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from .constrained import NO_START

__all__ = [
    "ABSTAIN_WEIGHT",
    "PRIOR_WEIGHT",
    "TYPE_WEIGHT",
    "answer_type",
    "copy_sources",
    "question_words",
    "segments",
    "typed_pieces",
    "without_words",
]

#: How strongly the retrieval prior steers which source a copied answer comes from: the weight of
#: log P(z|x) in each span's bias (2: the prior squared, renormalised; 1 and 2 measured in
#: benchmarks/RESULTS.md, "Small local answerers").
PRIOR_WEIGHT = 2.0
#: The bias of "not in the sources" against a span of the most trusted source: the sources were
#: retrieved for the question (retrieval abstains below ``min_score`` before any generation), and
#: once a span may not start at "in" or repeat the question's words a tiny LM otherwise says the
#: sources lack an answer its top source holds (measured in benchmarks/RESULTS.md).
ABSTAIN_WEIGHT = -2.0
#: The bias of a span that is not the kind of answer the question asks for (a year for "where",
#: a name for "how high"; :func:`answer_type`).
TYPE_WEIGHT = -2.0
_NUMBER_Q = re.compile(r"^(?:\w+ )?when\b|\bhow (?:many|much|high|tall|long|old|far|deep|big|large|wide|heavy|often)\b"
                       r"|\b(?:what|which) (?:year|month|day|date|time|number|age|percentage|price|amount|total)\b")
_NAME_Q = re.compile(r"^(?:\w+ )?(?:who|whom|whose|where)\b"
                     r"|\b(?:which|what) (?:town|city|village|country|place|person|street|port|river|island|"
                     r"company|firm|name)\b")
_NUMBER_WORDS = frozenset({
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty", "thirty",
    "forty", "fifty", "hundred", "thousand", "million", "dozen", "once", "twice",
    # dates and times count as numbers: "when" and "which month" ask for them
    "january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
    "november", "december", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday",
    "spring", "summer", "autumn", "winter", "noon", "midnight", "am", "pm",
})
# a sentence end (., !, ? then a space and a capital, digit or quote), an OCR line break, a caption
# separator, a line break
_PUNCT = "".join(c for c in string.punctuation if c not in "+-") + "\u201c\u201d\u2018\u2019"
# the words of a question that ask rather than name: never taken for words an answer would repeat
_ASKING = frozenset({
    "what", "which", "who", "whom", "whose", "when", "where", "why", "how", "many", "much", "did", "does", "do",
    "done", "is", "are", "was", "were", "be", "been", "has", "have", "had", "can", "could", "will", "would",
    "should", "may", "might", "there", "their", "they", "he", "she", "his", "her",
})
_CUT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])|\s+/\s+|;\s+|\s+\|\s+|\s*\n+\s*")


def _word(token: str) -> str:
    return token.strip(_PUNCT).lower()


def question_words(question: str) -> frozenset[str]:
    """The words of ``question`` an answer would not repeat: all but question words, auxiliaries
    and function words (lower case, punctuation stripped)."""
    return frozenset(w for t in question.split() if (w := _word(t)) and w not in _ASKING and w not in NO_START)


def without_words(segment: str, words: frozenset[str]) -> list[str]:
    """``segment`` cut where it holds one of ``words`` (those words dropped), each piece without
    the function words at its ends: "traders sell grain and walnuts" without {sell, walnuts} ->
    ["traders", "grain"]."""
    pieces: list[list[str]] = [[]]
    for token in segment.split():
        if _word(token) in words:
            pieces.append([])
        else:
            pieces[-1].append(token)
    out = []
    for piece in pieces:
        while piece and _word(piece[-1]) in NO_START:
            piece.pop()
        while piece and _word(piece[0]) in NO_START:
            piece.pop(0)
        if piece:
            out.append(" ".join(piece))
    return out


def answer_type(question: str) -> str | None:
    """What kind of answer ``question`` asks for: ``"number"`` (how many/much/high/..., when,
    which year/month/...; dates and times are numbers), ``"name"`` (who, where, which
    town/person/...), or None (anything else)."""
    q = " ".join(question.lower().split())
    if _NUMBER_Q.search(q):
        return "number"
    if _NAME_Q.search(q):
        return "name"
    return None


def _numeric(token: str) -> bool:
    w = _word(token)
    return bool(w) and (any(c.isdigit() for c in w) or w in _NUMBER_WORDS)


def typed_pieces(piece: str, kind: str | None) -> list[tuple[str, bool]]:
    """``piece`` cut into runs of numbers and runs of words, each with whether it is of the
    answer's ``kind`` (``answer_type``); the whole piece, fitting, when ``kind`` is None."""
    if kind is None:
        return [(piece, True)]
    runs: list[tuple[list[str], bool]] = []
    for token in piece.split():
        num = _numeric(token)
        if runs and runs[-1][1] == num:
            runs[-1][0].append(token)
        else:
            runs.append(([token], num))
    out = []
    for tokens, num in runs:
        text = " ".join(tokens)
        words = without_words(text, frozenset()) if not num else [text]
        out += [(w, num == (kind == "number")) for w in words]
    return out


def segments(text: str) -> list[str]:
    """``text`` cut at sentence ends, OCR line breaks (" / "), caption separators ("; ", " | ") and
    line breaks; empty pieces dropped."""
    return [s.strip() for s in _CUT.split(text) if s.strip()]


def copy_sources(texts: Sequence[str], log_prior: Sequence[float], question: str = "",
                 prior_weight: float = PRIOR_WEIGHT) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The copy constraint's texts and weights for sources ``texts`` with retrieval log-priors
    ``log_prior`` (same length): every segment of every source, cut where it repeats a word of
    ``question`` (:func:`without_words`) and, for a question asking for a number or a name,
    into runs of numbers and of words (:func:`typed_pieces`), weighted ``prior_weight *
    log_prior`` of its source plus :data:`TYPE_WEIGHT` where the run is not of the kind asked
    for (a piece found in several sources keeps the highest). Sources whose pieces all vanish
    keep their segments."""
    avoid, kind = question_words(question), answer_type(question)
    best: dict[str, float] = {}
    for text, lp in zip(texts, log_prior, strict=True):
        segs = segments(text)
        pieces = [p for seg in segs for p in without_words(seg, avoid)] or segs
        for piece, fits in (t for p in pieces for t in typed_pieces(p, kind)):
            w = prior_weight * float(lp) + (0.0 if fits else TYPE_WEIGHT)
            best[piece] = max(best.get(piece, -float("inf")), w)
    return tuple(best), tuple(best.values())
