"""The full-text (keyword) index of a collection's texts: SQLite FTS5 with BM25, kept in the
metadata database and written in the same transaction as the items it indexes.

What is indexed: the text of every caption, passage (title and text) and OCR item, one row per
item under the item's id (windows of long texts are not: their item is). Two FTS5 tables hold the
same texts, tokenised two ways, because OCR text loses spaces ("LIDLStore4711Berlin",
"Invoiceno.2026-0815") and a word index alone cannot find "4711" or "invoice" in it:

* ``fts_words`` (``unicode61``, diacritics folded): words, after splitting runs where letters
  meet digits or a lower-case letter meets a capital ("LIDL Store 4711 Berlin"); exact words
  score here.
* ``fts_grams`` (``trigram``, case-folded): every 3-character substring, so that any query word
  of 3 or more characters matches inside a glued run ("invoice" in "Invoiceno").

Both sides are folded (:func:`fold`, schema version 4): NFKC (fullwidth ``ｃａｔ`` -> ``cat``,
the ligature ``ﬁ`` -> ``fi``) with zero-width characters (U+200B..U+200D, U+2060, U+FEFF) and
soft hyphens (U+00AD) removed, so text written with them is found by plain words. Only the
index holds the folded text; the items keep the text as written. A store of schema 3 holds
texts as written until its next writable open rebuilds the index (read-only, it is searched as
it is).

A query is words (``\\w`` runs) and "quoted phrases"; each becomes one FTS5 phrase, quoted, so no
input reaches FTS5's query syntax. A quote left without its pair is a separator (``a 12" vinyl``
is the words a, 12, vinyl); a query without words matches nothing. Items match any phrase (OR);
an item's keyword score is the sum of its BM25 scores in the two tables (FTS5's ``bm25()``,
k1 = 1.2, b = 0.75, negated so that higher is better). docs/search-modes.md has the measurements
behind this choice.

No triggers (the schema check refuses them): :func:`index_items` and :func:`delete_items` are
called by the metadata store's own writes; :func:`rebuild` remakes both tables from the items,
even tables so damaged that SQLite cannot open them (a garbled structure record); :func:`problems`
compares them with the items for ``check``. A damaged index raises :class:`DamagedIndexError`
(naming ``reindex``) where it is used, and nowhere else: dense search and ``info`` never read it.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import CollectionError, QueryError

__all__ = ["FOLDED_SINCE", "FTS_KINDS", "FTS_TABLES", "IGNORED_CHARS", "DamagedIndexError", "KeywordQuery",
           "available", "delete_items", "doc_freqs", "fold", "fold_step", "fts_step", "index_items", "keyword_search",
           "parse_keyword_query", "problems", "rebuild", "search_store", "segment",
           "store_count"]

logger = logging.getLogger(__name__)

#: Item kinds whose text is indexed.
FTS_KINDS = ("caption", "passage", "ocr")
#: The two tables and their tokenisers (see the module docstring).
FTS_TABLES = {"fts_words": "unicode61 remove_diacritics 2", "fts_grams": "trigram case_sensitive 0"}
#: Longest keyword query accepted (characters) and most phrases in one.
MAX_QUERY_CHARS = 1000
MAX_PHRASES = 32
#: Characters that keyword search ignores on both sides: zero-width space, non-joiner and joiner,
#: word joiner, zero-width no-break space (BOM), soft hyphen.
IGNORED_CHARS = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
#: The schema version from which the index holds folded text (:func:`fold`).
FOLDED_SINCE = 4

_MARKS = ",".join("?" * len(FTS_KINDS))
# letters meeting digits, a lower-case letter meeting a capital, a capital run meeting a word
_SPLITS = re.compile(r"(?<=[^\W\d_])(?=\d)|(?<=\d)(?=[^\W\d_])|(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_PHRASE_OR_WORD = re.compile(r'"([^"]*)"|(\w+)')
_IGNORED = dict.fromkeys(map(ord, IGNORED_CHARS))


class DamagedIndexError(CollectionError):
    """The full-text index cannot be read or written (damaged); ``reindex`` rebuilds it."""


def _damaged(e: Exception, where: object = "this collection") -> DamagedIndexError:
    return DamagedIndexError(
        f"the keyword (full-text) index of {where} is damaged ({e}): rebuild it with `crossmodal-rag "
        "reindex` (the items are intact; dense search does not use this index)")


def fold(text: str) -> str:
    """``text`` as the index and queries hold it: NFKC, without :data:`IGNORED_CHARS`
    (``"ｃａｔ"`` -> ``"cat"``, ``"ﬁsh"`` -> ``"fish"``, ``"soft\\u00adware"`` -> ``"software"``)."""
    return unicodedata.normalize("NFKC", text.translate(_IGNORED)).translate(_IGNORED)


def segment(text: str) -> str:
    """``text`` with a space where letters meet digits or case changes inside a word:
    ``"LIDLStore4711Berlin"`` -> ``"LIDL Store 4711 Berlin"`` (what ``fts_words`` holds)."""
    return _SPLITS.sub(" ", text)


def _body(text: str | None, title: str | None, folded: bool = True) -> str | None:
    """What the index holds for an item (folded, or as written in a schema-3 store); None: nothing."""
    body = "\n".join(t for t in (title, text) if t)
    body = fold(body) if folded else body
    return body if body.strip() else None


def _is_folded(conn: sqlite3.Connection) -> bool:
    """Whether the store's index holds folded text: schema version :data:`FOLDED_SINCE` or later
    (a connection without a stated version is taken as current)."""
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError:  # no meta table
        return True
    value = str(row[0]) if row else ""
    return not value.isdigit() or int(value[:6]) >= FOLDED_SINCE


# -- schema ---------------------------------------------------------------------------------------

def available(conn: sqlite3.Connection) -> bool:
    """Whether this SQLite has FTS5 with the trigram tokeniser (3.34+)."""
    try:
        probe = sqlite3.connect(":memory:")
        try:
            probe.execute("CREATE VIRTUAL TABLE t USING fts5(body, tokenize='trigram')")
        finally:
            probe.close()
    except sqlite3.Error:
        return False
    return True


def _create_sql(table: str) -> str:
    return f"CREATE VIRTUAL TABLE IF NOT EXISTS {table} USING fts5(body, tokenize='{FTS_TABLES[table]}')"


def has_index(conn: sqlite3.Connection) -> bool:
    """Whether the store holds the full-text tables (a read-only schema-2 store does not)."""
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name IN (?, ?)",
                        tuple(FTS_TABLES)).fetchall()
    return len(rows) == len(FTS_TABLES)


def fts_step(conn: sqlite3.Connection) -> None:
    """Schema version 3: the two FTS5 tables, filled from the items already stored (idempotent:
    an existing table is kept; a store whose SQLite lacks FTS5 gets none and keyword search says so)."""
    if not available(conn):
        logger.warning("this SQLite (%s) has no FTS5 trigram tokeniser: no keyword index",
                       sqlite3.sqlite_version)
        return
    fresh = not has_index(conn)
    for table in FTS_TABLES:
        conn.execute(_create_sql(table))
    if fresh:
        _fill(conn)


# -- writes (inside the metadata transaction) ----------------------------------------------------

def index_items(conn: sqlite3.Connection, rows: Iterable[tuple[int, str | None, str | None]]) -> None:
    """Index ``(item id, text, title)`` rows (items of :data:`FTS_KINDS`; empty texts add nothing)."""
    words, grams = [], []
    for item_id, text, title in rows:
        body = _body(text, title)
        if body is not None:
            words.append((item_id, segment(body)))
            grams.append((item_id, body))
    if words:
        try:
            conn.executemany("INSERT INTO fts_words(rowid, body) VALUES (?, ?)", words)
            conn.executemany("INSERT INTO fts_grams(rowid, body) VALUES (?, ?)", grams)
        except sqlite3.DatabaseError as e:
            raise _damaged(e) from e


def delete_items(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
    """Drop ``ids`` from both tables (ids not indexed are ignored)."""
    for start in range(0, len(ids), 500):
        chunk = list(ids[start:start + 500])
        marks = ",".join("?" * len(chunk))
        for table in FTS_TABLES:
            try:
                conn.execute(f"DELETE FROM {table} WHERE rowid IN ({marks})", chunk)
            except sqlite3.DatabaseError as e:
                raise _damaged(e) from e


def _fill(conn: sqlite3.Connection) -> None:
    rows = conn.execute(f"SELECT id, text, title FROM items WHERE kind IN ({_MARKS}) ORDER BY id", FTS_KINDS)
    while batch := rows.fetchmany(1000):
        index_items(conn, batch)


def rebuild(conn: sqlite3.Connection) -> int:
    """Remake both tables from the items, folded (inside the caller's transaction); returns the
    rows indexed. Creates the tables on a store that has none; a table too damaged to open is
    first given the shadow tables of an empty one (:func:`_reset_shadows`), then dropped."""
    if not available(conn):
        return 0
    for table in FTS_TABLES:
        try:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
        except sqlite3.DatabaseError as e:  # its structure record or config cannot be read
            logger.warning("full-text index %s cannot be opened (%s): rebuilt from the items", table, e)
            _reset_shadows(conn, table)
            conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(_create_sql(table))
    _fill(conn)
    return int(conn.execute("SELECT count(*) FROM fts_grams").fetchone()[0])


def _reset_shadows(conn: sqlite3.Connection, table: str) -> None:
    """Give ``table``'s shadow tables (``_data``, ``_idx``, ``_content``, ``_docsize``,
    ``_config``) the rows of a new, empty FTS5 table of the same tokeniser, so that SQLite can
    open it again (to drop it); a shadow table that went missing is made again."""
    fresh = sqlite3.connect(":memory:")
    try:
        fresh.execute(_create_sql(table))
        shadows = fresh.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name LIKE ? "
                                "ESCAPE '\\'", (table.replace("_", "\\_") + "\\_%",)).fetchall()
        contents = {name: fresh.execute(f"SELECT * FROM {name}").fetchall() for name, _ in shadows}
    finally:
        fresh.close()
    have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    for name, sql in shadows:
        if name in have:
            conn.execute(f"DELETE FROM {name}")
        else:
            conn.execute(sql)
        for row in contents[name]:
            conn.execute(f"INSERT INTO {name} VALUES ({','.join('?' * len(row))})", row)


def fold_step(conn: sqlite3.Connection) -> None:
    """Schema version 4: the index rebuilt with folded text (:func:`fold`); a store without the
    tables (SQLite without FTS5) is left so."""
    if has_index(conn):
        rebuild(conn)


def problems(conn: sqlite3.Connection) -> list[str]:
    """How the full-text tables disagree with the items (empty: in sync): rows missing or left
    over, texts that differ, and FTS5's own integrity check of each table."""
    if not has_index(conn):
        return []
    out: list[str] = []
    for table in FTS_TABLES:  # FTS5's own check first, each a statement of its own
        try:
            conn.execute(f"INSERT INTO {table}({table}) VALUES ('integrity-check')")
        except sqlite3.DatabaseError as e:
            out.append(f"full-text index {table}: {e} (rebuild it with `crossmodal-rag reindex`)")
    broken = {table for table in FTS_TABLES if any(m.startswith(f"full-text index {table}:") for m in out)}
    # the items and both tables read in ONE read transaction: a commit by a concurrent ingest
    # between two reads would otherwise look like rows the index should not hold
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:
        folded = _is_folded(conn)
        expected = {}
        for item_id, text, title in conn.execute(
                f"SELECT id, text, title FROM items WHERE kind IN ({_MARKS})", FTS_KINDS):
            body = _body(text, title, folded)
            if body is not None:
                expected[item_id] = body
        for table in FTS_TABLES:
            if table in broken:
                continue
            try:
                held = dict(conn.execute(f"SELECT rowid, body FROM {table}").fetchall())
            except sqlite3.DatabaseError as e:
                out.append(f"full-text index {table}: {e} (rebuild it with `crossmodal-rag reindex`)")
                continue
            want = {i: (segment(b) if table == "fts_words" else b) for i, b in expected.items()}
            missing, extra = sorted(set(want) - set(held)), sorted(set(held) - set(want))
            changed = sorted(i for i in set(want) & set(held) if want[i] != held[i])
            for what, ids in (("lacks", missing), ("holds removed or unindexed", extra),
                              ("holds stale text for", changed)):
                if ids:
                    shown = ", ".join(map(str, ids[:10])) + (" ..." if len(ids) > 10 else "")
                    out.append(f"full-text index {table} {what} {len(ids)} item(s): {shown} "
                               "(rebuild it with `crossmodal-rag reindex`)")
    finally:
        if own:
            conn.execute("COMMIT")
    return out


# -- queries --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeywordQuery:
    """A parsed keyword query: its phrases, each a tuple of (folded) words; none when the query
    holds no letters or digits (it matches nothing)."""

    phrases: tuple[tuple[str, ...], ...]

    @property
    def empty(self) -> bool:
        """Whether the query holds no words (emoji or punctuation only): it matches nothing."""
        return not self.phrases

    def match(self, table: str) -> str | None:
        """The FTS5 MATCH expression for ``table`` (None: no phrase can match there): every
        phrase double-quoted (words hold no quote), joined by OR. The trigram table gets only
        phrases of 3 or more characters (shorter ones cannot match a trigram)."""
        parts = []
        for words in self.phrases:
            text = " ".join(segment(w) for w in words) if table == "fts_words" else " ".join(words)
            if table == "fts_grams" and len(text) < 3:
                continue
            parts.append('"' + text + '"')
        return " OR ".join(parts) or None


def parse_keyword_query(query: str) -> KeywordQuery:
    """Words and "quoted phrases" -> :class:`KeywordQuery`, after :func:`fold`. Everything else
    (punctuation, emoji, FTS5 operators) separates words; quotes pair from the left, and a last
    quote left without a pair separates words too (``a 12" vinyl`` -> a, 12, vinyl). A query
    without words gives an empty :class:`KeywordQuery`. Raises
    :class:`~crossmodal_rag.errors.QueryError` for a query that is not text or is too long (in
    characters, or in words and phrases)."""
    if not isinstance(query, str):
        raise QueryError(f"keyword query must be text, got {type(query).__name__}")
    if len(query) > MAX_QUERY_CHARS:
        raise QueryError(f"keyword query is {len(query)} characters; at most {MAX_QUERY_CHARS}")
    text = fold(query)
    if text.count('"') % 2:  # the unpaired quote (an inch mark, a typo) separates words
        last = text.rfind('"')
        text = text[:last] + " " + text[last + 1:]
    phrases: list[tuple[str, ...]] = []
    for m in _PHRASE_OR_WORD.finditer(text):
        words = tuple(re.findall(r"[^\W_]+", m.group(1) if m.group(1) is not None else m.group(2)))
        if words and words not in phrases:
            phrases.append(words)
    if len(phrases) > MAX_PHRASES:
        raise QueryError(f"keyword query holds {len(phrases)} words or phrases; at most {MAX_PHRASES}")
    return KeywordQuery(tuple(phrases))


def keyword_search(conn: sqlite3.Connection, query: str | KeywordQuery, limit: int | None = None,
                   allowed: set[int] | None = None) -> list[tuple[int, float]]:
    """Items matching ``query``, best first: ``[(item id, score), ...]``, score = the sum of the
    item's BM25 scores in both tables (higher is better). ``limit`` keeps the best (None: all);
    ``allowed`` keeps only those ids. Without ``allowed``, each table gives at most its best
    ``max(20 * limit, 1000)`` rows (an item past that in one table keeps its other table's score).
    A query without words finds nothing. Raises :class:`DamagedIndexError` when the index cannot
    be read."""
    return _search(conn, query, limit, allowed, "this collection")


def _search(conn: sqlite3.Connection, query: str | KeywordQuery, limit: int | None, allowed: set[int] | None,
            where: object) -> list[tuple[int, float]]:
    parsed = query if isinstance(query, KeywordQuery) else parse_keyword_query(query)
    if not has_index(conn):
        raise QueryError("this collection has no keyword index (made by an older crossmodal-rag, opened "
                         "read-only, or SQLite without FTS5): open it writable once, or search with "
                         "--mode dense")
    scores: dict[int, float] = {}
    for table in FTS_TABLES:
        match = parsed.match(table)
        if match is None:
            continue
        sql = f"SELECT rowid, -bm25({table}) FROM {table} WHERE {table} MATCH ? ORDER BY bm25({table}) LIMIT ?"
        fetch = -1 if limit is None or allowed is not None else max(20 * limit, 1000)
        try:
            rows = conn.execute(sql, (match, fetch)).fetchall()
        except sqlite3.OperationalError as e:
            if "syntax error" in str(e):  # not expected: every phrase is quoted
                raise QueryError(f"keyword query {match!r} was refused by the full-text index: {e}") from e
            raise _damaged(e, where) from e
        except sqlite3.DatabaseError as e:  # a garbled structure record, a malformed page
            raise _damaged(e, where) from e
        for item_id, score in rows:
            if allowed is None or item_id in allowed:
                scores[item_id] = scores.get(item_id, 0.0) + float(score)
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    return ranked if limit is None else ranked[:limit]


def indexed_count(conn: Any, where: object = "this collection") -> int:
    """Rows in the full-text index (0 when there is none); :class:`DamagedIndexError` when it
    cannot be read."""
    if not has_index(conn):
        return 0
    try:
        return int(conn.execute("SELECT count(*) FROM fts_grams").fetchone()[0])
    except sqlite3.DatabaseError as e:
        raise _damaged(e, where) from e


# -- on a MetadataStore (under its lock, ``store.locked()``: the connection is shared between threads)

def search_store(store: Any, query: str | KeywordQuery, limit: int | None = None,
                 allowed: set[int] | None = None) -> list[tuple[int, float]]:
    """:func:`keyword_search` on a :class:`~crossmodal_rag.store.metadata.MetadataStore`."""
    with store.locked() as conn:
        try:
            return _search(conn, query, limit, allowed, _folder(store))
        except sqlite3.DatabaseError as e:
            raise store.damaged(e) from e


def store_count(store: Any) -> int:
    """:func:`indexed_count` of a MetadataStore."""
    with store.locked() as conn:
        return indexed_count(conn, _folder(store))


def doc_freqs(store: Any, words: Sequence[str]) -> tuple[dict[str, int], int]:
    """(folded word -> number of texts holding it, number of texts indexed) from the word index
    (``fts_words``, read through FTS5's ``fts5vocab``); ``words`` as the index holds them
    (:func:`crossmodal_rag.search.evidence.fold`). A word in no text is left out; a store
    without the index gives ``({}, 0)``. Raises :class:`DamagedIndexError` when it cannot be read."""
    with store.locked() as conn:
        if not has_index(conn):
            return {}, 0
        try:
            conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.fts_words_vocab "
                         "USING fts5vocab(main, 'fts_words', 'row')")
            out: dict[str, int] = {}
            unique = list(dict.fromkeys(words))
            for start in range(0, len(unique), 500):
                chunk = unique[start:start + 500]
                rows = conn.execute("SELECT term, doc FROM temp.fts_words_vocab WHERE term IN "
                                    f"({','.join('?' * len(chunk))})", chunk).fetchall()
                out.update((str(t), int(d)) for t, d in rows)
            n = int(conn.execute("SELECT count(*) FROM fts_words").fetchone()[0])
        except sqlite3.DatabaseError as e:
            raise _damaged(e, _folder(store)) from e
    return out, n


def _folder(store: Any) -> object:
    path = getattr(store, "path", None)
    return path.parent if path is not None else "this collection"


