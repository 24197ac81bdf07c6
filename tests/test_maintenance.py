"""Maintenance (crossmodal_rag/maintenance/indexes.py) on collections of synthetic vectors, written with
the store's own writers (store/persist.py) and no model: a rebuilt and tuned index against
exact search, refused rebuilds leave the collection as it was, search settings persist,
near-duplicate groups against a brute-force union-find, also over an approximate index, and the
tuning queries name their ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crossmodal_rag.errors import CollectionError, QueryError
from crossmodal_rag.maintenance import indexes
from crossmodal_rag.maintenance.fingerprint import Fingerprint
from crossmodal_rag.store.ann import SearchParams, recall_at_k
from crossmodal_rag.store.manifest import Manifest
from crossmodal_rag.store.metadata import MetadataStore
from crossmodal_rag.store.persist import IndexState, write_new_collection

DIM = 32


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, seed: int, clusters: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM))
    return _unit_rows(centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, DIM)))


def synthetic_collection(folder: Path, images: np.ndarray, texts: np.ndarray | None = None) -> IndexState:
    """A collection of ``images`` (and ``texts``) vectors, opened writable (no lock, no model)."""
    folder.mkdir()
    probe = Fingerprint(np.eye(3, DIM, dtype=np.float32), None)
    manifest = write_new_collection(folder, encoder="open_clip:ViT-B-32/synthetic", dim=DIM, probe=probe,
                                    index_type="Flat", max_index_memory=None, fsync="off")
    state = IndexState(folder, manifest, MetadataStore(folder, fsync="off"), fsync=False)
    state.load(writable=True)
    added = {}
    with state.store.transaction():
        ids = [state.store.insert_item("image", v, sha256=f"{n:064x}") for n, v in enumerate(images)]
        added["image"] = (np.asarray(ids, np.int64), images)
        if texts is not None:
            ids = [state.store.insert_item("passage", v, text=f"text {n}", sha256=f"{n:064x}")
                   for n, v in enumerate(texts)]
            added["text"] = (np.asarray(ids, np.int64), texts)
    state.apply(added, [])
    state.persist()
    return state


@pytest.fixture
def state(tmp_path: Path):
    s = synthetic_collection(tmp_path / "c", clustered(2000, seed=1), clustered(300, seed=2))
    yield s
    s.store.close()


def _queries(state: IndexState, n: int = 100, seed: int = 9) -> np.ndarray:
    """New queries like the stored vectors: stored image vectors moved by noise."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(state.store.ids("image"), n, replace=False)
    return _unit_rows(state.store.vectors(ids.tolist(), DIM) + 0.3 * rng.standard_normal((n, DIM)))


def _exact(state: IndexState, queries: np.ndarray, k: int = 10) -> np.ndarray:
    ids = state.store.ids("image")
    vecs = state.store.vectors(ids.tolist(), DIM)
    return ids[np.argsort(-(queries @ vecs.T), axis=1, kind="stable")[:, :k]]


def test_reindex_builds_and_tunes_to_the_target_recall(state: IndexState) -> None:
    report = indexes.reindex(state, "HNSW16", target_recall=0.9, seed=3)
    assert report["image"]["index_type"] == "HNSW16" and report["image"]["count"] == 2000
    tuning = report["image"]["tuning"]
    assert tuning["param"] == "ef_search" and tuning["reached"]
    on_disk = Manifest.read(state.folder)  # what the next open uses
    assert on_disk.index_types["image"] == "HNSW16"
    assert on_disk.search_params["image"] == state.indexes["image"].params.to_dict()
    assert on_disk.tuning["image"] == tuning
    queries = _queries(state)
    _, found = state.indexes["image"].search(queries, 10)
    assert recall_at_k(found, _exact(state, queries)) >= 0.85  # target 0.9 on held-out stored vectors

    tuned = indexes.tune(state, target_recall=0.99, seed=4)
    assert tuned["image"]["tuning"]["target_recall"] == 0.99
    _, found = state.indexes["image"].search(queries, 10)
    assert recall_at_k(found, _exact(state, queries)) >= 0.95
    back = indexes.reindex(state, "Flat")
    assert back["image"]["tuning"] is None
    scores, found = state.indexes["image"].search(queries, 10)
    exact = _exact(state, queries)
    vecs = state.store.vectors(state.store.ids("image").tolist(), DIM)
    best = -np.sort(-(queries @ vecs.T), axis=1)[:, :10]
    # exact again, over the float16 copies: the same scores to float16 precision, ties aside
    np.testing.assert_allclose(scores, best, atol=2e-3)
    assert recall_at_k(found, exact) >= 0.98


def test_refused_rebuilds_change_nothing(state: IndexState) -> None:
    before = (state.folder / "manifest.json").read_text()
    for kwargs, message in (
        ({"index_type": "HNSW16", "target_recall": 0.0}, "target recall"),
        ({"index_type": "HNSW16", "target_recall": 1.5}, "target recall"),
        ({"index_type": "HNSW16", "sharded": True}, "IVF index types"),
        ({"index_type": "IVF4096,Flat"}, "needs at least"),  # 2,000 vectors
    ):
        with pytest.raises(CollectionError, match=message):
            indexes.reindex(state, **kwargs)
    with pytest.raises(CollectionError, match="target recall"):
        indexes.tune(state, target_recall=2.0)
    with pytest.raises(CollectionError, match="unknown index"):
        indexes.set_search_params(state, SearchParams(nprobe=4), "video")
    assert (state.folder / "manifest.json").read_text() == before


def test_search_settings_persist(state: IndexState) -> None:
    indexes.reindex(state, "IVF16,Flat", tune=False)
    indexes.set_search_params(state, SearchParams(nprobe=7), "image")
    stored = json.loads((state.folder / "manifest.json").read_text())["search_params"]
    assert stored["image"]["nprobe"] == 7 and stored["text"].get("nprobe") != 7
    reopened = IndexState(state.folder, Manifest.read(state.folder), state.store, fsync=False)
    reopened.load(writable=False)
    assert reopened.indexes["image"].params.nprobe == 7


def _brute_force_groups(ids: np.ndarray, vecs: np.ndarray, threshold: float) -> list[list[int]]:
    sims = vecs @ vecs.T
    parent = list(range(len(ids)))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for a in range(len(ids)):
        for b in range(a + 1, len(ids)):
            if sims[a, b] >= threshold:
                parent[find(b)] = find(a)
    groups: dict[int, list[int]] = {}
    for a in range(len(ids)):
        groups.setdefault(find(a), []).append(int(ids[a]))
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


@pytest.mark.parametrize("index_type", ["Flat", "HNSW8"])
def test_near_duplicates_match_brute_force(tmp_path: Path, index_type: str) -> None:
    """Planted near-copies (chains of small steps, linked transitively) among random vectors;
    an approximate index is not trusted: the groups are computed exactly either way."""
    rng = np.random.default_rng(5)
    base = _unit_rows(rng.standard_normal((200, DIM)))
    copies = [_unit_rows(base[i : i + 1] + 0.02 * rng.standard_normal((1 + i % 3, DIM))) for i in range(0, 60, 4)]
    vectors = np.concatenate([base, *copies])
    folder = tmp_path / "c"
    state = synthetic_collection(folder, vectors)
    try:
        if index_type != "Flat":
            indexes.reindex(state, index_type, tune=False)
        assert state.indexes["image"].index_type == index_type
        ids = state.store.ids("image")
        stored = state.store.vectors(ids.tolist(), DIM)
        for threshold in (0.999, 0.99, 0.95, 0.5):
            expected = _brute_force_groups(ids, stored, threshold)
            got = indexes.near_duplicates(state.store, state.indexes, DIM, threshold)
            assert got == expected, threshold
        assert indexes.near_duplicates(state.store, state.indexes, DIM, 0.99)  # planted ones found
        with pytest.raises(QueryError, match="between -1 and 1"):
            indexes.near_duplicates(state.store, state.indexes, DIM, 1.5)
    finally:
        state.store.close()


def test_no_groups_under_two_images(tmp_path: Path) -> None:
    state = synthetic_collection(tmp_path / "c", clustered(1, seed=0))
    try:
        assert indexes.near_duplicates(state.store, state.indexes, DIM, -1.0) == []
    finally:
        state.store.close()


def test_tuning_queries_name_their_own_ids(state: IndexState) -> None:
    """Held-out tuning queries: stored vectors of the index itself (with their ids, so tuning can
    leave each one's own vector out of its truth) and of the other modality (id -1)."""
    live = state.store.ids("image")
    queries, ids = state.tuning_queries("image", live, state.indexes["image"], seed=0, n=100)
    assert queries.shape == (100, DIM) and ids.shape == (100,)
    own = ids >= 0
    assert own.sum() == 50 and set(ids[own].tolist()) <= set(live.tolist())
    np.testing.assert_allclose(queries[own], state.shards["image"].lookup(ids[own]), atol=0)
    texts = state.store.vectors(state.store.ids("text").tolist(), DIM)
    # each other-modality query is one of the text vectors
    assert np.allclose((queries[~own] @ texts.T).max(axis=1), 1.0, atol=1e-5)


# -- reindex refuses bad stored vectors; --repair re-embeds them (issue 25) -----------------------
@pytest.fixture
def photo_collection(tmp_path: Path, photos: Path, tiny_oc_spec: str) -> Path:
    """Five copied photos with their captions (their files may be deleted by a test)."""
    from crossmodal_rag import Collection

    with Collection.create(tmp_path / "pc", tiny_oc_spec) as c:
        c.add(photos)
    return tmp_path / "pc"


def _stored(folder: Path) -> dict[str, Any]:
    """What a refused reindex must leave as it was: the manifest and the files it names."""
    import hashlib

    return {"manifest": (folder / "manifest.json").read_text(),
            "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in sorted((folder / "embeddings").rglob("*.npy"))}}


def test_reindex_refuses_bad_shard_vectors_naming_them_and_changes_nothing(photo_collection: Path) -> None:
    from crossmodal_rag import Collection
    from crossmodal_rag.cli import main
    from tests.test_check import poison_shard

    with Collection.open(photo_collection) as c:
        image, caption = int(c.store.ids("image")[1]), int(c.store.ids("text")[4])
        path = c.get(image)[0].path
    poison_shard(photo_collection, "image", {image: np.nan})
    poison_shard(photo_collection, "text", {caption: 0.0})
    before = _stored(photo_collection)
    with Collection.open(photo_collection, writable=True) as c, \
            pytest.raises(CollectionError, match="reindex --repair") as e:
        c.reindex()
    assert f"{image} ({path})" in str(e.value) and f"{caption} (caption of" in str(e.value)
    assert "nothing was changed" in str(e.value)
    assert _stored(photo_collection) == before
    assert main(["-q", "reindex", str(photo_collection)]) == 1
    assert _stored(photo_collection) == before


def test_reindex_repair_reembeds_exactly_the_bad_items(photo_collection: Path, capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """The re-embedded vectors are the encoder's for the source file and the stored caption
    (oracle: the encoder itself); every other stored vector stays as it was; `check` passes and
    image search finds every image again."""
    from crossmodal_rag import Collection
    from crossmodal_rag.cli import main
    from tests.test_check import poison_shard

    with Collection.open(photo_collection) as c:
        dim = c.manifest.dim
        images, texts = c.store.ids("image"), c.store.ids("text")
        image, caption = int(images[2]), int(texts[1])
        before = {n: c.shards[n].lookup(c.store.ids(n)) for n in ("image", "text")}
        enc = c.encoder
        want_image = enc.encode_images([c.get(image)[0].path])[0]
        want_caption = enc.encode_texts([c.get(caption)[0].text])[0]
    poison_shard(photo_collection, "image", {image: np.inf})
    poison_shard(photo_collection, "text", {caption: 1e-7})  # denormal float16
    with Collection.open(photo_collection) as c:
        assert not c.check().ok
    assert main(["-q", "reindex", str(photo_collection), "--repair", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["repair"]["reembedded"] == sorted([image, caption])
    assert report["repair"]["removed"] == [] and report["repair"]["kept"] == []
    with Collection.open(photo_collection) as c:
        assert c.check().ok, c.check().problems
        after = {n: c.shards[n].lookup(c.store.ids(n)) for n in ("image", "text")}
        np.testing.assert_allclose(c.store.vectors([image], dim)[0], want_image, atol=1e-5)
        np.testing.assert_allclose(c.store.vectors([caption], dim)[0], want_caption, atol=1e-5)
        np.testing.assert_allclose(after["image"][images == image][0], want_image, atol=2e-3)
        np.testing.assert_allclose(after["text"][texts == caption][0], want_caption, atol=2e-3)
        for name, ids, victim in (("image", images, image), ("text", texts, caption)):
            others = ids != victim
            np.testing.assert_allclose(after[name][others], before[name][others], atol=1e-3)
        assert len(c.search("a cat", k=10, mode="dense")) == len(images)


def test_reindex_repair_keeps_or_removes_an_image_whose_source_is_gone(photo_collection: Path) -> None:
    """Source gone: a sound committed vector is copied back into the shards; an item whose
    committed vector is bad too is removed, and reported with its path and why."""
    import sqlite3

    from crossmodal_rag import Collection
    from tests.test_check import poison_shard

    with Collection.open(photo_collection) as c:
        dim = c.manifest.dim
        ids = c.store.ids("image")
        keep, drop = int(ids[0]), int(ids[3])
        keep_path, drop_path = c.get(keep)[0].path, c.get(drop)[0].path
        committed = c.store.vectors([keep], dim)[0]
    Path(keep_path).unlink()
    Path(drop_path).unlink()
    poison_shard(photo_collection, "image", {keep: np.nan, drop: np.nan})
    with sqlite3.connect(photo_collection / "metadata.sqlite") as db:
        db.execute("UPDATE items SET vector = ? WHERE id = ?",
                   (np.full(dim, np.nan, "<f4").tobytes(), drop))
    with Collection.open(photo_collection, writable=True) as c:
        report = c.reindex(repair=True)["repair"]
    assert report["kept"] == [keep] and report["reembedded"] == []
    assert [(r["id"], r["path"]) for r in report["removed"]] == [(drop, drop_path)]
    assert report["removed"][0]["reason"] == f"{drop_path}: no such file"
    with Collection.open(photo_collection) as c:
        assert c.check().ok, c.check().problems
        assert drop not in c.store.ids("image") and keep in c.store.ids("image")
        np.testing.assert_allclose(c.shards["image"].lookup(np.array([keep]))[0], committed, atol=2e-3)


def test_reindex_rebuilds_a_shard_of_another_dimension(photo_collection: Path) -> None:
    """Its advice was "run reindex", which then failed on the same shard: now reindex rebuilds
    it from the metadata (no re-embedding needed) and `check` passes."""
    from crossmodal_rag import Collection

    m = Manifest.read(photo_collection)
    shard = m.embeddings["image"][0]
    vecs = np.load(photo_collection / shard.path)
    np.save(photo_collection / shard.path, vecs[:, : vecs.shape[1] // 2])
    with Collection.open(photo_collection) as c:
        problems = c.check().problems
    assert any(shard.path in p and "reindex" in p for p in problems), problems
    with Collection.open(photo_collection, writable=True) as c:
        built = c.reindex()
    assert [r["file"] for r in built["image"]["shards_rebuilt"]] == [shard.path]
    with Collection.open(photo_collection) as c:
        assert c.check().ok, c.check().problems
        ids = c.store.ids("image")
        np.testing.assert_allclose(c.shards["image"].lookup(ids), c.store.vectors(ids.tolist(), c.manifest.dim),
                                   atol=2e-3)


def test_no_index_is_built_from_a_nan_shard_row(photo_collection: Path) -> None:
    """Builds outside reindex (a type change as the collection grows, a graph rebuilt after a
    removal) read the shards too: a NaN or zero row stops them with the items to re-embed."""
    from crossmodal_rag import Collection
    from tests.test_check import poison_shard

    with Collection.open(photo_collection) as c:
        victim, zero = (int(i) for i in c.store.ids("image")[[1, 3]])
    poison_shard(photo_collection, "image", {victim: np.nan, zero: 0.0})
    with Collection.open(photo_collection, writable=True) as c:
        for index_type in ("Flat", "HNSW8"):
            with pytest.raises(CollectionError, match=f"items {victim}, {zero}.*reindex --repair"):
                c.state.build("image", index_type, c.store.ids("image"))
