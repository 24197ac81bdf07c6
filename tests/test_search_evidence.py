"""search.evidence: query terms, the evidence rule and the fusions, against hand computations."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossmodal_rag.search.evidence import (
    Evidence,
    EvidenceSettings,
    bm25_idf,
    fold,
    fuse_evidence,
    lookup_words,
    minmax_fusion,
    query_terms,
    weigh_evidence,
    weighted_rrf,
)
from crossmodal_rag.store.fulltext import parse_keyword_query

N = 500  # texts in the imagined index
DF = {"thesi": 1, "bridge": 10, "river": 40, "people": 3, "live": 2, "town": 30, "cat": 3, "whiskers": 1,
      "vinyl": 0, "record": 4, "1825": 2, "12": 60, "28": 45, "store": 60, "1663": 1, "onions": 12,
      "cello": 9, "photo": 3, "ledger": 5, "pro": 5}


def kinds(query: str) -> list[tuple[str, str]]:
    return [(t.text, t.kind) for t in query_terms(query)]


def test_terms_words_names_codes_and_phrases():
    assert kinds('the Thesi bridge') == [("the", "word"), ("Thesi", "name"), ("bridge", "word")]
    assert kinds('Thesi bridge') == [("Thesi", "word"), ("bridge", "word")]  # a capital at the start says nothing
    assert kinds('"Thesi Bridge" 1825') == [("Thesi Bridge", "phrase"), ("1825", "code")]
    # a code's parts joined by punctuation stay one phrase
    assert kinds("invoice 2023-8376 total 12.28") == [("invoice", "word"), ("2023 8376", "code"),
                                                       ("total", "word"), ("12 28", "code")]
    assert kinds("LedgerPro error") == [("LedgerPro", "name"), ("error", "word")]
    assert query_terms("LedgerPro")[0].words == ("ledger", "pro")  # as the word index splits it
    assert query_terms("0x8E005B86")[0].words == ("0", "x", "8", "e", "005", "b", "86")


def test_inch_marks_and_unpaired_quotes_are_not_phrases():
    assert kinds('a 12" vinyl record') == [("a", "word"), ("12", "code"), ("vinyl", "word"), ("record", "word")]
    assert kinds('8.5" x 11" paper') == [("8 5", "code"), ("x", "word"), ("11", "code"), ("paper", "word")]
    assert kinds('the "Thesi bridge') == [("the", "word"), ("Thesi", "name"), ("bridge", "word")]
    assert kinds('size 12" and "Thesi"') == [("Thesi", "phrase"), ("size", "word"), ("12", "code"),
                                             ("and", "word")]
    assert kinds("\u201cThesi Bridge\u201d") == [("Thesi Bridge", "phrase")]  # curly quotes pair too


def test_emoji_symbols_email_and_cplusplus():
    assert query_terms("🐱") == ()
    assert query_terms("!!! ??? ->") == ()
    assert [t.text for t in query_terms("🐱 tabby cat")] == ["tabby", "cat"]
    assert [t.text for t in query_terms("ines.vais@rind.org")] == ["ines", "vais", "rind", "org"]
    assert [t.text for t in query_terms("C++ exception")] == ["C", "exception"]
    assert query_terms("cat Cat CAT")[0].words == ("cat",)  # each term once


def test_fold_and_lookup_words():
    assert fold("Café") == "cafe"
    assert fold("ｃａｔ") == "cat" and fold("cat\u200b") == "cat"  # NFKC, zero-width dropped, as the index
    assert fold("ÅNGSTRÖM") == "angstrom"
    assert lookup_words("how many people live in the town") == ("people", "live", "town")
    assert lookup_words('"Thesi Bridge" 1825') == ("thesi", "bridge", "1825")


def test_bm25_idf_matches_fts5():
    assert bm25_idf(1, 500) == pytest.approx(math.log(499.5 / 1.5))
    assert bm25_idf(400, 500) == 1e-6  # FTS5's floor for words in most texts


def test_stopwords_only_is_dense():
    ev = weigh_evidence("how many of the", DF, N)
    assert ev.mode == "dense" and ev.keyword_query is None and ev.keyword_weight == 0
    assert "no informative keyword" in ev.reason


def test_common_and_unseen_words_are_dropped():
    s = EvidenceSettings(max_df_fraction=0.05, coverage_power=0.0)  # 25 of 500 texts; weight not scaled
    ev = weigh_evidence("how many people live in the town near the river", DF, N, s)
    assert ev.mode == "hybrid" and ev.keyword_query == "people live"
    assert {t.text: why for t, why in ev.dropped} == {
        "how": "stopword", "many": "stopword", "in": "stopword", "the": "stopword", "near": "in no text",
        "town": "common: in 30 of 500 texts", "river": "common: in 40 of 500 texts"}
    assert ev.keyword_weight == s.rare_weight and "rare words" in ev.reason


def test_codes_phrases_and_names_weigh_as_exact():
    s = EvidenceSettings(fusion="rrf", exact_weight=2.0, rare_weight=0.5, coverage_power=0.0)
    ev = weigh_evidence("store 1663 total 12.28", DF, N, s)
    # codes are kept whatever their df; "store" is common, "total" in no text
    assert ev.mode == "hybrid" and ev.keyword_query == '1663 "12 28"' and ev.keyword_weight == 2.0
    ev = weigh_evidence('"Thesi Bridge"', DF, N, s)
    assert ev.keyword_query == '"Thesi Bridge"' and ev.keyword_weight == 2.0
    ev = weigh_evidence("when was the Thesi bridge built", DF, N, s)
    assert ev.keyword_query == "Thesi bridge" and ev.keyword_weight == 2.0 and "names" in ev.reason
    ev = weigh_evidence("thesi bridge", DF, N, s)  # no capital: rare words
    assert ev.keyword_query == "thesi bridge" and ev.keyword_weight == 0.5


def test_twelve_inch_query_never_fails():
    ev = weigh_evidence('a 12" vinyl record', DF, N)
    assert ev.mode == "hybrid" and ev.keyword_query == "12 record"  # vinyl is in no text
    parse_keyword_query(ev.keyword_query)


def test_emoji_and_long_queries_are_dense():
    ev = weigh_evidence("🐱", DF, N)
    assert ev.mode == "dense" and "symbols or emoji" in ev.reason
    long_text = " ".join(["the cat with long whiskers sat by the river"] * 40)  # 360 words
    ev = weigh_evidence(long_text, DF, N, EvidenceSettings(long_terms=0))
    assert ev.mode == "dense" and "long text" in ev.reason
    ev = weigh_evidence(long_text, DF, N)  # the default: its rarest words (cat 3, whiskers 1) as keywords
    assert ev.mode == "hybrid" and ev.keyword_query == "whiskers cat" and "long text" in ev.reason
    assert weigh_evidence("cat " * 32, DF, N).mode == "hybrid"  # 32 words: a query
    assert "long text" in weigh_evidence("cat " * 33, DF, N).reason  # 33: a pasted text
    assert weigh_evidence("x" * 1001, DF, N).mode == "dense"  # a pasted text without rare words
    assert weigh_evidence("cat", DF, 0).mode == "dense"


def test_rare_weight_zero_means_dense():
    ev = weigh_evidence("cat whiskers", DF, N, EvidenceSettings(rare_weight=0.0))
    assert ev.mode == "dense" and ev.kept  # the terms are reported, the ranking is dense


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_query_gives_a_keyword_query_the_index_accepts(query):
    ev = weigh_evidence(query, DF, N, EvidenceSettings(max_df_fraction=1.0))
    assert ev.mode in ("dense", "hybrid") and ev.reason
    if ev.mode == "hybrid":
        parse_keyword_query(ev.keyword_query)  # raises QueryError if not


def test_weighted_rrf_by_hand():
    # a: dense 1, keyword 3 -> 1/11 + 2/13; b: dense 2 -> 1/12; c: keyword 1 -> 2/11; d: keyword 2 -> 2/12
    fused = weighted_rrf(["a", "b"], ["c", "d", "a"], 2.0, rrf_k=10)
    expected = {"a": 1 / 11 + 2 / 13, "b": 1 / 12, "c": 2 / 11, "d": 2 / 12}
    assert [i for i, _ in fused] == ["a", "c", "d", "b"]
    assert all(score == pytest.approx(expected[i], abs=1e-15) for i, score in fused)
    # depth cuts each list before fusing
    assert [i for i, _ in weighted_rrf(["a", "b"], ["c", "d", "a"], 2.0, rrf_k=10, depth=1)] == ["c", "a"]


def test_minmax_fusion_by_hand():
    dense = [("a", 0.9), ("b", 0.7), ("c", 0.5)]  # scaled 1, 0.5, 0
    keyword = [("c", 12.0), ("d", 4.0)]  # scaled 1, 0
    fused = dict(minmax_fusion(dense, keyword, 0.4))
    assert fused == pytest.approx({"a": 0.6, "b": 0.3, "c": 0.4, "d": 0.0})
    assert [i for i, _ in minmax_fusion(dense, keyword, 0.4)] == ["a", "c", "b", "d"]
    assert [i for i, _ in minmax_fusion(dense, [], 0.5)] == ["a", "b", "c"]
    assert dict(minmax_fusion([("a", 2.0)], [("a", 3.0)], 0.5)) == {"a": 1.0}  # equal scores scale to 1
    with pytest.raises(ValueError, match="alpha"):
        minmax_fusion(dense, keyword, 1.5)


def test_fuse_evidence_dense_keeps_the_dense_order_and_depth_is_fixed():
    s = EvidenceSettings(fusion="rrf", rrf_k=60, depth=3)
    dense = [(5, 0.9), (4, 0.8), (3, 0.7), (2, 0.6)]
    dense_only = Evidence("dense", None, 0.0, "dense: test")
    assert fuse_evidence(dense_only, dense, [(9, 3.0)], settings=s) == [(5, 0.9), (4, 0.8), (3, 0.7)]
    hybrid = Evidence("hybrid", "x", 1.0, "hybrid: test")
    fused = fuse_evidence(hybrid, dense, [(3, 8.0), (9, 2.0)], settings=s)
    assert [i for i, _ in fused] == [3, 5, 4, 9]  # 3: 1/63 + 1/61; 4 and 9 tie at 1/62: dense first
    assert fused[0][1] == pytest.approx(1 / 63 + 1 / 61)
    # the first rows do not depend on how many are asked for
    assert fuse_evidence(hybrid, dense, [(3, 8.0), (9, 2.0)], settings=s, limit=2) == fused[:2]
    # minmax: alpha = the evidence's weight; 3: 0.5 * 0 + 0.5 * 1, 5: 0.5 * 1
    mm = EvidenceSettings(fusion="minmax", exact_weight=0.5, depth=3)
    half = Evidence("hybrid", "x", 0.5, "hybrid: test")
    assert fuse_evidence(half, dense, [(3, 8.0), (9, 2.0)], settings=mm) == [
        (5, 0.5), (3, 0.5), (4, pytest.approx(0.25)), (9, 0.0)]


def test_coverage_scales_the_weight_and_min_coverage_falls_back_to_dense():
    # "people" kept (df 3); "feline" (df 0) and "town" (df 30 > 25) dropped
    idf = {w: bm25_idf(DF.get(w, 0), N) for w in ("people", "feline", "town")}
    expected = idf["people"] / sum(idf.values())
    ev = weigh_evidence("feline people town", DF, N, EvidenceSettings(rare_weight=1.0, coverage_power=1.0))
    assert ev.coverage == pytest.approx(expected) and ev.keyword_weight == pytest.approx(expected)
    ev = weigh_evidence("feline people town", DF, N, EvidenceSettings(min_coverage=expected + 0.01))
    assert ev.mode == "dense" and "of the query's weight" in ev.reason
    assert weigh_evidence("1663", DF, N).coverage == 1.0


def test_long_text_keeps_its_rarest_words_when_asked():
    text = "the cat with long whiskers sat by the river near people who live in the town " * 20
    s = EvidenceSettings(long_terms=2, long_weight=0.7)
    ev = weigh_evidence(text, DF, N, s)
    # rare (1 <= df <= 25): whiskers 1, live 2, cat 3, people 3; the two rarest
    assert ev.mode == "hybrid" and ev.keyword_query == "whiskers live" and ev.keyword_weight == 0.7
    assert "long text" in ev.reason


def test_defaults_are_the_measured_choice():
    # benchmarks/bench_search_modes.py chose these on its tune split (docs/search-modes.md)
    assert EvidenceSettings() == EvidenceSettings(
        fusion="minmax", max_df_fraction=0.05, exact_weight=0.6, rare_weight=0.4, coverage_power=1.0,
        min_coverage=0.0, max_words=32, max_chars=1000, long_terms=16, long_weight=0.6, depth=100)


@pytest.mark.parametrize("kwargs", [{"max_df_fraction": 0}, {"max_df_fraction": 1.5}, {"exact_weight": -1},
                                    {"rare_weight": -0.1}, {"rrf_k": 0}, {"max_words": 0}, {"depth": 0},
                                    {"fusion": "sum"}, {"fusion": "minmax", "exact_weight": 1.5},
                                    {"long_terms": 33}, {"coverage_power": -1}])
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        EvidenceSettings(**kwargs)
