"""Query arithmetic equals the normalised weighted sum computed by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag import Collection, QueryError
from crossmodal_rag.query import QueryTerm, parse_query


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

        hits = coll.search('2:"a cat" + snow - indoors', k=3)
        vecs = coll.store.vectors(coll.store.ids("image").tolist(), coll.manifest.dim)
        best = np.argsort(-(vecs @ _unit(2 * cat + snow - indoors)))[:3]
        assert [h.id for h in hits] == coll.store.ids("image")[best].tolist()
        with pytest.raises(QueryError, match="cancel"):
            coll.embed_query("cat - cat")
