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


def _store(texts: list[str | tuple[str, str]], kind: str = "caption", file: str = ":memory:") -> sqlite3.Connection:
    """An in-memory (or ``file``) items table holding ``texts`` (or ``(title, text)`` pairs) as ids
    1.., indexed."""
    conn = sqlite3.connect(file, isolation_level=None if file != ":memory:" else "")
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


def test_too_long_queries_name_the_limit() -> None:
    conn = _store(["a cat"])
    with pytest.raises(QueryError, match="at most"):
        ft.keyword_search(conn, "x" * (ft.MAX_QUERY_CHARS + 1))
    with pytest.raises(QueryError, match="at most 32"):
        ft.keyword_search(conn, " ".join(f"w{i}" for i in range(40)))


@pytest.mark.parametrize(("query", "as_words"), [
    ('a 12" vinyl record', "a 12 vinyl record"),  # an inch mark
    ('"tabby cat', "tabby cat"),  # a phrase never closed
    ('"lake boats" 12" red', '"lake boats" 12 red'),  # quotes pair from the left
    ('"a" "b" "', "a b"),
])
def test_an_unbalanced_quote_separates_words(query: str, as_words: str) -> None:
    """Issue 25: a quote without its pair is searched as the words around it (it failed with
    "unbalanced double quote"); the quoted phrases before it stay phrases."""
    texts = [*_corpus(seed=6, n=30), "a 12 inch vinyl record", "a red vinyl sleeve", "boats on the lake"]
    conn = _store(texts)
    assert ft.parse_keyword_query(query) == ft.parse_keyword_query(as_words)
    assert ft.keyword_search(conn, query) == ft.keyword_search(conn, as_words)
    assert ft.keyword_search(conn, query)  # every one finds something
    if "vinyl" in query:
        assert ft.keyword_search(conn, query)[0][0] == len(texts) - 2


def test_intended_phrases_stay_phrases() -> None:
    conn = _store(["boats lake", "lake boats", "the lake and its boats"])
    assert [i for i, _ in ft.keyword_search(conn, '"lake boats"')] == [2]
    assert {i for i, _ in ft.keyword_search(conn, "lake boats")} == {1, 2, 3}


@pytest.mark.parametrize("query", ["🐱", "?!- ()", '"', '""', "\u200b", "🐈‍⬛ 🐕", "* ^ -", "\u00ad\ufeff"])
def test_a_query_without_words_finds_nothing(query: str) -> None:
    """Issue 25: emoji or punctuation alone (it failed with "holds no words") is an empty query
    that finds nothing, not an error; hybrid and auto modes then rank densely."""
    conn = _store(["a cat", "🐱 emoji caption", "OR NOT"])
    assert ft.parse_keyword_query(query).empty
    assert ft.keyword_search(conn, query) == []


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


# -- Unicode folding (issue 25) -------------------------------------------------------------------

INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad"


def _fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def _disguise(text: str, seed: int) -> str:
    """``text`` as it may be written: invisible characters inside and between words, some words
    fullwidth, "fi"/"fl" as ligatures. NFKC plus dropping the invisible characters undoes it."""
    rng = random.Random(seed)
    words = []
    for word in text.split(" "):
        if rng.random() < 0.3:
            word = _fullwidth(word)
        word = word.replace("fi", "\ufb01").replace("fl", "\ufb02")
        chars = list(word)
        for _ in range(rng.randint(0, 2)):
            chars.insert(rng.randint(0, len(chars)), rng.choice(INVISIBLE))
        words.append("".join(chars))
    return " ".join(words)


FOLD_QUERIES = ["cat", "invoice 4711", "fish", "soft flower", "tabby cat", "Store Berlin", '"lake boats"',
                "software", "0815"]


def test_disguised_texts_rank_exactly_as_their_plain_form() -> None:
    """A corpus written with zero-width characters, soft hyphens, fullwidth letters and ligatures
    ranks for every query exactly as the same corpus written plainly (ids and BM25 scores: the
    index holds the folded text), and so do disguised queries."""
    texts = [*_corpus(seed=7, n=40), "fish and chips", "a soft flower", "software update"]
    plain, disguised = _store(texts), _store([_disguise(t, i) for i, t in enumerate(texts)])
    for n, query in enumerate(FOLD_QUERIES):
        expected = ft.keyword_search(plain, query)
        assert expected, query
        for conn, q in ((disguised, query), (disguised, _disguise(query, 100 + n)), (plain, _disguise(query, n))):
            got = ft.keyword_search(conn, q)
            assert [i for i, _ in got] == [i for i, _ in expected], (query, q)
            assert [s for _, s in got] == pytest.approx([s for _, s in expected], rel=1e-9)


@pytest.mark.parametrize(("caption", "query"), [
    ("a tabby c\u200bat on a mat", "cat"),  # zero-width space
    ("soft\u00adware update", "software"),  # soft hyphen
    ("\uff43\uff41\uff54 video", "cat"),  # fullwidth letters
    ("\ufb01sh soup", "fish"),  # ligature
    ("word\u2060joiner and \ufeffbom", "wordjoiner bom"),
    ("ca\u200d\u200ct", "cat"),
])
def test_captions_written_with_invisible_or_compatibility_characters_are_found(caption: str, query: str) -> None:
    conn = _store([caption, "a dog", "an unrelated caption"])
    assert [i for i, _ in ft.keyword_search(conn, query)][:1] == [1]
    # the items keep the text as written; the index holds it folded
    assert conn.execute("SELECT text FROM items WHERE id = 1").fetchone()[0] == caption
    held = conn.execute("SELECT body FROM fts_grams WHERE rowid = 1").fetchone()[0]
    assert held == ft.fold(caption) and not set(held) & set(INVISIBLE)
    assert ft.problems(conn) == []


def test_fold() -> None:
    assert ft.fold("\uff23\uff41\uff54\u200b \ufb01sh soft\u00adware \u2460") == "Cat fish software 1"
    assert ft.fold("".join(INVISIBLE)) == ""
    text = _disguise("the quick brown fox fixes flat tyres", 3)
    assert ft.fold(text) == ft.fold(ft.fold(text)) == "the quick brown fox fixes flat tyres"


def _schema3_store(folder: Path, captions: list[str]) -> None:
    """A metadata store as schema version 3 left it: the keyword index holds the texts as
    written (not folded)."""
    import numpy as np

    from crossmodal_rag.store.metadata import DB_NAME, MetadataStore

    store = MetadataStore(folder)
    with store.transaction():
        for text in captions:
            store.insert_item("caption", np.zeros(4, np.float32), parent_id=None, text=text)
    store.close()
    conn = sqlite3.connect(folder / DB_NAME, isolation_level=None)
    rows = conn.execute("SELECT id, text FROM items").fetchall()
    for table in ft.FTS_TABLES:
        conn.execute(f"DELETE FROM {table}")
        conn.executemany(f"INSERT INTO {table}(rowid, body) VALUES (?, ?)",
                         [(i, ft.segment(t) if table == "fts_words" else t) for i, t in rows])
    conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    conn.close()


def test_a_schema_3_index_is_read_as_it_is_and_folded_on_the_next_writable_open(tmp_path: Path) -> None:
    """Existing collections: read-only, a schema-3 store is searched and checked as it is (no
    false "stale text" problems); the next writable open rebuilds the index folded (schema 4),
    leaving the items' text as written."""
    from crossmodal_rag.store.metadata import MetadataStore
    from crossmodal_rag.store.schema import SCHEMA_VERSION

    captions = ["a \uff43\uff41\uff54 on a mat", "a plain cat", "soft\u00adware"]
    _schema3_store(tmp_path, captions)
    old = MetadataStore(tmp_path, readonly=True)
    try:
        assert old.schema_version == 3 and ft.problems(old.conn) == []
        assert [i for i, _ in ft.search_store(old, "cat")] == [2]  # the fullwidth one is not folded yet
    finally:
        old.close()
    store = MetadataStore(tmp_path)
    try:
        assert store.schema_version == SCHEMA_VERSION >= ft.FOLDED_SINCE
        assert ft.problems(store.conn) == []
        assert sorted(i for i, _ in ft.search_store(store, "cat")) == [1, 2]
        assert [i for i, _ in ft.search_store(store, "software")] == [3]
        assert [it.text for it in store.get_items([1, 2, 3]).values()] == captions
    finally:
        store.close()


# -- a damaged index (issue 25) -------------------------------------------------------------------

DAMAGE = {  # how a garbled file may look, and what SQLite then says
    "structure record": "UPDATE fts_words_data SET block = x'ffffffffffffffffffff0102' WHERE id = 10",
    "no structure record": "DELETE FROM fts_words_data WHERE id = 10",
    "averages record": "UPDATE fts_grams_data SET block = x'ffffffffffffffff' WHERE id = 1",
    "leaf page": "UPDATE fts_words_data SET block = substr(block, 1, 20) WHERE id = (SELECT max(id) FROM fts_words_data)",
    "config version": "UPDATE fts_grams_config SET v = 99 WHERE k = 'version'",
    "docsize": "UPDATE fts_words_docsize SET sz = x'ffffffff'",
    "shadow table gone": "DROP TABLE fts_words_docsize",
}


def _damaged(tmp_path: Path, texts: list[str], damage: str) -> sqlite3.Connection:
    """A store file holding ``texts``, damaged by another connection (as a file on disk is: FTS5
    keeps what it read in the connection), opened afresh."""
    file = str(tmp_path / "damaged.sqlite")
    _store(texts, file=file).close()
    with contextlib.closing(sqlite3.connect(file, isolation_level=None)) as other:
        other.execute(DAMAGE[damage])
    return sqlite3.connect(file, isolation_level=None)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_index_is_reported_refused_and_rebuilt(damage: str, tmp_path: Path) -> None:
    """Each damage: ``problems`` names it and the fix (reindex); keyword search raises a
    CollectionError naming reindex (not a bare sqlite3 error); ``rebuild`` remakes both tables
    from the items, after which the ranking equals a fresh store's."""
    from crossmodal_rag.errors import CollectionError

    texts = _corpus(seed=8, n=25)
    conn = _damaged(tmp_path, texts, damage)
    found = ft.problems(conn)
    assert found and all("reindex" in p for p in found), found
    with pytest.raises(CollectionError, match="keyword .*index .* is damaged.*reindex"):
        ft.keyword_search(conn, "cat tower")
    assert ft.rebuild(conn) == len(texts)
    assert ft.problems(conn) == []
    assert ft.keyword_search(conn, "cat tower") == ft.keyword_search(_store(texts), "cat tower")
    conn.execute("INSERT INTO items VALUES (99, 'caption', 'a new cat', NULL)")  # writes work again
    ft.index_items(conn, [(99, "a new cat", None)])
    assert ft.problems(conn) == []


def test_writes_to_a_damaged_index_name_reindex(tmp_path: Path) -> None:
    from crossmodal_rag.errors import CollectionError

    conn = _damaged(tmp_path, ["a cat"], "structure record")
    with pytest.raises(CollectionError, match="reindex"):
        ft.index_items(conn, [(2, "a dog", None)])
    with pytest.raises(CollectionError, match="reindex"):
        ft.delete_items(conn, [1])
