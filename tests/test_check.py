"""`check` compares what is stored on disk: the index files the manifest names, the float16
shards and the metadata; every id and (up to a documented size) every vector, for every index
type. Damage is made behind the library's back (raw SQLite, an index file written with one vector
replaced and the manifest pointed at it, as a buggy writer would), and `check` must name it."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag import Collection
from crossmodal_rag.store.audit import CHECK_ALL_MAX_VECTORS
from crossmodal_rag.store.manifest import IndexFile, Manifest
from crossmodal_rag.store.shards import EmbeddingShards
from crossmodal_rag.store.vectors import VectorIndex
from tests.e2e.test_cli import run
from tests.test_ann import _write_import, clustered

N = 1200  # images; every 10th row has a caption


def _fingerprint(folder: Path) -> dict[str, str]:
    """Hashes of every file that holds data (SQLite's own -wal/-shm and the lock excepted), plus
    the metadata's logical content: `check` must change none of it."""
    out = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".lock"
           and not p.name.startswith("metadata.sqlite")}
    with sqlite3.connect(folder / "metadata.sqlite") as db:
        dump = "\n".join(db.iterdump())
    out["<metadata>"] = hashlib.sha256(dump.encode()).hexdigest()
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory, tiny_oc_spec: str) -> Path:
    from crossmodal_rag.ingestion.importer import import_embeddings

    tmp = tmp_path_factory.mktemp("check")
    with Collection.create(tmp / "probe", tiny_oc_spec) as c:
        dim = c.manifest.dim
    src = _write_import(tmp, clustered(N, dim, seed=5, clusters=20))
    import_embeddings(src, tmp / "coll", tiny_oc_spec, progress=False, verify=0)
    return tmp / "coll"


def _copy(src: Path, dst: Path, index_type: str) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    if index_type != "Flat":
        with Collection.open(dst, writable=True) as c:
            c.reindex(index_type, tune=False)
    return dst


def _tamper_index_vector(folder: Path, name: str, victim: int, vector: np.ndarray) -> None:
    """Write the index with ``victim``'s vector replaced and point the manifest at the new file
    (sizes and checksum right): what a writer with a bug would leave."""
    m = Manifest.read(folder)
    index = VectorIndex.load(folder, m.files[name], m.dim, m.index_type_of(name))
    if index.supports_remove:
        index.remove(np.array([victim]))
        index.add(np.array([victim]), vector[None])
    else:  # a graph cannot forget a vector: build it again, one vector replaced
        ids = index.ids()
        vecs = EmbeddingShards(folder, name, m.dim, m.embeddings[name]).lookup(ids)
        vecs[ids == victim] = vector
        index = VectorIndex(m.dim, index.index_type)
        index.add(ids, vecs)
    record = index.save(folder, f"index/{name}.tampered.faiss")
    replace(m, files={**m.files, name: record}).write(folder)
    _record_as_own(folder, name, record)


def _record_as_own(folder: Path, name: str, record: IndexFile) -> None:
    """Record an index file in the metadata as the collection's own, as every writer does."""
    from crossmodal_rag.store.binding import remember_index_files
    from crossmodal_rag.store.metadata import MetadataStore

    store = MetadataStore(folder)
    try:
        remember_index_files(store, {name: record})
    finally:
        store.close()


def _set_metadata_vector(folder: Path, item_id: int, vector: np.ndarray) -> None:
    with sqlite3.connect(folder / "metadata.sqlite") as db:
        db.execute("UPDATE items SET vector = ? WHERE id = ?",
                   (np.ascontiguousarray(vector, "<f4").tobytes(), item_id))


def test_check_sees_a_metadata_row_deleted_behind_its_back(collection_copy: Path) -> None:
    with Collection.open(collection_copy) as c:
        assert c.check().ok
        victim = int(c.store.ids("text")[3])  # a caption: nothing else refers to it
    with sqlite3.connect(collection_copy / "metadata.sqlite") as db:
        db.execute("DELETE FROM items WHERE id = ?", (victim,))
    before = _fingerprint(collection_copy)
    with Collection.open(collection_copy) as c:
        report = c.check()
    assert not report.ok
    problem = " ".join(p for p in report.problems if "text index" in p)
    assert f"1 id(s) in the index file only (e.g. {victim})" in problem, report.problems
    assert report.counts["text_index"] == report.counts["captions"] + 1  # counts of both sides
    assert _fingerprint(collection_copy) == before  # check wrote nothing

    r = run("check", str(collection_copy))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"e.g. {victim}" in r.stdout and "FAILED" in r.stdout
    assert _fingerprint(collection_copy) == before


def test_check_sees_an_index_missing_a_committed_item(collection_copy: Path) -> None:
    with Collection.open(collection_copy) as c:
        victim = int(c.store.ids("image")[-1])
    m = Manifest.read(collection_copy)
    index = VectorIndex.load(collection_copy, m.files["image"], m.dim, "Flat")
    index.remove(np.array([victim]))
    record = index.save(collection_copy, "index/image.less.faiss")
    replace(m, files={**m.files, "image": record}).write(collection_copy)
    _record_as_own(collection_copy, "image", record)
    with Collection.open(collection_copy) as c:
        report = c.check()
    assert not report.ok
    assert any(f"1 in the metadata only (e.g. {victim})" in p for p in report.problems), report.problems


@pytest.mark.parametrize("index_type", ["Flat", "HNSW16", "IVF16,Flat", "IVF16,PQ8np"])
def test_check_finds_one_wrong_vector_in_any_index_type(imported: Path, tmp_path: Path, index_type: str) -> None:
    folder = _copy(imported, tmp_path / "c", index_type)
    with Collection.open(folder) as c:
        report = c.check()
        ids = c.store.ids("image")
        dim = c.manifest.dim
        assert c.manifest.index_types["image"] == index_type
    assert report.ok, report.problems  # no false alarm, even for PQ codes
    assert any(f"compared all {N} of {N} image vectors" in n for n in report.notes), report.notes

    # ids at positions 1 and 2: a sample of every 18th id (the old check's 64) would miss them
    in_index, in_metadata = int(ids[1]), int(ids[2])
    stranger = np.random.default_rng(3).normal(size=dim).astype(np.float32)
    stranger /= np.linalg.norm(stranger)
    _tamper_index_vector(folder, "image", in_index, stranger)
    before = _fingerprint(folder)
    with Collection.open(folder) as c:
        report = c.check()
    assert not report.ok
    bad = [p for p in report.problems if "image index" in p and "vector" in p]
    assert len(bad) == 1 and f"1 of {N}" in bad[0] and f"e.g. {in_index})" in bad[0], report.problems
    assert _fingerprint(folder) == before

    _set_metadata_vector(folder, in_metadata, -stranger)
    with Collection.open(folder) as c:
        report = c.check()
    text = "\n".join(report.problems)
    assert f"e.g. {in_index}, {in_metadata})" in text  # the index no longer holds what metadata says
    assert f"embedding shards: 1 of {N}" in text and f"e.g. {in_metadata})" in text


def test_check_samples_large_indexes_and_says_so(imported: Path, tmp_path: Path) -> None:
    folder = _copy(imported, tmp_path / "c", "IVF16,Flat")
    with Collection.open(folder) as c:
        ids = c.store.ids("image")
        full = c.check()
        sampled = c.check(max_vectors=300, seed=1)
        again = c.check(max_vectors=300, seed=1)
    assert CHECK_ALL_MAX_VECTORS >= 100_000
    assert any(f"compared all {N} of {N} image vectors" in n for n in full.notes)
    note = [n for n in sampled.notes if "image vectors" in n]
    assert note and f"compared 300 of {N} image vectors (seeded random sample, seed 1)" in note[0]
    assert sampled.notes == again.notes and sampled.ok and full.ok

    # one wrong vector is found by the sample exactly when the seeded sample holds its id
    from crossmodal_rag.store.audit import sample_ids

    drawn = sample_ids(ids, 300, 1)
    inside, outside = int(drawn[7]), int(np.setdiff1d(ids, drawn)[7])
    for victim, found in ((inside, True), (outside, False)):
        dst = _copy(folder, tmp_path / f"v{victim}", "Flat")
        m = Manifest.read(dst)
        with Collection.open(dst) as c:
            wrong = -c.store.vectors([victim], m.dim)[0]
        _tamper_index_vector(dst, "image", victim, wrong)
        with Collection.open(dst) as c:
            assert (not c.check(max_vectors=300, seed=1).ok) == found
            assert not c.check().ok  # the full comparison always finds it


# -- the values of every stored vector (issue 25) ------------------------------------------------
def poison_shard(folder: Path, name: str, rows: dict[int, np.ndarray | float]) -> None:
    """Write ``rows`` (id -> a vector, or a value for every component) into the float16 shard
    files of index ``name`` in place, as a damaged disk or a hostile hand would."""
    m = Manifest.read(folder)
    for shard in m.embeddings[name]:
        ids = np.load(folder / shard.ids_path)
        vecs = np.load(folder / shard.path)
        hit = False
        for item_id, value in rows.items():
            at = np.flatnonzero(ids == item_id)
            if len(at):
                vecs[at[0]] = value
                hit = True
        if hit:
            np.save(folder / shard.path, vecs)


#: One of each kind of bad float16 row: NaN, infinity, zero, denormal (subnormal float16), rescaled.
BAD_ROWS = {"nan": np.nan, "inf": np.inf, "zero": 0.0, "denormal": 1e-7, "scaled": None}


def _bad_value(kind: str, good: np.ndarray) -> np.ndarray:
    if kind == "scaled":
        return good * 3.0
    value = np.full_like(good, BAD_ROWS[kind])
    if kind == "nan":
        value[1:] = good[1:]  # one NaN component is enough
    return value


def test_check_names_every_bad_float16_vector(collection_copy: Path) -> None:
    with Collection.open(collection_copy) as c:
        assert c.check().ok
        ids = c.store.ids("image")
        dim = c.manifest.dim
        victims = {kind: int(ids[n + 1]) for n, kind in enumerate(BAD_ROWS)}
        good = c.store.vectors(list(victims.values()), dim)
        paths = {kind: c.get(v)[0].path for kind, v in victims.items()}
    poison_shard(collection_copy, "image", {v: _bad_value(kind, good[n]) for n, (kind, v) in enumerate(victims.items())})
    before = _fingerprint(collection_copy)
    with Collection.open(collection_copy) as c:
        report = c.check()
    assert not report.ok
    shards = [p for p in report.problems if p.startswith("image embedding shards")]
    nonfinite = next(p for p in shards if "not finite" in p)
    off_norm = next(p for p in shards if "not of unit norm" in p)
    for kind in ("nan", "inf"):
        assert f"{victims[kind]} ({paths[kind]})" in nonfinite, nonfinite
    for kind in ("zero", "denormal", "scaled"):
        assert f"{victims[kind]} ({paths[kind]})" in off_norm, off_norm
    assert f"reindex --repair {collection_copy}" in nonfinite and "2 of 15" in nonfinite
    listed = {(b["id"], b["problem"]) for b in report.bad_vectors if b["where"] == "shards"}
    assert listed == {(victims["nan"], "not finite"), (victims["inf"], "not finite"),
                      (victims["zero"], "not unit norm"), (victims["denormal"], "not unit norm"),
                      (victims["scaled"], "not unit norm")}
    assert all(b["path"] == paths[k] for k in victims for b in report.bad_vectors if b["id"] == victims[k])
    assert _fingerprint(collection_copy) == before  # check wrote nothing

    r = run("check", str(collection_copy), "--json")
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert {b["id"] for b in out["bad_vectors"]} == set(victims.values())


def test_check_names_bad_vectors_in_an_index_file(collection_copy: Path) -> None:
    with Collection.open(collection_copy) as c:
        victim = int(c.store.ids("image")[4])
        path = c.get(victim)[0].path
        dim = c.manifest.dim
    _tamper_index_vector(collection_copy, "image", victim, np.full(dim, np.nan, np.float32))
    with Collection.open(collection_copy) as c:
        report = c.check()
    index = [p for p in report.problems if p.startswith("image index (") and "not finite" in p]
    assert len(index) == 1 and f"{victim} ({path})" in index[0] and "reindex" in index[0], report.problems
    assert {(b["where"], b["id"]) for b in report.bad_vectors} == {("index", victim)}


def test_check_flags_a_shard_the_collection_did_not_write(collection_copy: Path) -> None:
    """A shard of the right shape and healthy values, but another collection's vectors (here
    the rows rolled by one): named as not the collection's own; `reindex` rebuilds it from the
    metadata, after which the shards hold the metadata's vectors again."""
    m = Manifest.read(collection_copy)
    shard = m.embeddings["image"][0]
    vecs = np.load(collection_copy / shard.path)
    np.save(collection_copy / shard.path, np.roll(vecs, 1, axis=0))
    with Collection.open(collection_copy) as c:
        report = c.check()
    assert any("is not one this collection wrote" in p and shard.path in p for p in report.problems), report.problems
    with Collection.open(collection_copy, writable=True) as c:
        c.reindex()
    with Collection.open(collection_copy) as c:
        report = c.check()
        ids = c.store.ids("image")
        assert report.ok, report.problems
        np.testing.assert_allclose(c.shards["image"].lookup(ids), c.store.vectors(ids.tolist(), c.manifest.dim),
                                   atol=2e-3)
