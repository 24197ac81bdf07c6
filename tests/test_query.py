"""Query arithmetic equals the normalised weighted sum computed by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag import Collection, QueryError
from crossmodal_rag.search.query import QueryTerm, parse_query


@pytest.mark.parametrize(
    ("query", "terms"),
    [
        ("a red t-shirt", [QueryTerm("a red t-shirt", 1.0)]),
        ('"a cat" + "snow" - "indoors"', [QueryTerm("a cat"), QueryTerm("snow"), QueryTerm("indoors", -1.0)]),
        ("cat + snow - indoors", [QueryTerm("cat"), QueryTerm("snow"), QueryTerm("indoors", -1.0)]),
        ('2:cat + 0.5:"red car"', [QueryTerm("cat", 2.0), QueryTerm("red car", 0.5)]),
        ('"a + b" - c', [QueryTerm("a + b"), QueryTerm("c", -1.0)]),
        ("rock-n-roll", [QueryTerm("rock-n-roll")]),
    ],
)
def test_parse(query: str, terms: list[QueryTerm]) -> None:
    assert parse_query(query) == terms


@pytest.mark.parametrize("bad", ["", "   ", '"" + cat', "cat + "])
def test_bad_queries(bad: str) -> None:
    with pytest.raises(QueryError):
        parse_query(bad)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_arithmetic_is_the_normalised_weighted_sum(sample_collection: Path, sample_dir: Path) -> None:
    with Collection.open(sample_collection) as coll:
        enc = coll.encoder
        cat, snow, indoors = enc.encode_texts(["a cat", "snow", "indoors"])
        got = coll.embed_query('2:"a cat" + snow - indoors')
        np.testing.assert_allclose(got, _unit(2 * cat + snow - indoors), atol=1e-5)

        img = enc.encode_images([sample_dir / "cat.jpg"])[0]
        night, day = enc.encode_texts(["at night", "daylight"])
        mixed = coll.embed_query(image=sample_dir / "cat.jpg", plus=["at night"], minus=["daylight"])
        np.testing.assert_allclose(mixed, _unit(img + night - day), atol=1e-5)
        both = coll.embed_query("a cat", image=sample_dir / "cat.jpg")
        np.testing.assert_allclose(both, _unit(img + cat), atol=1e-5)

        hits = coll.search('2:"a cat" + snow - indoors', k=3, mode="dense")
        vecs = coll.store.vectors(coll.store.ids("image").tolist(), coll.manifest.dim)
        best = np.argsort(-(vecs @ _unit(2 * cat + snow - indoors)))[:3]
        assert [h.id for h in hits] == coll.store.ids("image")[best].tolist()
        with pytest.raises(QueryError, match="cancel"):
            coll.embed_query("cat - cat")


# -- weights and query vectors with bounds (issue 25) ----------------------------------------------
@pytest.mark.parametrize("weight", ["9" * 400, "1e200", "1E400", "0", "0.0", "1e-9", "1001", "5e3"])
def test_a_weight_out_of_range_is_a_query_error_naming_it(weight: str) -> None:
    """A 400-digit weight was infinity, 1e200 a plain word and 0 a zero vector: each ended in a NaN
    or zero query vector that found nothing (with numpy warnings). Now each is refused, by name."""
    import warnings

    from crossmodal_rag.search.query import MAX_WEIGHT, MIN_WEIGHT

    shown = weight if len(weight) <= 24 else weight[:12]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy warning on the way
        with pytest.raises(QueryError, match="outside the allowed range") as e:
            parse_query(f"{weight}:cat + dog")
    assert shown in str(e.value) and f"{MIN_WEIGHT:g}" in str(e.value) and f"{MAX_WEIGHT:g}" in str(e.value)


@pytest.mark.parametrize(("query", "terms"), [
    ("1e-2:cat + 5E2:dog", [QueryTerm("cat", 0.01), QueryTerm("dog", 500.0)]),
    ("0.001:cat - 1000:dog", [QueryTerm("cat", 0.001), QueryTerm("dog", -1000.0)]),
    ("2.:cat", [QueryTerm("cat", 2.0)]),
])
def test_weights_in_range_are_parsed(query: str, terms: list[QueryTerm]) -> None:
    assert parse_query(query) == terms


def test_a_nonfinite_or_zero_query_vector_is_refused(sample_collection: Path) -> None:
    import warnings

    with Collection.open(sample_collection) as coll:
        dim = coll.manifest.dim
        good = coll.embed_query("a cat")
        assert len(coll.search_vectors(good[None], k=3)[0]) == 3
        for bad, what in ((np.full(dim, np.nan), "NaN"), (np.full(dim, np.inf), "infinity"),
                          (np.zeros(dim), "zero")):
            for target in ("images", "texts", "all"):
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    with pytest.raises(QueryError, match=what):
                        coll.search_vectors(np.stack([good, bad]), k=3, target=target)
        with pytest.raises(QueryError, match="outside the allowed range"):
            coll.search("9" * 400 + ":cat", k=3, mode="dense")
