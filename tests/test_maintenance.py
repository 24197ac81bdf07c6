"""Maintenance (crossmodal_rag/maintenance.py) on collections of synthetic vectors, written with
the store's own writers (store/persist.py) and no model: a rebuilt and tuned index against
exact search, refused rebuilds leave the collection as it was, search settings persist,
near-duplicate groups against a brute-force union-find, also over an approximate index, and the
tuning queries name their ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag import maintenance
from crossmodal_rag.errors import CollectionError, QueryError
from crossmodal_rag.fingerprint import Fingerprint
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
    report = maintenance.reindex(state, "HNSW16", target_recall=0.9, seed=3)
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

    tuned = maintenance.tune(state, target_recall=0.99, seed=4)
    assert tuned["image"]["tuning"]["target_recall"] == 0.99
    _, found = state.indexes["image"].search(queries, 10)
    assert recall_at_k(found, _exact(state, queries)) >= 0.95
    back = maintenance.reindex(state, "Flat")
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
            maintenance.reindex(state, **kwargs)
    with pytest.raises(CollectionError, match="target recall"):
        maintenance.tune(state, target_recall=2.0)
    with pytest.raises(CollectionError, match="unknown index"):
        maintenance.set_search_params(state, SearchParams(nprobe=4), "video")
    assert (state.folder / "manifest.json").read_text() == before


def test_search_settings_persist(state: IndexState) -> None:
    maintenance.reindex(state, "IVF16,Flat", tune=False)
    maintenance.set_search_params(state, SearchParams(nprobe=7), "image")
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
            maintenance.reindex(state, index_type, tune=False)
        assert state.indexes["image"].index_type == index_type
        ids = state.store.ids("image")
        stored = state.store.vectors(ids.tolist(), DIM)
        for threshold in (0.999, 0.99, 0.95, 0.5):
            expected = _brute_force_groups(ids, stored, threshold)
            got = maintenance.near_duplicates(state.store, state.indexes, DIM, threshold)
            assert got == expected, threshold
        assert maintenance.near_duplicates(state.store, state.indexes, DIM, 0.99)  # planted ones found
        with pytest.raises(QueryError, match="between -1 and 1"):
            maintenance.near_duplicates(state.store, state.indexes, DIM, 1.5)
    finally:
        state.store.close()


def test_no_groups_under_two_images(tmp_path: Path) -> None:
    state = synthetic_collection(tmp_path / "c", clustered(1, seed=0))
    try:
        assert maintenance.near_duplicates(state.store, state.indexes, DIM, -1.0) == []
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
