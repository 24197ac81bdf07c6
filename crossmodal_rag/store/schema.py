"""The metadata schema: the base tables (version 2), the ordered migration steps since, and the
check that a file's schema is one this library made.

How a store reaches :data:`SCHEMA_VERSION` (see :func:`migrate`, run by
:class:`~crossmodal_rag.store.metadata.MetadataStore` on every writable open, inside one
``BEGIN IMMEDIATE`` transaction, so a kill leaves the old version whole):

1. :data:`BASE_SCHEMA` (``CREATE ... IF NOT EXISTS``) makes the tables of version 2;
2. a store older than version 2 (or a new one) gets its item id counter (:func:`_id_counter`);
3. every :data:`STEPS` entry whose ``version`` is above the store's runs, in list order;
4. ``schema_version`` is stamped with :data:`SCHEMA_VERSION`.

A step is a named function of the connection that is safe to run twice (``CREATE TABLE IF NOT
EXISTS``, :func:`add_column`), so a new store (which runs every step) and an old one end with the
same schema. Steps are appended, never edited or reordered once released. A read-only open never
migrates: code that reads a table or column a step added checks
:attr:`MetadataStore.schema_version <crossmodal_rag.store.metadata.MetadataStore.schema_version>`
(or :meth:`~crossmodal_rag.store.metadata.MetadataStore.has_column`) first. A store of a version
above :data:`SCHEMA_VERSION` is refused, unread and unwritten.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BASE_SCHEMA", "BASE_VERSION", "NEXT_ID_KEY", "SCHEMA_VERSION", "STEPS",
           "UNVERIFIED_SHARDS_KEY", "Step", "add_column", "expected_tables", "has_column", "migrate"]

logger = logging.getLogger(__name__)

#: 1: ids from SQLite (``max(id) + 1``, reused once the newest is removed); 2: ids from a counter;
#: 3: the steps of :data:`STEPS` with ``version=3``; 4: the keyword index holds folded text;
#: 5: capture metadata (when, where, which camera) of images; items indexed by parent.
SCHEMA_VERSION = 5
#: The version :data:`BASE_SCHEMA` makes (with the id counter of :func:`_id_counter`).
BASE_VERSION = 2
#: Meta key of the next item id to give (every id below it was given once, maybe removed since).
NEXT_ID_KEY = "next_item_id"
#: Meta key set by the migration from version 1: the indexes (comma-separated) whose float16
#: shard copies may hold a removed item's vector under a reused id, to compare once with the
#: metadata (see :meth:`crossmodal_rag.collection.Collection.open`).
UNVERIFIED_SHARDS_KEY = "unverified_shards"

BASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id         INTEGER PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('image', 'caption', 'passage', 'window')),
    parent_id  INTEGER REFERENCES items(id) ON DELETE CASCADE,
    sha256     TEXT,
    text       TEXT,
    title      TEXT,
    ext_id     TEXT,
    origin     TEXT,
    width      INTEGER,
    height     INTEGER,
    format     TEXT,
    size_bytes INTEGER,
    extra      TEXT,
    added_at   REAL NOT NULL,
    vector     BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS items_image_sha ON items(sha256) WHERE kind = 'image';
CREATE UNIQUE INDEX IF NOT EXISTS items_passage_sha ON items(sha256) WHERE kind = 'passage';
CREATE UNIQUE INDEX IF NOT EXISTS items_caption ON items(parent_id, text) WHERE kind = 'caption';
CREATE INDEX IF NOT EXISTS items_kind ON items(kind);
CREATE TABLE IF NOT EXISTS paths (
    path       TEXT PRIMARY KEY,
    item_id    INTEGER NOT NULL REFERENCES items(id) ON DELETE CASCADE,
    size_bytes INTEGER,
    mtime_ns   INTEGER,
    added_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS paths_item ON paths(item_id);
"""


@dataclass(frozen=True)
class Step:
    """One migration step: ``apply(conn)`` brings a store up to ``version`` in part; it must be
    idempotent (it also runs on new stores, and again after a migration that was rolled back)."""

    version: int  # the schema version this step belongs to (> BASE_VERSION)
    name: str  # short, unique: what the step adds (logged when it runs)
    apply: Callable[[sqlite3.Connection], None]


def has_column(conn: sqlite3.Connection, table: str, column: str) -> bool:
    """Whether ``table`` (a name from this module, never user input) has ``column``."""
    return any(r[1] == column for r in conn.execute(f"PRAGMA table_info({table})"))


def add_column(conn: sqlite3.Connection, table: str, column: str, decl: str) -> None:
    """``ALTER TABLE table ADD COLUMN column decl`` unless the column is there already."""
    if not has_column(conn, table, column):
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")


# -- steps of version 3 (append below; see /work/notes/schema.md) ---------------------------------

def _ocr(conn: sqlite3.Connection) -> None:
    """Version 3: the 'ocr' item kind and the ocr_runs table (see :mod:`.ocr`)."""
    from .ocr import ocr_step

    ocr_step(conn)


def _fulltext(conn: sqlite3.Connection) -> None:
    """Version 3: the FTS5 keyword index of item texts, filled from the items (see :mod:`.fulltext`)."""
    from .fulltext import fts_step

    fts_step(conn)


# -- steps of version 4 ---------------------------------------------------------------------------

def _fulltext_folded(conn: sqlite3.Connection) -> None:
    """Version 4: the keyword index rebuilt with NFKC-folded text, zero-width characters and soft
    hyphens removed (see :func:`.fulltext.fold`); the items keep their text as written."""
    from .fulltext import fold_step

    fold_step(conn)


# -- steps of version 5 ---------------------------------------------------------------------------

def _captures(conn: sqlite3.Connection) -> None:
    """Version 5: the ``captures`` table of images' capture metadata (see :mod:`.captures`)."""
    from .captures import captures_step

    captures_step(conn)


def _parent_index(conn: sqlite3.Connection) -> None:
    """Version 5: items by their parent and kind, so an image's captions and OCR text, an item's
    windows and a removal's children are found without walking every item of the kind."""
    conn.execute("CREATE INDEX IF NOT EXISTS items_parent ON items(parent_id, kind)")


#: The ordered migration steps after :data:`BASE_VERSION`. Append only.
STEPS: list[Step] = [
    Step(3, "ocr item kind and runs", _ocr),  # H8 (issue 18)
    Step(3, "full-text index of item texts", _fulltext),  # H1 (issue 18)
    Step(4, "full-text index of folded texts", _fulltext_folded),  # issue 25
    Step(5, "capture metadata of images", _captures),  # issue 30
    Step(5, "index of items by parent", _parent_index),
]


# -- running them ---------------------------------------------------------------------------------

def _meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def _set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                 "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))


def _id_counter(conn: sqlite3.Connection, old: int | None) -> None:
    """Version 2: start the id counter above every id the items hold; a version-1 store also
    marks both indexes' float16 shards for one comparison with the metadata."""
    top = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()[0])
    _set_meta(conn, NEXT_ID_KEY, str(top + 1))
    if old == 1:
        _set_meta(conn, UNVERIFIED_SHARDS_KEY, "image,text")


def migrate(conn: sqlite3.Connection, old: int | None, *, where: object = "metadata",
            force: bool = False) -> bool:
    """Bring the store of schema version ``old`` (None: a new store) to :data:`SCHEMA_VERSION`
    inside the caller's transaction; returns whether anything ran. ``force`` runs every step
    even on an up-to-date store (one whose table went missing). ``where`` names the store in
    the log."""
    if old is not None and old >= SCHEMA_VERSION and not force:
        return False
    since = old if old is None or old < SCHEMA_VERSION else BASE_VERSION  # force: every step
    _run_script(conn, BASE_SCHEMA)
    if old is None or old < BASE_VERSION:
        _id_counter(conn, old)
    for step in STEPS:
        if since is None or step.version > since:
            step.apply(conn)
            if old is not None:
                logger.info("%s: schema step %r (version %d) applied", where, step.name, step.version)
    _set_meta(conn, "schema_version", str(SCHEMA_VERSION))
    if old is not None and old < SCHEMA_VERSION:
        logger.info("%s: migrated the metadata schema from version %d to %d", where, old, SCHEMA_VERSION)
    return True


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run ``script`` statement by statement (``executescript`` would commit the open
    transaction first)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


@functools.lru_cache(maxsize=8)
def expected_tables(version: int) -> dict[str, tuple[str, frozenset[str]]]:
    """Table -> (its ``CREATE`` statement, its column names) of a store at schema ``version``
    (from an in-memory store built by the same steps; ``version`` below :data:`BASE_VERSION`
    reads as the base)."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(BASE_SCHEMA)
        for step in STEPS:
            if step.version <= version:
                step.apply(conn)
        rows = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall()
        return {name: (sql, frozenset(r[1] for r in conn.execute(f"PRAGMA table_info('{name}')")))
                for name, sql in rows}
    finally:
        conn.close()
