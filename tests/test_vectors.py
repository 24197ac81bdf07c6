from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag.errors import CollectionError
from crossmodal_rag.store.manifest import IndexFile
from crossmodal_rag.store.vectors import VectorIndex


def clustered(n: int, d: int, seed: int, centres: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(xb: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ xb.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), ids[order]


@pytest.mark.parametrize("nq", [1, 3, 50])
def test_search_matches_brute_force_after_removals(nq: int) -> None:
    d = 48
    xb = clustered(2000, d, seed=1)
    ids = np.random.default_rng(2).permutation(10_000)[:2000].astype(np.int64)
    index = VectorIndex(d)
    index.add(ids[:1000], xb[:1000])
    index.add(ids[1000:], xb[1000:])
    drop = ids[::7]
    assert index.remove(drop) == len(drop)
    keep = ~np.isin(ids, drop)
    q = clustered(nq, d, seed=3)
    scores, got = index.search(q, 10)
    ref_scores, ref_ids = brute_force(xb[keep], ids[keep], q, 10)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    # ids may only differ where two scores tie
    assert (got == ref_ids).mean() > 0.99
    np.testing.assert_array_equal(index.ids(), np.sort(ids[keep]))


def test_k_larger_than_the_index_and_empty_index() -> None:
    index = VectorIndex(8)
    s, i = index.search(np.ones((2, 8), np.float32), 5)
    assert s.shape == (2, 0) and i.shape == (2, 0)
    index.add(np.array([4, 9]), clustered(2, 8, 0))
    s, i = index.search(clustered(1, 8, 1), 5)
    assert sorted(i[0].tolist()) == [4, 9]


def test_wrong_dimension_is_refused() -> None:
    index = VectorIndex(8)
    with pytest.raises(CollectionError, match="do not fit"):
        index.add(np.array([1]), np.ones((1, 9), np.float32))
    index.add(np.array([1]), np.ones((1, 8), np.float32))
    with pytest.raises(CollectionError, match="another encoder"):
        index.search(np.ones((1, 9), np.float32), 1)


def test_save_load_round_trip_and_checks(tmp_path: Path) -> None:
    xb = clustered(100, 16, 0)
    index = VectorIndex(16)
    index.add(np.arange(100, 200), xb)
    record = index.save(tmp_path, "index/x.1.faiss")
    assert record.count == 100 and record.bytes == (tmp_path / record.path).stat().st_size
    loaded = VectorIndex.load(tmp_path, record, 16, "Flat", verify_hash=True)
    q = clustered(4, 16, 9)
    np.testing.assert_array_equal(loaded.search(q, 5)[1], index.search(q, 5)[1])

    with pytest.raises(CollectionError, match="x.1.faiss.*manifest says 99"):
        VectorIndex.load(tmp_path, IndexFile(record.path, record.bytes, record.sha256, 99), 16, "Flat")
    with pytest.raises(CollectionError, match="bytes"):
        VectorIndex.load(tmp_path, IndexFile(record.path, record.bytes + 1, record.sha256, 100), 16, "Flat")
    path = tmp_path / record.path
    data = bytearray(path.read_bytes())
    data[10:30] = b"\xff" * 20
    path.write_bytes(bytes(data))
    with pytest.raises(CollectionError, match="checksum"):
        VectorIndex.load(tmp_path, record, 16, "Flat", verify_hash=True)
    path.write_bytes(b"\x00" * record.bytes)
    with pytest.raises(CollectionError, match="not a FAISS index"):
        VectorIndex.load(tmp_path, record, 16, "Flat")
    path.write_bytes(b"IxM2" + b"\xff" * (record.bytes - 4))  # right header, garbage body
    with pytest.raises(CollectionError, match="checksum"):
        VectorIndex.load(tmp_path, record, 16, "Flat", verify_hash=True)
    with pytest.raises(CollectionError, match="missing"):
        VectorIndex.load(tmp_path, IndexFile("index/none.faiss", 1, "", 1), 16, "Flat")


def test_invalid_index_type() -> None:
    with pytest.raises(CollectionError, match="invalid FAISS index type"):
        VectorIndex(8, "NoSuchIndex")


def test_the_index_description_follows_the_index_in_use() -> None:
    """The kind and code type a search reads are worked out once per FAISS index object, and
    anew when the index is replaced (an HNSW graph swapped in for a flat index searches as a
    graph, and removals are refused)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(500, dtype=np.int64)
    vi = VectorIndex(16, "Flat")
    vi.add(ids, x)
    assert vi.kind == "flat" and not vi.uses_pq and vi.supports_remove
    graph = VectorIndex(16, "HNSW16")
    graph.add(ids, x)
    vi.index = graph.index
    assert vi.kind == "hnsw" and not vi.supports_remove
    exact = np.argsort(-(x[:5] @ x.T), axis=1)[:, :10]
    _, found = vi.search(x[:5], 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact, strict=True)]) >= 0.9
    sq = VectorIndex(16, "SQfp16")
    sq.add(ids, x)
    vi.index = sq.index
    assert vi.kind == "flat" and vi.uses_pq
