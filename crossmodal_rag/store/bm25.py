"""BM25 with the statistics of several collections: keyword scores of index shards that equal the
scores of one collection holding the union of their texts.

FTS5's ``bm25()`` weighs a phrase by statistics of the table it reads: the rows ``N``, their
tokens (the average length ``avgdl``) and the rows holding the phrase ``n`` (its
``IDF = ln((N - n + 0.5) / (n + 0.5))``, 1e-6 where that is not positive). A shard knows only its
own, so its scores do not compare with another shard's. The rule here, per table of
:data:`~crossmodal_rag.store.fulltext.FTS_TABLES`:

1. :func:`query_stats`: each shard reports ``N``, its token total (FTS5's own, from the
   table's ``averages`` record) and ``n`` for each phrase of the query (:class:`Bm25Stats`);
   the shards' reports are summed (``+``): the union's statistics.
2. :func:`search_global`: each shard scores every row that holds a phrase with those summed
   statistics. The row's phrase frequency ``f`` is read back from FTS5's own score of that
   phrase alone with the shard's own statistics (``s = IDF * f (k1 + 1) / (f + K)``, ``K`` from
   the row's token count in ``_docsize``: ``f = s K / (IDF (k1 + 1) - s)``, a whole number), so
   the phrase matching stays FTS5's; then ``IDF`` and ``avgdl`` are the union's (numpy over
   the rows; one statement per phrase and table).

An item's score is the sum over both tables, as :func:`~crossmodal_rag.store.fulltext.keyword_search`
sums them: the score the union gives it (tests/test_shards.py checks ids and scores against one
collection holding the union, within 1e-6). The cost: every row holding a phrase is read, one
statement per phrase and table (a shard's own search stops at its best rows)."""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from typing import Any

import numpy as np

from .fulltext import FTS_TABLES, KeywordQuery, has_index, parse_keyword_query

__all__ = ["K1", "B", "Bm25Stats", "query_stats", "search_global"]

#: FTS5's ``bm25()`` constants.
K1, B = 1.2, 0.75


@dataclass(frozen=True)
class Bm25Stats:
    """The statistics BM25 reads for one keyword query, per table name: ``(rows, tokens, rows
    holding each of the table's phrases)`` (the phrases of :meth:`KeywordQuery.match`, in order)."""

    tables: tuple[tuple[str, int, int, tuple[int, ...]], ...]  # (table, N, tokens, n per phrase)

    def __add__(self, other: Bm25Stats) -> Bm25Stats:
        """The statistics of both shards' texts together (the same query)."""
        theirs = {t: (rows, tokens, hits) for t, rows, tokens, hits in other.tables}
        out = []
        for table, rows, tokens, hits in self.tables:
            r2, t2, h2 = theirs.get(table, (0, 0, (0,) * len(hits)))
            if len(h2) != len(hits):
                raise ValueError(f"BM25 statistics of another query for {table}: {len(h2)} phrases, not {len(hits)}")
            out.append((table, rows + r2, tokens + t2, tuple(a + b for a, b in zip(hits, h2, strict=True))))
        return Bm25Stats(tuple(out))

    def of(self, table: str) -> tuple[int, int, tuple[int, ...]]:
        return next(((n, tok, hits) for t, n, tok, hits in self.tables if t == table), (0, 0, ()))


def _phrases(query: KeywordQuery, table: str) -> list[str]:
    match = query.match(table)
    return match.split(" OR ") if match else []  # every phrase is quoted and holds no quote


def _varints(blob: bytes) -> list[int]:
    """SQLite varints (FTS5's record format): 7 bits a byte, high bit set = more, the 9th byte whole."""
    out, i = [], 0
    while i < len(blob):
        value = 0
        for j in range(9):
            byte = blob[i]
            i += 1
            if j == 8:
                value = (value << 8) | byte
                break
            value = (value << 7) | (byte & 0x7F)
            if not byte & 0x80:
                break
        out.append(value)
    return out


def _totals(conn: sqlite3.Connection, table: str) -> tuple[int, int]:
    """(rows, tokens) of ``table``: FTS5's ``averages`` record (rowid 1 of ``_data``)."""
    row = conn.execute(f"SELECT block FROM {table}_data WHERE id = 1").fetchone()
    values = _varints(bytes(row[0])) if row and row[0] else []
    return (values[0], values[1]) if len(values) >= 2 else (0, 0)


def _idf(rows: int, hits: int) -> float:
    idf = math.log((rows - hits + 0.5) / (hits + 0.5)) if rows else 0.0
    return idf if idf > 0 else 1e-6


def _matches(conn: sqlite3.Connection, table: str, phrase: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row ids, FTS5's BM25 of ``phrase`` alone under this table's statistics, row token counts)
    of every row holding ``phrase``."""
    rows = conn.execute(f"SELECT t.rowid, -bm25({table}), d.sz FROM {table} AS t JOIN {table}_docsize AS d "
                        f"ON d.id = t.rowid WHERE {table} MATCH ?", (phrase,)).fetchall()
    sizes: dict[bytes, int] = {}  # a row's size is one varint: few distinct ones
    for _, _, sz in rows:
        key = bytes(sz)
        if key not in sizes:
            sizes[key] = _varints(key)[0]
    return (np.fromiter((r[0] for r in rows), np.int64, len(rows)), np.fromiter((r[1] for r in rows), np.float64,
                                                                                len(rows)),
            np.fromiter((sizes[bytes(r[2])] for r in rows), np.float64, len(rows)))


def _parsed(query: str | KeywordQuery) -> KeywordQuery:
    return query if isinstance(query, KeywordQuery) else parse_keyword_query(query)


def query_stats(store: Any, query: str | KeywordQuery) -> Bm25Stats:
    """This collection's :class:`Bm25Stats` for ``query`` (a store without the index: zeros)."""
    parsed = _parsed(query)
    tables = []
    with store.locked() as conn:
        try:
            indexed = has_index(conn)
            for table in FTS_TABLES:
                phrases = _phrases(parsed, table)
                if not indexed:
                    tables.append((table, 0, 0, (0,) * len(phrases)))
                    continue
                rows, tokens = _totals(conn, table)
                hits = tuple(int(conn.execute(f"SELECT count(*) FROM {table} WHERE {table} MATCH ?",
                                              (p,)).fetchone()[0]) for p in phrases)
                tables.append((table, rows, tokens, hits))
        except sqlite3.DatabaseError as e:
            raise store.damaged(e) from e
    return Bm25Stats(tuple(tables))


def search_global(store: Any, query: str | KeywordQuery, stats: Bm25Stats, limit: int | None = None,
                  allowed: set[int] | None = None) -> list[tuple[int, float]]:
    """Items matching ``query``, best first, ``[(item id, score), ...]``: as
    :func:`~crossmodal_rag.store.fulltext.search_store` ranks them, with every BM25 statistic
    taken from ``stats`` (the shards' summed :func:`query_stats`) instead of this collection's."""
    parsed = _parsed(query)
    ids: list[np.ndarray] = []
    parts: list[np.ndarray] = []
    with store.locked() as conn:
        if not has_index(conn):
            return []
        try:
            for table in FTS_TABLES:
                n_all, tokens_all, hits_all = stats.of(table)
                phrases = _phrases(parsed, table)
                if len(hits_all) != len(phrases):
                    raise ValueError(f"BM25 statistics of another query: {len(hits_all)} phrases for {table}, "
                                     f"not {len(phrases)}")
                rows, tokens = _totals(conn, table)
                avgdl, avgdl_all = tokens / max(rows, 1), tokens_all / max(n_all, 1)
                for phrase, hits in zip(phrases, hits_all, strict=True):
                    found, local, size = _matches(conn, table, phrase)
                    idf = _idf(rows, len(found))
                    f = np.rint(local * _norm(size, avgdl) / (idf * (K1 + 1) - local))  # the phrase's count
                    ids.append(found)
                    parts.append(_idf(n_all, hits) * f * (K1 + 1) / (f + _norm(size, avgdl_all)))
        except sqlite3.DatabaseError as e:
            raise store.damaged(e) from e
    if not ids:
        return []
    every, inverse = np.unique(np.concatenate(ids), return_inverse=True)
    scores = np.bincount(inverse, weights=np.concatenate(parts))
    if allowed is not None:
        keep = np.isin(every, np.fromiter(allowed, np.int64, len(allowed)))
        every, scores = every[keep], scores[keep]
    order = np.lexsort((every, -scores))[:limit]
    return [(int(i), float(v)) for i, v in zip(every[order], scores[order], strict=True)]


def _norm(size: np.ndarray, avgdl: float) -> np.ndarray:
    """BM25's ``K = k1 (1 - b + b |D| / avgdl)`` of rows of ``size`` tokens."""
    return K1 * (1 - B + B * size / avgdl) if avgdl > 0 else np.full_like(size, K1)
