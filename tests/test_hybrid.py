"""Search modes (crossmodal_rag.search.hybrid): RRF fusion against a hand computation, keyword hits per
target, hybrid = RRF of the dense and keyword lists computed apart, filters in every mode,
--min-score's dense meaning, and the CLI's --mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossmodal_rag import Collection
from crossmodal_rag.errors import QueryError
from crossmodal_rag.search import Hit, hybrid
from crossmodal_rag.store import fulltext


def _hit(i: int, score: float, kind: str = "image") -> Hit:
    return Hit(rank=0, score=score, id=i, kind=kind, path=f"/p/{i}.jpg", text=None, captions=(),
               parent_id=None, title=None, mode="test")


def _search(c: Collection, query: str, **options: object) -> tuple[str, list[Hit]]:
    """``(the mode that ran, hits)`` of ``Collection.search``."""
    result = c.search(query, **options)
    return result.mode, list(result)


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
        """A store whose database has no keyword index."""

        import contextlib
        import sqlite3

        conn = sqlite3.connect(":memory:")

        @contextlib.contextmanager
        def locked(self):  # as MetadataStore.locked
            yield self.conn

    assert hybrid.choose_mode("auto", NoIndex(), has_text=True) == "dense"  # nothing to match
    assert hybrid.choose_mode("keyword", NoIndex(), has_text=True) == "keyword"
    with pytest.raises(QueryError, match="choose one of auto, dense, keyword, hybrid"):
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
        assert got.mode == ("hybrid" if mode == "auto" else mode)
        assert [h.id for h in got] == [h.id for h in _search(coll, "tabby cat", k=3, target="texts",
                                                              mode=mode)[1]]
    # a library caller that names no mode gets the CLI's default, auto (hybrid here)
    default = coll.search("tabby cat", k=3)
    assert default.mode == "hybrid" and default == coll.search("tabby cat", k=3, mode="auto").hits


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
        mode, hits = _search(coll, "a cup of espresso", k=5, target=target, mode="hybrid")
        depth = hybrid.fused_depth(5)
        dense = coll.search("a cup of espresso", k=depth, target=target, mode="dense")
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
        _, hits = _search(coll, "cup cat tower", k=10, mode=mode, where=["caption~espresso"])
        assert hits and all(h.path.endswith("coffee.jpg") for h in hits), mode
    for mode in ("keyword", "hybrid"):
        _, everything = _search(coll, "cat", k=10, target="texts", mode=mode, min_score=-1.0)
        assert all(h.dense_score is not None for h in everything)
        cut = sorted(h.dense_score for h in everything)[len(everything) // 2]
        _, kept = _search(coll, "cat", k=10, target="texts", mode=mode, min_score=cut)
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


# -- issue 25: queries keyword search cannot match, folded texts, a damaged keyword index ----------

@pytest.mark.parametrize("query", ['a 12" vinyl record', "🐱", "?!", '"'])
def test_queries_keyword_search_cannot_parse_never_fail(coll: Collection, query: str) -> None:
    """Unbalanced quotes are searched as words; a query without words (emoji, punctuation)
    finds no keyword hits: keyword mode returns none, hybrid mode the dense ranking alone (RRF of
    one list), auto mode the dense search itself."""
    dense = coll.search(query, k=5, target="texts", mode="dense")
    mode, auto = _search(coll, query, k=5, target="texts")
    _, fused = _search(coll, query, k=5, target="texts", mode="hybrid")
    _, keyword = _search(coll, query, k=5, target="texts", mode="keyword")
    if hybrid.keyword_note(query) is not None:  # no words
        assert mode == "dense" and [h.id for h in auto] == [h.id for h in dense]
        assert [h.id for h in fused] == [h.id for h in dense]
        assert [h.score for h in fused] == pytest.approx([1 / (60 + r) for r in range(1, 6)])
        assert keyword == []
    else:
        assert hybrid.keyword_note(query) is None and mode == "hybrid"
        assert [h.id for h in keyword] == [i for i, _ in fulltext.keyword_search(coll.store.conn, "a 12 vinyl "
                                                                                 "record")][:5]


def test_captions_with_invisible_and_fullwidth_characters_are_found_and_kept(tmp_path: Path,
                                                                            tiny_oc_spec: str) -> None:
    """The whole way: passages written with a zero-width space, a soft hyphen, fullwidth letters
    and a ligature are found by plain words in keyword and hybrid mode; the hits carry the text as
    written."""
    written = ["a tabby c\u200bat naps", "soft\u00adware release notes", "\uff4c\uff49\uff44\uff4c receipt",
               "\ufb01sh market prices", "nothing to see here"]
    corpus = tmp_path / "p.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"p{i}", "text": t}) for i, t in enumerate(written)))
    with Collection.create(tmp_path / "c", tiny_oc_spec) as c:
        c.add(corpus)
        for query, index in (("cat", 0), ("software", 1), ("lidl", 2), ("fish", 3), ("ｆｉｓｈ", 3)):
            for mode in ("keyword", "hybrid"):
                _, hits = _search(c, query, k=5, target="texts", mode=mode)
                first = hits[0] if mode == "keyword" else next(h for h in hits if h.keyword_score is not None)
                assert first.text == written[index], (query, mode)
        assert c.check().ok


def _garble_structure_record(folder: Path) -> None:
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(folder / "metadata.sqlite", isolation_level=None)) as db:
        db.execute("UPDATE fts_words_data SET block = x'ffffffffffffffffffff0102' WHERE id = 10")


def test_a_garbled_keyword_index_leaves_dense_search_and_is_rebuilt_by_reindex(
        coll: Collection, collection_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 25: a garbled FTS5 structure record made every command fail (reindex and check
    too). Now: the collection opens; dense search and info work; auto mode searches densely;
    keyword and hybrid search raise a CollectionError naming reindex; check reports it; reindex
    rebuilds it from the items."""
    from crossmodal_rag.cli import main
    from crossmodal_rag.errors import CollectionError

    expected_keyword = [h.id for h in coll.search("tabby cat", k=3, target="texts", mode="keyword")]
    coll.close()
    _garble_structure_record(collection_copy)
    with Collection.open(collection_copy) as c:
        dense = [h.id for h in c.search("tabby cat", k=3, mode="dense")]
        assert dense and [h.id for h in c.search("tabby cat", k=3, mode="auto")] == dense
        for mode in ("keyword", "hybrid"):
            with pytest.raises(CollectionError, match="keyword .*index .* is damaged.*reindex"):
                c.search("tabby cat", k=3, mode=mode)
        report = c.check()
        assert not report.ok and any("fts_words" in p and "reindex" in p for p in report.problems)
    base = ["-c", str(collection_copy), "-k", "3"]
    assert main(["-q", "info", str(collection_copy)]) == 0
    assert main(["-q", "search", "tabby cat", *base, "--mode", "dense"]) == 0
    capsys.readouterr()
    assert main(["-q", "search", "tabby cat", *base, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "dense"
    assert main(["-q", "search", "tabby cat", *base, "--mode", "keyword"]) == 1
    assert "reindex" in capsys.readouterr().err
    assert main(["-q", "check", str(collection_copy)]) == 1
    assert "reindex" in capsys.readouterr().out
    assert main(["-q", "reindex", str(collection_copy)]) == 0
    assert main(["-q", "check", str(collection_copy)]) == 0
    with Collection.open(collection_copy) as c:
        assert [h.id for h in c.search("tabby cat", k=3, target="texts", mode="keyword")] == expected_keyword


def test_cli_notes_a_keyword_query_without_words(coll: Collection, collection_copy: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from crossmodal_rag.cli import main

    coll.close()
    base = ["-c", str(collection_copy), "-k", "3", "--target", "texts"]
    assert main(["search", "🐱", *base, "--mode", "keyword", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["results"] == [] and out["mode"] == "keyword" and "no words" in out["note"]
    assert "note: keyword query '🐱' holds no words" in captured.err and "--mode dense" in captured.err
    for mode, shown in (("hybrid", "hybrid"), ("auto", "dense")):
        assert main(["-q", "search", "🐱", *base, "--mode", mode, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["mode"] == shown and len(out["results"]) == 3
        assert ("note" in out) == (mode == "hybrid")
    assert main(["-q", "search", 'a 12" vinyl record', *base]) == 0
