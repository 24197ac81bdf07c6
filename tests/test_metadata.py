"""The metadata store (crossmodal_rag/store/metadata.py, store/schema.py): schema versions and
their migration steps, on a schema-2 file saved by the code before version 3
(tests/data/schema2/metadata.sqlite: one image with a path and a caption, one passage, one
removed passage, next id 5)."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag.errors import CollectionError
from crossmodal_rag.store import schema
from crossmodal_rag.store.metadata import DB_NAME, SCHEMA_VERSION, MetadataStore
from crossmodal_rag.store.ocr import ocr_texts

SAVED = Path(__file__).parent / "data" / "schema2" / DB_NAME


def _saved(tmp_path: Path) -> Path:
    shutil.copy(SAVED, tmp_path / DB_NAME)
    return tmp_path


def _rows(folder: Path) -> tuple[list[tuple], list[tuple], dict[str, str]]:
    with sqlite3.connect(folder / DB_NAME) as db:
        items = db.execute("SELECT id, kind, parent_id, sha256, text, title, ext_id, width, height, "
                           "format, size_bytes, extra, added_at, vector FROM items ORDER BY id").fetchall()
        paths = db.execute("SELECT * FROM paths ORDER BY path").fetchall()
        meta = dict(db.execute("SELECT key, value FROM meta"))
    db.close()
    return items, paths, meta


def test_a_saved_schema_2_store_reads_as_it_is_when_read_only(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    before = (tmp_path / DB_NAME).read_bytes()
    store = MetadataStore(folder, readonly=True)
    assert store.schema_version == 2
    assert store.counts() == {"images": 1, "captions": 1, "passages": 1}
    assert [it.kind for it in store.get_items([1, 2, 3]).values()] == ["image", "caption", "passage"]
    store.close()
    assert (tmp_path / DB_NAME).read_bytes() == before  # nothing written


def test_migrating_a_saved_schema_2_store_to_3_keeps_every_row(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    items, paths, meta = _rows(folder)
    assert meta["schema_version"] == "2" and meta["next_item_id"] == "5"
    store = MetadataStore(folder)
    assert store.schema_version == SCHEMA_VERSION == 5
    image = store.get_items([1])[1]
    assert (image.path, image.captions, image.extra) == ("/photos/cat.png", ("a cat on a mat",), {"camera": "x"})
    with store.transaction():  # the id counter survived: 4 (removed) stays retired
        assert store.insert_item("passage", np.ones(8, np.float32) / 8 ** 0.5, text="new") == 5
    store.close()
    items_after, paths_after, meta_after = _rows(folder)
    assert items_after[: len(items)] == items and paths_after == paths
    assert meta_after["schema_version"] == str(SCHEMA_VERSION)
    assert {k: v for k, v in meta_after.items() if k not in ("schema_version", "generation", "next_item_id")} \
        == {k: v for k, v in meta.items() if k not in ("schema_version", "generation", "next_item_id")}


def test_a_step_appended_runs_once_on_old_stores_and_on_new_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def notes_table(conn: sqlite3.Connection) -> None:
        file = conn.execute("PRAGMA database_list").fetchone()[2]
        if file:  # (not the in-memory reference of expected_tables)
            calls.append(Path(file).parent.name)
        conn.execute("CREATE TABLE IF NOT EXISTS notes (item_id INTEGER PRIMARY KEY, note TEXT)")
        schema.add_column(conn, "items", "lang", "TEXT")

    monkeypatch.setattr(schema, "STEPS", [*schema.STEPS, schema.Step(3, "notes", notes_table)])
    schema.expected_tables.cache_clear()
    try:
        (tmp_path / "old").mkdir()
        old = MetadataStore(_saved(tmp_path / "old"))
        assert old.has_column("items", "lang") and old.get_items([3])[3].text == "the blik is red and round"
        old.close()
        assert MetadataStore(tmp_path / "old").has_column("items", "lang")  # up to date: not run again
        assert calls == ["old"]
        (tmp_path / "new").mkdir()
        new = MetadataStore(tmp_path / "new")
        assert new.has_column("items", "lang") and calls == ["old", "new"]
        new.close()
        with sqlite3.connect(tmp_path / "new" / DB_NAME) as db:  # a table the step made goes missing
            db.execute("DROP TABLE notes")
        db.close()
        with pytest.raises(CollectionError, match="has no 'notes' table"):
            MetadataStore(tmp_path / "new", readonly=True)
        MetadataStore(tmp_path / "new").close()  # writable: made again
        MetadataStore(tmp_path / "new", readonly=True).close()
    finally:
        schema.expected_tables.cache_clear()


def test_a_step_that_fails_leaves_the_schema_2_store_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def breaks(conn: sqlite3.Connection) -> None:
        schema.add_column(conn, "items", "lang", "TEXT")
        raise sqlite3.OperationalError("disk I/O error")

    folder = _saved(tmp_path)
    before = _rows(folder)
    monkeypatch.setattr(schema, "STEPS", [*schema.STEPS, schema.Step(3, "breaks", breaks)])
    with pytest.raises(CollectionError, match="disk I/O error"):
        MetadataStore(folder)
    monkeypatch.undo()
    assert _rows(folder) == before
    with sqlite3.connect(folder / DB_NAME) as db:
        assert "lang" not in {r[1] for r in db.execute("PRAGMA table_info(items)")}
    db.close()


@pytest.mark.parametrize("readonly", [True, False])
def test_a_newer_schema_is_refused_unread_and_unwritten(tmp_path: Path, readonly: bool) -> None:
    folder = _saved(tmp_path)
    with sqlite3.connect(folder / DB_NAME) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    db.close()
    before = _rows(folder)
    with pytest.raises(CollectionError, match=rf"version '{SCHEMA_VERSION + 1}' is not supported .*"
                                              rf"reads 1 to {SCHEMA_VERSION}.*newer crossmodal-rag"):
        MetadataStore(folder, readonly=readonly)
    assert _rows(folder) == before
    assert not (folder / f"{DB_NAME}-wal").exists()


def test_a_virtual_table_the_schema_does_not_make_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    with sqlite3.connect(folder / DB_NAME) as db:
        db.execute("CREATE VIRTUAL TABLE planted USING fts5(text)")
    db.close()
    with pytest.raises(CollectionError, match="virtual table 'planted'"):
        MetadataStore(folder, readonly=True)



def _steps(store: MetadataStore, read: Callable[[], object]) -> int:
    """SQLite virtual-machine steps (in units of 10) that ``read()`` costs on ``store``."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    store.conn.set_progress_handler(tick, 10)
    try:
        read()
    finally:
        store.conn.set_progress_handler(None, 0)
    return steps[0]


def test_an_images_children_are_found_without_reading_every_item(tmp_path: Path) -> None:
    """Reading one image's captions or OCR text costs the same in a collection of 50 images as in
    one of 3,000 (an index on the parent; before, SQLite walked every caption through the kind
    index: ~40 ms per image hit at 30k items)."""
    cost: dict[int, list[int]] = {}
    for n in (50, 3000):
        (tmp_path / str(n)).mkdir()
        store = MetadataStore(tmp_path / str(n))
        vec = np.full(4, 0.5, dtype=np.float32)
        with store.transaction():
            images = [store.insert_item("image", vec) for _ in range(n)]
            captions = {image: store.insert_item("caption", vec, parent_id=image, text=f"c{image}")
                        for image in images}
            for image in images:
                store.insert_item("ocr", vec, parent_id=image, text=f"o{image}")
        probe = images[n // 2]
        assert store.captions_of(probe) == {f"c{probe}": (captions[probe], None)}
        assert ocr_texts(store, [probe]) == {probe: f"o{probe}"}
        cost[n] = [_steps(store, lambda: store.captions_of(probe)),
                   _steps(store, lambda: ocr_texts(store, [probe]))]
        store.close()
    assert all(big <= small + 5 for small, big in zip(cost[50], cost[3000])), cost
