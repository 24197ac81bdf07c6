"""SQLite metadata: items (images, captions, passages), their source paths and their vectors.

SQLite is the collection's commit log: an item exists once its transaction commits, and its
vector is stored in the same row, so the FAISS indexes can always be rebuilt or brought up to date
from here after a crash (see :meth:`crossmodal_rag.collection.Collection.open`).

Item ids are never given twice. Each new item takes the next value of a counter kept in the
``meta`` table (:data:`NEXT_ID_KEY`), so an id that was removed, even the newest, stays retired:
the float16 shards, index files and ids kept outside the collection (liked items, chat sources,
checkpoints) can never point at another item. Schema version 1 let SQLite pick ``max(id) + 1``,
which reuses the newest id once removed; such a store is migrated when opened writable (one
transaction), and read as it is when opened read-only.

A metadata file is read as hostile input (see :mod:`crossmodal_rag.store.guard` and
:meth:`MetadataStore._check_schema`): it and SQLite's files beside it must be regular files, not
links; its schema may hold only tables and indexes (no views, no triggers), with the expected
tables and columns; functions in its schema run untrusted (``PRAGMA trusted_schema = OFF``); any
one value is at most :data:`MAX_VALUE_BYTES`; and no statement runs more than its step budget
(:class:`~crossmodal_rag.store.guard.StepBudget`). Damaged values (a vector of the wrong length,
a count that is not a number) are :class:`~crossmodal_rag.errors.CollectionError` naming the item
or key. The schema and its migration steps are :mod:`crossmodal_rag.store.schema`.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CollectionError
from . import captures as capture_sql
from . import fulltext
from . import generated as generated_sql
from . import ocr as ocr_sql
from .guard import DB_NAME, MAX_VALUE_BYTES, StepBudget, check_files
from .items import FILTER_COLUMNS, INDEX_OF_KIND, ROW_TYPES, Item, chunks
from .schema import (
    BASE_VERSION,
    NEXT_ID_KEY,
    SCHEMA_VERSION,
    UNVERIFIED_SHARDS_KEY,
    expected_tables,
    has_column,
    migrate,
)

__all__ = ["DB_NAME", "INDEX_OF_KIND", "MAX_VALUE_BYTES", "NEXT_ID_KEY", "SCHEMA_VERSION",
           "UNVERIFIED_SHARDS_KEY", "Item", "MetadataStore"]

logger = logging.getLogger(__name__)

def _locked(method):
    """Serialise use of the shared connection (the web app calls from many threads)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            self._budget.start()
            try:
                return method(self, *args, **kwargs)
            except (sqlite3.DatabaseError, UnicodeDecodeError) as e:  # damaged text decodes badly
                raise self.damaged(e) from e

    return wrapper


class MetadataStore:
    """Thin typed layer over the SQLite file; one instance per open collection."""

    def __init__(self, folder: Path, *, readonly: bool = False, fsync: str = "full") -> None:
        self.path = folder / DB_NAME
        self._lock = threading.RLock()
        self._next_id: int | None = None  # the id counter inside a write transaction
        self._writing = False  # inside transaction()
        self._incomplete = False  # a table of the schema is missing (recreated when writable)
        check_files(self.path, readonly)
        self._budget = StepBudget(self.path)
        try:
            self.conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                        check_same_thread=False)
        except sqlite3.DatabaseError as e:
            raise CollectionError(f"{self.path} is not a readable SQLite database: {e}") from e
        try:
            self._open(readonly, fsync)
        except BaseException:
            self.conn.close()
            raise

    def _open(self, readonly: bool, fsync: str) -> None:
        try:
            self._budget.install(self.conn)
            self.conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
            self.conn.execute("PRAGMA trusted_schema = OFF")  # schema functions: innocuous only
            self.conn.execute("PRAGMA foreign_keys = ON")
            new = self._check_schema(readonly, BASE_VERSION)
            version = None if new else self._stored_version(readonly)
            if version is not None and version > BASE_VERSION:
                self._check_schema(readonly, version)  # the tables its steps added, too
            if not readonly:
                self.conn.execute("PRAGMA journal_mode = WAL")
                level = {"full": "FULL", "normal": "NORMAL", "off": "OFF"}.get(fsync, "FULL")
                self.conn.execute(f"PRAGMA synchronous = {level}")
                if self._upgrade(version):
                    version = SCHEMA_VERSION
        except (sqlite3.DatabaseError, UnicodeDecodeError) as e:  # damaged text decodes badly
            raise CollectionError(f"{self.path} is not a readable SQLite database: {e}") from e
        #: The store's schema version as opened (a read-only store of an older version stays so:
        #: check it, or :meth:`has_column`, before reading what a later step added).
        self.schema_version: int = SCHEMA_VERSION if version is None else version
        self._fts = fulltext.has_index(self.conn)  # item writes keep the keyword index in step

    def _stored_version(self, readonly: bool) -> int | None:
        """The schema version the file states, refused unless in 1..:data:`SCHEMA_VERSION`
        (a newer one is refused before anything is written); None if a writable store states
        none (it is stamped as new)."""
        has_meta = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        version = self.get_meta("schema_version") if has_meta else None
        if version is None and not readonly:
            return None
        if version is None or not version.isdigit() or not 1 <= int(version[:6]) <= SCHEMA_VERSION:
            newer = version is not None and version.isdigit() and int(version[:6]) > SCHEMA_VERSION
            raise CollectionError(
                f"{self.path}: metadata schema version {str(version)[:40]!r} is not supported "
                f"(this crossmodal-rag reads 1 to {SCHEMA_VERSION})"
                + ("; it was written by a newer crossmodal-rag: upgrade crossmodal-rag to open it"
                   if newer else "")
            )
        return int(version)

    def _check_schema(self, readonly: bool, version: int) -> bool:
        """Refuse a schema this library did not make: views and triggers (a view can loop
        forever, a trigger runs on writes), virtual tables other than the schema's own, or tables
        missing the columns of schema ``version``. Returns whether the file has no tables yet (a
        new store, which the writable open creates)."""
        rows = self.conn.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
        for kind, name, _ in rows:
            if kind not in ("table", "index"):
                raise self._tampered(f"holds a {kind} {str(name)[:64]!r}, which crossmodal-rag never creates")
        tables = {name: sql for kind, name, sql in rows if kind == "table"}
        if not tables and not readonly:
            return True
        known = expected_tables(SCHEMA_VERSION)
        for name, sql in tables.items():
            virtual = isinstance(sql, str) and sql.lstrip()[:20].upper().startswith("CREATE VIRTUAL")
            if virtual and known.get(name, ("",))[0] != sql:
                raise self._tampered(f"holds a virtual table {str(name)[:64]!r}, which "
                                         "crossmodal-rag never creates")
        for name, (want_sql, columns) in expected_tables(version).items():
            sql = tables.get(name)
            if sql is None:
                if readonly:
                    raise self._tampered(f"has no {name!r} table")
                self._incomplete = True  # created by the migration (run even if up to date)
                continue
            virtual = want_sql.lstrip()[:20].upper().startswith("CREATE VIRTUAL")
            if not virtual and (not isinstance(sql, str)
                                or not sql.lstrip()[:12].upper().startswith("CREATE TABLE")):
                raise self._tampered(f"{name!r} is not a plain table")
            if virtual and sql == want_sql:  # its statement fixes its columns; reading them would
                continue  # construct it, which fails on a damaged keyword index (check/reindex see it)
            have = {r[1] for r in self.conn.execute(f"PRAGMA table_info('{name}')")}
            missing = sorted(columns - have)
            if missing:
                raise self._tampered(f"table {name!r} lacks the column(s) {missing}")
        return False

    def has_column(self, table: str, column: str) -> bool:
        """Whether this store's ``table`` has ``column`` (a read-only store of an older schema
        version may lack what a later migration step adds)."""
        with self._lock:
            return has_column(self.conn, table, column)

    def _tampered(self, what: str) -> CollectionError:
        return CollectionError(
            f"{self.path} {what}: not a metadata file this library wrote (damaged or tampered "
            "with); nothing was read. Restore it from a backup")

    def meta_int(self, key: str, default: int = 0) -> int:
        """A whole-number meta value (a counter) in [0, 2^63); ``default`` if absent."""
        value = self.get_meta(key)
        if value is None:
            return default
        text = value.strip()
        if not text.isdigit() or len(text) > 19 or int(text) > 2**63 - 1:
            raise CollectionError(
                f"{self.path}: meta value {key!r} is {value[:40]!r}, not a whole number; the metadata "
                "file is damaged: restore it from a backup")
        return int(text)

    def _upgrade(self, version: int | None) -> bool:
        """Bring the store from schema ``version`` (None: new) to :data:`SCHEMA_VERSION` by the
        steps of :mod:`crossmodal_rag.store.schema`, in one transaction (a kill leaves the old
        version whole); returns whether anything ran."""
        if version is not None and version >= SCHEMA_VERSION and not self._incomplete:
            return False
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            migrate(self.conn, version, where=self.path, force=self._incomplete)
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return True

    def _max_item_id(self) -> int:
        return int(self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()[0])

    def close(self) -> None:
        self.conn.close()

    def damaged(self, e: Exception) -> CollectionError:
        if self._budget.exceeded and "interrupt" in str(e):
            self._budget.exceeded = False
            return CollectionError(
                f"a query on the metadata file {self.path} ran past its budget of "
                f"{self._budget.limit:,} SQLite steps and was stopped; the file is damaged or was "
                "made to loop. Check it with `crossmodal-rag check`, or restore it from a backup")
        return CollectionError(
            f"metadata file {self.path} is damaged or unreadable ({e}); restore it from a backup "
            "(the index files alone cannot rebuild it)"
        )

    # -- transactions --------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write; bumps the generation counter on commit."""
        with self._lock:
            self._budget.start()
            try:
                yield from self._transaction()
            except sqlite3.DatabaseError as e:
                raise self.damaged(e) from e

    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        self._next_id, self._writing = None, True
        try:
            yield self.conn
            gen = self.meta_int("generation") + 1
            self.set_meta("generation", str(gen))
            if self._next_id is not None:
                self.set_meta(NEXT_ID_KEY, str(self._next_id))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        finally:
            self._next_id, self._writing = None, False

    @contextmanager
    def locked(self) -> Iterator[sqlite3.Connection]:
        """The shared connection, held by this thread for the block: for reads of several
        statements outside a transaction (the keyword index's searches and counts). The web app
        calls from many threads; every other method holds the same lock."""
        with self._lock:
            yield self.conn

    def rebuild_keyword_index(self) -> int:
        """Remake the keyword index from the items in one transaction of its own (the generation
        stays: no item changes); returns the rows indexed. Item writes keep it in step from then on."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                count = fulltext.rebuild(self.conn)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self._fts = fulltext.has_index(self.conn)
            return count

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A consistent read view (a deferred read transaction)."""
        with self._lock:
            self._budget.start()
            try:
                self.conn.execute("BEGIN")
                try:
                    yield self.conn
                finally:
                    self.conn.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                raise self.damaged(e) from e

    @_locked
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is not None and not isinstance(row[0], str):
            raise CollectionError(f"{self.path}: meta value {key!r} is a {type(row[0]).__name__}, not "
                                  "text; the metadata file is damaged: restore it from a backup")
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    @property
    def generation(self) -> int:
        return self.meta_int("generation")

    @_locked
    def retire_ids_up_to(self, last: int) -> None:
        """Never give ids up to ``last`` (e.g. ids the float16 shards of a migrated collection
        still hold for removed items). Its own small transaction; the generation stays."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            if self.meta_int(NEXT_ID_KEY, 1) <= last:
                self.set_meta(NEXT_ID_KEY, str(last + 1))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    @_locked
    def put_meta(self, key: str, value: str | None) -> None:
        """Set (None: delete) one bookkeeping value outside any item change: the generation stays."""
        if value is None:
            self.conn.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self.set_meta(key, value)

    # -- writes (call inside transaction()) ---------------------------------------------
    def insert_item(self, kind: str, vector: np.ndarray, **fields: Any) -> int:
        fields = {k: v for k, v in fields.items() if v is not None}
        if "extra" in fields:
            fields["extra"] = json.dumps(fields["extra"], ensure_ascii=False, sort_keys=True)
        item_id = self._take_id()
        self._budget.start()
        cols = ["id", "kind", "vector", "added_at", *fields]
        blob = np.ascontiguousarray(vector, dtype="<f4").tobytes()
        values = [item_id, kind, blob, time.time(), *fields.values()]
        self.conn.execute(
            f"INSERT INTO items({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", values
        )
        if self._fts and kind in fulltext.FTS_KINDS:
            fulltext.index_items(self.conn, [(item_id, fields.get("text"), fields.get("title"))])
        return item_id

    def _take_id(self) -> int:
        """The next never-given id; the counter is written back when the transaction commits
        (a rolled-back insert gives its id again)."""
        if not self._writing:
            raise CollectionError(f"{self.path}: items are inserted inside transaction() only")
        if self._next_id is None:
            self._next_id = max(self.meta_int(NEXT_ID_KEY, 1), self._max_item_id() + 1)
        item_id = self._next_id
        self._next_id += 1
        return item_id

    def set_path(self, path: str, item_id: int, size_bytes: int | None, mtime_ns: int | None) -> None:
        self._budget.start()
        self.conn.execute(
            "INSERT INTO paths(path, item_id, size_bytes, mtime_ns, added_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET item_id = excluded.item_id, "
            "size_bytes = excluded.size_bytes, mtime_ns = excluded.mtime_ns",
            (path, item_id, size_bytes, mtime_ns, time.time()),
        )

    def delete_items(self, ids: Iterable[int]) -> list[int]:
        """Delete items (an image takes its captions and paths along); returns all ids deleted."""
        ids = list(ids)
        if not ids:
            return []
        gone: set[int] = set()
        level = ids
        while level:  # an image's captions, and the windows of captions and passages
            gone.update(level)
            children: list[int] = []
            for chunk in chunks(level, 500):
                marks = ",".join("?" * len(chunk))
                children += [r[0] for r in self.conn.execute(
                    f"SELECT id FROM items WHERE parent_id IN ({marks})", chunk)]
            level = [c for c in children if c not in gone]
        if self._fts:
            fulltext.delete_items(self.conn, sorted(gone))
        for chunk in chunks(sorted(gone), 500):
            marks = ",".join("?" * len(chunk))
            self.conn.execute(f"DELETE FROM items WHERE id IN ({marks})", chunk)
        return sorted(gone)

    def forget_path(self, path: str) -> None:
        """Drop the record of the file ``path`` (its item stays; call inside transaction())."""
        self._budget.start()
        self.conn.execute("DELETE FROM paths WHERE path = ?", (path,))

    def replace_vectors(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        """Overwrite the stored vectors of ``ids`` with the rows of ``vectors`` ``(len(ids), D)``
        (call inside transaction(); ids without a row are left out)."""
        self._budget.start()
        self.conn.executemany("UPDATE items SET vector = ? WHERE id = ?",
                              [(np.ascontiguousarray(v, dtype="<f4").tobytes(), int(i))
                               for i, v in zip(ids, vectors, strict=True)])

    def copy_to(self, folder: Path) -> None:
        """Write a consistent copy of this store to ``folder`` (SQLite's online backup, taken in
        one read snapshot); ``folder`` must exist."""
        dst = sqlite3.connect(folder / DB_NAME)
        try:
            with self.snapshot() as src:
                src.backup(dst)
        finally:
            dst.close()

    # -- capture metadata (store/captures.py) --------------------------------------------
    def write_captures(self, rows: Iterable[tuple[int, dict[str, Any]]]) -> int:
        """Store ``(image id, capture fields)`` rows (call inside transaction())."""
        self._budget.start()
        return capture_sql.write_captures(self.conn, rows)

    @_locked
    def captures_pending(self) -> list[tuple[int, str]]:
        """(image id, its first path) of the images whose capture metadata was never read."""
        return capture_sql.captures_pending(self.conn)

    @_locked
    def capture_summary(self, top: int = 5) -> dict[str, Any]:
        """Time span, top places and cameras of the images (empty before schema version 5)."""
        return capture_sql.capture_summary(self.conn, top)

    # -- reads ---------------------------------------------------------------------------
    @_locked
    def caption_parents(self) -> list[tuple[int, Any]]:
        """``(caption id, image id)`` of every caption, as stored (a damaged row's image id may be
        any SQLite type: callers leave out those that are not ints)."""
        return self.conn.execute("SELECT id, parent_id FROM items WHERE kind = 'caption'").fetchall()

    @_locked
    def path_range(self) -> tuple[str | None, str | None]:
        """The lexicographically first and last stored file paths (None, None: no paths)."""
        first, last = self.conn.execute("SELECT MIN(path), MAX(path) FROM paths").fetchone()
        return first, last

    def filter_candidates(self) -> list[dict[str, Any]]:
        """Every item as the metadata filters read it: its columns ``id, kind, parent_id, text,
        title, format, size_bytes, width, height, added_at`` by name, ``extra`` parsed, its
        ``paths`` (list) and its ``capture`` (dict or None), from one snapshot. A damaged row
        is a CollectionError."""
        with self.snapshot() as conn:
            rows = conn.execute(f"SELECT {', '.join(FILTER_COLUMNS)} FROM items").fetchall()
            path_rows = conn.execute("SELECT item_id, path FROM paths").fetchall()
            caps = capture_sql.capture_rows(conn)
        paths: dict[int, list[str]] = {}
        for item_id, p in path_rows:
            paths.setdefault(item_id, []).append(p)
        out = []
        for r in rows:
            d = dict(zip(FILTER_COLUMNS, r, strict=True))
            d["paths"] = paths.get(d["id"], [])
            d["capture"] = caps.get(d["id"])
            out.append(self.checked_filter_row(d))  # any SQLite type in any column: refused
        return out

    @_locked
    def paths_under(self, folder: str) -> list[str]:
        """The recorded file paths under ``folder`` (an absolute path, without a trailing slash)."""
        prefix = folder.rstrip("/") + "/"
        rows = self.conn.execute("SELECT path FROM paths WHERE path >= ? AND path < ? ORDER BY path",
                                 (prefix, prefix[:-1] + "0")).fetchall()  # '0' follows '/'
        return [r[0] for r in rows if isinstance(r[0], str)]

    @_locked
    def path_entry(self, path: str) -> tuple[int, int | None, int | None] | None:
        row = self.conn.execute(
            "SELECT item_id, size_bytes, mtime_ns FROM paths WHERE path = ?", (path,)
        ).fetchone()
        return (row[0], row[1], row[2]) if row else None

    @_locked
    def item_by_sha(self, kind: str, sha256: str) -> int | None:
        row = self.conn.execute(
            "SELECT id FROM items WHERE kind = ? AND sha256 = ?", (kind, sha256)
        ).fetchone()
        return row[0] if row else None

    @_locked
    def captions_of(self, image_id: int) -> dict[str, tuple[int, str | None]]:
        """caption text -> (caption id, origin)."""
        rows = self.conn.execute(
            "SELECT text, id, origin FROM items WHERE kind = 'caption' AND parent_id = ? ORDER BY id",
            (image_id,),
        ).fetchall()
        if any(not isinstance(r[0], str) or not isinstance(r[2], (str, type(None))) for r in rows):
            raise self._bad_item(image_id, "one of its captions is not text")
        return {r[0]: (r[1], r[2]) for r in rows}

    @_locked
    def paths_of(self, item_id: int) -> list[str]:
        rows = self.conn.execute(
            "SELECT path FROM paths WHERE item_id = ? ORDER BY rowid", (item_id,)
        ).fetchall()
        if any(not isinstance(r[0], str) for r in rows):
            raise self._bad_item(item_id, "one of its paths is not text")
        return [r[0] for r in rows]

    @_locked
    def ids(self, index: str) -> np.ndarray:
        """Ids of the items that belong in the ``"image"`` or ``"text"`` index, sorted."""
        kinds = ("image",) if index == "image" else ("caption", "passage", "window", "ocr")
        marks = ",".join("?" * len(kinds))
        rows = self.conn.execute(
            f"SELECT id FROM items WHERE kind IN ({marks}) ORDER BY id", kinds
        ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    @_locked
    def vectors(self, ids: Sequence[int], dim: int) -> np.ndarray:
        """Stored vectors of ``ids`` in that order: ``(len(ids), dim)`` float32.

        Ids with no row (removed by a concurrent writer) get a zero row, never uninitialised
        memory; callers look the items up afterwards and drop the missing ones.
        """
        out, _ = self._vector_rows(ids, dim, strict=True)
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            raise self._bad_item(int(np.asarray(ids)[~finite][0]), "its vector holds NaN or infinity")
        return out

    @_locked
    def vectors_as_stored(self, ids: Sequence[int], dim: int) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors (len(ids), dim) float32, unreadable (len(ids),) bool)``: the stored vectors
        as they are, NaN and infinity included, for checks and repairs; a vector of another size
        (or not a blob) is a zero row marked ``unreadable``, never an error."""
        return self._vector_rows(ids, dim, strict=False)

    def _vector_rows(self, ids: Sequence[int], dim: int, *, strict: bool) -> tuple[np.ndarray, np.ndarray]:
        out = np.zeros((len(ids), dim), dtype=np.float32)
        unreadable = np.zeros(len(ids), dtype=bool)
        pos = {int(i): n for n, i in enumerate(ids)}
        for chunk in chunks([int(i) for i in ids], 500):
            marks = ",".join("?" * len(chunk))
            for item_id, blob in self.conn.execute(
                f"SELECT id, vector FROM items WHERE id IN ({marks})", chunk
            ):
                if not isinstance(blob, bytes) or len(blob) != 4 * dim:
                    if not strict:
                        unreadable[pos[item_id]] = True
                        continue
                    size = f"{len(blob)} bytes" if isinstance(blob, bytes) else f"a {type(blob).__name__}"
                    raise self._bad_item(item_id, f"its vector is {size}, not {dim} float32 values "
                                                  f"({4 * dim} bytes)")
                out[pos[item_id]] = np.frombuffer(blob, dtype="<f4")
        return out, unreadable

    def _bad_item(self, item_id: int, what: str) -> CollectionError:
        return CollectionError(
            f"{self.path}: item {item_id}: {what}; the metadata file is damaged. Remove the item "
            f"(`crossmodal-rag remove {item_id}`) and index it again, or restore the file from a backup")

    @_locked
    def counts(self) -> dict[str, int]:
        rows = dict(self.conn.execute("SELECT kind, COUNT(*) FROM items GROUP BY kind").fetchall())
        counts = {"images": rows.get("image", 0), "captions": rows.get("caption", 0),
                  "passages": rows.get("passage", 0)}
        if rows.get("window"):
            counts["windows"] = rows["window"]  # extra windows of long texts
        if rows.get("ocr"):
            counts["ocr"] = rows["ocr"]  # images with text read in them (index --ocr)
        return counts

    @_locked
    def get_items(self, ids: Sequence[int]) -> dict[int, Item]:
        """Items by id (ids that do not exist are left out)."""
        result: dict[int, Item] = {}
        int_ids = [int(i) for i in ids]
        for chunk in chunks(int_ids, 500):
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(
                "SELECT id, kind, parent_id, sha256, text, title, ext_id, width, height, format, "
                f"size_bytes, extra, added_at FROM items WHERE id IN ({marks})",
                chunk,
            ).fetchall()
            owners = [r[2] if r[1] in ("caption", "ocr") else r[0] for r in rows]
            caps = capture_sql.captures_of(self.conn, [o for o in owners if isinstance(o, int)])
            made = generated_sql.generated_among(self.conn, [r[0] for r in rows if r[1] == "caption"])
            for r in rows:
                self._check_row(r)
                (item_id, kind, parent_id, sha, text, title, ext_id, w, h, fmt, size, extra, added) = r
                owner = parent_id if kind in ("caption", "ocr") else item_id
                paths = self.paths_of(owner) if kind != "passage" else []
                captions: tuple[str, ...] = ()
                generated: tuple[str, ...] = (text,) if item_id in made and isinstance(text, str) else ()
                ocr_text = None
                if kind == "image":
                    of = self.captions_of(item_id)
                    captions = tuple(of)
                    generated = tuple(t for t, (_, origin) in of.items() if generated_sql.is_generated(origin))
                    ocr_text = ocr_sql.ocr_texts(self.conn, [item_id]).get(item_id)
                result[item_id] = Item(
                    id=item_id, kind=kind, path=paths[0] if paths else None, text=text,
                    captions=captions, parent_id=parent_id, title=title, ext_id=ext_id, width=w,
                    height=h, format=fmt, size_bytes=size, sha256=sha, added_at=added,
                    extra=self._extra(item_id, extra), ocr=ocr_text, capture=caps.get(owner),
                    generated=generated,
                )
        return result

    def _check_row(self, row: tuple[Any, ...]) -> None:
        """Each column of an item row (as :meth:`get_items` selects it) holds its type (SQLite
        lets a damaged or hostile file store any type in any column)."""
        for value, (column, types) in zip(row, ROW_TYPES, strict=True):
            if not isinstance(value, types):
                raise self._bad_item(row[0], f"column {column} holds a {type(value).__name__}")
        if row[1] not in INDEX_OF_KIND:
            raise self._bad_item(row[0], f"unknown kind {str(row[1])[:40]!r}")

    def checked_filter_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` (an item's columns by name, and its ``paths``, as filters read them) with each
        column checked for its type and ``extra`` parsed: a damaged row is a CollectionError."""
        for column, types in ROW_TYPES:
            if column in row and not isinstance(row[column], types):
                raise self._bad_item(row["id"], f"column {column} holds a {type(row[column]).__name__}")
        if any(not isinstance(p, str) for p in row.get("paths", ())):
            raise self._bad_item(row["id"], "one of its paths is not text")
        return {**row, "extra": self._extra(row["id"], row.get("extra"))}

    def _extra(self, item_id: int, extra: str | None) -> dict[str, Any]:
        if not extra:
            return {}
        try:
            value = json.loads(extra)
        except (ValueError, RecursionError) as e:
            raise self._bad_item(item_id, f"its extra fields are not valid JSON ({str(e)[:80]})") from e
        if not isinstance(value, dict):
            raise self._bad_item(item_id, "its extra fields are not a JSON object")
        return value

    def item_ids_for_paths(self, paths: Iterable[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in paths:
            entry = self.path_entry(p)
            if entry:
                out[p] = entry[0]
        return out

    @_locked
    def integrity_problems(self) -> list[str]:
        problems: list[str] = []
        res = self.conn.execute("PRAGMA integrity_check").fetchall()
        if res != [("ok",)]:
            problems.append(f"{self.path}: SQLite integrity check failed: {res[:3]}")
        orphans = self.conn.execute(
            "SELECT COUNT(*) FROM items c LEFT JOIN items p ON c.parent_id = p.id "
            "WHERE c.kind = 'caption' AND p.id IS NULL"
        ).fetchone()[0]
        if orphans:
            problems.append(f"{orphans} captions whose image is missing")
        dangling = self.conn.execute(
            "SELECT COUNT(*) FROM paths LEFT JOIN items ON paths.item_id = items.id WHERE items.id IS NULL"
        ).fetchone()[0]
        if dangling:
            problems.append(f"{dangling} paths that point to no item")
        return problems + fulltext.problems(self.conn)
