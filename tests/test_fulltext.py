"""The full-text index (crossmodal_rag.store.fulltext): FTS5 rankings against a brute-force BM25
over the same tokens, OCR text with dropped spaces, hostile keyword queries, and the check that
finds the index out of step with the items."""

from __future__ import annotations

import contextlib
import math
import random
import re
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossmodal_rag.errors import QueryError
from crossmodal_rag.store import fulltext as ft

pytestmark = pytest.mark.skipif(not ft.available(sqlite3.connect(":memory:")),
                                reason="this SQLite has no FTS5 trigram tokeniser")

VOCAB = ["cat", "dog", "receipt", "invoice", "total", "lidl", "store", "berlin", "coffee", "espresso", "tower",
         "lake", "boats", "red", "green", "blue", "4711", "2026", "0815", "tabby"]


def _store(texts: list[str | tuple[str, str]], kind: str = "caption") -> sqlite3.Connection:
    """An in-memory items table holding ``texts`` (or ``(title, text)`` pairs) as ids 1.., indexed."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, kind TEXT, text TEXT, title TEXT)")
    rows = [(i, kind, *(t[::-1] if isinstance(t, tuple) else (t, None))) for i, t in enumerate(texts, 1)]
    conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?)", rows)
    ft.fts_step(conn)
    return conn


def _corpus(seed: int = 1, n: int = 80) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(1, n + 1):
        text = " ".join(rng.choice(VOCAB) for _ in range(rng.randint(2, 12)))
        if i % 5 == 0:  # OCR-like: spaces dropped
            text = text.replace(" ", "", 2)
        if i % 7 == 0:
            text = text.title().replace(" ", "")
        docs.append(text)
    return docs


def _bm25(docs: dict[int, list[str]], phrases: list[tuple[str, ...]], k1: float = 1.2, b: float = 0.75
          ) -> dict[int, float]:
    """Okapi BM25 summed over phrases, with FTS5's idf floor: idf = ln((N - n + 0.5) / (n + 0.5)),
    1e-6 where that is <= 0; tf = the phrase's occurrences; length = tokens."""
    n_docs = len(docs)
    avg = sum(map(len, docs.values())) / n_docs
    out: dict[int, float] = {}
    for phrase in phrases:
        size = len(phrase)
        tf = {i: sum(tuple(t[j:j + size]) == phrase for j in range(len(t) - size + 1)) for i, t in docs.items()}
        n = sum(1 for f in tf.values() if f)
        idf = math.log((n_docs - n + 0.5) / (n + 0.5))
        idf = idf if idf > 0 else 1e-6
        for i, f in tf.items():
            if f:
                out[i] = out.get(i, 0.0) + idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(docs[i]) / avg))
    return out


def _brute_force(texts: list[str], query: str) -> list[tuple[int, float]]:
    """The ranking keyword_search should give: BM25 over words (after ``segment``, lower-cased)
    plus BM25 over character trigrams (lower-cased, spaces included)."""
    parsed = ft.parse_keyword_query(query)
    words = {i: re.findall(r"[a-z0-9]+", ft.segment(t).lower()) for i, t in enumerate(texts, 1)}
    grams = {i: [t.lower()[j:j + 3] for j in range(len(t) - 2)] for i, t in enumerate(texts, 1)}
    word_phrases = [tuple(re.findall(r"[a-z0-9]+", ft.segment(" ".join(p)).lower())) for p in parsed.phrases]
    gram_phrases = [tuple(s[j:j + 3] for j in range(len(s) - 2))
                    for s in (" ".join(p).lower() for p in parsed.phrases) if len(s) >= 3]
    by_words, by_grams = _bm25(words, word_phrases), _bm25(grams, gram_phrases)
    total = {i: by_words.get(i, 0.0) + by_grams.get(i, 0.0) for i in set(by_words) | set(by_grams)}
    return sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))


@pytest.mark.parametrize("query", ["invoice 4711", "cat", "Store Berlin", "tabby cat", "receipt total 2026",
                                   '"lake boats" red', "espresso", "0815", "dog dog"])
def test_ranking_equals_brute_force_bm25(query: str) -> None:
    texts = _corpus()
    got = ft.keyword_search(_store(texts), query)
    expected = _brute_force(texts, query)
    assert [i for i, _ in got] == [i for i, _ in expected]
    assert [s for _, s in got] == pytest.approx([s for _, s in expected], rel=1e-9)
    assert got  # every query above matches something in the corpus


def test_limit_and_allowed() -> None:
    texts = _corpus(seed=2)
    conn = _store(texts)
    everything = ft.keyword_search(conn, "cat tower")
    assert ft.keyword_search(conn, "cat tower", limit=3) == everything[:3]
    allowed = {i for i, _ in everything[1::2]}
    assert ft.keyword_search(conn, "cat tower", allowed=allowed) == [p for p in everything if p[0] in allowed]


def test_ocr_text_with_dropped_spaces_is_found() -> None:
    texts = ["LIDLStore4711Berlin\nInvoiceno.2026-0815\nTOTAL 12.50", "a tabby cat on a mat", "store opening hours"]
    conn = _store(texts, kind="ocr")
    for query in ("invoice", "4711", "lidl", "berlin", "invoice 4711", "2026-0815", "Invoice no"):
        assert ft.keyword_search(conn, query)[0][0] == 1, query
    # the word table alone would miss "invoice" (glued to "no") and find 4711 only after segmenting
    words_only = conn.execute("SELECT rowid FROM fts_words WHERE fts_words MATCH '\"invoice\"'").fetchall()
    assert words_only == []
    assert ft.segment("LIDLStore4711Berlin") == "LIDL Store 4711 Berlin"
    # a word that only the word table can match (under 3 characters) still counts
    assert [i for i, _ in ft.keyword_search(conn, "12")] == [1]


def test_titles_are_indexed_with_their_passage() -> None:
    conn = _store([("Grace Hopper", "She wrote the first compiler."), ("Pagoda", "A tower by a lake.")],
                  kind="passage")
    assert ft.keyword_search(conn, "hopper")[0][0] == 1 and ft.keyword_search(conn, "lake")[0][0] == 2


HOSTILE = ['"', 'a"b', '"""', "NEAR(a b)", "*", "OR", "AND NOT", "^cat", "body:cat", "cat*", "(cat",
           "'); DROP TABLE items;--", "\x00cat", "c\u0301at", "🐈 cat", "-cat", "+cat", "cat:", "{body}: cat",
           "x" * 999, "NOT cat", "cat AND", '"cat" OR "', "\\", "%_", "''", ";"]


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_queries_match_or_are_refused_clearly(query: str) -> None:
    conn = _store(_corpus(seed=3, n=20))
    try:
        result = ft.keyword_search(conn, query)
    except QueryError as e:
        assert "keyword query" in str(e)
    else:
        assert isinstance(result, list)
    assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == 20


def test_syntax_errors_name_the_problem() -> None:
    conn = _store(["a cat"])
    with pytest.raises(QueryError, match="unbalanced double quote"):
        ft.keyword_search(conn, '"tabby cat')
    with pytest.raises(QueryError, match="holds no words"):
        ft.keyword_search(conn, "?!- ()")
    with pytest.raises(QueryError, match="at most"):
        ft.keyword_search(conn, "x" * (ft.MAX_QUERY_CHARS + 1))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([*'ab c"*^:()-+\'\\\x00é🐈1', "OR", "AND", "NOT", "NEAR"]), max_size=20))
def test_any_query_matches_or_raises_query_error(pieces: list[str]) -> None:
    with contextlib.suppress(QueryError):
        assert isinstance(ft.keyword_search(_HOSTILE_CONN, "".join(pieces)), list)


_HOSTILE_CONN = _store(["a cat", "NEAR the OR", "é 1 abc", "🐈 cat café"]) if ft.available(
    sqlite3.connect(":memory:")) else None


def test_check_finds_the_index_out_of_step_and_rebuild_repairs_it() -> None:
    texts = _corpus(seed=4, n=12)
    conn = _store(texts)
    assert ft.problems(conn) == []
    conn.execute("DELETE FROM fts_words WHERE rowid = 3")  # a row lost
    conn.execute("UPDATE items SET text = 'a new caption' WHERE id = 5")  # the text changed
    conn.execute("INSERT INTO fts_grams(rowid, body) VALUES (99, 'left over')")  # a removed item's row
    found = "\n".join(ft.problems(conn))
    assert "fts_words lacks 1 item(s): 3" in found
    assert "fts_words holds stale text for 1 item(s): 5" in found
    assert "fts_grams holds removed or unindexed 1 item(s): 99" in found
    assert ft.rebuild(conn) == 12
    assert ft.problems(conn) == []
    assert ft.keyword_search(conn, "new caption")[0][0] == 5


def test_index_and_delete_keep_step_with_the_items() -> None:
    conn = _store(["a cat", "a dog"])
    conn.execute("INSERT INTO items VALUES (3, 'ocr', 'Receipt4711', NULL)")
    ft.index_items(conn, [(3, "Receipt4711", None)])
    assert [i for i, _ in ft.keyword_search(conn, "receipt")] == [3]
    conn.execute("DELETE FROM items WHERE id IN (1, 3)")
    ft.delete_items(conn, [1, 3])
    assert ft.problems(conn) == [] and ft.keyword_search(conn, "cat receipt") == []
    assert ft.indexed_count(conn) == 1


def test_a_store_without_the_tables_says_how_to_get_them() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, kind TEXT, text TEXT, title TEXT)")
    assert ft.problems(conn) == [] and ft.indexed_count(conn) == 0
    with pytest.raises(QueryError, match="--mode dense"):
        ft.keyword_search(conn, "cat")


def test_migration_from_schema_2_fills_the_index_and_later_writes_keep_it(tmp_path: Path) -> None:
    """A saved schema-2 store (tests/data/schema2): read-only it has no keyword index (keyword
    search says how to get one); the writable open's migration indexes its caption and passage;
    items added and removed afterwards keep the index in step."""
    import shutil

    import numpy as np

    from crossmodal_rag.store.metadata import DB_NAME, MetadataStore

    shutil.copy(Path(__file__).parent / "data" / "schema2" / DB_NAME, tmp_path / DB_NAME)
    old = MetadataStore(tmp_path, readonly=True)
    try:
        assert not ft.has_index(old.conn)
        with pytest.raises(QueryError, match="no keyword index"):
            ft.search_store(old, "anything")
    finally:
        old.close()
    store = MetadataStore(tmp_path)
    try:
        texts = dict(store.conn.execute(
            "SELECT id, text FROM items WHERE kind IN ('caption', 'passage') AND text != ''").fetchall())
        assert texts and ft.store_count(store) == len(texts) and ft.problems(store.conn) == []
        word = max(texts[min(texts)].split(), key=len)
        assert min(texts) in [i for i, _ in ft.search_store(store, word)]
        dim = len(store.conn.execute("SELECT vector FROM items LIMIT 1").fetchone()[0]) // 4
        with store.transaction():
            new = store.insert_item("caption", np.zeros(dim, np.float32), parent_id=None,
                                    text="LIDLStore4711Berlin")
        assert [i for i, _ in ft.search_store(store, "4711")] == [new]
        with store.transaction():
            store.delete_items([new])
        assert ft.search_store(store, "4711") == [] and ft.problems(store.conn) == []
    finally:
        store.close()
