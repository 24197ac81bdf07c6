"""store/reconcile.py and store/persist.py: commits the in-memory indexes were not told about (a
crash before persist, another process) are replayed from the metadata, for an index that can
forget items and for a graph that cannot (rebuilt from the float16 shards instead); the shards
follow the metadata on persist."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag.maintenance import indexes
from crossmodal_rag.store.manifest import Manifest
from crossmodal_rag.store.persist import IndexState
from crossmodal_rag.store.reconcile import reconcile
from tests.test_maintenance import DIM, clustered, synthetic_collection


@pytest.fixture
def state(tmp_path: Path):
    s = synthetic_collection(tmp_path / "c", clustered(400, seed=1), clustered(50, seed=2))
    yield s
    s.store.close()


def _commit_behind_its_back(state: IndexState) -> tuple[list[int], list[int], np.ndarray]:
    """Remove 10 images and add 5 in the metadata only: (removed ids, new ids, new vectors)."""
    gone = [int(i) for i in state.store.ids("image")[:10]]
    new = clustered(5, seed=11)
    with state.store.transaction():
        state.store.delete_items(gone)
        fresh = [state.store.insert_item("image", v, sha256=f"{n + 9000:064x}") for n, v in enumerate(new)]
    return gone, fresh, new


def test_replayed_into_an_index_that_can_forget(state: IndexState) -> None:
    _, fresh, new = _commit_behind_its_back(state)
    with state.store.snapshot():
        done = reconcile(state.store, state.indexes, DIM)
    assert (done.added, done.removed) == (5, 10)
    assert done.changed == {"image"} and done.rebuild == set()
    assert np.array_equal(np.sort(state.indexes["image"].ids()), state.store.ids("image"))
    scores, found = state.indexes["image"].search(new, 1)
    assert found[:, 0].tolist() == fresh and np.allclose(scores[:, 0], 1.0, atol=1e-5)
    with state.store.snapshot():
        again = reconcile(state.store, state.indexes, DIM)
    assert (again.added, again.removed, again.changed) == (0, 0, set())


def test_a_graph_that_cannot_forget_is_rebuilt_from_the_shards(state: IndexState) -> None:
    indexes.reindex(state, "HNSW8", tune=False)
    gone, fresh, _ = _commit_behind_its_back(state)
    assert state.reconcile() == (5, 0)  # the graph takes additions, not removals
    assert set(gone) <= set(state.indexes["image"].ids().tolist())  # still in the graph
    assert "image" in state.rebuild and "image" in state.dirty
    state.persist()  # syncs the shards with the metadata, then rebuilds the graph from them
    assert state.rebuild == set() and state.dirty == set()
    assert np.array_equal(np.sort(state.indexes["image"].ids()), state.store.ids("image"))  # removed ones gone
    held = set(state.shards["image"].held_ids().tolist())
    assert set(fresh) <= held  # the new vectors were appended to the float16 shards
    on_disk = Manifest.read(state.folder)
    assert on_disk.generation == state.store.generation and on_disk.index_types["image"] == "HNSW8"
    reopened = IndexState(state.folder, on_disk, state.store, fsync=False)
    reopened.load(writable=False)
    assert np.array_equal(np.sort(reopened.indexes["image"].ids()), state.store.ids("image"))


def test_an_open_replays_commits_newer_than_the_index_files(state: IndexState) -> None:
    """What a process killed after its commit and before its persist leaves: the next open
    (read-only: nothing written) serves the committed items."""
    before = (state.folder / "manifest.json").read_text()
    gone, fresh, _ = _commit_behind_its_back(state)
    reader = IndexState(state.folder, Manifest.read(state.folder), state.store, fsync=False)
    reader.load(writable=False)
    ids = set(reader.indexes["image"].ids().tolist())
    assert ids == set(state.store.ids("image").tolist())
    assert set(fresh) <= ids and not set(gone) & ids
    assert (state.folder / "manifest.json").read_text() == before
