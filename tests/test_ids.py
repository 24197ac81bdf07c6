"""Item ids are never given twice: an id removed (even the newest) stays retired, so the float16
shards, the indexes built from them and every id kept outside the collection (liked ids, chat
sources, checkpoints) can never point at another item. Collections made before that (schema
version 1) migrate when opened writable, and a shard copy left behind under a reused id is
rewritten from the metadata."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag import Collection
from crossmodal_rag.store import schema
from crossmodal_rag.store.metadata import DB_NAME, SCHEMA_VERSION, MetadataStore

PASSAGES = ["the blik is red and round", "a dax sleeps under the bridge", "wug eats yellow soup",
            "fep climbs the tall green tower", "tor sings to the moon at night"]
NEW = "quokka plays the banjo on a boat"


def _write(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _five_passages(tmp_path: Path, spec: str) -> Path:
    folder = tmp_path / "coll"
    with Collection.create(folder, spec) as coll:
        coll.add(_write(tmp_path / "five.jsonl", PASSAGES))
        assert sorted(coll.store.ids("text").tolist()) == [1, 2, 3, 4, 5]
    return folder


def _downgrade(folder: Path) -> None:
    """Make ``folder`` look as written by the code before ids were retired (schema version 1:
    no id counter; SQLite then gives max(id) + 1)."""
    with sqlite3.connect(folder / DB_NAME) as db:
        db.execute("DELETE FROM meta WHERE key IN ('next_item_id', 'unverified_shards')")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.close()


def _shards_agree_with_metadata(coll: Collection) -> None:
    for name in ("image", "text"):
        live = coll.store.ids(name)
        if len(live):
            np.testing.assert_allclose(coll.shards[name].lookup(live),
                                       coll.store.vectors(live.tolist(), coll.manifest.dim), atol=2e-3)


def _top_text_hit(coll: Collection, text: str) -> tuple[int, str | None]:
    hit = coll.search(text, k=1, target="texts", mode="dense")[0]
    return hit.id, hit.text


def _brute_force_top(coll: Collection, text: str) -> int:
    ids = coll.store.ids("text")
    scores = coll.store.vectors(ids.tolist(), coll.manifest.dim) @ coll.embed_query(text)
    return int(ids[int(np.argmax(scores))])


def test_the_newest_id_removed_is_never_given_again(tmp_path: Path, tiny_oc_spec: str) -> None:
    folder = _five_passages(tmp_path, tiny_oc_spec)
    with Collection.open(folder, writable=True) as coll:
        assert coll.remove(ids=[5])["removed"] == [5]
        coll.add(_write(tmp_path / "new.jsonl", [NEW]))
        (new_id,) = set(coll.store.ids("text").tolist()) - {1, 2, 3, 4}
        assert new_id > 5  # id 5 belonged to another passage: it is retired
        coll.reindex()  # builds from the float16 shards
        assert _top_text_hit(coll, NEW) == (new_id, NEW) and _brute_force_top(coll, NEW) == new_id
        _shards_agree_with_metadata(coll)
        report = coll.check()
        assert report.ok, report.problems
    with Collection.open(folder) as coll:  # as stored on disk
        assert _top_text_hit(coll, NEW) == (new_id, NEW)
        assert coll.check().ok


def test_ids_stay_retired_across_reopen_and_compaction(tmp_path: Path, tiny_oc_spec: str) -> None:
    folder = _five_passages(tmp_path, tiny_oc_spec)
    with Collection.open(folder, writable=True) as coll:
        coll.remove(ids=[4, 5])
        coll.reindex()  # compacts the shards: ids 4 and 5 leave them too
        assert coll.shards["text"].max_id == 3
    with Collection.open(folder, writable=True) as coll:
        coll.add(_write(tmp_path / "new.jsonl", [NEW]))
        assert set(coll.store.ids("text").tolist()) == {1, 2, 3, 6}
        assert coll.store.get_meta("next_item_id") == "7"


def test_a_rolled_back_insert_does_not_advance_the_counter(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path)
    vec = np.ones(4, np.float32) / 2
    with store.transaction():
        assert store.insert_item("passage", vec, text="a") == 1
    with pytest.raises(RuntimeError), store.transaction():
        store.insert_item("passage", vec, text="b")
        raise RuntimeError("abort")
    with store.transaction():
        assert store.insert_item("passage", vec, text="c") == 2  # 2 was never committed
        store.delete_items([2])
    with store.transaction():
        assert store.insert_item("passage", vec, text="d") == 3
    store.close()


def test_an_old_schema_collection_opens_read_only_and_migrates_when_writable(
        tmp_path: Path, tiny_oc_spec: str) -> None:
    folder = _five_passages(tmp_path, tiny_oc_spec)
    with Collection.open(folder, writable=True) as coll:
        coll.remove(ids=[5])  # the shards still hold id 5's vector
        before = {it.id: it.text for it in coll.get([1, 2, 3, 4])}
    _downgrade(folder)
    with Collection.open(folder) as coll:  # read-only: readable, and nothing is written
        assert {it.id: it.text for it in coll.get([1, 2, 3, 4])} == before
        assert _top_text_hit(coll, PASSAGES[2]) == (3, PASSAGES[2])
        assert coll.store.get_meta("schema_version") == "1"
    with Collection.open(folder, writable=True) as coll:
        assert coll.store.get_meta("schema_version") == str(SCHEMA_VERSION) == "5"
        assert {it.id: it.text for it in coll.get([1, 2, 3, 4])} == before
        coll.add(_write(tmp_path / "new.jsonl", [NEW]))
        assert set(coll.store.ids("text").tolist()) == {1, 2, 3, 4, 6}  # 5 is in the shards: retired
        coll.reindex()
        assert _top_text_hit(coll, NEW) == (6, NEW)
        assert coll.check().ok


def test_a_reused_id_of_an_old_collection_gets_its_shard_copy_rewritten(
        tmp_path: Path, tiny_oc_spec: str) -> None:
    folder = _five_passages(tmp_path, tiny_oc_spec)
    with Collection.open(folder, writable=True) as coll:
        coll.remove(ids=[5])
        vector = coll.encoder.encode_texts([NEW])[0]
    _downgrade(folder)
    with sqlite3.connect(folder / DB_NAME) as db:  # what the old code did: SQLite's max(id) + 1
        sha = hashlib.sha256(json.dumps([None, NEW]).encode()).hexdigest()
        cur = db.execute("INSERT INTO items(kind, sha256, text, added_at, vector) "
                         "VALUES ('passage', ?, ?, ?, ?)",
                         (sha, NEW, time.time(), np.ascontiguousarray(vector, "<f4").tobytes()))
        assert cur.lastrowid == 5
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
    db.close()
    with Collection.open(folder) as coll:  # the defect as it stood: the shard holds the old vector
        assert "float16" in " ".join(coll.check().problems)
    with Collection.open(folder, writable=True) as coll:  # migrates, and rewrites id 5's copy
        _shards_agree_with_metadata(coll)
        coll.reindex()
        assert _top_text_hit(coll, NEW) == (5, NEW) and _brute_force_top(coll, NEW) == 5
        report = coll.check()
        assert report.ok, report.problems
    with Collection.open(folder, writable=True) as coll:  # verified once: nothing left to do
        assert coll.store.get_meta("unverified_shards") is None


def test_a_migration_that_fails_midway_leaves_the_old_schema_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from crossmodal_rag.errors import CollectionError

    store = MetadataStore(tmp_path)
    with store.transaction():
        for text in "abc":
            store.insert_item("passage", np.ones(4, np.float32) / 2, text=text)
        store.delete_items([3])
    store.close()
    _downgrade(tmp_path)
    set_meta = schema._set_meta

    def dies_at_the_version(conn: sqlite3.Connection, key: str, value: str) -> None:
        if key == "schema_version":  # the last write of the migration
            raise sqlite3.OperationalError("disk I/O error")
        set_meta(conn, key, value)

    monkeypatch.setattr(schema, "_set_meta", dies_at_the_version)
    with pytest.raises(CollectionError):
        MetadataStore(tmp_path)
    monkeypatch.undo()
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        assert dict(db.execute("SELECT key, value FROM meta")) == {"schema_version": "1", "generation": "1"}
        assert db.execute("SELECT id, text FROM items ORDER BY id").fetchall() == [(1, "a"), (2, "b")]
    db.close()
    store = MetadataStore(tmp_path)  # the next open migrates
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
    assert store.get_meta("unverified_shards") == "image,text"
    with store.transaction():  # the store alone knows ids up to max(id); a Collection also
        assert store.insert_item("passage", np.ones(4, np.float32) / 2, text="d") == 3  # retires its shards' ids
    store.close()


def test_vectors_of_a_missing_id_are_zero_rows_not_garbage(tmp_path: Path, tiny_oc_spec: str) -> None:
    folder = _five_passages(tmp_path, tiny_oc_spec)
    with Collection.open(folder) as coll:
        dim = coll.manifest.dim
        want = coll.store.vectors([2], dim)[0]
        # poison the allocator's free memory so np.empty would hand back non-zero bytes
        for _ in range(50):
            np.full((64, dim), 7.0, dtype=np.float32)
        got = coll.store.vectors([2, 424242, 3], dim)
    np.testing.assert_array_equal(got[0], want)
    np.testing.assert_array_equal(got[1], np.zeros(dim, dtype=np.float32))
    assert np.linalg.norm(got[2]) > 0.5
