"""Span-constrained decoding: the answer is a span copied from the retrieved sources.

A tiny LM asked for "the answer, copied from the context" still paraphrases, invents a name or
turns "22:30" into "12:30:00". Here, at every decoding step, only the tokens that continue some
span of the sources' token ids may be chosen (plus an end token once the answer has text), so
the greedy answer is the source span the model likes best. Every runtime applies the same rule
(llama.cpp's :func:`~crossmodal_rag.generation.llamacpp.LlamaCppGenerator.generate` and ``stream``,
RAG-token's mixture in :mod:`~crossmodal_rag.generation.rag`, and transformers through
:func:`logits_processor`).

The spans are token windows: each source text is tokenised from every word start (with and
without the space before it, since a chat model starts its answer without one and a base model
after "Short answer:" with one), ``WINDOW_CHARS`` characters long. Because tokenisers split
words independently, the tokens of a span inside a window are the tokens of the span decoded
alone. The state after some tokens is the set of (window, position) pairs that match them all.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .prompting import GenerationSettings

__all__ = ["NO_START", "WINDOW_CHARS", "SpanConstraint", "logits_processor", "span_windows", "whole_windows"]

logger = logging.getLogger(__name__)

#: How far one window reaches (characters); an answer longer than this is cut at the window end.
WINDOW_CHARS = 160
#: At most this many word starts per source text (a long OCR'd page costs no more than this).
MAX_STARTS = 400
_WORD_START = re.compile(r"(?:(?<=\s)|^)\S")
#: Words a copied span never starts with: an answer is "Kraibor", not "in Kraibor", "the" or "and walnuts".
NO_START = frozenset({
    "a", "about", "after", "against", "an", "and", "are", "as", "at", "be", "been", "before", "between", "but",
    "by", "during", "for", "from", "had", "has", "have", "in", "into", "is", "it", "its", "near", "nor", "of",
    "on", "onto", "or", "than", "that", "the", "then", "there", "these", "this", "those", "through", "to", "towards",
    "under", "until", "was", "were", "which", "who", "whom", "whose", "with", "within",
})
_FIRST_WORD = re.compile(r"[^\W_]+")


def span_windows(texts: Iterable[str], tokenize: Callable[[str], list[int]],
                 weights: Sequence[float] = ()) -> dict[tuple[int, ...], float]:
    """Token windows of every word start of every text, with and without the space before it, and
    with its first letter in upper case too (an answer may start a sentence), each with the
    ``weights`` of its text (0 when none; a window found in several texts keeps the highest).
    ``tokenize`` adds no BOS."""
    windows: dict[tuple[int, ...], float] = {}
    for k, text in enumerate(texts):
        weight = float(weights[k]) if k < len(weights) else 0.0
        text = " ".join(text.split())
        for n, m in enumerate(_WORD_START.finditer(text)):
            if n >= MAX_STARTS:
                break
            i = m.start()
            word = _FIRST_WORD.match(text, i)
            if word is not None and word.end() < len(text) and word.group().lower() in NO_START:
                continue  # a span starts at a content word (a last word of a text may still be one)
            piece = text[i : i + WINDOW_CHARS]
            for start in {piece, piece[:1].upper() + piece[1:]}:
                for variant in (start, " " + start):
                    ids = tuple(tokenize(variant))
                    if ids:
                        windows[ids] = max(weight, windows.get(ids, weight))
    return windows


def whole_windows(texts: Iterable[str], tokenize: Callable[[str], list[int]]) -> list[tuple[int, ...]]:
    """Token ids of each text, with and without a leading space: answers allowed only whole."""
    return list(dict.fromkeys(ids for t in texts for v in (t, " " + t) if (ids := tuple(tokenize(v)))))


class SpanConstraint:
    """Which tokens may come next so that the answer stays a span of the windows.

    ``windows``: token-id sequences; ``end_ids``: the tokens that end the answer (allowed once it
    has at least one token); ``whole``: sequences the answer may be only as a whole (the end
    allowed only after their last token); ``bias``: per window, a log-weight added to the score of
    every answer copied from it (which source to copy from: RAG passes log P(z|x), so a tiny LM
    does not copy from a source the retriever ranked far below; whole sequences get 0; see
    :meth:`bias_steps`). Call :meth:`allowed` (or :meth:`mask`) before each pick and
    :meth:`advance` with the token picked. A token outside the allowed set (a caller that picked
    freely) releases the constraint: from then on every token is allowed."""

    def __init__(self, windows: Sequence[Sequence[int]], end_ids: Iterable[int],
                 whole: Sequence[Sequence[int]] = (), bias: Sequence[float] = (), n_spans: int | None = None) -> None:
        # windows[n_spans:] (when given) are whole-only, as are ``whole``; ``bias`` covers ``windows``
        windows = list(windows)  # a span_windows dict gives its windows
        n = len(windows) if n_spans is None else n_spans
        keep = [i for i, w in enumerate(windows) if len(w)]
        kept_whole = [i for i in keep if i >= n]
        keep = [i for i in keep if i < n]
        self.windows = ([tuple(int(t) for t in windows[i]) for i in keep + kept_whole]
                        + [tuple(int(t) for t in w) for w in whole if len(w)])
        self.n_spans = len(keep)  # windows[n_spans:] are whole-only
        self.bias = ([float(bias[i]) for i in keep + kept_whole] + [0.0] * (len(self.windows) - len(keep) - len(kept_whole))
                     if len(bias) else [])
        self.end_ids = frozenset(int(t) for t in end_ids)
        self.states: list[tuple[int, int]] | None = [(w, 0) for w in range(len(self.windows))]
        self.steps = 0

    @classmethod
    def build(cls, texts: Iterable[str], tokenize: Callable[[str], list[int]], end_ids: Iterable[int],
              whole: Iterable[str] = (), weights: Sequence[float] = (), whole_weight: float = 0.0) -> SpanConstraint:
        """The constraint for answers copied from ``texts`` (any span) or equal to one of ``whole``.
        ``weights`` (per text) become the spans' bias, the best text's 0; ``whole_weight`` is the
        whole answers' bias on the same scale. A line break ends a span as the end tokens do (a
        base model writes one after a short answer; decode with ``stop="sentence"`` so that it
        ends the answer)."""
        ends = set(end_ids) | {ids[0] for t in ("\n", "\n\n") if len(ids := tokenize(t)) == 1}
        spans = span_windows(texts, tokenize, weights)
        top = max(spans.values(), default=0.0)
        whole_ids = whole_windows(whole, tokenize)
        bias = ([w - top for w in spans.values()] + [whole_weight] * len(whole_ids)
                if len(weights) or whole_weight else ())
        return cls(list(spans) + whole_ids, ends, bias=bias, n_spans=len(spans))

    @classmethod
    def of(cls, settings: GenerationSettings, tokenize: Callable[[str], list[int]],
           end_ids: Iterable[int]) -> SpanConstraint | None:
        """The constraint ``settings`` ask for (``copy_from``, ``copy_whole``, ``copy_weights``,
        ``copy_whole_weight``), or None when decoding is free."""
        s = settings
        if not (s.copy_from or s.copy_whole):
            return None
        return cls.build(s.copy_from, tokenize, end_ids, s.copy_whole, s.copy_weights, s.copy_whole_weight)

    def restart(self) -> SpanConstraint:
        """A constraint over the same windows, at the answer's start."""
        new = SpanConstraint([], self.end_ids)
        new.windows, new.n_spans, new.bias = self.windows, self.n_spans, self.bias
        new.states = [(w, 0) for w in range(len(self.windows))]
        return new

    @property
    def free(self) -> bool:
        """True once the constraint no longer restricts anything."""
        return self.states is None or not self.windows

    def allowed(self) -> np.ndarray:
        """The token ids that may come next, sorted (int64); empty when free (anything goes)."""
        if self.free:
            return np.zeros(0, dtype=np.int64)
        assert self.states is not None
        nxt = {self.windows[w][p] for w, p in self.states if p < len(self.windows[w])}
        if self.steps and any(w < self.n_spans or p == len(self.windows[w]) for w, p in self.states):
            nxt |= self.end_ids
        return np.array(sorted(nxt), dtype=np.int64)

    def mask(self, logp: np.ndarray) -> np.ndarray:
        """``logp`` ``(V,)`` with every token that may not come next set to -inf (a copy)."""
        ok = self.allowed()
        if self.free or not len(ok):
            return logp
        out = np.full_like(logp, -np.inf)
        ok = ok[ok < logp.shape[-1]]
        out[ok] = logp[ok]
        if self.bias:  # which source to copy from: see bias_steps
            best = self.bias_steps()
            ids = np.fromiter(best, dtype=np.int64, count=len(best))
            ids_ok = ids < logp.shape[-1]
            out[ids[ids_ok]] += np.fromiter(best.values(), dtype=out.dtype, count=len(best))[ids_ok]
        return out

    def bias_steps(self) -> dict[int, float]:
        """Per next token, what its pick adds to the answer's bias: the best bias among the windows
        that still match after it minus the best among those matching now (0 for a token every
        best window continues with). Summed over the steps, an answer's score is its log-probability
        plus the highest bias of the windows it is a span of, whatever its tokens: a number whose
        first digit starts spans of every source is still held to the trusted source's digits."""
        assert self.states is not None
        now = max((self.bias[w] for w, _ in self.states), default=0.0)
        best: dict[int, float] = {}
        for w, p in self.states:
            if p < len(self.windows[w]):
                t, b = self.windows[w][p], self.bias[w]
                if b > best.get(t, -np.inf):
                    best[t] = b
        return {t: b - now for t, b in best.items()}

    def advance(self, token: int) -> None:
        """Take ``token`` as the answer's next token."""
        token = int(token)
        self.steps += 1
        if self.free:
            return
        assert self.states is not None
        if token in self.end_ids:  # a line break taken as text (stop="eos"): only an end may follow
            self.states = [(w, len(self.windows[w])) for w in range(self.n_spans)][:1]
            return
        nxt = [(w, p + 1) for w, p in self.states if p < len(self.windows[w]) and self.windows[w][p] == token]
        if not nxt:
            logger.debug("token %d leaves every source span; decoding goes on unconstrained", token)
        self.states = nxt or None


def logits_processor(windows: Sequence[Sequence[int]] | SpanConstraint, end_ids: Iterable[int] = (), start: int = 0,
                     whole: Sequence[Sequence[int]] = (), bias: Sequence[float] = ()) -> Any:
    """A transformers ``LogitsProcessor`` keeping every row of a ``generate`` batch on a span of
    ``windows`` (or of a built :class:`SpanConstraint`'s, whose end tokens, whole sequences and
    bias it keeps); each row's new tokens begin at column ``start`` of ``input_ids`` (causal
    models: the padded prompt width; seq2seq: 1, after the decoder's start token)."""
    import torch
    from transformers import LogitsProcessor

    proto = windows if isinstance(windows, SpanConstraint) else SpanConstraint(windows, end_ids, whole, bias)

    class Copy(LogitsProcessor):  # stateless: beam search reorders the rows between steps
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            out = scores.clone()
            for r in range(input_ids.shape[0]):
                constraint = proto.restart()
                for token in input_ids[r, start:].tolist():
                    constraint.advance(token)
                if not constraint.free:
                    row = constraint.mask(scores[r].detach().float().cpu().numpy())
                    out[r] = torch.from_numpy(row).to(scores.device, scores.dtype)
            return out

    return Copy()
