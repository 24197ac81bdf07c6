"""Keyword evidence: whether the keyword (BM25) ranking should count in a text search, how much,
and why. Pure functions: no SQL, no model. The caller reads document frequencies from the
full-text index and runs both rankings; this module decides and fuses::

    query --query_terms--> terms --(caller: df of each term's words, number of texts)-->
        weigh_evidence --> Evidence(mode, keyword_query, keyword_weight, reason)
    dense ranking + keyword ranking of Evidence.keyword_query --fuse_evidence--> one ranking

The rule is what the ``auto`` search mode does for a text query
(:func:`crossmodal_rag.search.hybrid.weigh` and :func:`~crossmodal_rag.search.hybrid.fuse_evidence`
wire it; constants in :class:`EvidenceSettings`, chosen by ``benchmarks/bench_search_modes.py``,
see docs/search-modes.md, "How the default was chosen"):

* codes (a word holding a digit: ``1663``, ``0x8E005B86``, ``2023-8376``) and "quoted phrases"
  are kept whatever their document frequency; a code whose parts are joined by punctuation is
  matched as one phrase (``12.28`` -> ``"12 28"``, not ``12`` OR ``28``);
* stopwords carry no weight; a word in more than ``max_df_fraction`` of the texts (and in more
  than one: in a small collection a word of one text is still rare) is dropped (its BM25 idf is
  near zero and it matches unrelated texts); a word in no text is dropped;
* *coverage*: the share of the query's BM25 idf mass (stopwords left out; a word in no text
  counts at its full idf) held by the kept terms. A paraphrase ("a feline portrait") keeps
  little of it; a name, a code or a question in the texts' own words keeps most;
* a query with nothing left and a query of symbols or emoji alone are searched densely (the
  keyword side is not informative there, or cannot parse them), and this is never an error;
  so is a long pasted text (more than ``max_words`` words or ``max_chars`` characters), unless
  ``long_terms`` > 0: then its ``long_terms`` rarest words are its keywords;
* otherwise the keyword ranking of the kept terms is fused with the dense ranking; its weight
  is ``exact_weight`` when a code, phrase or name was kept, else ``rare_weight`` (rare ordinary
  words), times ``coverage ** coverage_power``. ``fusion`` "rrf" is weighted reciprocal rank
  fusion; "minmax" adds the two lists' min-max scaled scores, the weight as alpha.

A quote right after a digit is an inch mark (``12"``), not a phrase; an unpaired quote is
ignored. Query arithmetic is the caller's: pass the text whose words keyword search should
match (:func:`crossmodal_rag.search.hybrid.keyword_text`).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from ..store.fulltext import fold as fold_text
from ..store.fulltext import segment
from .fusion import reciprocal_rank_fusion

__all__ = ["STOPWORDS", "Evidence", "EvidenceSettings", "QueryTerm", "bm25_idf", "fold", "fuse_evidence",
           "lookup_words", "minmax_fusion", "query_terms", "weigh_evidence", "weighted_rrf"]

T = TypeVar("T", bound=Hashable)

_STOPWORD_TEXT = """
a about above after again against all also am an and any are aren as at be because been before
being below between both but by can could did do does doing down during each either else ever every
few for from further had has have having he her here hers herself him himself his how however i if
in into is it its itself just let me might more most much must my myself no nor not now of off on
once only or other ought our ours ourselves out over own per perhaps please same shall she should so
some such than that the their theirs them themselves then there these they this those through thus
to too under until up upon us very was we were what whatever when where whether which while who
whom whose why will with within without would yet you your yours yourself yourselves
anyone anything anybody something somebody someone somewhere thing things way ways one ones
many lot lots kind sort get got give find found show shown search searching look looking see seen
want wanted need needed know tell told like called named say said
picture pictures photo photos image images text texts document documents
s t d ll m re ve
"""
#: English function words, question words and search-request words ("show me a photo of"):
#: they say what the user wants done, not what the text holds.
STOPWORDS = frozenset(_STOPWORD_TEXT.split())

#: How the two rankings may be combined (see :func:`fuse_evidence`).
FUSIONS = ("rrf", "minmax")
#: Most terms in a keyword query (the full-text index takes at most 32 phrases).
MAX_KEYWORD_TERMS = 32

_WORD = re.compile(r"[^\W_]+")
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"'})


@dataclass(frozen=True)
class EvidenceSettings:
    """The constants of the rule (see the module docstring); the defaults are the measured choice."""

    fusion: str = "minmax"  # "minmax": min-max scaled scores added | "rrf": weighted reciprocal rank fusion
    max_df_fraction: float = 0.05  # a word in more than this share of the texts is dropped
    exact_weight: float = 0.6  # keyword weight (alpha in minmax, RRF weight in rrf) when a code, phrase or name is kept
    rare_weight: float = 0.4  # ... when only rare ordinary words are kept
    coverage_power: float = 1.0  # the weight is multiplied by coverage ** this (0: not scaled)
    min_coverage: float = 0.0  # a query whose coverage is below this is searched densely
    rrf_k: int = 60  # RRF damping constant (fusion.RRF_K; rrf only)
    max_words: int = 32  # a query of more (whitespace-separated) words than this is a pasted text
    max_chars: int = 1000  # ... or of more characters than this
    long_terms: int = 16  # a pasted text's rarest words used as keywords (0: a pasted text is dense alone)
    long_weight: float = 0.6  # keyword weight for a pasted text's rarest words
    depth: int = 100  # each ranking is fused this deep, whatever k (stable first pages)

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if not 0.0 < self.max_df_fraction <= 1.0:
            raise ValueError(f"max_df_fraction must be in (0, 1], got {self.max_df_fraction!r}")
        for name in ("exact_weight", "rare_weight", "coverage_power", "min_coverage", "long_weight", "long_terms"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.fusion == "minmax" and max(self.exact_weight, self.rare_weight, self.long_weight) > 1:
            raise ValueError("with fusion 'minmax' the weights are alphas: each must be in [0, 1]")
        for name in ("rrf_k", "max_words", "max_chars", "depth"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.long_terms > MAX_KEYWORD_TERMS:
            raise ValueError(f"long_terms must be <= {MAX_KEYWORD_TERMS}, got {self.long_terms!r}")


@dataclass(frozen=True)
class QueryTerm:
    """One term of a text query as keyword search would match it."""

    text: str  # as the keyword query gets it: a word, or words joined by spaces (a phrase)
    words: tuple[str, ...]  # folded words, as the word index holds them (df is looked up for each)
    kind: str  # "phrase" (quoted) | "code" (holds a digit) | "name" (a capital not at the start) | "word"
    stopword: bool = False


@dataclass(frozen=True)
class Evidence:
    """What :func:`weigh_evidence` decided for one query."""

    mode: str  # "dense" (keyword ranking not used) | "hybrid" (fused with weight keyword_weight)
    keyword_query: str | None  # the keyword query to run (None in dense mode): words and "phrases"
    keyword_weight: float  # keyword weight: RRF weight (the dense ranking weighs 1), or alpha in minmax
    reason: str  # one line for --json / -v: why this mode, which terms counted
    coverage: float = 0.0  # share of the query's idf mass held by the kept terms (0..1)
    kept: tuple[QueryTerm, ...] = field(default=())  # terms in keyword_query
    dropped: tuple[tuple[QueryTerm, str], ...] = field(default=())  # (term, why) left out


def fold(word: str) -> str:
    """``word`` as the word index stores it: the index's own folding
    (:func:`~crossmodal_rag.store.fulltext.fold`: NFKC, zero-width characters dropped), then
    FTS5's ``unicode61 remove_diacritics 2``: lower case, diacritics removed (``Café`` -> ``cafe``)."""
    decomposed = unicodedata.normalize("NFKD", fold_text(word))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


def _index_words(text: str) -> tuple[str, ...]:
    """The words the word index holds for ``text`` (split where letters meet digits, folded)."""
    return tuple(fold(w) for w in _WORD.findall(segment(text)))


def _phrases(query: str) -> tuple[list[str], str]:
    """(quoted phrases, the query with them blanked out). A quote after a digit is an inch mark;
    an opening quote must follow the start, a space or a bracket; an unpaired quote is ignored."""
    phrases: list[str] = []
    out: list[str] = []
    i, n = 0, len(query)
    while i < n:
        c = query[i]
        if c == '"':
            prev = query[i - 1] if i else " "
            close = query.find('"', i + 1)
            if not prev.isdigit() and (prev.isspace() or prev in "([{") and close > i + 1:
                phrases.append(query[i + 1:close])
                out.append(" " * (close + 1 - i))
                i = close + 1
                continue
            out.append(" ")  # an inch mark or an unpaired quote
        else:
            out.append(c)
        i += 1
    return phrases, "".join(out)


def query_terms(query: str) -> tuple[QueryTerm, ...]:
    """The terms of a text query, in order, each once: quoted phrases, codes (a whitespace-
    separated chunk holding a digit, its parts as one phrase: ``2023-8376`` -> ``2023 8376``),
    names (a capital inside a word or on a word after the first) and plain words."""
    phrases, rest = _phrases(fold_text(query).translate(_QUOTES))
    terms: list[QueryTerm] = []
    seen: set[str] = set()

    def add(text: str, kind: str, stop: bool = False) -> None:
        key = fold(text)
        words = _index_words(text)
        if words and key not in seen:
            seen.add(key)
            terms.append(QueryTerm(text, words, kind, stop))

    for phrase in phrases:
        parts = _WORD.findall(phrase)
        if parts:
            add(" ".join(parts), "phrase")
    position = 0
    for chunk in rest.split():
        parts = _WORD.findall(chunk)
        if not parts:
            continue
        if any(ch.isdigit() for ch in chunk):
            add(" ".join(parts), "code")
            position += 1
            continue
        for word in parts:
            inner_capital = any(ch.isupper() for ch in word[1:])
            capital = word[:1].isupper() and position > 0
            stop = fold(word) in STOPWORDS
            add(word, "name" if (inner_capital or capital) and not stop else "word", stop)
            position += 1
    return tuple(terms)


def lookup_words(query: str) -> tuple[str, ...]:
    """The folded words whose document frequency :func:`weigh_evidence` needs for ``query``
    (the caller reads them from the word index: FTS5 ``fts5vocab`` of ``fts_words``)."""
    return tuple(dict.fromkeys(w for t in query_terms(query) if not t.stopword for w in t.words))


def bm25_idf(df: int, n_docs: int) -> float:
    """FTS5's BM25 idf of a word in ``df`` of ``n_docs`` texts: ``ln((N - df + 0.5) / (df + 0.5))``,
    floored at 1e-6 as FTS5 does."""
    return max(math.log((n_docs - df + 0.5) / (df + 0.5)), 1e-6)


def _term_df(term: QueryTerm, doc_freq: Mapping[str, int]) -> int:
    """An upper bound of the texts holding ``term``: the smallest df of its words."""
    return min(int(doc_freq.get(w, 0)) for w in term.words)


def _quoted(term: QueryTerm) -> str:
    return f'"{term.text}"' if " " in term.text else term.text


def _dense(reason: str, coverage: float = 0.0, kept: Sequence[QueryTerm] = (),
           dropped: Sequence[tuple[QueryTerm, str]] = ()) -> Evidence:
    return Evidence("dense", None, 0.0, f"dense: {reason}", coverage, tuple(kept), tuple(dropped))


def weigh_evidence(query: str, doc_freq: Mapping[str, int], n_docs: int,
                   settings: EvidenceSettings | None = None) -> Evidence:
    """Decide how the keyword ranking counts for ``query``.

    Args:
        query: the text whose words keyword search matches.
        doc_freq: folded word -> number of texts holding it (the words of
            :func:`lookup_words`; a missing word counts as in none).
        n_docs: the number of texts in the keyword index.
        settings: the rule's constants (default: :class:`EvidenceSettings`).

    Returns:
        :class:`Evidence`: ``mode`` "dense" (with ``keyword_query`` None) or "hybrid".
    """
    s = settings or EvidenceSettings()
    if n_docs <= 0:
        return _dense("the keyword index holds no texts")
    terms = query_terms(query)
    if not terms:
        return _dense("no words or numbers to match (symbols or emoji only)")
    limit = max(s.max_df_fraction * n_docs, 1)  # a word in one text is rare in any collection
    dfs = {t: _term_df(t, doc_freq) for t in terms}
    n_words = len(query.split())
    if n_words > s.max_words or len(query) > s.max_chars:
        return _long(query, n_words, terms, dfs, limit, n_docs, s)
    kept: list[QueryTerm] = []
    dropped: list[tuple[QueryTerm, str]] = []
    for term in terms:
        df = dfs[term]
        if term.kind in ("phrase", "code"):
            kept.append(term)
        elif term.stopword:
            dropped.append((term, "stopword"))
        elif df == 0:
            dropped.append((term, "in no text"))
        elif df > limit:
            dropped.append((term, f"common: in {df} of {n_docs} texts"))
        else:
            kept.append(term)
    mass = {t: bm25_idf(dfs[t], n_docs) for t in terms if not t.stopword or t in kept}
    coverage = sum(mass[t] for t in kept) / sum(mass.values()) if kept else 0.0
    if not kept:
        why = ", ".join(f"{t.text} ({r})" for t, r in dropped[:6])
        return _dense(f"no informative keyword: {why}", coverage, (), dropped)
    if coverage < s.min_coverage:
        return _dense(f"the kept keywords hold {coverage:.0%} of the query's weight (< {s.min_coverage:.0%})",
                      coverage, kept, dropped)
    exact = any(t.kind != "word" for t in kept)
    weight = (s.exact_weight if exact else s.rare_weight) * coverage ** s.coverage_power
    keyword_query = " ".join(_quoted(t) for t in kept)
    if weight <= 0:
        return _dense("only rare ordinary words, which weigh 0", coverage, kept, dropped)
    if len(keyword_query) > s.max_chars:
        return _dense(f"the keyword query would be {len(keyword_query)} characters", coverage, kept, dropped)
    shown = ", ".join(f"{t.text} ({t.kind}, df {dfs[t]})" for t in kept[:6])
    what = "codes, phrases or names" if exact else "rare words"
    reason = f"hybrid: keyword weight {weight:.3g} for {what} holding {coverage:.0%} of the query: {shown}"
    if dropped:
        reason += f"; ignored {', '.join(t.text for t, _ in dropped[:6])}"
    return Evidence("hybrid", keyword_query, weight, reason, coverage, tuple(kept), tuple(dropped))


def _long(query: str, n_words: int, terms: Sequence[QueryTerm], dfs: Mapping[QueryTerm, int], limit: float,
          n_docs: int, s: EvidenceSettings) -> Evidence:
    """A pasted text: dense alone, or (``long_terms`` > 0) its rarest words as keywords."""
    size = f"a long text ({n_words} words, {len(query)} characters)"
    if s.long_terms == 0 or s.long_weight <= 0:
        return _dense(f"{size}; its words are not used as keywords")
    rare = [t for t in terms if not t.stopword and 1 <= dfs[t] <= limit]
    rare.sort(key=lambda t: dfs[t])  # stable: the rarest first, then in query order
    kept = rare[:s.long_terms]
    keyword_query = " ".join(_quoted(t) for t in kept)
    if not kept or len(keyword_query) > s.max_chars:
        return _dense(f"{size}; no rare words to use as keywords")
    shown = ", ".join(f"{t.text} (df {dfs[t]})" for t in kept[:6])
    return Evidence("hybrid", keyword_query, s.long_weight,
                    f"hybrid: {size}; its {len(kept)} rarest words as keywords, weight {s.long_weight:g}: {shown}",
                    0.0, tuple(kept))


def weighted_rrf(dense: Sequence[T], keyword: Sequence[T], keyword_weight: float, *, rrf_k: int = 60,
                 depth: int | None = None, limit: int | None = None) -> list[tuple[T, float]]:
    """Weighted RRF of two best-first id lists, each cut to ``depth``:
    ``score(d) = 1 / (rrf_k + rank_dense(d)) + keyword_weight / (rrf_k + rank_keyword(d))``."""
    cut = slice(None) if depth is None else slice(depth)
    return reciprocal_rank_fusion([list(dense)[cut], list(keyword)[cut]], rrf_k, weights=[1.0, keyword_weight],
                                  limit=limit)


def minmax_fusion(dense: Sequence[tuple[T, float]], keyword: Sequence[tuple[T, float]], alpha: float, *,
                  limit: int | None = None) -> list[tuple[T, float]]:
    """Score-normalised fusion: ``(1 - alpha) * dense' + alpha * keyword'``, each list's scores
    min-max scaled to [0, 1] over the list (an id missing from a list scores 0 there; a list
    whose scores are all equal scales to 1). Ties keep dense order, then keyword order."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")

    def scaled(pairs: Sequence[tuple[T, float]]) -> dict[T, float]:
        if not pairs:
            return {}
        values = [s for _, s in pairs]
        lo, hi = min(values), max(values)
        return {i: (1.0 if hi == lo else (s - lo) / (hi - lo)) for i, s in reversed(pairs)}

    d, k = scaled(dense), scaled(keyword)
    order = {i: n for n, i in enumerate(dict.fromkeys([*(i for i, _ in dense), *(i for i, _ in keyword)]))}
    fused = {i: (1 - alpha) * d.get(i, 0.0) + alpha * k.get(i, 0.0) for i in order}
    ranked = sorted(fused.items(), key=lambda p: (-p[1], order[p[0]]))
    return ranked if limit is None else ranked[:limit]


def fuse_evidence(evidence: Evidence, dense: Sequence[tuple[T, float]], keyword: Sequence[tuple[T, float]], *,
                  settings: EvidenceSettings | None = None, limit: int | None = None) -> list[tuple[T, float]]:
    """The default ranking of one query, ``[(id, fused score), ...]`` best first.

    ``dense`` (cosine) and ``keyword`` (BM25) are best-first ``(id, score)`` lists, each cut to
    ``settings.depth``. In dense mode: the dense list in its order. In hybrid mode:
    :func:`weighted_rrf` (``settings.fusion`` "rrf", keyword weight ``evidence.keyword_weight``)
    or :func:`minmax_fusion` ("minmax", alpha ``evidence.keyword_weight``). The first rows do not
    depend on ``limit``: the depth is fixed.
    """
    s = settings or EvidenceSettings()
    dense, keyword = list(dense)[:s.depth], list(keyword)[:s.depth]
    if evidence.mode != "hybrid" or evidence.keyword_weight <= 0:
        fused = [(i, float(score)) for i, score in dense]
        return fused if limit is None else fused[:limit]
    if s.fusion == "minmax":
        return minmax_fusion(dense, keyword, min(evidence.keyword_weight, 1.0), limit=limit)
    return weighted_rrf([i for i, _ in dense], [i for i, _ in keyword], evidence.keyword_weight,
                        rrf_k=s.rrf_k, limit=limit)
