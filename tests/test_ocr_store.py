"""The OCR schema step and queries (crossmodal_rag/store/ocr.py) on the saved schema-2 store
(tests/data/schema2/metadata.sqlite: image 1 with a path and caption 2, passage 3) and on new
stores: the widened kind constraint, rows and paths kept, the same schema either way."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag.errors import CollectionError
from crossmodal_rag.store import ocr as ocr_sql
from crossmodal_rag.store.metadata import DB_NAME, MetadataStore

SAVED = Path(__file__).parent / "data" / "schema2" / DB_NAME
VEC = np.ones(8, np.float32) / 8 ** 0.5


def _schema(folder: Path) -> dict[str, str]:
    with sqlite3.connect(folder / DB_NAME) as db:
        rows = dict(db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL"))
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    db.close()
    return rows


def _dump(folder: Path) -> tuple[list, list]:
    with sqlite3.connect(folder / DB_NAME) as db:
        items = db.execute("SELECT * FROM items ORDER BY id").fetchall()
        paths = db.execute("SELECT * FROM paths ORDER BY path").fetchall()
    db.close()
    return items, paths


def test_migration_widens_the_kind_check_and_keeps_rows_and_paths(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(SAVED, old / DB_NAME)
    items, paths = _dump(old)
    store = MetadataStore(old)
    with store.transaction() as conn:
        assert ocr_sql.ocr_pending(conn) == [(1, "/photos/cat.png")]
        oid = store.insert_item("ocr", VEC, parent_id=1, text="LIDL Store 4711")
        ocr_sql.record_ocr_run(conn, 1, "rapidocr-ppocrv4", 1)
    with pytest.raises(CollectionError, match="CHECK constraint failed"), store.transaction():
        store.insert_item("scribble", VEC, parent_id=1, text="x")  # other kinds stay refused
    assert ocr_sql.ocr_pending(store.conn) == []
    assert ocr_sql.ocr_texts(store.conn, [1, 3]) == {1: "LIDL Store 4711"}
    store.close()
    items_after, paths_after = _dump(old)
    assert items_after[: len(items)] == items and paths_after == paths  # not a row lost or moved
    assert [r[0] for r in items_after[len(items):]] == [oid]

    new = tmp_path / "new"
    new.mkdir()
    MetadataStore(new).close()
    assert _schema(new) == _schema(old)  # a migrated store and a new one are alike
    MetadataStore(old).close()  # opening again changes nothing
    assert _schema(old) == _schema(new)


def test_an_ocr_item_goes_with_its_image(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path)
    with store.transaction() as conn:
        image = store.insert_item("image", VEC, sha256="a" * 64)
        store.set_path("/x/receipt.png", image, 10, 1)
        oid = store.insert_item("ocr", VEC, parent_id=image, text="TOTAL 3.78")
        store.insert_item("window", VEC, parent_id=oid, text="3.78")
        ocr_sql.record_ocr_run(conn, image, "rapidocr-ppocrv4", 1)
    with store.transaction():
        store.delete_items([image])
    left = store.conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    runs = store.conn.execute("SELECT COUNT(*) FROM ocr_runs").fetchone()[0]
    store.close()
    assert (left, runs) == (0, 0)


def test_a_tampered_kind_constraint_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, kind TEXT CHECK (kind IN ('image')))")
    with pytest.raises(sqlite3.DatabaseError, match="kind constraint"):
        ocr_sql.ocr_step(conn)
