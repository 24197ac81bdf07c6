"""Reciprocal rank fusion against hand computation and a brute-force oracle."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from crossmodal_rag.search.fusion import RRF_K, reciprocal_rank_fusion


def test_hand_computed_two_lists():
    # a: rank 1 in list one, rank 3 in list two -> 1/61 + 1/63
    # b: rank 2 in list one                     -> 1/62
    # c: rank 1 in list two                     -> 1/61
    # d: rank 3 in list one, rank 2 in list two -> 1/63 + 1/62
    fused = reciprocal_rank_fusion([["a", "b", "d"], ["c", "d", "a"]])
    expected = {"a": 1 / 61 + 1 / 63, "b": 1 / 62, "c": 1 / 61, "d": 1 / 63 + 1 / 62}
    assert [i for i, _ in fused] == ["a", "d", "c", "b"]
    for item, score in fused:
        assert score == pytest.approx(expected[item], abs=1e-15)


def test_default_k_is_sixty_and_k_changes_scores():
    assert RRF_K == 60
    (item, score), = reciprocal_rank_fusion([["x"]], k=1)
    assert (item, score) == ("x", 0.5)
    assert reciprocal_rank_fusion([["x"]])[0][1] == pytest.approx(1 / 61)


def test_agreement_beats_a_single_top_rank():
    # "both" is 2nd in two lists; "top" is 1st in one list only
    fused = reciprocal_rank_fusion([["top", "both"], ["other", "both"]])
    assert fused[0][0] == "both"


def test_weights_limit_and_ties():
    fused = reciprocal_rank_fusion([["a"], ["b"]], weights=[1.0, 2.0])
    assert fused == [("b", pytest.approx(2 / 61)), ("a", pytest.approx(1 / 61))]
    # equal scores: order of first appearance (list by list)
    assert [i for i, _ in reciprocal_rank_fusion([["p", "q"], ["r", "s"]])] == ["p", "r", "q", "s"]
    assert [i for i, _ in reciprocal_rank_fusion([["p", "q"], ["r", "s"]], limit=2)] == ["p", "r"]
    assert reciprocal_rank_fusion([["p"]], limit=0) == []


def test_duplicates_within_a_list_count_once_at_best_rank():
    assert reciprocal_rank_fusion([["a", "b", "a"]]) == reciprocal_rank_fusion([["a", "b"]])


def test_empty_inputs():
    assert reciprocal_rank_fusion([]) == []
    assert reciprocal_rank_fusion([[], []]) == []


@pytest.mark.parametrize("kwargs", [{"k": 0}, {"k": -1}, {"weights": [1.0]},
                                    {"weights": [1.0, -1.0]}, {"limit": -1}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="reciprocal_rank_fusion"):
        reciprocal_rank_fusion([["a"], ["b"]], **kwargs)


def test_matches_exact_brute_force_on_random_lists():
    rng = random.Random(7)
    for _ in range(200):
        universe = list(range(rng.randint(1, 30)))
        lists = [rng.sample(universe, rng.randint(0, len(universe))) for _ in range(rng.randint(1, 4))]
        k = rng.randint(1, 100)
        # oracle: exact rational scores per id, computed independently
        exact = {i: sum((Fraction(1, k + lst.index(i) + 1) for lst in lists if i in lst), Fraction(0))
                 for i in universe if any(i in lst for lst in lists)}
        fused = reciprocal_rank_fusion(lists, k=k)
        assert {i for i, _ in fused} == set(exact)
        for item, score in fused:
            assert score == pytest.approx(float(exact[item]), rel=1e-12)
        got = [exact[i] for i, _ in fused]
        assert got == sorted(got, reverse=True)
