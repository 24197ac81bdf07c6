"""Search modes (crossmodal_rag.hybrid): RRF fusion against a hand computation, keyword hits per
target, hybrid = RRF of the dense and keyword lists computed apart, filters in every mode,
--min-score's dense meaning, and the CLI's --mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossmodal_rag import Collection, hybrid
from crossmodal_rag.errors import QueryError
from crossmodal_rag.store import fulltext


def _hit(i: int, score: float, kind: str = "image") -> hybrid.RankedHit:
    return hybrid.RankedHit(rank=0, score=score, id=i, kind=kind, path=f"/p/{i}.jpg", text=None, captions=(),
                            parent_id=None, title=None, mode="test")


def test_fuse_is_reciprocal_rank_fusion_by_hand() -> None:
    dense = [_hit(1, 0.9), _hit(2, 0.8), _hit(3, 0.7)]
    keyword = [_hit(3, 7.0), _hit(4, 5.0), _hit(1, 1.0)]
    fused = hybrid.fuse(dense, keyword, k=10)
    # 1: 1/61 + 1/63; 3: 1/63 + 1/61; 2: 1/62; 4: 1/62 -> ties kept in first-met order (1 before 3,
    # 2 before 4: dense list first)
    expected = [(1, 1 / 61 + 1 / 63), (3, 1 / 63 + 1 / 61), (2, 1 / 62), (4, 1 / 62)]
    assert [h.id for h in fused] == [i for i, _ in expected]
    assert [h.score for h in fused] == pytest.approx([s for _, s in expected], rel=1e-12)
    assert [h.rank for h in fused] == [1, 2, 3, 4] and {h.mode for h in fused} == {"hybrid"}
    assert [(h.dense_score, h.keyword_score) for h in fused] == [(0.9, 1.0), (0.7, 7.0), (0.8, None), (None, 5.0)]
    assert [h.id for h in hybrid.fuse(dense, keyword, k=2)] == [1, 3]


def test_choose_mode() -> None:
    class NoIndex:
        import threading

        _lock = threading.RLock()
        import sqlite3

        conn = sqlite3.connect(":memory:")

    assert hybrid.choose_mode("auto", NoIndex(), has_text=True) == "dense"  # nothing to match
    assert hybrid.choose_mode("keyword", NoIndex(), has_text=True) == "keyword"
    with pytest.raises(QueryError, match="choose one of dense, keyword, hybrid"):
        hybrid.choose_mode("bm25", NoIndex(), has_text=True)
    with pytest.raises(QueryError, match="needs a text query"):
        hybrid.choose_mode("hybrid", NoIndex(), has_text=False)
    assert hybrid.keyword_text('"a cat" + snow - indoors') == "a cat snow"


@pytest.fixture
def coll(collection_copy: Path) -> Collection:
    """The sample collection with its keyword index (filled by the ingest's own writes)."""
    with Collection.open(collection_copy) as c:
        assert fulltext.indexed_count(c.store.conn) == c.store.counts()["captions"] > 0
        yield c


def test_collection_search_takes_the_mode(coll: Collection) -> None:
    for mode in ("keyword", "hybrid", "auto"):
        got = coll.search("tabby cat", k=3, target="texts", mode=mode)
        assert [h.id for h in got] == [h.id for h in hybrid.search(coll, "tabby cat", k=3, target="texts",
                                                                   mode=mode)[1]]
    assert [h.id for h in coll.search("tabby cat", k=3)] == [h.id for h in coll.search("tabby cat", k=3,
                                                                                       mode="dense")]


def test_keyword_hits_per_target(coll: Collection) -> None:
    texts = hybrid.keyword_hits(coll.store, "tabby cat", 10, "texts")
    assert texts and all(h.kind == "caption" and "cat" in h.text for h in texts)
    ranked = fulltext.keyword_search(coll.store.conn, "tabby cat")
    assert [h.id for h in texts] == [i for i, _ in ranked][:10]
    images = hybrid.keyword_hits(coll.store, "tabby cat", 10, "images")
    assert [h.id for h in images] == [texts[0].parent_id] and images[0].score == texts[0].score
    assert images[0].path.endswith("cat.jpg") and images[0].captions
    mixed = hybrid.keyword_hits(coll.store, "tabby cat", 4, "all")
    assert [h.kind for h in mixed] == ["caption", "image", "caption", "caption"]


def test_hybrid_is_rrf_of_the_dense_and_keyword_lists(coll: Collection) -> None:
    for target in ("images", "texts", "all"):
        mode, hits = hybrid.search(coll, "a cup of espresso", k=5, target=target, mode="hybrid")
        depth = max(5 * hybrid.DEPTH_FACTOR, hybrid.MIN_DEPTH)
        dense = coll.search("a cup of espresso", k=depth, target=target)
        keyword = hybrid.keyword_hits(coll.store, "a cup of espresso", depth, target)
        scores: dict[int, float] = {}
        for ranked in ([h.id for h in dense], [h.id for h in keyword]):
            for r, i in enumerate(ranked, start=1):
                scores[i] = scores.get(i, 0.0) + 1 / (60 + r)
        expected = sorted(scores.values(), reverse=True)[:5]
        assert mode == "hybrid"
        assert [h.score for h in hits] == pytest.approx(expected)
        assert all(scores[h.id] == pytest.approx(h.score) for h in hits)
        # every hit knows its cosine, equal to the dense search's where that found it
        dense_of = {h.id: h.score for h in dense}
        for h in hits:
            if h.id in dense_of:
                assert h.dense_score == pytest.approx(dense_of[h.id], abs=1e-5)


def test_filters_apply_to_every_mode_and_min_score_is_dense(coll: Collection) -> None:
    for mode in ("dense", "keyword", "hybrid"):
        _, hits = hybrid.search(coll, "cup cat tower", k=10, mode=mode, where=["caption~espresso"])
        assert hits and all(h.path.endswith("coffee.jpg") for h in hits), mode
    for mode in ("keyword", "hybrid"):
        _, everything = hybrid.search(coll, "cat", k=10, target="texts", mode=mode, min_score=-1.0)
        assert all(h.dense_score is not None for h in everything)
        cut = sorted(h.dense_score for h in everything)[len(everything) // 2]
        _, kept = hybrid.search(coll, "cat", k=10, target="texts", mode=mode, min_score=cut)
        assert kept and all(h.dense_score >= cut for h in kept)
        assert {h.id for h in kept} < {h.id for h in everything}
        if mode == "keyword":  # the same ranking, the hits under the cut left out
            assert [h.id for h in kept] == [h.id for h in everything if h.dense_score >= cut]


def test_cli_mode_in_json_and_errors(coll: Collection, collection_copy: Path, sample_dir: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from crossmodal_rag.cli import main

    coll.close()
    base = ["-c", str(collection_copy), "-k", "3"]
    for mode, expected in (("auto", "hybrid"), ("dense", "dense"), ("keyword", "keyword")):
        assert main(["-q", "search", "tabby cat", *base, "--mode", mode, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["mode"] == expected and out["results"]
    assert main(["-q", "search", "--image", str(sample_dir / "cat.jpg"), *base, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "dense"
    assert main(["-q", "search", "--image", str(sample_dir / "cat.jpg"), *base, "--mode", "keyword"]) == 2
    assert "keyword search needs a text query" in capsys.readouterr().err
    for hostile in ('"tabby', "NEAR(cat dog", "*", "'); DROP TABLE items;--"):
        code = main(["-q", "search", hostile, *base, "--mode", "keyword"])
        captured = capsys.readouterr()
        assert code in (0, 2) and "Traceback" not in captured.err, hostile
        assert code == 0 or "keyword query" in captured.err
    assert main(["-q", "check", str(collection_copy)]) == 0


def test_check_and_reindex_see_the_keyword_index(coll: Collection, collection_copy: Path) -> None:
    coll.close()
    with Collection.open(collection_copy, writable=True) as c, c.store.transaction() as conn:
        conn.execute("DELETE FROM fts_words WHERE rowid = (SELECT MIN(rowid) FROM fts_words)")
    with Collection.open(collection_copy) as c:
        assert any("full-text index fts_words lacks 1 item(s)" in p for p in c.check().problems)
    from crossmodal_rag.cli import main

    assert main(["-q", "reindex", str(collection_copy)]) == 0
    with Collection.open(collection_copy) as c:
        assert c.check().ok
        assert fulltext.store_count(c.store) == c.store.counts()["captions"]
    with Collection.open(collection_copy, writable=True) as c:  # the library's reindex, too
        with c.store.transaction() as conn:
            conn.execute("DELETE FROM fts_grams")
        assert not c.check().ok
        c.reindex()
        assert c.check().ok and fulltext.store_count(c.store) == c.store.counts()["captions"]
