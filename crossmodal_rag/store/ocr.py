"""SQL of the OCR text (issue 18): the schema step that adds it, and its queries.

Schema (version 3, step :func:`ocr_step`):

* items of kind ``ocr``: the text read in an image (``parent_id`` = the image; ``text`` = the
  lines, ``origin`` = ``ocr:<engine>``, ``extra`` = ``{"ocr": {"engine", "lines": [{"text",
  "box", "conf"}]}}``); long texts get ``window`` items like captions;
* ``ocr_runs(item_id, engine, lines, done_at)``: which images were read (with or without text),
  so later ingests read only new images and ``--ocr`` on an old collection back-fills.

Adding a kind widens the ``items`` CHECK constraint. SQLite cannot alter a constraint, and
rebuilding ``items`` would copy every vector (and, with foreign keys on, dropping the old table
would delete the paths that point to it); a wider CHECK changes nothing on disk and every stored
row satisfies it, so the step rewrites the table's definition in ``sqlite_schema`` and bumps the
schema cookie, the procedure SQLite documents for such changes (section 7 of its ALTER TABLE
page), in O(1) inside the migration's transaction.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

__all__ = ["OCR_KIND", "ocr_pending", "ocr_step", "ocr_texts", "record_ocr_run"]

OCR_KIND = "ocr"

_OLD_CHECK = "CHECK (kind IN ('image', 'caption', 'passage', 'window'))"
_NEW_CHECK = "CHECK (kind IN ('image', 'caption', 'passage', 'window', 'ocr'))"
_RUNS = """CREATE TABLE IF NOT EXISTS ocr_runs (
    item_id INTEGER PRIMARY KEY REFERENCES items(id) ON DELETE CASCADE,
    engine  TEXT NOT NULL,
    lines   INTEGER NOT NULL,
    done_at REAL NOT NULL
)"""


def ocr_step(conn: sqlite3.Connection) -> None:
    """Version 3: the ``ocr`` item kind and the ``ocr_runs`` table (idempotent)."""
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'items'").fetchone()[0]
    if _NEW_CHECK not in sql:
        if sql.count(_OLD_CHECK) != 1:
            raise sqlite3.DatabaseError("the items table's kind constraint is not the one this "
                                        "library wrote; cannot add the 'ocr' kind")
        cookie = int(conn.execute("PRAGMA schema_version").fetchone()[0])
        conn.execute("PRAGMA writable_schema = ON")
        try:
            conn.execute("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'items'",
                         (sql.replace(_OLD_CHECK, _NEW_CHECK),))
            conn.execute(f"PRAGMA schema_version = {cookie + 1}")
        finally:
            conn.execute("PRAGMA writable_schema = OFF")
    conn.execute(_RUNS)


def _conn(store: Any) -> sqlite3.Connection:
    """The connection of a MetadataStore (or a connection itself)."""
    return store if isinstance(store, sqlite3.Connection) else store.conn


def ocr_pending(store: Any) -> list[tuple[int, str]]:
    """(image id, its first path) of every image with a path and no OCR run, by id."""
    rows = _conn(store).execute(
        "SELECT i.id, MIN(p.path) FROM items i JOIN paths p ON p.item_id = i.id "
        "LEFT JOIN ocr_runs r ON r.item_id = i.id "
        "WHERE i.kind = 'image' AND r.item_id IS NULL GROUP BY i.id ORDER BY i.id").fetchall()
    return [(int(i), str(p)) for i, p in rows if isinstance(i, int) and isinstance(p, str)]


def record_ocr_run(store: Any, item_id: int, engine: str,
                   lines: int) -> None:
    """Remember that image ``item_id`` was read (call inside the store's transaction)."""
    _conn(store).execute("INSERT INTO ocr_runs(item_id, engine, lines, done_at) VALUES (?, ?, ?, ?) "
                 "ON CONFLICT(item_id) DO UPDATE SET engine = excluded.engine, "
                 "lines = excluded.lines, done_at = excluded.done_at",
                 (int(item_id), str(engine), int(lines), time.time()))


def ocr_texts(store: Any, image_ids: list[int]) -> dict[int, str]:
    """image id -> the text read in it, for the images in ``image_ids`` that have some."""
    conn = _conn(store)
    out: dict[int, str] = {}
    ids = [int(i) for i in image_ids]
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        marks = ",".join("?" * len(chunk))
        for parent, text in conn.execute(
                f"SELECT parent_id, text FROM items WHERE kind = 'ocr' AND parent_id IN ({marks}) "
                "ORDER BY id", chunk):
            if isinstance(parent, int) and isinstance(text, str):
                out.setdefault(parent, text)
    return out
